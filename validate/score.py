"""Run one artifact on its runtime, in a child process, and score it against the reference.

The child loads only that artifact's runtime, so a runtime that crashes (it happens with native
code) becomes a clear error here, and the peak memory it reports is the artifact's own.
"""

from __future__ import annotations

import contextlib
import resource
import sys
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

import numpy as np

from siliconvert.artifacts import Artifact
from siliconvert.children import child_pool
from siliconvert.corpus import Windows
from siliconvert.errors import ArtifactError
from siliconvert.validate.metrics import Scores, compare, per_position
from siliconvert.validate.router import RouterAgreement, router_agreement
from siliconvert.validate.runners import Latency, open_runner
from siliconvert.validate.runners.base import Runner
from siliconvert.validate.tokenizer import TokenizerCheck, TokenizerProbes, check_tokenizer

if TYPE_CHECKING:
    from siliconvert.validate.overlap import RunPhase

# Tokens fed one at a time through the model's state, each checked against the no-cache pass. The state is every
# layer's: the attention layers' KV caches and the recurrent state of the others (a hybrid's short convolutions);
# report.json keeps the name `kv_cache` for the check of all of them.
CACHE_CHECK_TOKENS = 16
# Two logits closer than this are a tie: a cache and a no-cache pass may break it differently.
TIE_MARGIN = 1e-3
# The cache is judged by what it computes, not by which kernels compute it. A runtime takes other kernels for a
# one-token decode than for a window (llama.cpp: other activation rounding and matmul paths), so a working cache never
# reproduces the no-cache pass exactly; what it must not do is move the artifact away from the reference. So both
# paths are scored against the reference at the same positions, and decoding may be worse than the no-cache pass
# (mean KLD to the reference over the checked steps) by at most FLOOR + FACTOR × the no-cache pass's own KLD there.
# Measured, llama.cpp on a real 135M Llama (SmolLM2-135M-Instruct, 4 windows × prompts of 64 and 128 tokens, 16 steps
# each): a working cache moved Q8_0 from its no-cache pass by KLD 0.002-0.005 (as much as Q8_0 moves it from the
# reference), yet decoding was -0.0009 to +0.0007 nats worse than the no-cache pass (limit about 0.002); Q4_K_M
# -0.005 to +0.005 (limit about 0.016); F16 0 to 1e-5 (limit 0.001). A broken cache moves it far more: on the demo
# model a dropped or stale cache 1.4 to 2.8 nats, one that stores a token twice 0.004 to 0.010; on the small LFM2
# (mlx-lm 8-bit, 3 short-conv layers) a conv state not advanced, one step stale or reset 0.17, 0.14 and 0.11 nats
# (mlx-lm's own: 0, its decode is its no-cache pass exactly).
KV_CACHE_KLD_FLOOR = 1e-3
KV_CACHE_KLD_FACTOR = 0.25


@dataclass(frozen=True)
class RunOutput:
    runtime: str
    device: str
    logits: np.ndarray  # [windows, context, vocab]
    probe_ids: list[list[int]]  # the artifact's ids for each of the tokenizer check's texts (artifact_texts)
    # Logits [1 + CACHE_CHECK_TOKENS, vocab] of the first window's tokens fed one at a time through the KV cache
    # after its first `cache_prompt` tokens (row i: position cache_prompt - 1 + i); None when the runner cannot
    # (the reason is in `unmeasured`). The parent judges them, where the reference is.
    cached_logits: np.ndarray | None
    cache_prompt: int
    latency: Latency | None  # None when not asked for, or not measurable (see `unmeasured`)
    unmeasured: dict[str, str]  # check ("kv_cache", "latency") → why this runner could not make it
    peak_rss_mb: float  # peak resident memory of the child over the whole run (logits, checks, timing)
    # The experts each sparse layer chose for each scored token (Runner.expert_choices); None: no experts, or
    # not measurable (`unmeasured["router"]`)
    expert_choices: np.ndarray | None = None
    quiet_wait_s: float = 0.0  # how long its latency runs waited for the other runs to go quiet (validate/overlap.py)


class KVCacheCheck(TypedDict):
    """Decoding through the KV cache against the no-cache pass (report.json's `kv_cache`). It is a check of every
    state the runtime carries from one token to the next: a hybrid's recurrent states (LFM2's conv states) too,
    which decoding goes through as it goes through the attention layers' cache."""

    consistent: bool | None  # None: not measured (the runner's `unmeasured` says why)
    checked_tokens: int  # steps compared: the prompt's last position, then each token fed through the cache
    first_mismatch: int | None  # first step whose top token differs beyond the tie margin
    mean_kld: float | None  # mean KL(no-cache ‖ cached) over the steps: how far the two paths differ
    same_top1: float | None  # fraction of steps whose top token agrees (ties within the margin agree)
    # each path against the reference at the same positions: mean KL(reference ‖ decoded) and KL(reference ‖ no-cache)
    decode_kld: float | None
    no_cache_kld: float | None
    excess_kld: float | None  # decode_kld - no_cache_kld: how much worse decoding is (negative: better)
    # the most excess_kld may be: KV_CACHE_KLD_FLOOR + FACTOR × no_cache_kld (reports made before decode_kld
    # existed bounded mean_kld with it)
    limit_kld: float | None


