"""Validation at 7B scale: the MLX stand-in (its weights in torch), runners' logits_many, and checks a
runner cannot make shown as not measured, never as passed."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from conftest import build_mlx
from mlx.utils import tree_map

from siliconvert.artifacts import Artifact
from siliconvert.checkpoint import Checkpoint
from siliconvert.recipe import Gates
from siliconvert.validate import gates as gate_checks
from siliconvert.validate.metrics import compare
from siliconvert.validate.report import artifact_entry, markdown
from siliconvert.validate.runners.mlx import DequantizedMLXRunner, MLXRunner, choose_engine
from siliconvert.validate.score import run_artifact, score

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
    from siliconvert.validate.corpus import PROBE_STRINGS, source_tokenizer, token_windows
    from siliconvert.validate.reference import reference_logits

    source = small_model("llama", "sentencepiece", rope_theta=50000.0)
    artifact = build_mlx(source, tmp_path, bits=4)
    stand_in = Artifact(artifact.format, artifact.quant, artifact.path, {"engine": "torch"})
    tokenizer = source_tokenizer(source)
    windows = token_windows(tokenizer, "builtin", 256, 128)
    reference, _ = reference_logits(Checkpoint.open(source), windows, tmp_path / "cache")
    run = run_artifact(stand_in, windows, latency=(64, 8))
    assert run.kv_cache["consistent"] is None and run.latency is None
    assert set(run.unmeasured) == {"kv_cache", "latency"} and run.peak_rss_mb > 0
    probe_ids = [tokenizer.encode(t, add_special_tokens=False) for t in (*PROBE_STRINGS, windows.probe_text)]
    result = score(stand_in, run, reference, windows, probe_ids)
    assert result.tokenizer_match and result.scores.mean_kld < 0.05
    assert gate_checks.check(result, Gates()) == []
    entry = artifact_entry(result, [], {})
    assert entry["not_measured"] == run.unmeasured and entry["latency"] is None


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


class ScriptedRunner:
    """Logits from a table: position p of a sequence scores token (p * 7) % vocab highest; `broken_at` makes
    the cached path pick another token from that step on, as a cache that loses a write would."""

    vocab = 50

    def __init__(self, broken_at: int | None = None):
        self.broken_at = broken_at

    def row(self, position: int, cached_step: int | None = None) -> np.ndarray:
        row = np.zeros(self.vocab, np.float32)
        best = (position * 7) % self.vocab
        if cached_step is not None and self.broken_at is not None and cached_step >= self.broken_at:
            best = (best + 1) % self.vocab
        row[best] = 5.0
        return row

    def cached_logits(self, prompt: np.ndarray, continuation: np.ndarray) -> np.ndarray:
        return np.stack([self.row(len(prompt) - 1 + i, i) for i in range(1 + len(continuation))])


@pytest.mark.parametrize("broken_at", [None, 0, 5])
def test_kv_cache_check_compares_every_cached_step_with_the_scoring_pass(broken_at):
    from siliconvert.validate.score import CACHE_CHECK_TOKENS, _kv_cache_check

    runner = ScriptedRunner(broken_at)
    window = np.arange(64)
    no_cache = np.stack([runner.row(p) for p in range(len(window))])
    result = _kv_cache_check(runner, window, no_cache)
    assert result["checked_tokens"] == 1 + CACHE_CHECK_TOKENS
    assert result["consistent"] is (broken_at is None)
    assert result["first_mismatch"] == broken_at
