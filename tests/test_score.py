"""Scoring one artifact: the KV-cache check on a scripted model whose cache is broken in known ways (the gates and
the report take its verdict)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from siliconvert.artifacts import Artifact
from siliconvert.corpus import PROBE_STRINGS, Windows
from siliconvert.recipe import Gates
from siliconvert.validate import gates as gate_checks
from siliconvert.validate.report import artifact_entry, markdown
from siliconvert.validate.runners.base import Runner
from siliconvert.validate.score import (
    CACHE_CHECK_TOKENS,
    KV_CACHE_KLD_FACTOR,
    KV_CACHE_KLD_FLOOR,
    ArtifactScore,
    score,
)
from siliconvert.validate.tokenizer import Probe, TokenizerProbes


class ScriptedModel(Runner):
    """A small model in numpy with a working KV cache (the tokens fed so far). Each position's logits depend on
    every token before it (decaying with distance) and on the position itself, sharply, as a trained model's do;
    every fourth position has its top two tokens 0.05 apart, a near tie."""

    runtime, device = "scripted", "CPU (scripted)"
    vocab, width = 48, 16

    def __init__(self, path: Path | None = None, options: dict | None = None) -> None:
        rng = np.random.default_rng(0)
        self.embedding, self.head = rng.normal(size=(self.vocab, self.width)), rng.normal(size=(self.width, self.vocab))
        self.position = rng.normal(size=(512, self.width))
        self.fed: list[int] = []

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        state = np.zeros(self.width)
        rows = []
        for position, token in enumerate(tokens):
            state = 0.7 * state + self.embedding[token]
            row = (state + self.position[position]) @ self.head / 2
            if position % 4 == 1:
                runner_up, best = np.argsort(row)[-2:]
                row[runner_up] = row[best] - 0.05
            rows.append(row)
        return np.array(rows, np.float32)

    def tokenize(self, text: str) -> list[int]:
        return [ord(c) % self.vocab for c in text]

    def start(self, prompt: np.ndarray) -> np.ndarray:
        self.fed = [int(t) for t in prompt]
        return self.logits(np.array(self.fed))[-1]

    def step(self, token: int) -> np.ndarray:
        self.fed.append(int(token))
        return self.logits(np.array(self.fed))[-1]


class FaultyCache(Runner):
    """A working runner whose cached path has `fault`:
    "dropped": each step sees only its own token, as if the cache were lost;
    "stale": each step returns the step before's logits, as a cache read before its write would;
    "shifted": the first token fed is stored twice, so every later position is one off;
    "noise": Gaussian noise of standard deviation `scale` on each step's logits, as other decode kernels add;
    "tie-flips": where the top two tokens are within 0.1, the runner-up ends 0.05 ahead, as such rounding does;
    "none": no fault."""

    def __init__(self, runner: Runner, fault: str, scale: float = 0.0) -> None:
        self.runner, self.fault, self.scale = runner, fault, scale
        self.runtime, self.device = runner.runtime, runner.device
        self.rng = np.random.default_rng(1)

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        return self.runner.logits(tokens)

    def tokenize(self, text: str) -> list[int]:
        return self.runner.tokenize(text)

    def close(self) -> None:
        self.runner.close()

    def start(self, prompt: np.ndarray) -> np.ndarray:
        self.previous, self.steps = self.runner.start(prompt), 0
        return self.previous

    def step(self, token: int) -> np.ndarray:
        if self.fault == "dropped":
            return self.runner.start(np.array([token]))
        if self.fault == "shifted" and self.steps == 0:
            self.runner.step(token)
        self.steps += 1
        row = self.runner.step(token).copy()
        if self.fault == "stale":
            row, self.previous = self.previous, row
        elif self.fault == "noise":
            row += self.rng.normal(scale=self.scale, size=row.shape).astype(row.dtype)
        elif self.fault == "tie-flips":
            runner_up, best = np.argsort(row)[-2:]
            if row[best] - row[runner_up] < 0.1:
                row[runner_up] = row[best] + 0.05
        return row


def scripted_score(monkeypatch, fault: str, scale: float = 0.0) -> ArtifactScore:
    """The child's run of a FaultyCache(ScriptedModel) and the parent's score, against a reference that is the
    model's own logits with "quantization" noise of standard deviation 0.5."""
    from siliconvert.validate import score as scoring

    model = ScriptedModel()
    tokens = np.random.default_rng(2).integers(0, model.vocab, size=(2, 64))
    windows = Windows(tokens, "scripted", "digest", "held-out text")
    monkeypatch.setattr(scoring, "open_runner", lambda fmt, path, options: FaultyCache(model, fault, scale))
    artifact = Artifact("gguf", "Q4_K_M", Path("scripted.gguf"))
    probes = TokenizerProbes([Probe("fixed", text, model.tokenize(text), {}) for text in PROBE_STRINGS])
    run = scoring._child(artifact, "scripted", windows, (16, 4), probes.artifact_texts)
    no_cache = np.stack([model.logits(window) for window in tokens])
    reference = no_cache + np.random.default_rng(3).normal(scale=0.5, size=no_cache.shape).astype(np.float32)
    return score(artifact, run, reference, windows, probes)


