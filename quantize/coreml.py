"""Weight compression for Core ML packages through coremltools.optimize: int8 per output channel, int4 in
blocks of INT4_BLOCK input channels (each with its own scale), both symmetric, and int4 with zero points.

coremltools compresses single-function models only (`linear_quantize_weights` refuses multifunction ones), and
its pass would quantize a weight shared by two functions twice. So the Core ML writer builds one function
("decode") with the fp16 weights read back from the finished fp16 package, runs coremltools' own pass
(`compression::linear_quantize_weights`) over it, and gives both functions of the compressed package the
constexpr ops the pass chose: one copy of each compressed weight, whose bytes the pass computed. Only weights
are compressed; other consts (RoPE tables, index ranges) stay exact, and so do the weights the writer keeps
(a mixture of experts' routers). Activations and compute stay fp16; the
runtime dequantizes weights (`constexpr_blockwise_shift_scale`).

Palettization (`pal<bits>`, 2, 3, 4, 6 or 8 bits): each weight becomes indices into a lookup table of 2^bits
fp16 values, one table per PALETTE_GROUP output channels (coremltools' `per_grouped_channel`), made by coremltools'
own pass (`compression::palettize_weights`, op `constexpr_lut_to_dense`). Its k-means is our `kmeans_lut`, handed
to the pass as a custom LUT function: coremltools' own (`mode="kmeans"`) needs scikit-learn or kmeans1d, neither a
dependency here, and ours weighs each value by its input column's importance (the calibration's mean x², where a
run measured it): the error it minimises, Σ imp_j ΔW_ij², is the layer output's (E[(ΔW x)²] for inputs of that
power), the same error the planner's costs measure. Without an importance every value weighs alike (plain
k-means). Joint compression (`pal<bits>-lut8`): the tables are then stored as int8 with one fp16 scale per
weight, by the linear pass in joint-compression mode (`constexpr_blockwise_shift_scale` feeding the table), as
ANE-first projects ship them.

Error compensation for the linear precisions (int8, int4): where an importance is known, each block's scale is
the one (of a grid around the pass's max/7, then refined by least squares) that minimises the same importance-
weighted output error, its values rounded at that scale (`fit_scales`; llama.cpp's K-quants search their scales
the same way with an importance matrix). The ops and their layout stay the pass's own.

Zero points (`int4-zp`, and `int4-zp-b<n>` in plans): the pass's asymmetric layout (mode="linear"): each block of
int4 values q with an int4 zero point z beside its scale s, values s·(q − z) over q's whole −8…7 (symmetric int4
uses ±7, 15 levels about zero). Scale and zero point are fitted per block to the same weighted error
(`_fit_affine`). A block's 4-bit zero point costs an eighth of a bit per weight at blocks of 32; on the real
SmolLM2-135M's layers (0, 14, 29: q, o, gate, down), rounded by GPTQ, int4-zp left 0.61× the output error of int4,
int4-zp-b64 (4.31 bits per weight) 0.87×.

W8A8 (`w8a8`): int8 weights per output channel, as `int8`, and the input of every compressed linear layer quantized to
int8 as well, per tensor (symmetric: scale = the calibration's peak |x| / 127, no zero point), by a `quantize` /
`dequantize` pair (iOS 17 ops) in front of its convolution: the layout coremltools'
`linear_quantize_activations` makes (its `insert_prefix_quantize_dequantize_pair` pass, its default
`linear_symmetric` config), which the Neural Engines of A17 Pro / M4 and later run as int8 × int8 products. The
peaks come from our own calibration forward (siliconvert/calibration.py INPUT_PEAKS), not from predictions, which
coremltools runs only on macOS.

GPTQ (a target's `method: gptq`; `gptq_rounded`): where the calibration measured the second moments H of a weight's
inputs, its values are rounded again a column at a time, largest inputs first (act order), each column's error
carried into the columns not yet rounded (quantize/gptq.py's `carry_errors`). The grid is fixed first, so columns
may go in any order: a palette keeps the tables its k-means made, int8 / int4 blocks the scales `fit_scales`
fitted; each value then takes the entry or integer GPTQ picks, not the nearest. Same ops, same bytes. (On the demo
model's layers, act order with fixed grids left a half to a tenth of the output error that GPTQ in plain column
order left, with int4 scales refitted block by block as it went.)

A planned package (precision: auto) gives each weight its own precision, int4 also in blocks of 16, 64 or 128
(`int4-b<n>`), and the palettes: the pass takes one config per op, and `quantize_weights` asks `precision_of` for
each weight id.
The planner's costs (quantize/sensitivity.py `coreml_costs`) quantize each weight with the pass's own function
(`compress`), on the weights the pass would compress (`compressible`), so the estimate is of the bytes the
package holds. A plan whose weights GPTQ rounds weighs each candidate's error by GPTQ's share of it at that
precision, measured on a sample of the weight's rows (`gptq_error_share`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from functools import partial

import mlx.core as mx
import numpy as np

from siliconvert.quantize.gptq import carry_errors, group_scale, inverse_factor

# On Linux coremltools warns at import that its prediction library is missing; compression does not need it.
logging.getLogger("coremltools").setLevel(logging.ERROR)
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import Function, Program  # noqa: E402
from coremltools.converters.mil.mil.passes.graph_pass import PassOption  # noqa: E402
from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY  # noqa: E402
from coremltools.optimize._utils import (  # noqa: E402
    dequantize_by_scale_and_zp,
    lut_to_dense,
    select_input_output_channel_axis,
)
from coremltools.optimize.coreml import (  # noqa: E402
    OpLinearQuantizerConfig,
    OpPalettizerConfig,
    OptimizationConfig,
)
from coremltools.optimize.coreml._config import CompressionGranularity  # noqa: E402
from coremltools.optimize.coreml._quantization_passes import (  # noqa: E402
    linear_quantize_weights,
    palettize_weights,
)

INT4_BLOCK = 32  # input channels per int4 scale: the block size Apple's examples use for LLMs
ZERO_POINTS = "-zp"  # int4 with a zero point per block (coremltools' mode="linear"): int4-zp, int4-zp-b<n>
QUANTIZED_OP = "constexpr_blockwise_shift_scale"  # what the pass makes for iOS 18 targets
PALETTIZED_OP = "constexpr_lut_to_dense"
PALETTE_BITS = (2, 3, 4, 6, 8)
PALETTE_GROUP = 16  # output channels per lookup table: what Apple's LLM examples use (per_grouped_channel)
INT8_LUT = "-lut8"  # a palette whose tables are stored as int8 (joint compression)
# the fixed choices a recipe names (recipes/README.md); a plan also takes int4-b<n> and pal<bits>-g<n>[-lut8]
W8A8 = "w8a8"  # int8 weights per channel and int8 activations at the linear layers' inputs
ACTIVATION_RANGE = 127  # symmetric int8: ±127, as coremltools' linear_symmetric mode (quant_min raised by one)
PRECISIONS = ("int8", "int4", f"int4{ZERO_POINTS}", W8A8, *(f"pal{bits}" for bits in PALETTE_BITS),
              *(f"pal{bits}{INT8_LUT}" for bits in PALETTE_BITS if bits < 8))
SCALE_GRID = np.linspace(0.6, 1.1, 26)  # multiples of a block's max/qmax scale that fit_scales tries
ZERO_SHIFTS = (-1, 0, 1)  # zero points fit_scales tries around the one nearest a block's least-squares bias
ZERO_POINT_SCALE_GRID = np.linspace(0.9, 1.1, 21)  # multiples of that least-squares scale it tries at each
GPTQ_SAMPLED_ROWS = 128  # rows of a weight GPTQ rounds to measure its share of rounding's error (gptq_error_share)
KMEANS_ROUNDS = 100  # Lloyd rounds at most; they stop earlier once no value changes cluster


@dataclass(frozen=True)
class Palette:
    """A palettization: `bits` per index, one table per `group` output channels, tables in int8 or fp16."""

    bits: int
    group: int = PALETTE_GROUP
    int8_lut: bool = False


def palette_of(precision: str) -> Palette | None:
    """The palette a precision names (pal<bits>[-g<group>][-lut8]), or None for a linear one (int8, int4…)."""
    match = re.fullmatch(r"pal(\d)(?:-g(\d+))?(-lut8)?", precision)
    if match is None:
        return None
    if int(match[1]) not in PALETTE_BITS:
        raise ValueError(f"a Core ML palette has {PALETTE_BITS} bits, not {match[1]} ({precision!r})")
    return Palette(int(match[1]), int(match[2] or PALETTE_GROUP), bool(match[3]))


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight as coremltools' pass compressed it: data (int8, or int4 in an int8-backed dtype), scales, and
    zero points (None when symmetric)."""

    data: np.ndarray
    scale: np.ndarray
    offset: np.ndarray | None

    def same_as(self, other: CompressedWeight) -> bool:
        return isinstance(other, QuantizedWeight) and all(
            (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))
            for a, b in ((self.data, other.data), (self.scale, other.scale), (self.offset, other.offset)))


