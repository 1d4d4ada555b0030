"""Validation at 7B scale: the MLX stand-in (its weights in torch), runners' logits_many, and checks a
runner cannot make shown as not measured, never as passed."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import build_mlx
from mlx.utils import tree_map

from siliconvert.artifacts import Artifact
from siliconvert.checkpoint import Checkpoint
from siliconvert.corpus import PROBE_STRINGS, Windows
from siliconvert.format import entry as format_entry
from siliconvert.recipe import Gates
from siliconvert.validate import gates as gate_checks
from siliconvert.validate.metrics import compare
from siliconvert.validate.report import artifact_entry, markdown
from siliconvert.validate.runners.base import Runner
from siliconvert.validate.runners.mlx import DequantizedMLXRunner, MLXRunner, choose_engine
from siliconvert.validate.score import (
    CACHE_CHECK_TOKENS,
    KV_CACHE_KLD_FACTOR,
    KV_CACHE_KLD_FLOOR,
    ArtifactScore,
    run_artifact,
    score,
)
from siliconvert.validate.tokenizer import Probe, TokenizerProbes

MISTRAL_7B = {
    "model_type": "mistral", "architectures": ["MistralForCausalLM"], "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "vocab_size": 32000, "rms_norm_eps": 1e-5, "rope_theta": 1e6, "tie_word_embeddings": False,
}


def test_auto_engine_stands_in_for_mlx_only_where_its_cpu_is_too_slow(tmp_path):
    assert mx.default_device().type == mx.cpu  # these machines: mlx's CPU backend
    cases = {
        "7b-4bit": MISTRAL_7B | {"quantization": {"group_size": 64, "bits": 4}},
        "7b-fp16": MISTRAL_7B,
        "demo-4bit": MISTRAL_7B | {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
                                   "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 4096,
                                   "quantization": {"group_size": 64, "bits": 4}},
    }
    engines = {}
    for name, config in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        engines[name] = choose_engine(tmp_path / name, {})
    assert engines == {"7b-4bit": "torch", "7b-fp16": "torch", "demo-4bit": "mlx"}
    assert choose_engine(tmp_path / "7b-4bit", {"engine": "mlx"}) == "mlx"
    assert choose_engine(tmp_path / "demo-4bit", {"engine": "torch"}) == "torch"
    from siliconvert.errors import ArtifactError

    with pytest.raises(ArtifactError, match="engine"):
        choose_engine(tmp_path / "demo-4bit", {"engine": "cuda"})
    with pytest.raises(ArtifactError, match="option"):
        choose_engine(tmp_path / "demo-4bit", {"engin": "torch"})


def test_report_says_not_measured_with_the_reason():
    report = {
        "source": "x", "source_info": {"name": "x", "architecture": "MistralForCausalLM"},
        "reference": {"runtime": "transformers", "device": "CPU", "dtype": "float32", "method": "streamed",
                      "peak_rss_mb": 900.0, "wall_s": 12.5, "cached": False},
        "corpus": {"name": "builtin", "positions": 1020, "windows": 4, "context": 256},
        "artifacts": [{
            "format": "mlx", "quant": "4bit-g64", "size_bytes": 4e9, "runtime": "mlx weights in torch (dequantized)",
            "device": "CPU (emulated: mlx's CPU backend too slow at this size)", "tokenizer_match": True,
            "kv_cache": {"consistent": None, "checked_tokens": 0, "first_mismatch": None},
            "not_measured": {"kv_cache": "mlx did not run", "latency": "mlx did not run either"},
            "metrics": {"mean_kld": 0.01, "p99_kld": 0.1, "same_top1": 0.9, "ppl_ratio": 1.01, "rms_delta_p": 0.01},
            "latency": None, "gates": {"passed": True, "failed": [], "limits": {}},
        }],
    }
    text = markdown(report, plot_name=None)
    row = next(line for line in text.splitlines() if line.startswith("| mlx 4bit-g64"))
    assert row.count("not measured [1]") == 4 and "not measured [2]" in row and "consistent" not in row
    assert "[1] mlx 4bit-g64: latency not measured: mlx did not run either" in text
    assert "[2] mlx 4bit-g64: KV cache not measured: mlx did not run" in text
    assert "peak memory 900 MB; 12.5 s" in text


def mlx_logits(path, windows, float32: bool) -> np.ndarray:
    """mlx-lm's own run; with `float32`, every float parameter widened, so it computes in float32."""
    from mlx_lm import load

    model, _ = load(str(path))
    if float32:
        model.update(tree_map(lambda p: p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p,
                              model.parameters()))
    return np.stack([np.array(model(mx.array(w)[None])[0].astype(mx.float32)) for w in windows])


