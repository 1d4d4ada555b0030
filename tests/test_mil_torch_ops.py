"""The MIL interpreter's torch kernels against its numpy ones, the reference: op by op, per family of ops, on
fp16 inputs as the program stores them, on the CPU and on CUDA where there is one. Results are compared once
stored in their declared type (fp16 for floats): equal, or one fp16 rounding apart where float32 sums in
another order land on the other side of a rounding boundary, or within 1e-6 of each other near zero, where a
formula cancels (gelu's tail: 1 + tanh(x) for very negative x, float32's tanh rounding differently)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from siliconvert.validate.runners.mil.ops import OPS, Unsupported
from siliconvert.validate.runners.mil.program import LOAD_TIME_OPS, store
from siliconvert.validate.runners.mil.torch_ops import TORCH_OPS, TorchEngine
from siliconvert.validate.runners.mil.values import TensorType

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def engine(request) -> TorchEngine:
    return TorchEngine(request.param)


def stored_type(array: np.ndarray) -> TensorType:
    """The declared type a program would give this result: fp16 for floats, as the builder's activations."""
    declared = TensorType.__new__(TensorType)
    declared.dtype = np.dtype(np.float16) if array.dtype.kind == "f" else array.dtype
    declared.shape = array.shape
    return declared


def agree(engine: TorchEngine, name: str, *data, **params) -> list[np.ndarray]:
    """Run op `name` in both: `data` (op results: fp16 or integer arrays) as tensors on the engine's device,
    `params` as the program binds consts (floats as tensors, integers and booleans as numpy arrays); the two
    results, stored as the program stores them, agree. Returns the stored numpy results."""
    torch_params = {k: engine.const(v) if isinstance(v, np.ndarray) else v for k, v in params.items()}
    torch_data = [[engine.value(d) for d in value] if isinstance(value, list) else engine.value(value)
                  for value in data]  # a list: a tuple input (concat's values)
    with engine.running():
        expected = OPS[name](*data, **params)
        got = TORCH_OPS[name](*torch_data, **torch_params)
    expected = list(expected) if isinstance(expected, tuple) else [expected]
    got = list(got) if isinstance(got, tuple) else [got]
    results = []
    for want, have in zip(expected, got, strict=True):
        want = store(want, stored_type(np.asarray(want)))
        have = engine.output(engine.store(have, stored_type(want)))
        assert have.shape == want.shape and have.dtype == want.dtype, (name, have.shape, want.shape)
        if want.dtype.kind == "f":
            np.testing.assert_allclose(have.astype(np.float32), want.astype(np.float32), rtol=2**-10, atol=2**-20,
                                       err_msg=name)
        else:
            np.testing.assert_array_equal(have, want, err_msg=name)
        results.append(want)
    return results


def fp16(*shape, seed=0, scale=1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float16)


def test_every_op_a_program_runs_has_a_torch_kernel():
    """Load-time ops run in numpy on either engine (program.py); every other op needs its torch kernel."""
    assert set(OPS) - set(LOAD_TIME_OPS) - set(TORCH_OPS) == set()


def test_elementwise(engine):
    x, y = fp16(3, 8), fp16(3, 8, seed=1)
    for name in ("add", "sub", "mul", "real_div", "maximum", "minimum", "less", "less_equal", "greater",
                 "greater_equal", "equal", "not_equal"):
        agree(engine, name, x, y)
    (big,) = agree(engine, "mul", np.array([300.0, -300.0], np.float16), np.array([300.0, 300.0], np.float16))
    assert np.isinf(big).all()  # past fp16's range: ±inf, as on the device
    agree(engine, "add", x, y=np.array([0.125], np.float32))  # a float const, bound as a tensor
    agree(engine, "add", np.array([3, -1, 7], np.int32), y=np.array([16], np.int32))  # index wrapping's add
    agree(engine, "logical_and", x > 0, y > 0)
    agree(engine, "logical_or", x > 0, y > 0)
    agree(engine, "abs", x)
    agree(engine, "select", x > 0, x, y)
    agree(engine, "cast", x, dtype="fp32")
    agree(engine, "identity", x)


