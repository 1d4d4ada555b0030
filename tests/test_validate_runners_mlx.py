"""The MLX runner's engines on mlx's CPU: a quantized folder run by mlx-lm with its quantized layers swapped for
float layers of the same weights (engine "mlx-dequantized", the default there), against mlx's own quantized
kernels and against the same weights in float32; experts held in float32 where mlx's CPU needs them so."""

import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import build_mlx
from mlx.utils import tree_map
from mlx_lm import load
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchGLU, SwitchLinear
from test_moe import TINY, save_tiny

from siliconvert import mlx_blas
from siliconvert.validate.metrics import compare
from siliconvert.validate.runners import mlx as mlx_runner
from siliconvert.validate.runners.mlx import (
    MLXRunner,
    WidenedEmbedding,
    WidenedExperts,
    WidenedLinear,
    choose_engine,
    dequantize_quantized_layers,
    keep_cuda_kernels,
)


def mean_kld(expected: np.ndarray, logits: np.ndarray, windows: np.ndarray) -> float:
    vocab = expected.shape[-1]
    return compare(expected.reshape(-1, vocab), logits.reshape(-1, vocab), windows.reshape(-1))[0].mean_kld


def mlx_lm_logits(path, windows, float32: bool = False) -> np.ndarray:
    """mlx-lm's own run of the folder, quantized kernels and all; with `float32`, its quantized layers dequantized
    into float32 and every float parameter widened, so the whole forward is float32."""
    model, _ = load(str(path))
    if float32:
        dequantize_quantized_layers(model)
        model.update(tree_map(lambda p: p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p,
                              model.parameters()))
    return np.stack([np.array(model(mx.array(w)[None])[0].astype(mx.float32)) for w in windows])


@pytest.fixture(scope="module")
def demo_4bit(demo_model, tmp_path_factory):
    """The demo's 4-bit folder in the source's bfloat16 (as mlx_lm.convert makes it)."""
    return build_mlx(demo_model, tmp_path_factory.mktemp("mlx"), bits=4, group_size=64, dtype="bfloat16").path


def test_auto_runs_a_quantized_folder_dequantized_by_mlx_in_its_own_float_type(demo_4bit):
    assert mx.default_device().type == mx.cpu  # these machines: mlx's CPU backend
    assert choose_engine(demo_4bit, {}) == "mlx-dequantized"
    runner = MLXRunner(demo_4bit, {})
    assert runner.runtime == "mlx"
    assert runner.device == ("CPU (mlx), weights dequantized by mlx to bfloat16 (mlx's CPU has no fast quantized "
                             "kernels), float layers multiplied in float32 through torch's BLAS and rounded to "
                             "bfloat16 once, as mlx's GPU kernels sum")
    modules = [module for _, module in runner.model.named_modules()]
    assert not any(isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for module in modules)
    linears = [module for module in modules if isinstance(module, nn.Linear)]
    assert linears and all(module.weight.dtype == mx.bfloat16 for module in linears)
    # the bfloat16 weights are mx.dequantize's float32 values, exactly: no rounding is added by holding them so
    plain, _ = load(str(demo_4bit))
    quantized = plain.model.layers[0].mlp.down_proj
    exact = mx.dequantize(quantized.weight, quantized.scales, quantized.biases, quantized.group_size, quantized.bits,
                          dtype=mx.float32)
    assert mx.array_equal(runner.model.model.layers[0].mlp.down_proj.weight.astype(mx.float32), exact).item()


def test_the_compute_type_named_is_the_folders(demo_model, tmp_path):
    folder = build_mlx(demo_model, tmp_path, bits=4, group_size=64, dtype="float16").path
    runner = MLXRunner(folder, {})
    assert "weights dequantized by mlx to float16" in runner.device
    assert runner.model.model.layers[0].self_attn.q_proj.weight.dtype == mx.float16


def test_dequantized_engine_computes_what_mlx_computes(demo_4bit):
    """Measured on the demo's 4-bit folder, 2 windows of 64 tokens: the dequantized run is mean KLD 3.4e-5 from
    the same weights in float32 (bfloat16 activations, products summed in float32 as mlx's GPU kernels sum them);
    mlx's CPU quantized kernel sums in bfloat16 (mlx 0.32.4's `_qmm_t`) and is 2.2e-3 from both."""
    windows = np.random.default_rng(0).integers(0, 4096, size=(2, 64))
    dequantized = MLXRunner(demo_4bit, {"engine": "mlx-dequantized"}).logits_many(windows)
    float32 = mlx_lm_logits(demo_4bit, windows, float32=True)
    quantized = MLXRunner(demo_4bit, {"engine": "mlx"}).logits_many(windows)
    assert mean_kld(float32, dequantized, windows) < 2e-4
    assert mean_kld(float32, quantized, windows) < 1e-2
    assert mean_kld(quantized, dequantized, windows) < 1e-2
    assert np.array_equal(quantized, mlx_lm_logits(demo_4bit, windows))  # engine "mlx" is mlx-lm's run, untouched


