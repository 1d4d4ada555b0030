"""The MIL interpreter's ops against numpy on tiny arrays: float16 inputs computed in float32, the stable topk,
1×1 convolutions as products, grouped ones against torch, blockwise dequantization, palettized weights against
coremltools' own decompression, quantize / dequantize against coremltools' own value inference, and the forms it
refuses."""

from __future__ import annotations

import numpy as np
import pytest

from siliconvert.validate.runners.mil.ops import OPS, Unsupported


def test_binary_ops_compute_float16_in_float32():
    x = np.array([60000.0], np.float16)
    assert OPS["add"](x, x).dtype == np.float32 and OPS["add"](x, x)[0] == 120000.0  # past fp16's range
    assert OPS["less"](np.array([1, 3]), np.array([2, 2])).tolist() == [True, False]


def test_softmax_is_stable_and_sums_to_one():
    probabilities = OPS["softmax"](np.array([[1000.0, 1000.0, -1000.0]], np.float32), axis=-1)
    np.testing.assert_allclose(probabilities, [[0.5, 0.5, 0.0]])


def test_topk_keeps_the_lower_index_of_equal_values():
    values, indices = OPS["topk"](np.array([[1.0, 3.0, 3.0, 2.0]], np.float16), k=2, axis=-1)
    assert indices.tolist() == [[1, 2]] and values.tolist() == [[3.0, 3.0]]
    with pytest.raises(Unsupported, match="without indices"):
        OPS["topk"](np.zeros((1, 2)), return_indices=False)


def test_gather_refuses_indices_out_of_range():
    x = np.arange(6).reshape(3, 2)
    assert OPS["gather"](x, np.array([2, 0]), axis=0).tolist() == [[4, 5], [0, 1]]
    with pytest.raises(Unsupported, match="out of range"):
        OPS["gather"](x, np.array([-1]), axis=0)


def test_one_hot_puts_the_new_axis_where_asked():
    hot = OPS["one_hot"](np.array([2, 0]), one_hot_vector_size=3, axis=0)
    assert hot.tolist() == [[0, 1], [0, 0], [1, 0]]


def test_a_1x1_conv_is_a_matrix_product():
    rng = np.random.default_rng(0)
    x, weight, bias = rng.normal(size=(1, 4, 1, 5)), rng.normal(size=(3, 4, 1, 1)), rng.normal(size=3)
    expected = np.einsum("oi,nis->nos", weight[:, :, 0, 0], x[:, :, 0, :])[:, :, None, :] + bias[:, None, None]
    np.testing.assert_allclose(OPS["conv"](x, weight, bias), expected, rtol=1e-6)