def test_activations(engine):
    x = np.concatenate([fp16(64, scale=4.0), np.array([-100.0, -20.0, 0.0, 20.0, 60.0], np.float16)])
    for name in ("silu", "sigmoid", "exp", "softplus", "tanh"):
        agree(engine, name, x)
    agree(engine, "rsqrt", np.abs(x), epsilon=np.array(1e-5, np.float32))
    agree(engine, "rsqrt", np.abs(x))
    agree(engine, "gelu", x, mode="TANH_APPROXIMATION")
    with pytest.raises(Unsupported, match="gelu mode"):
        TORCH_OPS["gelu"](engine.value(x), mode="EXACT")
    agree(engine, "softmax", fp16(2, 3, 16, scale=8.0), axis=np.array(-1, np.int32))
    agree(engine, "softmax", np.array([[60000.0, 60000.0, -60000.0]], np.float16))  # stable


def test_reductions(engine):
    x = fp16(2, 3, 64, scale=3.0)
    for name in ("reduce_max", "reduce_sum", "reduce_mean"):
        agree(engine, name, x, axes=np.array([-1], np.int32), keep_dims=np.array(True))
        agree(engine, name, x, axes=np.array([0, 2], np.int32))
        agree(engine, name, x)


def test_shape_ops(engine):
    x = fp16(2, 3, 4)
    agree(engine, "reshape", x, shape=np.array([6, 4], np.int32))
    agree(engine, "transpose", x, perm=np.array([2, 0, 1], np.int32))
    agree(engine, "expand_dims", x, axes=np.array([0, -1], np.int32))
    agree(engine, "expand_dims", x, axes=np.array([3, 1], np.int32))
    agree(engine, "squeeze", x[:1, :, :1], axes=np.array([0, 2], np.int32))
    agree(engine, "squeeze", x[:1, :, :1])
    agree(engine, "tile", x, reps=np.array([1, 2, 1], np.int32))
    agree(engine, "concat", [x, fp16(2, 1, 4, seed=3)], axis=np.array(1, np.int32))
    with pytest.raises(Unsupported, match="interleave"):
        TORCH_OPS["concat"]([engine.value(x)], axis=0, interleave=True)


def test_indexing(engine):
    x = fp16(2, 6, 5)
    agree(engine, "slice_by_index", x, begin=np.array([0, 1, 0], np.int32), end=np.array([2, 5, 3], np.int32),
          stride=np.array([1, 2, 1], np.int32), end_mask=np.array([False, False, True]))
    agree(engine, "slice_by_index", x, begin=np.array([1, -3, 0], np.int32), end=np.array([2, 6, 5], np.int32),
          squeeze_mask=np.array([True, False, False]))
    agree(engine, "slice_update", x, fp16(2, 2, 5, seed=4), begin=np.array([0, 3, 0], np.int32),
          end=np.array([2, 5, 5], np.int32))
    with pytest.raises(Unsupported, match="slice_update"):
        TORCH_OPS["slice_update"](engine.value(x), engine.value(fp16(2, 3, 5)), begin=[0, 3, 0], end=[2, 5, 5])
    # a KV cache written at a computed position: begin is an op result
    agree(engine, "slice_by_size", x, np.array([0, 4, 0], np.int32), size=np.array([-1, 2, 5], np.int32))
    with pytest.raises(Unsupported, match="out of"):
        TORCH_OPS["slice_by_size"](engine.value(x), engine.value(np.array([0, 5, 0], np.int32)), [-1, 2, 5])
    table = fp16(10, 4)
    agree(engine, "gather", table, np.array([[3, 0, 9]], np.int32), axis=np.array(0, np.int32))
    agree(engine, "gather", table, np.array([1, 1], np.uint16), axis=np.array(-1, np.int32))
    with pytest.raises(Unsupported, match="out of range"):
        TORCH_OPS["gather"](engine.value(table), engine.value(np.array([10], np.int32)))
    ties = np.array([[1.0, 3.0, 3.0, 2.0], [0.5, 0.5, 0.5, 0.5]], np.float16)
    _, indices = agree(engine, "topk", ties, k=np.array(2, np.int32), axis=np.array(-1, np.int32))
    assert indices.tolist() == [[1, 2], [0, 1]]  # of equal values, the lower index first
    agree(engine, "topk", ties, k=np.array(3, np.int32), ascending=np.array(True))
    agree(engine, "one_hot", np.array([[2, 0], [1, 3]], np.int32), one_hot_vector_size=np.array(4, np.int32),
          axis=np.array(1, np.int32), on_value=np.array(0.5, np.float32), off_value=np.array(0.0, np.float32))