def test_widened_layers_compute_what_mlx_computes(demo_model, demo_4bit, tmp_path, monkeypatch):
    """With torch's BLAS taking mlx's float32 products (these machines), every float layer multiplies in float32 and
    rounds once: the function mlx's own 16-bit kernels compute, summed in another order. Measured on the demo's 4-bit
    folder and its bfloat16 folder (tied embedding, so the head is the embedding's `as_linear`), 2 windows of 64
    tokens: mean KLD 2e-6 and 5e-6 from mlx's own kernels on the same (dequantized) weights."""
    assert mlx_blas.blas == mlx_blas.TORCH_BLAS
    windows = np.random.default_rng(2).integers(0, 4096, size=(2, 64))
    floats = build_mlx(demo_model, tmp_path, bits=16, dtype="bfloat16").path
    for folder in (demo_4bit, floats):
        widened = MLXRunner(folder, {})
        modules = [module for _, module in widened.model.named_modules()]
        assert not any(type(module) in (nn.Linear, nn.Embedding) for module in modules)
        assert any(isinstance(module, WidenedLinear) for module in modules)
        assert isinstance(widened.model.model.embed_tokens, WidenedEmbedding)
        assert widened.model.model.embed_tokens.weight.dtype == mx.bfloat16  # the compute type mlx-lm reads
        with monkeypatch.context() as patched:
            patched.setattr(mlx_runner, "widens", lambda: False)
            own = MLXRunner(folder, {"engine": "mlx-dequantized"})
        assert "float layers multiplied in float32" not in own.device
        logits, expected = widened.logits_many(windows), own.logits_many(windows)
        assert mean_kld(expected, logits, windows) < 5e-5
        assert not np.array_equal(expected, logits)  # the widened layers ran, not mlx's own kernels


def test_a_widened_layer_rounds_once_and_keeps_its_bias():
    linear = nn.Linear(48, 24, bias=True)
    linear.update(tree_map(lambda p: p.astype(mx.bfloat16), linear.parameters()))
    x = mx.random.normal((5, 48)).astype(mx.bfloat16)
    exact = (x.astype(mx.float32) @ linear.weight.astype(mx.float32).T + linear.bias.astype(mx.float32))
    out = WidenedLinear(linear)(x)
    assert out.dtype == mx.bfloat16
    # the float32 result rounded once, up to the order of its sum (which may move a rounding here and there)
    assert (out == exact.astype(mx.bfloat16)).astype(mx.float32).mean().item() > 0.95
    rounded_sum = (x @ linear.weight.T + linear.bias).astype(mx.float32)  # bfloat16 sums, for contrast
    assert (rounded_sum == exact.astype(mx.bfloat16).astype(mx.float32)).astype(mx.float32).mean().item() < 0.95


def test_dequantized_engine_decodes_through_mlx_lms_cache(demo_4bit):
    runner = MLXRunner(demo_4bit, {})
    tokens = np.random.default_rng(1).integers(0, 4096, size=40)
    cached = runner.cached_logits(tokens[:24], tokens[24:])
    whole = runner.logits(tokens)[23:]
    assert cached.shape == whole.shape
    assert mean_kld(whole[:-1], cached[:-1], tokens[24:]) < 1e-3


def test_quantized_experts_run_dequantized_and_widened(tmp_path):
    """Quantized experts become float32 stacks (mlx's CPU gathers experts in float32 only), the rest of the model
    stays in its float type; the experts chosen are recorded as with mlx's own kernels."""
    source = save_tiny(tmp_path / "source", "qwen3_moe", num_hidden_layers=2, num_experts=4, num_experts_per_tok=2,
                       hidden_size=64, head_dim=16, moe_intermediate_size=64, intermediate_size=128)
    # dtype set: the toy word-level tokenizer gives no calibration tokens for the float type to be measured on
    artifact = build_mlx(source, tmp_path / "mlx", bits=8, group_size=64, dtype="bfloat16").path
    runner = MLXRunner(artifact, {})
    assert runner.device.startswith("CPU (mlx), weights dequantized by mlx to ")
    assert ", experts in float32 (mlx's CPU gathers experts in float32 only)" in runner.device
    modules = [module for _, module in runner.model.named_modules()]
    assert any(isinstance(module, WidenedExperts) for module in modules)
    assert not any(isinstance(module, (QuantizedSwitchLinear, SwitchLinear)) for module in modules)
    assert any(isinstance(module, SwitchGLU) for module in modules)
    windows = np.random.default_rng(0).integers(0, TINY["vocab_size"], size=(2, 24))
    logits = runner.logits_many(windows)
    assert runner.expert_choices().shape == (2, 24, 2, 2)
    float32 = mlx_lm_logits(artifact, windows, float32=True)
    assert mean_kld(float32, logits, windows) < 1e-3


