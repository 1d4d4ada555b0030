"""The MIL ops the interpreter knows: those the Core ML builder emits and those coremltools' passes turn
them into (int16/uint16 casts and index wrapping around `gather`, `write_state` + `read_state` for
`coreml_update_state`, `constexpr_blockwise_shift_scale` and `constexpr_lut_to_dense` for compressed weights,
`quantize` and `dequantize` around a W8A8 package's activations).

Each op is a function of its MIL inputs (keyword arguments named as in the MIL spec) returning numpy arrays.
Floating-point work happens in float32 (the package docstring says what that approximates); the program then
stores every result in its declared type (fp16 for activations), rounding once per op as the runtime does.
read_state / write_state touch the program's states and live in program.py.

The ops are grouped by kind below: elementwise, activations and other nonlinear functions, reductions, shape,
indexing, products, load-time. A new op is one function under `@op("its MIL name")` in its group, its
parameters named and defaulted as in the MIL spec; program.py refuses a program that uses an op not registered
here.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

OPS: dict[str, Callable[..., np.ndarray]] = {}


class Unsupported(Exception):
    """An op used in a form the interpreter does not implement (e.g. a strided convolution)."""


def op(name: str):
    def register(function: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
        OPS[name] = function
        return function

    return register


def wide(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) if x.dtype == np.float16 else x


# ---- elementwise ---------------------------------------------------------------------------------


def _binary(name: str, function: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> None:
    OPS[name] = lambda x, y: function(wide(x), wide(y))


for _name, _function in {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "real_div": np.divide,
    "maximum": np.maximum, "minimum": np.minimum,
    "less": np.less, "less_equal": np.less_equal, "greater": np.greater, "greater_equal": np.greater_equal,
    "equal": np.equal, "not_equal": np.not_equal, "logical_and": np.logical_and, "logical_or": np.logical_or,
}.items():  # fmt: skip
    _binary(_name, _function)


@op("abs")
def _abs(x):
    return np.abs(x)


@op("select")
def _select(cond, a, b):
    return np.where(cond, a, b)


@op("cast")
def _cast(x, dtype):
    return x  # the program stores every result in its declared type, which for cast is `dtype`


@op("identity")
def _identity(x):
    return x


# ---- activations and other nonlinear functions ---------------------------------------------------


@op("rsqrt")
def _rsqrt(x, epsilon=1e-12):  # MIL's default epsilon
    return 1.0 / np.sqrt(wide(x) + np.float32(epsilon))


@op("silu")
def _silu(x):
    x = wide(x)
    with np.errstate(over="ignore"):  # exp(-x) → inf for very negative x: x / inf = -0, as it should
        return x / (1.0 + np.exp(-x))


@op("sigmoid")
def _sigmoid(x):
    with np.errstate(over="ignore"):  # exp(-x) → inf for very negative x: 1 / inf = 0, as it should
        return 1.0 / (1.0 + np.exp(-wide(x)))


@op("exp")
def _exp(x):
    with np.errstate(over="ignore"):  # past fp16's range the program stores inf, as the runtime would
        return np.exp(wide(x))


@op("softplus")
def _softplus(x):
    return np.logaddexp(np.float32(0), wide(x))  # log(1 + exp(x)) without overflow for large x


@op("tanh")
def _tanh(x):
    return np.tanh(wide(x))


@op("gelu")
def _gelu(x, mode="EXACT"):
    if str(mode) != "TANH_APPROXIMATION":
        raise Unsupported(f"gelu mode {mode} (only TANH_APPROXIMATION)")
    x = wide(x)
    return 0.5 * x * (1.0 + np.tanh(np.float32(math.sqrt(2 / math.pi)) * (x + np.float32(0.044715) * x**3)))


@op("softmax")
def _softmax(x, axis=-1):
    x = wide(x)
    e = np.exp(x - x.max(axis=int(axis), keepdims=True))
    return e / e.sum(axis=int(axis), keepdims=True)


# ---- reductions ----------------------------------------------------------------------------------


@op("reduce_max")
def _reduce_max(x, axes=None, keep_dims=False):
    return np.max(x, axis=None if axes is None else tuple(axes), keepdims=bool(keep_dims))


@op("reduce_sum")
def _reduce_sum(x, axes=None, keep_dims=False):
    return np.sum(wide(x), axis=None if axes is None else tuple(axes), keepdims=bool(keep_dims))


@op("reduce_mean")
def _reduce_mean(x, axes=None, keep_dims=False):
    return np.mean(wide(x), axis=None if axes is None else tuple(axes), keepdims=bool(keep_dims))


# ---- shape ---------------------------------------------------------------------------------------


@op("reshape")
def _reshape(x, shape):
    return x.reshape(tuple(int(d) for d in shape))


@op("transpose")
def _transpose(x, perm):
    return np.transpose(x, tuple(perm))


@op("expand_dims")
def _expand_dims(x, axes):
    return np.expand_dims(x, tuple(int(a) for a in axes))


@op("squeeze")
def _squeeze(x, axes=None):
    return np.squeeze(x, None if axes is None else tuple(int(a) for a in axes))


@op("tile")
def _tile(x, reps):
    return np.tile(x, [int(r) for r in reps])


@op("concat")
def _concat(values, axis, interleave=False):
    if interleave:
        raise Unsupported("concat with interleave=True")
    values = values if isinstance(values, list) else [values]
    return np.concatenate([wide(v) for v in values], axis=int(axis))


# ---- indexing ------------------------------------------------------------------------------------


def _slices(shape, begin, end, stride, begin_mask, end_mask, squeeze_mask) -> tuple:
    rank = len(shape)
    stride = np.ones(rank, int) if stride is None else stride
    index = []
    for axis in range(rank):
        if squeeze_mask is not None and squeeze_mask[axis]:
            index.append(int(begin[axis]))
            continue
        start = None if begin_mask is not None and begin_mask[axis] else int(begin[axis])
        stop = None if end_mask is not None and end_mask[axis] else int(end[axis])
        index.append(slice(start, stop, int(stride[axis])))
    return tuple(index)


@op("slice_by_index")
def _slice_by_index(x, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    return x[_slices(x.shape, begin, end, stride, begin_mask, end_mask, squeeze_mask)]


@op("slice_update")
def _slice_update(x, update, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    index = _slices(x.shape, begin, end, stride, begin_mask, end_mask, squeeze_mask)
    out = x.copy()
    target = out[index]
    if target.size != update.size:
        raise Unsupported(f"slice_update of {update.shape} into a {target.shape} slice (out of range?)")
    out[index] = update.reshape(target.shape)
    return out


@op("slice_by_size")
def _slice_by_size(x, begin, size):
    """`size` elements from `begin` on each axis (-1: to the end); `begin` may be computed, `size` fixes the shape."""
    if any(int(b) < 0 or (int(n) != -1 and int(b) + int(n) > d) for b, n, d in zip(begin, size, x.shape, strict=True)):
        raise Unsupported(f"slice_by_size of {list(size)} from {list(begin)} out of a {x.shape} tensor")
    return x[tuple(slice(int(b), None if int(n) == -1 else int(b) + int(n)) for b, n in zip(begin, size, strict=True))]


@op("gather")
def _gather(x, indices, axis=0, batch_dims=0, validate_indices=False):
    axis = int(axis) % x.ndim
    if int(batch_dims):
        raise Unsupported("gather with batch_dims")
    indices = indices.astype(np.int64)
    if indices.min(initial=0) < 0 or indices.max(initial=0) >= x.shape[axis]:
        raise Unsupported(f"gather index out of range [0, {x.shape[axis]}) (iOS 17+ gather takes no negatives)")
    return np.take(x, indices, axis=axis)


@op("topk")
def _topk(x, k=1, axis=-1, ascending=False, sort=True, return_indices=True, output_indices_dtype="int32"):
    """The k largest (or smallest) values along `axis`, sorted, and their indices; of equal values the lower
    index comes first (a stable sort)."""
    if not bool(return_indices):
        raise Unsupported("topk without indices")
    axis = int(axis) % x.ndim
    order = np.argsort(x if bool(ascending) else -wide(x), axis=axis, kind="stable")
    indices = np.take(order, np.arange(int(k)), axis=axis)
    return np.take_along_axis(x, indices, axis=axis), indices  # the indices stored as output_indices_dtype


@op("one_hot")
def _one_hot(indices, one_hot_vector_size, axis=-1, on_value=1, off_value=0):
    """A vector of `one_hot_vector_size` along a new `axis` of the result per index: on_value at the index."""
    size = int(one_hot_vector_size)
    axis = int(axis) % (indices.ndim + 1)
    hot = np.moveaxis(indices[..., None] == np.arange(size), -1, axis)
    return np.where(hot, wide(np.asarray(on_value)), wide(np.asarray(off_value)))


# ---- products ------------------------------------------------------------------------------------


@op("matmul")
def _matmul(x, y, transpose_x=False, transpose_y=False):
    x, y = wide(x), wide(y)
    return np.matmul(np.swapaxes(x, -1, -2) if transpose_x else x, np.swapaxes(y, -1, -2) if transpose_y else y)


@op("conv")
def _conv(x, weight, bias=None, strides=None, pad_type="valid", pad=None, dilations=None, groups=1):
    """2-D convolutions of stride and dilation 1 without padding: 1×1 ones (the builder's linear layers) as one
    matrix product per batch; others (grouped, depthwise, wider kernels: a short convolution) as a sum over the
    kernel's taps of a grouped matrix product each."""
    out_channels, per_group, *kernel = weight.shape
    groups = int(groups)
    if any(int(s) != 1 for s in (strides if strides is not None else ())) or any(
            int(d) != 1 for d in (dilations if dilations is not None else ())):
        raise Unsupported(f"conv with strides {strides}, dilations {dilations} (only 1)")
    n, c, *spatial = x.shape
    if kernel == [1] * len(kernel) and groups == 1:
        y = np.matmul(wide(weight).reshape(out_channels, per_group), wide(x).reshape(n, c, -1))
        if bias is not None:
            y += wide(bias)[:, None]
        return y.reshape(n, out_channels, *spatial)
    if len(kernel) != 2 or str(pad_type) not in ("valid", "custom") or (pad is not None and any(pad)):
        raise Unsupported(f"conv with kernel {kernel}, pad_type {pad_type}, pad {pad} (2-D, unpadded only)")
    if c != groups * per_group or out_channels % groups:
        raise Unsupported(f"conv of {c} channels in {groups} groups by a {list(weight.shape)} weight")
    rows, columns = spatial[0] - kernel[0] + 1, spatial[1] - kernel[1] + 1
    x, weight = wide(x), wide(weight).reshape(groups, out_channels // groups, per_group, *kernel)
    y = np.zeros((n, groups, out_channels // groups, rows * columns), np.float32)
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            taps = x[:, :, i : i + rows, j : j + columns].reshape(n, groups, per_group, rows * columns)
            y += np.matmul(weight[..., i, j], taps)  # (groups, out/group, in/group) @ (n, groups, in/group, S)
    y = y.reshape(n, out_channels, rows, columns)
    if bias is not None:
        y += wide(bias)[:, None, None]
    return y


# ---- quantization (iOS 17): an activation as int8 between a quantize and a dequantize (W8A8) ------
# The semantics are the MIL spec's (coremltools' iOS17 quantization_ops.py: quantize = clip(round(input / scale)
# + zero_point), dequantize = scale × (input − zero_point)), computed in the order of that op's value inference
# (coremltools.optimize._utils quantize_by_scale_and_zp): the quotient in the input's own type (numpy divides
# fp16 by fp16 into fp16), rounded half to even (np.around), the zero point added, then saturated to the output
# type's range (int8: [-128, 127], uint8: [0, 255]); dequantize multiplies in float32 (its _cast_from_quantized_
# dtype) and the program stores the product as the declared fp16.
QUANTIZED_RANGES = {"int8": (-128, 127), "uint8": (0, 255)}


def along(param: np.ndarray, rank: int, axis) -> np.ndarray:
    """A scale or zero point (a scalar, or a vector along `axis`) shaped to broadcast over a tensor of `rank`."""
    param = np.asarray(param)
    if axis is None:  # the spec's scalar (a one-value array once held as a tensor)
        return param.reshape(())
    shape = [1] * rank
    shape[int(axis) % rank] = param.size
    return param.reshape(shape)


@op("quantize")
def _quantize(input, scale, output_dtype, zero_point=None, axis=None):
    if str(output_dtype) not in QUANTIZED_RANGES:
        raise Unsupported(f"quantize to {output_dtype} (int8 or uint8)")
    low, high = QUANTIZED_RANGES[str(output_dtype)]
    quotient = wide(input) / along(wide(scale), input.ndim, axis)
    if input.dtype == np.float16:
        quotient = quotient.astype(np.float16)  # rounded to the input's type, as the spec's value inference
    quantized = np.round(quotient).astype(np.float32)  # half to even
    if zero_point is not None:
        quantized = quantized + along(zero_point, input.ndim, axis).astype(np.float32)
    return np.clip(quantized, low, high)


@op("dequantize")
def _dequantize(input, scale, zero_point=None, axis=None):
    values = input.astype(np.float32)
    if zero_point is not None:
        values = values - along(zero_point, input.ndim, axis).astype(np.float32)
    return values * along(wide(scale), input.ndim, axis)


# ---- load-time (constexpr): evaluated once, when the weights load (program.py) -------------------


@op("constexpr_blockwise_shift_scale")
def _blockwise_shift_scale(data, scale, offset=None):
    """Dequantize (data − offset) × scale; scale and offset have data's rank, one value per block."""
    def expand(params: np.ndarray) -> np.ndarray:
        for axis, (size, blocks) in enumerate(zip(data.shape, params.shape, strict=True)):
            params = np.repeat(params, size // blocks, axis=axis)
        return params

    values = data.astype(np.float32)
    if offset is not None:
        values = values - expand(wide(offset).astype(np.float32))
    return values * expand(wide(scale))


@op("constexpr_lut_to_dense")
def _lut_to_dense(indices, lut, vector_axis=None):
    """Palettized weights: each index picks an entry of its block's table. lut is [blocks per axis of indices…,
    entries, 1]: a block spans indices.shape[i] / lut.shape[i] along axis i (one table per group of channels)."""
    if vector_axis is not None or lut.shape[-1] != 1:
        raise Unsupported("vector palettization (table entries longer than 1)")
    block = [size // tables for size, tables in zip(indices.shape, lut.shape[:-2], strict=True)]
    table = np.zeros(indices.shape, np.int64)  # each value's table, as a flat index into lut's leading axes
    for axis, (size, tables) in enumerate(zip(indices.shape, lut.shape[:-2], strict=True)):
        shape = [1] * indices.ndim
        shape[axis] = size
        table = table * tables + (np.arange(size) // block[axis]).reshape(shape)
    return lut.reshape(-1, lut.shape[-2])[table, indices.astype(np.int64)]