@dataclass(frozen=True)
class ArtifactScore:
    artifact: Artifact
    run: RunOutput
    scores: Scores
    kld: np.ndarray  # per scored position, for plots
    tokenizer_match: bool  # every probe text gives the source's ids
    tokenizer_mismatch: str | None  # where the first differing id is (unexplained first, else a known rule's)
    kv_cache: KVCacheCheck
    tokenizer: TokenizerCheck
    router: RouterAgreement | None = None  # a mixture of experts: the artifact's choices against the reference's


def run_artifact(artifact: Artifact, runner: str, windows: Windows, latency: tuple[int, int] | None,
                 probe_texts: list[str], phase: RunPhase | None = None) -> RunOutput:
    """Run `artifact` in a fresh process with `runner` ("module:Class", its format's); `latency` = (prefill
    tokens, decode tokens) or None; `probe_texts`: what the tokenizer check has the artifact tokenize
    (TokenizerProbes.artifact_texts); `phase`: the run's busy phase, when it overlaps others (validate/overlap.py):
    the child ends it once its logits are in, and times its latency in the quiet phase."""
    with child_pool(_keep_phase, (phase,)) as pool:
        future = pool.submit(_child, artifact, runner, windows, latency, probe_texts)
        try:
            return future.result()
        except BrokenProcessPool:
            raise ArtifactError(
                f"the {artifact.format} runtime crashed while running the artifact", artifact.path
            ) from None


def score(artifact: Artifact, run: RunOutput, reference: np.ndarray, windows: Windows, probes: TokenizerProbes,
          strict_tokenizer: bool = False, reference_choices: np.ndarray | None = None,
          sparse_layers: list[int] | None = None) -> ArtifactScore:
    """Compare a run's logits with the reference on the scored positions, and its token ids with the source's
    (`strict_tokenizer`: differences from known rules fail too); for a mixture of experts, its routers' choices
    with the reference's (`reference_choices` for `sparse_layers`)."""
    vocab = reference.shape[-1]
    logits = run.logits[..., :vocab]  # some formats pad the vocabulary; padded ids are never targets
    if run.logits.shape[:2] != reference.shape[:2]:
        raise ArtifactError(f"returned logits of shape {run.logits.shape}, expected {reference.shape}",
                            artifact.path)
    ref = reference[:, :-1].reshape(-1, vocab)
    art = logits[:, :-1].reshape(-1, vocab)
    scores, kld = compare(ref, art, windows.targets.reshape(-1))
    tokenizer = check_tokenizer(probes, run.probe_ids, strict_tokenizer)
    known = [k["example"] for k in tokenizer["known"].values()]
    mismatch = next(iter(tokenizer["differences"] + known), None)
    if run.cached_logits is None:
        kv_cache = KVCacheCheck(consistent=None, checked_tokens=0, first_mismatch=None, mean_kld=None,
                                same_top1=None, decode_kld=None, no_cache_kld=None, excess_kld=None, limit_kld=None)
    else:
        kv_cache = kv_cache_check(run.cached_logits[:, :vocab], run.cache_prompt, logits[0], reference[0],
                                  windows.targets[0])
    router = None
    if reference_choices is not None:
        router = router_agreement(reference_choices, run.expert_choices, sparse_layers or [],
                                  run.unmeasured.get("router"))
    return ArtifactScore(artifact, run, scores, kld, tokenizer["identical"] == tokenizer["probes"], mismatch,
                         kv_cache, tokenizer, router)


_phase: RunPhase | None = None  # in a child: its run's busy phase (multiprocessing objects come only at its start)


def _keep_phase(phase: RunPhase | None) -> None:
    global _phase
    _phase = phase