@pytest.mark.parametrize(("fault", "scale"), [("none", 0.0), ("tie-flips", 0.0), ("noise", 0.05)])
def test_kv_cache_check_passes_a_cache_that_adds_less_than_quantization(monkeypatch, fault, scale):
    result = scripted_score(monkeypatch, fault, scale)
    kv = result.kv_cache
    assert kv["checked_tokens"] == 1 + CACHE_CHECK_TOKENS and kv["consistent"] is True
    # the check's yardstick: KV_CACHE_KLD_FACTOR times the quantization KLD at the checked positions (16..32)
    quantization = result.kld.reshape(2, 63)[0, 15:32].mean()
    assert kv["limit_kld"] == pytest.approx(KV_CACHE_KLD_FACTOR * quantization) and kv["limit_kld"] > KV_CACHE_KLD_FLOOR
    assert kv["mean_kld"] < kv["limit_kld"] / 5
    if fault == "none":
        assert kv["mean_kld"] == 0 and kv["same_top1"] == 1 and kv["first_mismatch"] is None
    if fault == "tie-flips":  # near ties at steps 2, 6, 10, 14 (positions 17, 21, ...) flip, harmlessly
        assert kv["first_mismatch"] == 2 and kv["same_top1"] == pytest.approx(13 / 17)
    assert gate_checks.check(result, Gates()) == []
    entry = artifact_entry(result, [], {})
    assert entry["kv_cache"] == kv and set(kv) == {"consistent", "checked_tokens", "first_mismatch", "mean_kld",
                                                   "limit_kld", "same_top1"}
    text = markdown(report_with(entry), plot_name=None)
    assert f"| consistent: mean KLD {kv['mean_kld']:.2g} over 17 steps, limit {kv['limit_kld']:.2g} (" in text


@pytest.mark.parametrize(("fault", "scale"), [("dropped", 0.0), ("stale", 0.0), ("shifted", 0.0), ("noise", 1.0)])
def test_kv_cache_check_fails_a_broken_cache(monkeypatch, fault, scale):
    result = scripted_score(monkeypatch, fault, scale)
    kv = result.kv_cache
    assert kv["consistent"] is False and kv["mean_kld"] > 2 * kv["limit_kld"]
    assert kv["first_mismatch"] is not None and kv["same_top1"] < 1
    (failure,) = gate_checks.check(result, Gates())
    assert (failure.metric, failure.value, failure.limit) == ("kv_cache", kv["mean_kld"], kv["limit_kld"])
    assert failure.message == (
        f"gguf Q4_K_M: decoding through the KV cache drifts from the no-cache pass: mean KLD {kv['mean_kld']:.2g} "
        f"over 17 steps, limit {kv['limit_kld']:.2g} (first different token at step {kv['first_mismatch']})")
    entry = artifact_entry(result, [failure], {})
    text = markdown(report_with(entry), plot_name=None)
    assert f"| DRIFTS: mean KLD {kv['mean_kld']:.2g} over 17 steps" in text and failure.message in text


def report_with(entry: dict) -> dict:
    return {"source": "x", "source_info": {"name": "x", "architecture": "MistralForCausalLM"},
            "reference": {"runtime": "transformers", "device": "CPU", "dtype": "float32"},
            "corpus": {"name": "scripted", "positions": 126, "windows": 2, "context": 64}, "artifacts": [entry]}
