"""GPTQ for mlx's affine layout: mlx's own packing, rows independent, a smaller output error than rounding to
nearest on correlated inputs; and end to end, an MLX folder mlx_lm.load opens whose KLD is below rounding's."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import build_mlx

from siliconvert.quantize.gptq import gptq_quantize, pack


def correlated(rows: int = 96, columns: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A weight and the second moments of inputs whose columns are correlated and of unequal scales, as a
    layer's are."""
    rng = np.random.default_rng(seed)
    mixing = np.eye(columns) + 0.1 * rng.normal(size=(columns, columns))
    x = rng.normal(size=(2048, columns)) @ mixing * np.exp(rng.normal(size=columns))
    return (0.05 * rng.normal(size=(rows, columns))).astype(np.float32), x.T @ x / len(x)


def output_error(weight: np.ndarray, hessian: np.ndarray, arrays: dict[str, mx.array], bits: int) -> float:
    rounded = mx.dequantize(arrays["weight"], arrays["scales"], arrays["biases"], group_size=64, bits=bits)
    delta = weight - np.asarray(rounded.astype(mx.float32))
    return float(np.einsum("ij,jk,ik->", delta, hessian, delta))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_packing_is_mlxs(bits):
    weight = mx.random.normal((4, 128), key=mx.random.key(bits))
    packed, scales, biases = mx.quantize(weight, 64, bits)
    steps = np.asarray(mx.dequantize(packed, scales, biases, group_size=64, bits=bits))
    q = np.rint((steps - np.repeat(np.asarray(biases), 64, 1)) / np.repeat(np.asarray(scales), 64, 1))
    assert np.array_equal(pack(q.astype(np.uint32), bits), np.asarray(packed))


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_beats_rounding_to_nearest_on_the_layers_output(bits):
    weight, hessian = correlated()
    nearest = dict(zip(("weight", "scales", "biases"), mx.quantize(mx.array(weight).astype(mx.float16), 64, bits),
                       strict=True))
    ours = gptq_quantize(weight, hessian, bits, 64)
    assert ours["weight"].shape == nearest["weight"].shape and ours["scales"].dtype == mx.float16
    assert output_error(weight, hessian, ours, bits) < 0.6 * output_error(weight, hessian, nearest, bits)


def test_rows_are_independent():
    """The writer converts a big tensor a block of rows at a time: the blocks must give the whole's arrays."""
    weight, hessian = correlated(rows=64)
    whole = gptq_quantize(weight, hessian, 4, 64, mx.bfloat16)
    halves = [gptq_quantize(weight[rows], hessian, 4, 64, mx.bfloat16) for rows in (slice(0, 40), slice(40, None))]
    for key in whole:
        assert mx.array_equal(whole[key], mx.concatenate([half[key] for half in halves])), key


@pytest.mark.slow
def test_an_mlx_folder_by_gptq_scores_better_than_rounding(small_model, tmp_path):
    from conftest import reference_logits_for
    from test_mlx import held_out_windows
    from test_mlx_bits import mean_kld

    llama = small_model("llama", "sentencepiece", rope_theta=50000.0)
    windows = held_out_windows(llama)
    reference = (windows, reference_logits_for(llama, windows))
    klds = {method: mean_kld(build_mlx(llama, tmp_path / method, bits=3, method=method).path, reference)
            for method in ("rtn", "gptq")}  # mlx_lm.load opens both
    assert klds["gptq"] < 0.8 * klds["rtn"]
