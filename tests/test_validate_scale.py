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
from siliconvert.format import entry as format_entry
from siliconvert.recipe import Gates
from siliconvert.validate import gates as gate_checks
from siliconvert.validate.metrics import compare
from siliconvert.validate.report import artifact_entry
from siliconvert.validate.runners.mlx import DequantizedMLXRunner, MLXRunner, choose_engine
from siliconvert.validate.score import (
    run_artifact,
    score,
)

MISTRAL_7B = {
    "model_type": "mistral", "architectures": ["MistralForCausalLM"], "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "vocab_size": 32000, "rms_norm_eps": 1e-5, "rope_theta": 1e6, "tie_word_embeddings": False,
}


def test_auto_engine_stands_in_for_mlx_only_where_its_cpu_is_too_slow(tmp_path):
    assert mx.default_device().type == mx.cpu  # these machines: mlx's CPU backend
    demo = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 8,
            "num_key_value_heads": 4, "vocab_size": 4096}
    # a 135M Llama (SmolLM's shape) and a 0.5B Qwen2 (Qwen2.5-0.5B's): mlx scores both, dequantized; a 7B only
    # through torch
    llama_135m = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                  "num_key_value_heads": 3, "vocab_size": 49152}
    qwen_05b = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
                "num_key_value_heads": 2, "vocab_size": 151936}
    four_bit = {"quantization": {"group_size": 64, "bits": 4}}
    cases = {
        "7b-4bit": MISTRAL_7B | four_bit,
        "7b-fp16": MISTRAL_7B,
        "demo-4bit": MISTRAL_7B | demo | four_bit,
        "demo-bf16": MISTRAL_7B | demo | {"dtype": "bfloat16"},
        "135m-4bit": MISTRAL_7B | llama_135m | four_bit,
        "0.5b-4bit": MISTRAL_7B | qwen_05b | four_bit,
    }
    # the 7B folders' weights as sparse files of their size: mlx-lm would hold them dequantized (and widened to
    # float32 where torch's BLAS takes mlx's products), more than these machines have
    weights = {"7b-4bit": 4_070_000_000, "7b-fp16": 14_480_000_000}
    engines = {}
    for name, config in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        with open(tmp_path / name / "weights-sized.bin", "wb") as shard:  # no header to read: not a shard
            shard.truncate(weights.get(name, 0))
        engines[name] = choose_engine(tmp_path / name, {})
    # a bfloat16 folder runs with mlx's own kernels only where its float layers are not widened (no torch BLAS)
    assert engines == {"7b-4bit": "torch", "7b-fp16": "torch", "demo-4bit": "mlx-dequantized",
                       "demo-bf16": "mlx-dequantized", "135m-4bit": "mlx-dequantized", "0.5b-4bit": "mlx-dequantized"}
    assert choose_engine(tmp_path / "7b-4bit", {"engine": "mlx"}) == "mlx"
    assert choose_engine(tmp_path / "demo-4bit", {"engine": "mlx"}) == "mlx"
    assert choose_engine(tmp_path / "demo-4bit", {"engine": "torch"}) == "torch"
    from siliconvert.errors import ArtifactError

    with pytest.raises(ArtifactError, match="engine"):
        choose_engine(tmp_path / "demo-4bit", {"engine": "cuda"})
    with pytest.raises(ArtifactError, match="option"):
        choose_engine(tmp_path / "demo-4bit", {"engin": "torch"})


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
                                 "mean_kld": None, "same_top1": None, "decode_kld": None, "no_cache_kld": None,
                                 "excess_kld": None, "limit_kld": None}


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
