"""The MIL ops on torch, on CUDA where there is a GPU and on the CPU otherwise: the same semantics as the numpy
kernels in ops.py, which stay the reference (tests/test_mil_torch_ops.py holds the two together op by op).

As there, floating-point work happens in float32 on values widened from their fp16 storage, and the program
stores every result in its declared type (TorchEngine.store rounds to fp16 once per op). The products are
float32 products (TF32 is turned off while a program runs on CUDA: its 10-bit mantissas would round the
operands). Only the order of the sums and torch's exp differ from numpy's, within rounding.

Inputs arrive as torch tensors (op results, weights, float consts, all on the engine's device) or as numpy arrays
(the small integer and boolean consts: axes, shapes, masks, which the kernels read as Python ints, with no trip
to the GPU); a kernel that takes such a const as data moves it to the device of its tensor operands.
Load-time (constexpr) ops are not here: they run once, when the weights load, in the numpy reference (program.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager

import numpy as np
import torch

from siliconvert.validate.runners.mil.ops import QUANTIZED_RANGES, Unsupported
from siliconvert.validate.runners.mil.values import TensorType

TORCH_OPS: dict[str, Callable[..., torch.Tensor]] = {}
TORCH_DTYPES = {  # numpy storage type → torch's
    np.dtype(np.bool_): torch.bool, np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32,
    np.dtype(np.int8): torch.int8, np.dtype(np.int16): torch.int16, np.dtype(np.int32): torch.int32,
    np.dtype(np.int64): torch.int64, np.dtype(np.uint8): torch.uint8, np.dtype(np.uint16): torch.uint16,
    np.dtype(np.uint32): torch.uint32,
}  # fmt: skip


def op(name: str):
    def register(function: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        TORCH_OPS[name] = function
        return function

    return register


def wide(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype == torch.float16 else x


def on_device(value, device: torch.device) -> torch.Tensor:
    """A const taken as data (a numpy array, widened already if it was fp16) as a tensor on `device`."""
    return value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value)).to(device)


def device_of(*values) -> torch.device:
    return next((v.device for v in values if isinstance(v, torch.Tensor)), torch.device("cpu"))


def data(*values) -> list[torch.Tensor]:
    """Operands as tensors on one device: numpy consts join their tensor operands there, widened from fp16."""
    device = device_of(*values)
    return [wide(on_device(v, device)) for v in values]


def ints(values) -> list[int]:
    """A parameter (axes, a shape, a begin index) as Python ints; a computed one is read back from the device."""
    return [int(v) for v in (values.tolist() if isinstance(values, torch.Tensor | np.ndarray) else values)]


def axes_of(axes) -> tuple[int, ...] | None:
    return None if axes is None else tuple(ints(axes))


# ---- elementwise ---------------------------------------------------------------------------------


def _binary(name: str, function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    TORCH_OPS[name] = lambda x, y: function(*data(x, y))


for _name, _function in {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "real_div": torch.true_divide,
    "maximum": torch.maximum, "minimum": torch.minimum,
    "less": torch.lt, "less_equal": torch.le, "greater": torch.gt, "greater_equal": torch.ge,
    "equal": torch.eq, "not_equal": torch.ne, "logical_and": torch.logical_and, "logical_or": torch.logical_or,
}.items():  # fmt: skip
    _binary(_name, _function)


@op("abs")
def _abs(x):
    return torch.abs(x)


@op("select")
def _select(cond, a, b):
    cond, a, b = data(cond, a, b)
    return torch.where(cond.bool(), a, b)


@op("cast")
def _cast(x, dtype):
    return x  # the program stores every result in its declared type, which for cast is `dtype`


@op("identity")
def _identity(x):
    return x


# ---- activations and other nonlinear functions ---------------------------------------------------


@op("rsqrt")
def _rsqrt(x, epsilon=1e-12):  # MIL's default epsilon
    x, epsilon = data(x, np.float32(epsilon) if isinstance(epsilon, float) else epsilon)
    return 1.0 / torch.sqrt(x + epsilon)


@op("silu")
def _silu(x):
    x = wide(x)
    return x / (1.0 + torch.exp(-x))  # exp(-x) → inf for very negative x: x / inf = -0, as in numpy


@op("sigmoid")
def _sigmoid(x):
    return 1.0 / (1.0 + torch.exp(-wide(x)))


@op("exp")
def _exp(x):
    return torch.exp(wide(x))


@op("softplus")
def _softplus(x):
    x = wide(x)
    return torch.logaddexp(torch.zeros_like(x), x)


@op("tanh")
def _tanh(x):
    return torch.tanh(wide(x))


@op("gelu")
def _gelu(x, mode="EXACT"):
    if str(mode) != "TANH_APPROXIMATION":
        raise Unsupported(f"gelu mode {mode} (only TANH_APPROXIMATION)")
    x = wide(x)
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))  # in x's float32


@op("softmax")
def _softmax(x, axis=-1):
    x, axis = wide(x), int(axis)
    e = torch.exp(x - x.amax(dim=axis, keepdim=True))
    return e / e.sum(dim=axis, keepdim=True)


# ---- reductions ----------------------------------------------------------------------------------


@op("reduce_max")
def _reduce_max(x, axes=None, keep_dims=False):
    return torch.amax(x, dim=axes_of(axes) or (), keepdim=bool(keep_dims))


@op("reduce_sum")
def _reduce_sum(x, axes=None, keep_dims=False):
    return torch.sum(wide(x), dim=axes_of(axes), keepdim=bool(keep_dims))


@op("reduce_mean")
def _reduce_mean(x, axes=None, keep_dims=False):
    return torch.mean(wide(x), dim=axes_of(axes), keepdim=bool(keep_dims))


# ---- shape ---------------------------------------------------------------------------------------


@op("reshape")
def _reshape(x, shape):
    return x.reshape(ints(shape))


@op("transpose")
def _transpose(x, perm):
    return x.permute(ints(perm))


@op("expand_dims")
def _expand_dims(x, axes):
    rank = x.ndim + len(ints(axes))
    for axis in sorted(a % rank for a in ints(axes)):  # numpy's order: each axis of the result, ascending
        x = x.unsqueeze(axis)
    return x


@op("squeeze")
def _squeeze(x, axes=None):
    return torch.squeeze(x) if axes is None else torch.squeeze(x, axes_of(axes))


@op("tile")
def _tile(x, reps):
    return torch.tile(x, ints(reps))


@op("concat")
def _concat(values, axis, interleave=False):
    if interleave:
        raise Unsupported("concat with interleave=True")
    return torch.cat(data(*(values if isinstance(values, list) else [values])), dim=int(axis))


# ---- indexing ------------------------------------------------------------------------------------


def _slices(shape, begin, end, stride, begin_mask, end_mask, squeeze_mask) -> tuple:
    rank = len(shape)
    begin, end = ints(begin), ints(end)
    stride = [1] * rank if stride is None else ints(stride)
    if any(s < 1 for s in stride):
        raise Unsupported(f"slices of stride {stride} (torch slices forwards only)")
    index = []
    for axis in range(rank):
        if squeeze_mask is not None and squeeze_mask[axis]:
            index.append(begin[axis])
            continue
        start = None if begin_mask is not None and begin_mask[axis] else begin[axis]
        stop = None if end_mask is not None and end_mask[axis] else end[axis]
        index.append(slice(start, stop, stride[axis]))
    return tuple(index)


@op("slice_by_index")
def _slice_by_index(x, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    return x[_slices(x.shape, begin, end, stride, begin_mask, end_mask, squeeze_mask)]


@op("slice_update")
def _slice_update(x, update, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    index = _slices(x.shape, begin, end, stride, begin_mask, end_mask, squeeze_mask)
    out = x.clone()
    target = out[index]
    if target.numel() != update.numel():
        raise Unsupported(f"slice_update of {tuple(update.shape)} into a {tuple(target.shape)} slice (out of range?)")
    out[index] = on_device(update, out.device).reshape(target.shape).to(out.dtype)
    return out


@op("slice_by_size")
def _slice_by_size(x, begin, size):
    begin, size = ints(begin), ints(size)
    if any(b < 0 or (n != -1 and b + n > d) for b, n, d in zip(begin, size, x.shape, strict=True)):
        raise Unsupported(f"slice_by_size of {size} from {begin} out of a {tuple(x.shape)} tensor")
    return x[tuple(slice(b, None if n == -1 else b + n) for b, n in zip(begin, size, strict=True))]


@op("gather")
def _gather(x, indices, axis=0, batch_dims=0, validate_indices=False):
    axis = int(axis) % x.ndim
    if int(batch_dims):
        raise Unsupported("gather with batch_dims")
    indices = on_device(indices, x.device).long()
    if indices.numel() and bool((indices.min() < 0) | (indices.max() >= x.shape[axis])):
        raise Unsupported(f"gather index out of range [0, {x.shape[axis]}) (iOS 17+ gather takes no negatives)")
    taken = torch.index_select(x, axis, indices.reshape(-1))
    return taken.reshape(*x.shape[:axis], *indices.shape, *x.shape[axis + 1:])


@op("topk")
def _topk(x, k=1, axis=-1, ascending=False, sort=True, return_indices=True, output_indices_dtype="int32"):
    """As ops.py's: of equal values the lower index comes first (a stable sort)."""
    if not bool(return_indices):
        raise Unsupported("topk without indices")
    axis = int(axis) % x.ndim
    values, order = torch.sort(wide(x), dim=axis, descending=not bool(ascending), stable=True)
    return values.narrow(axis, 0, int(k)).to(x.dtype), order.narrow(axis, 0, int(k))


