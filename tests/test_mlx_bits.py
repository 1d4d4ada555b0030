"""Every bit width mlx quantizes (2, 3, 4, 5, 6, 8) and every group size (32, 64, 128) is a fixed MLX choice:
mlx_lm.load opens each folder, the weights are mlx-lm's own, and more bits cost less KLD."""

import mlx.core as mx
import pytest
from conftest import build_mlx, reference_logits_for
from test_mlx import held_out_windows, mlx_logits

from siliconvert.validate.metrics import compare

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llama(small_model):
    return small_model("llama", "sentencepiece", rope_theta=50000.0)


@pytest.fixture(scope="module")
def reference(llama):
    windows = held_out_windows(llama)
    return windows, reference_logits_for(llama, windows)


def mean_kld(path, reference) -> float:
    windows, logits = reference
    ours = mlx_logits(path, windows)
    return compare(logits[:, :-1].reshape(-1, logits.shape[-1]), ours[:, :-1].reshape(-1, ours.shape[-1]),
                   windows[:, 1:].reshape(-1))[0].mean_kld


def test_more_bits_cost_less(llama, reference, tmp_path):
    klds = {bits: mean_kld(build_mlx(llama, tmp_path / f"b{bits}", bits=bits, group_size=64).path, reference)
            for bits in (2, 3, 5, 6)}
    assert klds[2] > klds[3] > klds[5] > klds[6]
    assert klds[6] < 0.01


@pytest.mark.parametrize(("bits", "group_size"), [(3, 32), (6, 128)])
def test_weights_are_mx_quantize_at_that_width(llama, tmp_path, bits, group_size):
    artifact = build_mlx(llama, tmp_path / "out", bits=bits, group_size=group_size)
    weights = {}
    for shard in artifact.path.glob("model*.safetensors"):
        weights |= mx.load(str(shard))
    packed, scales = weights["model.layers.0.mlp.down_proj.weight"], weights["model.layers.0.mlp.down_proj.scales"]
    in_features = scales.shape[-1] * group_size
    assert packed.shape[-1] * 32 == in_features * bits  # uint32 words holding `bits` per weight
    assert artifact.path.name.endswith(f"-mlx-{bits}bit-g{group_size}")


def test_dtype_sets_the_float_type_of_scales_and_unquantized_arrays(llama, tmp_path):
    """`dtype` is mlx_lm.convert's --dtype: a bfloat16 source's scales, biases and norms are stored in it, and so
    are the activations mlx-lm computes; left out, a bfloat16 source whose calibrated residual stream leaves float16
    its headroom takes float16 (mlx-lm would keep bfloat16), and the artifact says why. A dtype the recipe sets is
    in the folder's name."""
    def floats(artifact) -> set:
        weights = {}
        for shard in artifact.path.glob("model*.safetensors"):
            weights |= mx.load(str(shard))
        return {array.dtype for array in weights.values() if mx.issubdtype(array.dtype, mx.floating)}

    default = build_mlx(llama, tmp_path / "default", bits=4)
    assert floats(default) == {mx.float16} and default.path.name.endswith("-mlx-4bit-g64")
    assert default.float_type["dtype"] == "float16"
    assert default.float_type["reason"].startswith("float16 for the source's bfloat16: the residual stream peaks at")
    as_bfloat16 = build_mlx(llama, tmp_path / "bf16", bits=4, dtype="bfloat16")
    assert floats(as_bfloat16) == {mx.bfloat16} and as_bfloat16.path.name.endswith("-mlx-4bit-g64-bf16")
    assert as_bfloat16.float_type == {"dtype": "bfloat16", "reason": "bfloat16, as the recipe's dtype asks"}
    mlx_logits(as_bfloat16.path, held_out_windows(llama))  # mlx_lm.load opens it and runs
    unquantized = build_mlx(llama, tmp_path / "fp32", bits=16, dtype="float32")
    assert floats(unquantized) == {mx.float32} and unquantized.path.name.endswith("-mlx-fp32")


def test_a_residual_stream_past_float16_keeps_the_sources_bfloat16(llama, tmp_path, monkeypatch):
    from siliconvert.calibration import Calibrations, FP16Range

    monkeypatch.setattr(Calibrations, "fp16_range", lambda self: FP16Range(70000.0, 0.5))
    kept = build_mlx(llama, tmp_path / "kept", bits=8)
    assert kept.float_type["dtype"] == "bfloat16" and "too near float16's limit" in kept.float_type["reason"]


def test_rows_no_multiple_of_the_group_size_take_a_smaller_group_or_stay_float_and_say_so(small_model, tmp_path):
    """Rows 160 wide (no multiple of 64) take group 32; rows 688 wide (no multiple of 32) stay in float; the reason
    names both. mlx_lm.convert leaves both in float without a word, so its "4-bit" of this model is float16."""
    import json

    from siliconvert.validate.runners.mlx import MLXRunner

    source = small_model("llama", "sentencepiece", hidden_size=160, intermediate_size=688, num_heads=5,
                         num_kv_heads=5, tie_word_embeddings=False, vocab_size=1100)
    artifact = build_mlx(source, tmp_path, bits=4, group_size=64)
    quantization = json.loads((artifact.path / "config.json").read_text())["quantization"]
    assert (quantization["bits"], quantization["group_size"]) == (4, 32)
    weights = {}
    for shard in artifact.path.glob("model*.safetensors"):
        weights |= mx.load(str(shard))
    assert "model.layers.0.self_attn.q_proj.scales" in weights and "model.layers.0.mlp.up_proj.scales" in weights
    assert "model.layers.0.mlp.down_proj.scales" not in weights  # 688 columns: no group of mlx's fits
    reason = artifact.float_type["reason"]
    assert "layers take group 32: their rows are no multiple of 64" in reason
    assert "2 layers stay unquantized, in that type: their rows (688 wide)" in reason
    windows = held_out_windows(source)
    reference = reference_logits_for(source, windows)
    ours = MLXRunner(artifact.path, {}).logits_many(windows)
    kld = compare(reference[:, :-1].reshape(-1, reference.shape[-1]), ours[:, :-1].reshape(-1, ours.shape[-1]),
                  windows[:, 1:].reshape(-1))[0].mean_kld
    assert 1e-6 < kld < 0.01  # quantized (float16 alone scores ~1e-7 here), and sound