@dataclass(frozen=True)
class PalettizedWeight:
    """A weight as the palettization pass stored it: indices (uint<bits>, the weight's shape), tables (one per
    group of output channels: [groups, 1, …, 2^bits, 1]) in fp16, or in int8 with one fp16 scale."""

    indices: np.ndarray
    lut: np.ndarray
    lut_scale: np.ndarray | None

    def same_as(self, other: CompressedWeight) -> bool:
        return (isinstance(other, PalettizedWeight) and np.array_equal(self.indices, other.indices)
                and np.array_equal(self.lut, other.lut)
                and (self.lut_scale is None) == (other.lut_scale is None)
                and (self.lut_scale is None or np.array_equal(self.lut_scale, other.lut_scale)))


CompressedWeight = QuantizedWeight | PalettizedWeight


def kmeans_lut(values: np.ndarray, bits: int, importance: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """One group's table (2^bits fp16 values, ascending) and each value's index into it (uint8, flat): k-means of
    the group's fp16 values, each weighing its input column's `importance` (None: alike). `values` are rows ×
    columns (× 1s: a conv's kernel axes), the importance one per column. Lloyd rounds on the distinct values with
    their summed weights: first every value alike, from the quantiles, then (with an importance) weighted, from
    there: a Lloyd round never raises the error it minimises, so the weighted table is never worse than the plain
    one by the weighted error. The indices pick the nearest fp16 table entry."""
    distinct, where = _distinct_fp16(values)
    size = 1 << bits
    if len(distinct) <= size:
        lut = np.concatenate([distinct, np.full(size - len(distinct), distinct[-1])])
        return lut.astype(np.float16), where.astype(np.uint8)
    counts = np.bincount(where).astype(np.float64)
    cumulative = np.cumsum(counts)
    centres = distinct[np.searchsorted(cumulative, (np.arange(size) + 0.5) / size * cumulative[-1])]
    centres = _lloyd(distinct, counts, centres.astype(np.float64))
    if importance is not None:
        weights = np.tile(_weighing(importance), len(values))
        if len(weights) != len(where):
            raise ValueError(f"an importance of {len(importance)} columns for a group of shape {values.shape}")
        centres = _lloyd(distinct, np.bincount(where, weights), centres)
    lut = np.sort(centres.astype(np.float16))
    wide = lut.astype(np.float32)
    nearest = np.searchsorted((wide[1:] + wide[:-1]) / 2, distinct)
    return lut, nearest[where].astype(np.uint8)


def _distinct_fp16(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct values of an fp16 array, ascending (float64), and each value's index among them: counted
    through their bit patterns, made to sort as the numbers do (sign bit flipped for positives, every bit for
    negatives), so no sort of the values is needed (np.unique's argsort was most of a group's time)."""
    pattern = values.astype(np.float16).reshape(-1).view(np.uint16)
    key = np.where(pattern & 0x8000, ~pattern, pattern | 0x8000)
    present = np.flatnonzero(np.bincount(key, minlength=1 << 16)).astype(np.uint16)
    rank = np.zeros(1 << 16, np.int64)
    rank[present] = np.arange(len(present))
    patterns = np.where(present & 0x8000, present ^ 0x8000, ~present).astype(np.uint16)
    return patterns.view(np.float16).astype(np.float64), rank[key]


def _lloyd(values: np.ndarray, mass: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """1-D k-means (Lloyd) of sorted distinct `values` of weight `mass`, from `centres`, until no value changes
    cluster (KMEANS_ROUNDS at most). A cluster of sorted values is a run of them, cut where the centres' midpoints
    fall, so a round costs a search per centre and its sums come from running sums, not a pass over the values.
    An empty cluster keeps its centre."""
    running_mass = np.concatenate([[0.0], np.cumsum(mass)])
    running_moment = np.concatenate([[0.0], np.cumsum(mass * values)])
    cuts = None
    for _ in range(KMEANS_ROUNDS):
        centres = np.sort(centres)
        # a value goes to the centre it is nearest, the lower one at a midpoint
        chosen = np.concatenate([[0], np.searchsorted(values, (centres[1:] + centres[:-1]) / 2, side="right"),
                                 [len(values)]])
        if cuts is not None and np.array_equal(chosen, cuts):
            break
        cuts = chosen
        total = running_mass[cuts[1:]] - running_mass[cuts[:-1]]
        filled = total > 0
        centres[filled] = (running_moment[cuts[1:]] - running_moment[cuts[:-1]])[filled] / total[filled]
    return centres


def fit_scales(weight: np.ndarray, made: QuantizedWeight, importance: np.ndarray, bits: int) -> QuantizedWeight:
    """A symmetric `bits`-bit quantization of `weight` (as the pass `made` it: its blocks and dtypes) with
    each block's scale chosen for the least importance-weighted error Σ imp_j (w_j − s·q_j)²: the grid SCALE_GRID
    × the pass's scale, then the least-squares scale of the best grid point's values, kept where it is better.
    Scales are fp16, as stored, before the values are rounded at them. A weight with zero points (int4-zp) is
    fitted by `_fit_affine`."""
    if made.offset is not None:
        return _fit_affine(weight, made, importance, bits)
    rows, blocks = made.scale.shape[0], made.scale.shape[1]
    values = weight.reshape(rows, blocks, -1).astype(np.float32)
    weights = _weighing(importance).reshape(1, blocks, -1).astype(np.float32)
    limit = float(2 ** (bits - 1) - 1)  # the pass's symmetric range: ±7 for int4, ±127 for int8

    def rounded(scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scale = scale.astype(np.float16).astype(np.float32)
        safe = np.where(scale == 0, 1, scale)
        q = np.clip(np.round(values / safe[..., None]), -limit, limit)
        return q, (weights * (values - scale[..., None] * q) ** 2).sum(-1)

    base = made.scale.reshape(rows, blocks).astype(np.float32)
    best_scale, (best_q, best_error) = base, rounded(base)
    for factor in SCALE_GRID:
        q, error = rounded(base * factor)
        better = error < best_error
        best_scale = np.where(better, base * factor, best_scale)
        best_q, best_error = np.where(better[..., None], q, best_q), np.where(better, error, best_error)
    denominator = (weights * best_q**2).sum(-1)
    fitted = np.where(denominator > 0, (weights * values * best_q).sum(-1) / np.where(denominator > 0, denominator, 1),
                      best_scale)
    q, error = rounded(fitted)
    better = error < best_error
    best_scale, best_q = np.where(better, fitted, best_scale), np.where(better[..., None], q, best_q)
    return QuantizedWeight(best_q.reshape(made.data.shape).astype(made.data.dtype),
                           best_scale.reshape(made.scale.shape).astype(made.scale.dtype), made.offset)


def _fit_affine(weight: np.ndarray, made: QuantizedWeight, importance: np.ndarray, bits: int) -> QuantizedWeight:
    """An asymmetric `bits`-bit quantization of `weight` (values s·(q − z), q and the zero point z integers of the
    data's range, as the pass `made` them: its blocks and dtypes) with each block's scale and zero point chosen for
    the least importance-weighted error: the scale and bias of the weighted least-squares range search the MLX
    writer's GPTQ uses (quantize/gptq.py `group_scale`, llama.cpp's make_qkx2_quants with a free bias), its bias
    rounded to the integer zero points ZERO_SHIFTS around it, each tried at ZERO_POINT_SCALE_GRID multiples of the
    scale, then refitted by least squares at the best zero point; the pass's own min/max fit is a candidate too, so
    the result is never worse than the pass's by that error."""
    rows, blocks = made.scale.shape[0], made.scale.shape[1]
    low, high = _integer_range(made, bits)
    values = weight.reshape(rows, blocks, -1).astype(np.float32)
    weights = np.broadcast_to(_weighing(importance).reshape(1, blocks, -1).astype(np.float32), values.shape)

    def rounded(scale: np.ndarray, zero: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        scale = scale.astype(np.float16).astype(np.float32)
        safe = np.where(scale == 0, 1, scale)
        q = np.clip(np.rint(values / safe[..., None]) + zero[..., None], low, high)
        return scale, q, (weights * (values - scale[..., None] * (q - zero[..., None])) ** 2).sum(-1)

    base_zero = made.offset.reshape(rows, blocks).astype(np.float32)
    best_scale, best_q, best_error = rounded(made.scale.reshape(rows, blocks).astype(np.float32), base_zero)
    best_zero = base_zero
    scale, bias = group_scale(values.reshape(rows * blocks, -1), weights.reshape(rows * blocks, -1),
                               int(high - low), mx.float16)
    scale, bias = scale.reshape(rows, blocks), bias.reshape(rows, blocks)
    nearest = np.rint(-bias / np.where(scale == 0, 1, scale)) + low  # the bias as s·(low − z)
    for shift in ZERO_SHIFTS:
        zero = np.clip(nearest + shift, low, high)
        for factor in ZERO_POINT_SCALE_GRID:
            candidate, q, error = rounded(scale * factor, zero)
            better = error < best_error
            best_scale, best_zero = np.where(better, candidate, best_scale), np.where(better, zero, best_zero)
            best_q, best_error = np.where(better[..., None], q, best_q), np.where(better, error, best_error)
    shifted = best_q - best_zero[..., None]
    denominator = (weights * shifted**2).sum(-1)
    fitted = np.where(denominator > 0, (weights * values * shifted).sum(-1) / np.where(denominator > 0, denominator, 1),
                      best_scale)
    candidate, q, error = rounded(fitted, best_zero)
    better = error < best_error
    best_scale, best_q = np.where(better, candidate, best_scale), np.where(better[..., None], q, best_q)
    return QuantizedWeight(best_q.reshape(made.data.shape).astype(made.data.dtype),
                           best_scale.reshape(made.scale.shape).astype(made.scale.dtype),
                           best_zero.reshape(made.offset.shape).astype(made.offset.dtype))


def _integer_range(made: QuantizedWeight, bits: int) -> tuple[int, int]:
    """The integers a linear weight's values take: the pass's symmetric ±(2^(bits−1) − 1), or with zero points the
    data's whole signed range (int4: −8…7)."""
    top = 2 ** (bits - 1) - 1
    return (-top - 1, top) if made.offset is not None else (-top, top)


def gptq_rounded(weight: np.ndarray, made: CompressedWeight, hessian: np.ndarray, precision: str,
                 inverse: np.ndarray | None = None) -> CompressedWeight:
    """`made` (the passes' compression of `weight` at `precision`, in their layout) rounded again by GPTQ against
    `hessian` [input channels, input channels], the mean x xᵀ of the weight's inputs, its columns taken in order of
    falling H diagonal (GPTQ's act order: the columns whose inputs are largest are rounded first, and their errors
    carried into every column still free). The grid stays as `made` has it, so the order need not follow the
    layout: a palette keeps its tables (each value taking the entry GPTQ picks), a linear weight its blocks' scales
    (`fit_scales`' where an importance was known). `inverse`: `gptq_inverse(hessian)`, where one weight is rounded at
    several precisions."""
    rows = len(weight)
    values = weight.reshape(rows, -1).astype(np.float32)
    columns = values.shape[1]
    if hessian.shape != (columns, columns):
        raise ValueError(f"GPTQ: a weight of {columns} input channels takes a [{columns}, {columns}] matrix, "
                         f"not {list(hessian.shape)}")
    order = _act_order(hessian)
    if isinstance(made, PalettizedWeight):
        lut = made.lut if made.lut_scale is None else dequantize_by_scale_and_zp(made.lut, made.lut_scale,
                                                                                None).astype(np.float16)
        tables = lut.reshape(len(lut), -1).astype(np.float32)
        grid = np.repeat(tables, rows // len(tables), axis=0)  # each row's table: one per group of rows
        every_row = np.arange(rows)

        def round_column(w: np.ndarray, j: int) -> np.ndarray:
            chosen[:, j] = index = np.abs(w[:, j, None] - grid).argmin(axis=1)
            return grid[every_row, index]
    else:
        low, high = _integer_range(made, _bits(precision))
        blocks = made.scale.shape[1]

        def per_column(part: np.ndarray) -> np.ndarray:  # a block's value for each column, in act order
            return np.repeat(part.reshape(rows, blocks).astype(np.float32), columns // blocks, axis=1)[:, order]

        steps = per_column(made.scale)
        zeros = per_column(made.offset) if made.offset is not None else np.zeros_like(steps)
        safe = np.where(steps == 0, 1, steps)

        def round_column(w: np.ndarray, j: int) -> np.ndarray:
            chosen[:, j] = integer = np.clip(np.rint(w[:, j] / safe[:, j]) + zeros[:, j], low, high)
            return (integer - zeros[:, j]) * steps[:, j]
    chosen = np.empty((rows, columns), dtype=np.int32)  # each value's index or integer, in GPTQ's column order
    carry_errors(values[:, order], hessian[np.ix_(order, order)], round_column, inverse)
    chosen = chosen[:, np.argsort(order)]
    if isinstance(made, PalettizedWeight):
        return PalettizedWeight(chosen.reshape(made.indices.shape).astype(made.indices.dtype), made.lut, made.lut_scale)
    return QuantizedWeight(chosen.reshape(made.data.shape).astype(made.data.dtype), made.scale, made.offset)


def gptq_inverse(hessian: np.ndarray) -> np.ndarray:
    """GPTQ's update weights for a weight rounded against `hessian`, in act order: what `gptq_rounded` computes
    each time it is not given them (the costly part on wide layers: a Cholesky factor and an inverse)."""
    order = _act_order(hessian)
    return inverse_factor(hessian[np.ix_(order, order)])


def _act_order(hessian: np.ndarray) -> np.ndarray:
    return np.argsort(-np.diag(hessian), kind="stable")


def gptq_error_share(weight: np.ndarray, hessian: np.ndarray, precision: str, importance: np.ndarray | None = None,
                     sampled_rows: int = GPTQ_SAMPLED_ROWS, inverse: np.ndarray | None = None,
                     measured_on: np.ndarray | None = None) -> float:
    """The output error (tr ΔW H ΔWᵀ) of `weight` [rows, columns] compressed at `precision` and rounded again by GPTQ
    against `hessian` (`gptq_rounded`), over its error as the passes compress it (`compress`, with `importance`), on
    a sample of rows: whole groups of a palette's rows, spread over the weight (a table is fitted to its group).
    GPTQ's gain differs by precision and layer (on the demo model's fixed packages it took pal3's mean KLD to a
    third of rounding's, int4's to 0.6), so a plan of GPTQ-rounded weights weighs each candidate by its own share.
    1 where the passes cannot compress the sample or it rounds exactly. `inverse`: `gptq_inverse(hessian)`.
    `measured_on`: the second moments both errors are measured under, where not `hessian` (those of text GPTQ was
    not fitted to: GPTQ's gain there is what a package keeps on text it never saw)."""
    palette = palette_of(precision)
    group = palette.group if palette else 1
    groups = len(weight) // group
    if groups == 0:
        return 1.0
    taken = np.linspace(0, groups, min(groups, max(1, sampled_rows // group)), endpoint=False).astype(int)
    sample = weight[:groups * group].reshape(groups, group, -1)[taken].reshape(len(taken) * group, -1)
    made = compress(sample, precision, importance)
    if made is None:
        return 1.0

    def output_error(compressed: CompressedWeight) -> float:
        delta = decompress(compressed).astype(np.float64).reshape(sample.shape) - sample.astype(np.float64)
        return float(np.einsum("ij,jk,ik->", delta, measure, delta))

    measure = (hessian if measured_on is None else measured_on).astype(np.float64)

    rounding = output_error(made)
    if rounding == 0:
        return 1.0
    return min(1.0, output_error(gptq_rounded(sample, made, hessian, precision, inverse)) / rounding)


def _bits(precision: str) -> int:
    return weight_config(precision).dtype.get_bitwidth()


def _weighing(importance: np.ndarray) -> np.ndarray:
    """Column weights from an importance row: relative to its mean, with a floor so that a column the calibration
    never saw active still counts a little (its weights are not free to go anywhere)."""
    importance = np.asarray(importance, np.float64)
    mean = importance.mean() if importance.size and importance.mean() > 0 else 1.0
    return np.maximum(importance / mean, 1e-3)


def palette_config(palette: Palette, importance: np.ndarray | None = None) -> OpPalettizerConfig:
    """The pass's config for one weight: per grouped output channel, our k-means as its LUT function."""
    return OpPalettizerConfig(mode="custom", lut_function=partial(kmeans_lut, bits=palette.bits, importance=importance),
                              granularity="per_grouped_channel", group_size=palette.group, channel_axis=0)


def lut_config() -> OpLinearQuantizerConfig:
    """An int8 table (joint compression): symmetric, one scale for all of a weight's tables (the pass refuses
    another granularity there: the tables' axes are not the weight's). Tables are small (the default threshold of
    2048 values would leave most as they are)."""
    return OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_tensor",
                                   weight_threshold=0)


def weight_config(precision: str) -> OpLinearQuantizerConfig:
    """int8 (and w8a8's weights): per output channel; int4: per block of INT4_BLOCK input channels; int4-b<n> (a
    plan's other candidates): per block of n; int4-zp[-b<n>]: the same blocks, each with an int4 zero point beside
    its scale (coremltools' mode="linear", the asymmetric layout its docs offer beside the symmetric one)."""
    if precision in ("int8", W8A8):
        return OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel")
    match = re.fullmatch(rf"int4({ZERO_POINTS})?(?:-b(\d+))?", precision)
    if match:
        return OpLinearQuantizerConfig(mode="linear" if match[1] else "linear_symmetric", dtype="int4",
                                       granularity="per_block", block_size=int(match[2] or INT4_BLOCK))
    raise ValueError(f"Core ML compression is one of {PRECISIONS}, not {precision!r}")


def quantize_weights(function: Function, precision_of: Callable[[str], str | None],
                     importance_of: Callable[[str], np.ndarray | None] = lambda weight: None,
                     hessian_of: Callable[[str], np.ndarray | None] = lambda weight: None,
                     ) -> dict[str, CompressedWeight]:
    """Run coremltools' compression passes over the consts with a weight_id of a one-function program, each at
    `precision_of(weight id)` (None: left fp16, as the shared consts must be: RoPE tables and index ranges carry
    weight ids too): palettization first, then linear quantization of the int8/int4 weights, then (joint
    compression) of the int8 tables. A palette's k-means weighs its columns by `importance_of(weight id)`, and a
    linear weight's scales are fitted to it (`fit_scales`); a weight with a `hessian_of(weight id)` is then rounded
    again by GPTQ against it (`gptq_rounded`).
    Return what the passes made of each weight, by weight id; weights they leave alone (asked to, too small, or
    1-D) are absent. `function` is consumed: the passes rewrite it."""
    uses = []  # (weight id, the op that reads its const, under which input, its precision)
    for op in function.operations:
        if op.op_type == "const" and op.weight_id is not None and (precision := precision_of(op.weight_id)):
            (reader,) = op.outputs[0].child_ops
            uses.append((op.weight_id, reader, next(k for k, v in reader.inputs.items() if v is op.outputs[0]),
                         precision))
    hessians = {weight: hessian for weight, *_ in uses if (hessian := hessian_of(weight)) is not None}
    # the values of the linear weights an importance compensates (fit_scales) and of those GPTQ rounds again, before
    # the passes replace them
    originals = {weight: reader.inputs[key].val for weight, reader, key, precision in uses
                 if weight in hessians or (not palette_of(precision) and importance_of(weight) is not None)}
    program = Program()
    program.add_function("main", function)
    palettes = {reader.inputs[key].op.name: palette_config(palette, importance_of(weight))
                for weight, reader, key, precision in uses if (palette := palette_of(precision))}
    linear = {reader.inputs[key].op.name: weight_config(precision)
              for _, reader, key, precision in uses if not palette_of(precision)}
    _apply("compression::palettize_weights", program, palettes)
    _apply("compression::linear_quantize_weights", program, linear)
    tables = {}  # the int8 tables' consts: the const feeding each palettized weight's lut
    for _, reader, key, precision in uses:
        op = reader.inputs[key].op
        if op.op_type == PALETTIZED_OP and palette_of(precision).int8_lut:
            tables[op.lut.op.name] = lut_config()
    _apply("compression::linear_quantize_weights", program, tables, joint_compression=True)
    quantized: dict[str, CompressedWeight] = {}
    for weight, reader, key, precision in uses:
        op = reader.inputs[key].op  # the const itself, or the constexpr the passes put in its place
        if op.op_type == QUANTIZED_OP:
            offset = op.inputs.get("offset")
            made = QuantizedWeight(op.data.val, op.scale.val, None if offset is None else offset.val)
            if importance_of(weight) is not None:
                made = fit_scales(originals[weight], made, importance_of(weight), _bits(precision))
        elif op.op_type == PALETTIZED_OP:
            table = op.lut.op
            made = (PalettizedWeight(op.indices.val, table.data.val, table.scale.val) if table.op_type == QUANTIZED_OP
                    else PalettizedWeight(op.indices.val, op.lut.val, None))
        else:
            continue
        # A tied table both embeds (gather) and projects (conv) under one weight id; the passes take output
        # channels on axis 0 for both, so both uses must come out the same to share one copy.
        if weight in quantized and not quantized[weight].same_as(made):
            raise RuntimeError(f"coremltools compressed the two uses of {weight} differently")
        quantized[weight] = made
    for weight in hessians.keys() & quantized.keys():  # once per weight id, a tied table's two uses alike
        quantized[weight] = gptq_rounded(originals[weight], quantized[weight], hessians[weight], precision_of(weight))
    return quantized


def _apply(name: str, program: Program, configs: dict, joint_compression: bool = False) -> None:
    """Run one of coremltools' compression passes with a config per const op (by name); others are left alone."""
    if not configs:
        return
    compression = PASS_REGISTRY[name]
    options = [PassOption("config", OptimizationConfig(op_name_configs=configs))]
    compression.set_options(options + ([PassOption("joint_compression", True)] if joint_compression else []))
    compression.apply(program)


def compressible(function: Function, weights: Collection[str]) -> Iterator[tuple[str, np.ndarray]]:
    """(weight id, values as output channels × input channels) of each of `weights` the pass would compress, once
    per weight id, as coremltools decides it (`need_compress_const`: rank above 1, more values than the configs'
    weight_threshold). The values are the const's own (memory-mapped from a stored package: one at a time)."""
    quantizer = PASS_REGISTRY["compression::linear_quantize_weights"]
    threshold = weight_config("int8").weight_threshold
    seen = set()
    for op in function.operations:
        if op.op_type != "const" or op.weight_id not in weights or op.weight_id in seen:
            continue
        with function:  # the pass asks inside the function (it reads the opset version there)
            if not quantizer.need_compress_const(op, False, threshold):
                continue
        # `compress` lays blocks along axis 1 of a (rows × columns) view: the pass must read the weight so too
        if select_input_output_channel_axis(op) != (1, 0):
            raise RuntimeError(f"coremltools reads {op.weight_id} with other channel axes than (out, in)")
        seen.add(op.weight_id)
        value = op.outputs[0].val
        yield op.weight_id, value.reshape(value.shape[0], -1)


def compress(weight: np.ndarray, precision: str, importance: np.ndarray | None = None) -> CompressedWeight | None:
    """An (output channels × input channels) weight as the passes compress it at `precision`, through their own
    functions (`blockwise_compress_by_dtype`, with the block sizes the linear pass infers for such a weight, its
    scales fitted to `importance` where given;
    `grouped_channelwise_compress` with our k-means, `importance` weighing its columns, for a palette); None where
    they cannot (input channels not a whole number of blocks, output channels not of groups), as the passes then
    leave it fp16."""
    palette = palette_of(precision)
    if palette is not None:
        made = palettize_weights.grouped_channelwise_compress(
            weight, "CUSTOM", None, 0, palette.group, partial(kmeans_lut, bits=palette.bits, importance=importance))
        if made is None:
            return None
        if not palette.int8_lut:
            return PalettizedWeight(made.indices, made.lut, None)
        table = linear_quantize_weights.blockwise_compress_by_dtype(made.lut, "int8", "LINEAR_SYMMETRIC",
                                                                    [0] * made.lut.ndim)
        return PalettizedWeight(made.indices, table.data, table.scale)
    config = weight_config(precision)
    columns = config.block_size if config.granularity == CompressionGranularity.PER_BLOCK else 0
    made = linear_quantize_weights.blockwise_compress_by_dtype(weight, config.dtype, config.mode, [1, columns])
    if made is None:
        return None
    made = QuantizedWeight(made.data, made.scale, made.offset)
    return made if importance is None else fit_scales(weight, made, importance, _bits(precision))


def decompress(weight: CompressedWeight) -> np.ndarray:
    """The fp16 values the runtime makes of a compressed weight (what the passes' own `decompress` computes; an
    int8 table is made fp16 first, as the device's constexpr does)."""
    if isinstance(weight, PalettizedWeight):
        lut = weight.lut if weight.lut_scale is None else dequantize_by_scale_and_zp(weight.lut, weight.lut_scale,
                                                                                     None).astype(np.float16)
        return lut_to_dense(weight.indices, lut, None)
    return dequantize_by_scale_and_zp(weight.data, weight.scale, weight.offset)


def stored_bytes(weight: CompressedWeight, precision: str, rows: int | None = None) -> int:
    """Bytes of a compressed weight in weight.bin: its data at the precision's bits (int4 packs two to a byte, a
    palette's indices bits apiece), its scales, zero points and tables, each a blob of its own. `rows`: the whole
    weight's output channels where `weight` is a sample of its rows (every row, or group of rows, stores alike;
    the blobs' padding is the whole weight's)."""
    palette = palette_of(precision)
    data = weight.indices if isinstance(weight, PalettizedWeight) else weight.data
    bits = palette.bits if palette else weight_config(precision).dtype.get_bitwidth()
    rows = rows or len(data)

    def values(part: np.ndarray) -> int:  # the whole weight's count of this part's values
        return part.size * rows // len(data)

    # (part, its bits per value): a zero point is stored in the data's type (int4: packed two to a byte)
    extra = (((weight.lut, None), (weight.lut_scale, None)) if isinstance(weight, PalettizedWeight)
             else ((weight.scale, None), (weight.offset, bits)))
    parts = [-(-values(data) * bits // 8),
             *(-(-values(part) * (width or 8 * part.itemsize) // 8) for part, width in extra if part is not None)]
    return sum(blob_bytes(n) for n in parts)


def blob_bytes(nbytes: int) -> int:
    """A blob's share of weight.bin: a 64-byte record, then its data padded to 64 bytes (MIL blob storage v2,
    convert/coreml/package.py)."""
    return 64 + -(-nbytes // 64) * 64


def quantized_const(weight: CompressedWeight, weight_id: str, name: str):
    """The op the passes make for a compressed weight, in the function being built. Its consts carry weight ids
    derived from the weight's, so that both functions point at one copy of the compressed bytes."""
    if isinstance(weight, PalettizedWeight):
        lut = _consts({"lut": weight.lut, "lut_scale": weight.lut_scale}, weight_id, name)
        table = (lut["lut"] if weight.lut_scale is None else
                 mb.constexpr_blockwise_shift_scale(data=lut["lut"], scale=lut["lut_scale"], name=f"{name}_lut8"))
        indices = _consts({"indices": weight.indices}, weight_id, name)["indices"]
        return mb.constexpr_lut_to_dense(indices=indices, lut=table, name=f"{name}_palettized")
    consts = _consts({"data": weight.data, "scale": weight.scale, "offset": weight.offset}, weight_id, name)
    return mb.constexpr_blockwise_shift_scale(**consts, name=f"{name}_quantized")


def _consts(parts: dict[str, np.ndarray | None], weight_id: str, name: str) -> dict:
    consts = {}
    for part, value in parts.items():
        if value is not None:
            consts[part] = mb.const(val=value, name=f"{name}_{part}")
            consts[part].op.weight_id = f"{weight_id}/{part}"
    return consts


def activation_scale(peak: float) -> np.float16:
    """The per-tensor scale of an int8 activation whose calibrated peak |x| is `peak`: peak / 127 in fp16 (the
    activations' type), as coremltools' pass computes it from an (rmin, rmax) pair; 1 where the peak is 0 (an input
    the calibration never saw active), as that pass replaces a zero scale."""
    scale = np.float16(peak / ACTIVATION_RANGE)
    return scale if scale > 0 else np.float16(1)


def quantized_input(x, scale: np.float16, name: str):
    """`x` through int8 and back (quantize → dequantize at one per-tensor `scale`), in the function being built: what
    a linear layer of a W8A8 package reads."""
    quantized = mb.quantize(input=x, scale=scale, output_dtype="int8", name=f"{name}_input_int8")
    return mb.dequantize(input=quantized, scale=scale, name=f"{name}_input")