def test_products(engine):
    agree(engine, "matmul", fp16(2, 4, 8), fp16(2, 8, 3, seed=1))
    agree(engine, "matmul", fp16(2, 4, 8), fp16(2, 3, 8, seed=1), transpose_y=np.array(True))
    agree(engine, "matmul", fp16(2, 8, 4), fp16(8, 3, seed=1), transpose_x=np.array(True))
    x = fp16(1, 16, 1, 9)
    agree(engine, "conv", x, fp16(12, 16, 1, 1, seed=1), fp16(12, seed=2))  # a linear layer
    agree(engine, "conv", x, fp16(16, 1, 1, 3, seed=1), fp16(16, seed=2), groups=np.array(16, np.int32))  # short conv
    agree(engine, "conv", x, fp16(8, 4, 1, 2, seed=1), groups=np.array(4, np.int32))
    with pytest.raises(Unsupported, match="strides"):
        TORCH_OPS["conv"](engine.value(x), engine.value(fp16(16, 1, 1, 3)), groups=16, strides=[1, 2])
    with pytest.raises(Unsupported, match="unpadded"):
        TORCH_OPS["conv"](engine.value(x), engine.value(fp16(16, 1, 1, 3)), groups=16, pad_type="same")


def test_quantization(engine):
    """quantize to int8 / uint8 (a scalar scale and a per-axis one, with zero points) and dequantize back agree bit
    for bit: the same fp16 quotient, the same half-to-even rounding, the same saturation."""
    x = fp16(2, 8, 5, scale=40)
    ties = np.array([0.25, 0.75, -0.25, -0.75, 1.25, 63.75, -64.25, 1000.0], np.float16)
    for data, params in [(ties, {"scale": np.array(0.5, np.float32), "output_dtype": "int8"}),
                         (x, {"scale": np.array(0.37, np.float32), "output_dtype": "int8"}),
                         (x, {"scale": np.array(0.21, np.float32), "output_dtype": "uint8",
                              "zero_point": np.array(128, np.uint8)}),
                         (x, {"scale": np.linspace(0.1, 0.6, 8).astype(np.float16).astype(np.float32),
                              "output_dtype": "int8", "zero_point": np.arange(-4, 4, dtype=np.int8),
                              "axis": np.array(1, np.int32)})]:
        (quantized,) = agree(engine, "quantize", data, **params)
        quantized = quantized.astype(params["output_dtype"])
        dequantized = {k: v for k, v in params.items() if k != "output_dtype"}
        agree(engine, "dequantize", quantized, **dequantized)


def test_engine_stores_as_the_device_does(engine):
    """fp16 storage rounds to nearest even, overflows to ±inf; integer casts wrap as numpy's do."""
    values = np.array([1 + 2**-11, 1 + 3 * 2**-11, 70000.0, -70000.0, 1e-8], np.float32)
    fp16_type = stored_type(values)
    stored = engine.output(engine.store(engine.value(values), fp16_type))
    np.testing.assert_array_equal(stored, store(values, fp16_type))
    indices = np.array([70000, -1, 5], np.int32)
    int16_type = stored_type(indices.astype(np.int16))
    np.testing.assert_array_equal(engine.output(engine.store(engine.value(indices), int16_type)),
                                  store(indices, int16_type))