def test_a_gated_delta_folder_runs_in_mlx_however_slow(family_model, tmp_path, monkeypatch):
    """The torch stand-in reads weights as transformers' own: a Qwen3.5 folder (norms stored as 1 + w, names under
    language_model.) would run there as another function. `auto` keeps it in mlx even where mlx's CPU would take
    longer than the limit; asked for by name, the stand-in refuses it."""
    from siliconvert.errors import ArtifactError
    from siliconvert.validate.runners import mlx as mlx_runner

    path = build_mlx(family_model("qwen3_5_text"), tmp_path, bits=16).path
    llama = build_mlx(save_tiny(tmp_path / "llama", "llama", intermediate_size=64), tmp_path / "llama-mlx",
                      bits=16).path
    monkeypatch.setattr(mlx_runner, "MAX_CPU_SECONDS", 0)
    assert choose_engine(llama, {}) == "torch"  # where the stand-in can, it takes over beyond the limit
    assert choose_engine(path, {}) != "torch"
    with pytest.raises(ArtifactError, match="stores its norms as 1 \\+ w"):
        MLXRunner(path, {"engine": "torch"})


def test_a_folder_too_big_to_hold_dequantized_is_run_by_the_stand_in(tmp_path, monkeypatch):
    """mlx-lm holds the whole model, dequantized and widened (a 7B 4-bit folder: 4 + 14 + 28 GB); the stand-in reads
    a layer at a time. `auto` hands over where the held bytes exceed half the memory free."""
    llama = build_mlx(save_tiny(tmp_path / "llama", "llama", intermediate_size=64), tmp_path / "llama-mlx",
                      bits=4, group_size=32).path
    assert choose_engine(llama, {}) == "mlx-dequantized"
    from siliconvert.format import artifact_bytes

    held = mlx_runner.held_bytes(llama, {"quantization": {"bits": 4}})
    assert held == artifact_bytes(llama) * (1 + 4 + 8)  # the packed 4 bits, 16 dequantized and 32 widened
    monkeypatch.setattr(mlx_runner, "available_host_bytes", lambda: 2 * held - 1)
    assert choose_engine(llama, {}) == "torch"
    monkeypatch.setattr(mlx_runner, "available_host_bytes", lambda: 2 * held)
    assert choose_engine(llama, {}) == "mlx-dequantized"


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["mlx", "torch"])
def test_a_folder_runs_only_a_model_file_siliconvert_ships(engine, family_model, tmp_path):
    """mlx_lm.load runs config.json's model_file only with trust_remote_code=True: the runner passes it for
    siliconvert's own file (`model_file: faithful`), byte for byte, and refuses any other file before running it."""
    import json

    from siliconvert.errors import ArtifactError

    folder = build_mlx(family_model("gemma2"), tmp_path, bits=16, model_file="faithful").path
    assert MLXRunner(folder, {"engine": engine}).logits(np.arange(8)).shape[0] == 8
    with (folder / "gemma2.py").open("a") as edited:
        edited.write("print('not what siliconvert wrote')\n")
    with pytest.raises(ArtifactError, match=r"gemma2\.py is not the one this siliconvert ships"):
        MLXRunner(folder, {"engine": engine})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"model_file": "custom.py"}))
    (folder / "custom.py").write_text((folder / "gemma2.py").read_text())
    with pytest.raises(ArtifactError, match=r"model_file 'custom\.py' is not one siliconvert ships"):
        MLXRunner(folder, {"engine": engine})


def test_a_gemma4_folder_runs_in_mlx_however_slow(family_model, tmp_path, monkeypatch):
    """mlx-lm's gemma4_text sizes its layers from keys (global_head_dim, kv-shared layers, per-layer inputs) that the
    stand-in's rebuilt transformers config would lose: `auto` keeps it in mlx, and the stand-in refuses it by name."""
    from siliconvert.errors import ArtifactError
    from siliconvert.validate.runners import mlx as mlx_runner

    path = build_mlx(family_model("gemma4_text"), tmp_path, bits=16).path
    monkeypatch.setattr(mlx_runner, "MAX_CPU_SECONDS", 0)
    assert choose_engine(path, {}) != "torch"
    with pytest.raises(ArtifactError, match="sizes its layers apart"):
        MLXRunner(path, {"engine": "torch"})


def test_cuda_kernels_are_kept_per_mlx_version_and_gpu_architecture(tmp_path, monkeypatch):
    """Compiled once per machine: in the siliconvert cache, not /tmp; a folder per architecture (mlx names its
    cubins by kernel and shape only); a folder the user set stands."""
    monkeypatch.setenv("SILICONVERT_CACHE", str(tmp_path))
    monkeypatch.setenv("MLX_PTX_CACHE_DIR", "set here to be restored")
    monkeypatch.delenv("MLX_PTX_CACHE_DIR")
    folder = keep_cuda_kernels("sm_90")
    assert folder == tmp_path / "mlx-cuda-kernels" / mx.__version__ / "sm_90"
    assert os.environ["MLX_PTX_CACHE_DIR"] == str(folder)
    monkeypatch.setenv("MLX_PTX_CACHE_DIR", str(tmp_path / "mine"))
    assert keep_cuda_kernels("sm_100") == tmp_path / "mine"