def test_a_depthwise_conv_matches_torch_and_padded_or_strided_ones_are_refused():
    """A short convolution's form: one filter of 3 taps per channel over the width, unpadded."""
    import torch

    rng = np.random.default_rng(0)
    x, weight, bias = rng.normal(size=(1, 4, 1, 7)), rng.normal(size=(4, 1, 1, 3)), rng.normal(size=4)
    expected = torch.nn.functional.conv2d(torch.tensor(x), torch.tensor(weight), torch.tensor(bias), groups=4)
    np.testing.assert_allclose(OPS["conv"](x, weight, bias, groups=4), expected.numpy(), rtol=1e-5, atol=1e-6)
    grouped = rng.normal(size=(6, 2, 1, 2))  # 2 groups of 2 input channels → 3 outputs each
    expected = torch.nn.functional.conv2d(torch.tensor(x), torch.tensor(grouped), groups=2)
    np.testing.assert_allclose(OPS["conv"](x, grouped, groups=2), expected.numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(Unsupported, match="unpadded"):
        OPS["conv"](x, weight, groups=4, pad_type="same")
    with pytest.raises(Unsupported, match="strides"):
        OPS["conv"](x, weight, groups=4, strides=[1, 2])


def test_slice_by_size_takes_a_computed_begin_and_refuses_to_overrun():
    x = np.arange(10).reshape(2, 5)
    assert OPS["slice_by_size"](x, np.array([1, 3]), np.array([1, 2])).tolist() == [[8, 9]]
    assert OPS["slice_by_size"](x, np.array([0, 4]), np.array([-1, 1])).tolist() == [[4], [9]]
    with pytest.raises(Unsupported, match="out of"):
        OPS["slice_by_size"](x, np.array([0, 4]), np.array([1, 2]))


def test_slice_update_refuses_an_update_of_another_size():
    x = np.zeros((2, 4))
    updated = OPS["slice_update"](x, np.ones((2, 2)), begin=[0, 1], end=[2, 3])
    assert updated.sum() == 4 and updated[:, 1:3].all() and x.sum() == 0
    with pytest.raises(Unsupported, match="slice_update"):
        OPS["slice_update"](x, np.ones((2, 3)), begin=[0, 1], end=[2, 3])


def test_blockwise_shift_scale_dequantizes_each_block():
    data = np.array([[0, 1, 2, 3]], np.int8)
    scale = np.array([[0.5, 2.0]], np.float16)  # one scale per block of two columns
    offset = np.array([[0, 1]], np.int8)
    np.testing.assert_array_equal(OPS["constexpr_blockwise_shift_scale"](data, scale, offset), [[0, 0.5, 2, 4]])


def test_lut_to_dense_looks_each_index_up_in_its_groups_table():
    from coremltools.optimize._utils import lut_to_dense

    rng = np.random.default_rng(0)
    indices = rng.integers(0, 4, (8, 6, 1, 1)).astype(np.uint8)
    lut = rng.standard_normal((2, 1, 1, 1, 4, 1)).astype(np.float16)  # a table per 4 output channels
    dense = OPS["constexpr_lut_to_dense"](indices, lut)
    np.testing.assert_array_equal(dense, lut_to_dense(indices, lut, None))
    assert dense[5, 3, 0, 0] == lut[1, 0, 0, 0, indices[5, 3, 0, 0], 0]
    with pytest.raises(Unsupported, match="vector palettization"):
        OPS["constexpr_lut_to_dense"](indices, lut, vector_axis=0)


def test_exp_softplus_and_tile_match_numpy():
    """The gated delta rule's decay (exp, softplus) and its heads repeated (tile), computed in float32."""
    x = np.array([-100.0, -1.0, 0.0, 2.0, 30.0], np.float16)
    np.testing.assert_allclose(OPS["exp"](x), np.exp(x.astype(np.float32)), rtol=1e-6)
    np.testing.assert_allclose(OPS["softplus"](x), np.log1p(np.exp(x.astype(np.float64))), rtol=1e-6, atol=1e-30)
    assert OPS["softplus"](np.array([100.0], np.float32))[0] == 100.0  # no overflow on the way
    tiled = OPS["tile"](np.arange(4).reshape(2, 1, 2), reps=np.array([1, 3, 1]))
    assert tiled.shape == (2, 3, 2) and tiled[1].tolist() == [[2, 3]] * 3


def test_quantize_rounds_as_coremltools_value_inference_half_to_even_and_saturates():
    """The spec's clip(round(x / scale) + zero_point), as coremltools' iOS17 quantize op infers a const's value
    (optimize/_utils.py quantize_by_scale_and_zp on fp16 operands: the quotient in fp16, np.around, clipped to the
    dtype's range), for int8 and uint8, a scalar and a per-axis scale."""
    from coremltools.converters.mil.mil import types
    from coremltools.optimize._utils import quantize_by_scale_and_zp

    scale = np.float16(0.5)
    ties = np.array([0.25, 0.75, -0.25, -0.75, 1.25, 63.75, -64.25], np.float16)  # x / 0.5 = ±0.5, ±1.5, 2.5 …
    assert OPS["quantize"](ties, scale, "int8").tolist() == [0, 2, -0, -2, 2, 128 - 1, -128]  # half to even, clipped
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 8, 3)) * 40).astype(np.float16)
    for dtype, zero_point, axis, scale in [("int8", None, None, np.float16(0.37)),
                                           ("uint8", np.uint8(128), None, np.float16(0.21)),
                                           ("int8", np.array([1, -3, 0, 5, 7, -1, 2, 0], np.int8), 1,
                                            rng.uniform(0.1, 0.6, 8).astype(np.float16))]:
        ours = OPS["quantize"](x, scale, dtype, zero_point=zero_point, axis=axis).astype(dtype)
        shape = (1, -1, 1) if axis is not None else ()  # the op's broadcast of a per-axis parameter
        theirs = quantize_by_scale_and_zp(x, np.reshape(scale, shape),
                                          None if zero_point is None else np.reshape(zero_point, shape),
                                          types.string_to_builtin(dtype))
        np.testing.assert_array_equal(ours, theirs, err_msg=dtype)
        assert ours.min() == np.iinfo(dtype).min or ours.max() == np.iinfo(dtype).max  # some saturate
    with pytest.raises(Unsupported, match="int16"):
        OPS["quantize"](x, np.float16(1), "int16")


def test_dequantize_multiplies_in_float32():
    q = np.array([[-128, 0, 127]], np.int8)
    np.testing.assert_array_equal(OPS["dequantize"](q, np.float32(0.5)), [[-64.0, 0.0, 63.5]])
    np.testing.assert_array_equal(OPS["dequantize"](q.astype(np.uint8), np.float32(2.0), zero_point=np.uint8(128)),
                                  [[0.0, -256.0, -2.0]])
