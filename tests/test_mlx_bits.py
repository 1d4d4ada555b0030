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
    are the activations mlx-lm computes; left out, a fixed width keeps the source's type, as mlx-lm does."""
    def floats(artifact) -> set:
        weights = {}
        for shard in artifact.path.glob("model*.safetensors"):
            weights |= mx.load(str(shard))
        return {array.dtype for array in weights.values() if mx.issubdtype(array.dtype, mx.floating)}

    assert floats(build_mlx(llama, tmp_path / "source", bits=4)) == {mx.bfloat16}
    as_float16 = build_mlx(llama, tmp_path / "fp16", bits=4, dtype="float16")
    assert floats(as_float16) == {mx.float16}
    mlx_logits(as_float16.path, held_out_windows(llama))  # mlx_lm.load opens it and runs