def _child(artifact: Artifact, runner_name: str, windows: Windows, latency: tuple[int, int] | None,
           probe_texts: list[str]) -> RunOutput:
    runner = open_runner(runner_name, artifact.path, artifact.runner_options)
    try:
        logits = runner.logits_many(windows.tokens)
        choices = runner.expert_choices()
        probe_ids = [runner.tokenize(text) for text in probe_texts]
        unmeasured = runner.unmeasured()
        cached, cache_prompt = ((None, 0) if "kv_cache" in unmeasured
                                else cached_window_logits(runner, windows.tokens[0]))
        if _phase is not None:
            _phase.done()
        timing = None
        if latency and "latency" not in unmeasured:
            prefill_tokens, decode_tokens = latency
            prompt = np.resize(windows.tokens.reshape(-1), prefill_tokens)
            with _phase.timing() if _phase is not None else contextlib.nullcontext():
                prefill_tps, decode_tps, ttft_ms = runner.latency(prompt, decode_tokens)
            timing = Latency(prefill_tps, decode_tps, ttft_ms, peak_rss_mb(), prefill_tokens, decode_tokens)
        return RunOutput(runner.runtime, runner.device, logits, probe_ids, cached, cache_prompt, timing,
                         unmeasured, peak_rss_mb(), choices, _phase.waited_s if _phase is not None else 0.0)
    finally:
        runner.close()


def cached_window_logits(runner: Runner, window: np.ndarray) -> tuple[np.ndarray, int]:
    """(logits, prompt length): a quarter of the window (at least 8 tokens) as the prompt, then up to
    CACHE_CHECK_TOKENS of the window's own tokens fed one at a time through the KV cache (teacher-forced: every
    runner does it in one go, also one that must load its packages anew for each pass). Every row is a scored
    position, so the scoring pass's logits and KLD at that position are the check's yardsticks."""
    prompt = min(max(8, len(window) // 4), len(window) - 1)
    continuation = window[prompt:len(window) - 1][:CACHE_CHECK_TOKENS]
    return runner.cached_logits(window[:prompt], continuation), prompt


def kv_cache_check(cached: np.ndarray, prompt: int, no_cache: np.ndarray, reference: np.ndarray,
                   targets: np.ndarray) -> KVCacheCheck:
    """Does decoding through the KV cache (and every other state the model carries) compute as well as the no-cache
    pass?

    `cached` [steps, vocab] from `cached_window_logits`; `no_cache` and `reference` [context, vocab] and `targets`
    [context - 1] for the same window. Neither top tokens nor the distance between the two paths is the test: a
    runtime's decode kernels round differently from its window kernels, which moves every distribution a little
    and flips near ties, harmlessly. The test is whether decoding lands further from the reference than the
    no-cache pass does, by more than that rounding explains (see KV_CACHE_KLD_FACTOR); a lost, stale or shifted
    cache, or a recurrent state not advanced, reset or one step stale, lands far further.
    """
    positions = slice(prompt - 1, prompt - 1 + len(cached))
    expected, steps = no_cache[positions], targets[positions]
    between = per_position(expected, cached, steps)["kld"]
    decode = float(per_position(reference[positions], cached, steps)["kld"].mean())
    without_cache = float(per_position(reference[positions], expected, steps)["kld"].mean())
    rows = np.arange(len(cached))
    best = expected.argmax(axis=-1)
    top = cached.max(axis=-1)
    agree = (cached.argmax(axis=-1) == best) | (top - cached[rows, best] <= TIE_MARGIN * np.maximum(1.0, np.abs(top)))
    excess = decode - without_cache
    limit = KV_CACHE_KLD_FLOOR + KV_CACHE_KLD_FACTOR * without_cache
    return KVCacheCheck(consistent=excess <= limit, checked_tokens=len(cached),
                        first_mismatch=None if agree.all() else int(np.argmin(agree)), mean_kld=float(between.mean()),
                        same_top1=float(agree.mean()), decode_kld=decode, no_cache_kld=without_cache,
                        excess_kld=excess, limit_kld=limit)


def describe_kv_cache(check: KVCacheCheck) -> str:
    """A measured check in words, e.g. "KLD to the reference 0.83 decoding, 0.004 without the cache (+0.83, limit
    0.002) over 17 steps; the two paths differ by KLD 0.83 (first different token at step 3)"."""
    first = check["first_mismatch"]
    tokens = "same token at every step" if first is None else f"first different token at step {first}"
    if check.get("decode_kld") is None:  # a report made before both paths were scored against the reference
        return (f"mean KLD {check['mean_kld']:.2g} over {check['checked_tokens']} steps, limit "
                f"{check['limit_kld']:.2g} ({tokens})")
    return (f"KLD to the reference {check['decode_kld']:.2g} decoding, {check['no_cache_kld']:.2g} without the cache "
            f"({check['excess_kld']:+.2g}, limit {check['limit_kld']:.2g}) over {check['checked_tokens']} steps; "
            f"the two paths differ by KLD {check['mean_kld']:.2g} ({tokens})")


def peak_rss_mb() -> float:
    """Peak resident memory of this process, in MB.

    On Linux ru_maxrss survives fork and exec, so a child would report its parent's peak when that is
    larger; /proc's VmHWM belongs to this process alone. macOS reports ru_maxrss in bytes.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def artifact_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