def mean_kld(reference: np.ndarray, logits: np.ndarray, windows: np.ndarray) -> float:
    vocab = reference.shape[-1]
    return compare(reference[:, :-1].reshape(-1, vocab), logits[:, :-1].reshape(-1, vocab),
                   windows[:, 1:].reshape(-1))[0].mean_kld


# family → tokenizer, overrides (shared with test_mlx.py), config.json changes after conversion
STAND_IN_CASES = {
    "llama": ("sentencepiece", {"rope_theta": 50000.0}, {}),
    "qwen2-tied": ("bpe", {"tie_word_embeddings": True}, {}),
    # mlx-lm reads no sliding window for Mistral (no layer_types): the stand-in must attend as mlx-lm does
    "mistral-windowed": ("sentencepiece", {"tie_word_embeddings": False}, {"sliding_window": 16}),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(STAND_IN_CASES))
def test_stand_in_computes_what_mlx_computes(small_model, tmp_path, case):
    tokenizer, overrides, config_changes = STAND_IN_CASES[case]
    source = small_model(case.split("-")[0], tokenizer, **overrides)
    artifact = build_mlx(source, tmp_path, bits=4)
    if config_changes:
        config_file = artifact.path / "config.json"
        config_file.write_text(json.dumps(json.loads(config_file.read_text()) | config_changes))
    windows = np.random.default_rng(0).integers(0, json.loads((source / "config.json").read_text())["vocab_size"],
                                                size=(2, 48))
    stand_in = MLXRunner(artifact.path, {"engine": "torch"})
    assert isinstance(stand_in, DequantizedMLXRunner)
    assert stand_in.runtime == "mlx weights in torch (dequantized)"
    assert stand_in.device.startswith("CPU (emulated: forced by the runner option engine=torch")
    logits = stand_in.logits_many(windows)
    # Same weights, same function: only float32 rounding apart from mlx computing in float32 ...
    assert mean_kld(mlx_logits(artifact.path, windows, float32=True), logits, windows) < 1e-4
    # ... while mlx's own bfloat16 arithmetic adds its rounding (about 2e-3 on the demo model).
    assert mean_kld(mlx_logits(artifact.path, windows, float32=False), logits, windows) < 1e-2
    assert stand_in.tokenize("Hello world") == MLXRunner(artifact.path, {"engine": "mlx"}).tokenize("Hello world")


@pytest.mark.slow
def test_unmeasured_checks_fail_no_gate_and_show_as_not_measured(small_model, tmp_path):
    from siliconvert.corpus import source_tokenizer, token_windows
    from siliconvert.validate.reference import reference_logits
    from siliconvert.validate.tokenizer import tokenizer_probes

    source = small_model("llama", "sentencepiece", rope_theta=50000.0)
    artifact = build_mlx(source, tmp_path, bits=4)
    stand_in = Artifact(artifact.format, artifact.quant, artifact.path, {"engine": "torch"})
    tokenizer = source_tokenizer(source)
    windows = token_windows(tokenizer, "builtin", 256, 128)
    reference, _ = reference_logits(Checkpoint.open(source), windows, tmp_path / "cache")
    probes = tokenizer_probes(tokenizer, windows.probe_text, stand_in.format)
    run = run_artifact(stand_in, format_entry(stand_in.format).runner, windows, (64, 8), probes.artifact_texts)
    assert run.cached_logits is None and run.latency is None
    assert set(run.unmeasured) == {"kv_cache", "latency"} and run.peak_rss_mb > 0
    result = score(stand_in, run, reference, windows, probes)
    assert result.tokenizer_match and result.scores.mean_kld < 0.05
    assert gate_checks.check(result, Gates()) == []
    entry = artifact_entry(result, [], {})
    assert entry["not_measured"] == run.unmeasured and entry["latency"] is None
    assert entry["kv_cache"] == {"consistent": None, "checked_tokens": 0, "first_mismatch": None,
                                 "mean_kld": None, "limit_kld": None, "same_top1": None}


@pytest.mark.slow
def test_stand_in_refuses_what_it_cannot_run_the_mlx_way(small_model, tmp_path):
    from siliconvert.errors import ArtifactError

    artifact = build_mlx(small_model("llama", "sentencepiece", rope_theta=50000.0), tmp_path, bits=4)
    traditional = tmp_path / "traditional"
    shutil.copytree(artifact.path, traditional)
    config = json.loads((traditional / "config.json").read_text())
    (traditional / "config.json").write_text(json.dumps(config | {"rope_traditional": True}))
    with pytest.raises(ArtifactError, match="rope_traditional"):
        MLXRunner(traditional, {"engine": "torch"})


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
    run = scoring._child(artifact, windows, (16, 4), probes.artifact_texts)
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
