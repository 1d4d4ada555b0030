"""Run one artifact on its runtime, in a child process, and score it against the reference.

The child loads only that artifact's runtime, so a runtime that crashes (it happens with native
code) becomes a clear error here, and the peak memory it reports is the artifact's own.
"""

from __future__ import annotations

import multiprocessing
import resource
import sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from siliconvert.artifacts import Artifact
from siliconvert.errors import ArtifactError
from siliconvert.validate.corpus import PROBE_STRINGS, Windows
from siliconvert.validate.metrics import Scores, compare
from siliconvert.validate.runners import Latency, open_runner

# Tokens fed one at a time through the KV cache, each checked against the no-cache pass.
CACHE_CHECK_TOKENS = 16
# Two logits closer than this are a tie: a cache and a no-cache pass may break it differently.
TIE_MARGIN = 1e-3


@dataclass(frozen=True)
class RunOutput:
    runtime: str
    device: str
    logits: np.ndarray  # [windows, context, vocab]
    probe_ids: list[list[int]]
    # {"consistent": bool, "checked_tokens": int, "first_mismatch": int | None}; "consistent" is None
    # when the check could not run (the reason is in `unmeasured`)
    kv_cache: dict
    latency: Latency | None  # None when not asked for, or not measurable (see `unmeasured`)
    unmeasured: dict[str, str]  # check ("kv_cache", "latency") → why this runner could not make it
    peak_rss_mb: float  # peak resident memory of the child over the whole run (logits, checks, timing)


@dataclass(frozen=True)
class ArtifactScore:
    artifact: Artifact
    run: RunOutput
    scores: Scores
    kld: np.ndarray  # per scored position, for plots
    tokenizer_match: bool
    tokenizer_mismatch: str | None  # where the first differing id is


def run_artifact(artifact: Artifact, windows: Windows, latency: tuple[int, int] | None) -> RunOutput:
    """Run `artifact` in a fresh process; `latency` = (prefill tokens, decode tokens) or None."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        future = pool.submit(_child, artifact, windows, latency)
        try:
            return future.result()
        except BrokenProcessPool:
            raise ArtifactError(
                f"the {artifact.format} runtime crashed while running the artifact", artifact.path
            ) from None


def score(artifact: Artifact, run: RunOutput, reference: np.ndarray, windows: Windows,
          source_probe_ids: list[list[int]]) -> ArtifactScore:
    """Compare a run's logits with the reference on the scored positions, and its token ids."""
    vocab = reference.shape[-1]
    logits = run.logits[..., :vocab]  # some formats pad the vocabulary; padded ids are never targets
    if run.logits.shape[:2] != reference.shape[:2]:
        raise ArtifactError(f"returned logits of shape {run.logits.shape}, expected {reference.shape}",
                            artifact.path)
    ref = reference[:, :-1].reshape(-1, vocab)
    art = logits[:, :-1].reshape(-1, vocab)
    scores, kld = compare(ref, art, windows.targets.reshape(-1))
    mismatch = first_token_mismatch(source_probe_ids, run.probe_ids)
    return ArtifactScore(artifact, run, scores, kld, mismatch is None, mismatch)


def first_token_mismatch(expected: list[list[int]], actual: list[list[int]]) -> str | None:
    """A one-line description of the first differing token id, or None when all agree."""
    probes = [*PROBE_STRINGS, "held-out text"]
    for text, want, got in zip(probes, expected, actual, strict=True):
        if want != got:
            pairs = enumerate(zip(want, got, strict=False))
            position = next((i for i, (a, b) in pairs if a != b), min(len(want), len(got)))
            return (f"{text[:24]!r}: token {position} is {got[position:position + 1]} "
                    f"but the source tokenizer gives {want[position:position + 1]}")
    return None


def _child(artifact: Artifact, windows: Windows, latency: tuple[int, int] | None) -> RunOutput:
    runner = open_runner(artifact.format, artifact.path, artifact.runner_options)
    try:
        logits = runner.logits_many(windows.tokens)
        probe_ids = [runner.tokenize(text) for text in (*PROBE_STRINGS, windows.probe_text)]
        unmeasured = runner.unmeasured()
        if "kv_cache" in unmeasured:
            kv_cache = {"consistent": None, "checked_tokens": 0, "first_mismatch": None}
        else:
            kv_cache = _kv_cache_check(runner, windows.tokens[0], logits[0])
        timing = None
        if latency and "latency" not in unmeasured:
            prefill_tokens, decode_tokens = latency
            prompt = np.resize(windows.tokens.reshape(-1), prefill_tokens)
            prefill_tps, decode_tps, ttft_ms = runner.latency(prompt, decode_tokens)
            timing = Latency(prefill_tps, decode_tps, ttft_ms, peak_rss_mb(), prefill_tokens, decode_tokens)
        return RunOutput(runner.runtime, runner.device, logits, probe_ids, kv_cache, timing, unmeasured,
                         peak_rss_mb())
    finally:
        runner.close()


def _kv_cache_check(runner, window: np.ndarray, no_cache: np.ndarray) -> dict:
    """Decoding through the KV cache must pick what the no-cache pass picks. The window's own tokens are fed
    one at a time after a prompt (teacher-forced: every runner does it in one go, also one that must load its
    packages anew for each pass), and each step's argmax is compared with the scoring pass's logits at that
    position, so no extra no-cache pass is needed."""
    prompt = max(8, len(window) // 4)
    continuation = window[prompt:prompt + CACHE_CHECK_TOKENS]
    cached = runner.cached_logits(window[:prompt], continuation)
    expected = no_cache[prompt - 1:prompt + len(continuation)]
    for i, (row, reference_row) in enumerate(zip(cached, expected, strict=True)):
        token = int(np.argmax(reference_row))
        if int(np.argmax(row)) != token and row.max() - row[token] > TIE_MARGIN * max(1.0, abs(row.max())):
            return {"consistent": False, "checked_tokens": len(cached), "first_mismatch": i}
    return {"consistent": True, "checked_tokens": len(cached), "first_mismatch": None}


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