@op("one_hot")
def _one_hot(indices, one_hot_vector_size, axis=-1, on_value=1, off_value=0):
    size = int(one_hot_vector_size)
    axis = int(axis) % (indices.ndim + 1)
    indices, on, off = data(indices, on_value, off_value)
    hot = torch.movedim(indices[..., None] == torch.arange(size, device=indices.device), -1, axis)
    return torch.where(hot, on, off)


# ---- products ------------------------------------------------------------------------------------


@op("matmul")
def _matmul(x, y, transpose_x=False, transpose_y=False):
    x, y = data(x, y)
    return torch.matmul(x.transpose(-1, -2) if transpose_x else x, y.transpose(-1, -2) if transpose_y else y)


@op("conv")
def _conv(x, weight, bias=None, strides=None, pad_type="valid", pad=None, dilations=None, groups=1):
    """As ops.py's: 1×1 convolutions as one matrix product per batch, others as a sum over the kernel's taps of
    a grouped matrix product each (products, not cuDNN, whose float32 convolutions may use TF32)."""
    out_channels, per_group, *kernel = weight.shape
    groups = int(groups)
    if any(s != 1 for s in ints(strides if strides is not None else ())) or any(
            d != 1 for d in ints(dilations if dilations is not None else ())):
        raise Unsupported(f"conv with strides {strides}, dilations {dilations} (only 1)")
    n, c, *spatial = x.shape
    x, weight = data(x, weight)
    bias = None if bias is None else data(x, bias)[1]
    if kernel == [1] * len(kernel) and groups == 1:
        y = torch.matmul(weight.reshape(out_channels, per_group), x.reshape(n, c, -1))
        if bias is not None:
            y = y + bias[:, None]
        return y.reshape(n, out_channels, *spatial)
    if len(kernel) != 2 or str(pad_type) not in ("valid", "custom") or (pad is not None and any(ints(pad))):
        raise Unsupported(f"conv with kernel {kernel}, pad_type {pad_type}, pad {pad} (2-D, unpadded only)")
    if c != groups * per_group or out_channels % groups:
        raise Unsupported(f"conv of {c} channels in {groups} groups by a {list(weight.shape)} weight")
    rows, columns = spatial[0] - kernel[0] + 1, spatial[1] - kernel[1] + 1
    weight = weight.reshape(groups, out_channels // groups, per_group, *kernel)
    y = torch.zeros((n, groups, out_channels // groups, rows * columns), dtype=torch.float32, device=x.device)
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            taps = x[:, :, i : i + rows, j : j + columns].reshape(n, groups, per_group, rows * columns)
            y += torch.matmul(weight[..., i, j], taps)
    y = y.reshape(n, out_channels, rows, columns)
    if bias is not None:
        y = y + bias[:, None, None]
    return y


# ---- quantization (iOS 17) -----------------------------------------------------------------------


def along(param, like: torch.Tensor, axis) -> torch.Tensor:
    """As ops.py's: a scale or zero point as a float32 tensor on `like`'s device, shaped to broadcast over it."""
    param = wide(on_device(param, like.device)).float()
    if axis is None:  # the spec's scalar: TorchEngine holds a float const of rank 0 as one of shape (1,)
        return param.reshape(())
    shape = [1] * like.ndim
    shape[int(axis) % like.ndim] = param.numel()
    return param.reshape(shape)


@op("quantize")
def _quantize(input, scale, output_dtype, zero_point=None, axis=None):
    """As ops.py's: the quotient in the input's type, half to even (torch.round), the zero point, saturated."""
    if str(output_dtype) not in QUANTIZED_RANGES:
        raise Unsupported(f"quantize to {output_dtype} (int8 or uint8)")
    low, high = QUANTIZED_RANGES[str(output_dtype)]
    quotient = wide(input) / along(scale, input, axis)
    if input.dtype == torch.float16:
        quotient = quotient.half().float()
    quantized = torch.round(quotient)
    if zero_point is not None:
        quantized = quantized + along(zero_point, input, axis)
    return quantized.clamp(low, high)


@op("dequantize")
def _dequantize(input, scale, zero_point=None, axis=None):
    values = input.float()
    if zero_point is not None:
        values = values - along(zero_point, input, axis)
    return values * along(scale, input, axis)


# ---- the engine: how program.py holds values on torch --------------------------------------------


class TorchEngine:
    """Values as torch tensors on one device (CUDA where torch sees a GPU, else the CPU); see program.py's
    NumpyEngine for what each method does."""

    ops = TORCH_OPS

    def __init__(self, device: str | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    @property
    def device_name(self) -> str:
        return "CUDA" if self.device.type == "cuda" else "CPU"

    def free_bytes(self) -> int | None:
        return torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else None

    def value(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def const(self, value):
        """Float consts become tensors on the device (they are operands); integer and boolean ones stay numpy
        arrays (parameters the kernels read on the host)."""
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            return self.value(value)
        return value

    def widen(self, value: torch.Tensor) -> torch.Tensor:
        return wide(value)

    def zeros(self, declared: TensorType) -> torch.Tensor:
        return torch.zeros(declared.shape, dtype=TORCH_DTYPES[declared.dtype], device=self.device)

    def store(self, result, declared: TensorType) -> torch.Tensor:
        result = on_device(result, self.device)
        return result.to(TORCH_DTYPES[declared.dtype])  # past ±65504: ±inf in fp16, as in numpy and on device

    def output(self, value) -> np.ndarray:
        return value.cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)

    @contextmanager
    def running(self):
        """While a program runs: float32 products in float32 (TF32 off: torch's default, made sure of); on the
        CPU, one thread. The ops are many and small (a 7B decode step is about 40 per layer), and on a machine
        whose cores are busy a second thread makes each op wait for the slower of the two: the demo's package
        scored 4 windows of 256 tokens in 1.8 s on one thread and 11.8 s on two (2 cores, load average 14);
        even a 1B model's largest product, 64 tokens by 2048 → 7168, took 81 to 109 ms on one and 128 on two."""
        precision, threads = torch.get_float32_matmul_precision(), torch.get_num_threads()
        torch.set_float32_matmul_precision("highest")
        if self.device.type == "cpu":
            torch.set_num_threads(1)
        try:
            with torch.inference_mode():
                yield
        finally:
            torch.set_float32_matmul_precision(precision)
            torch.set_num_threads(threads)
