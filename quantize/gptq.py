"""GPTQ for mlx's affine quantization: a weight rounded a column at a time, each column's rounding error carried
into the columns not yet rounded, weighed by the second moments of the layer's calibration inputs (Frantar et al.
2022, "GPTQ"; mlx_lm/quant/gptq.py does the same on a whole model it holds and runs in mlx).

The layer's output error for inputs x is ‖(W − Ŵ)x‖²; over the calibration inputs its mean is tr(ΔW H ΔWᵀ) with
H = E[x xᵀ]. Each row is independent given H, so a block of rows at a time gives what the whole weight gives (the
MLX writer converts big tensors by row blocks). Columns are rounded in act order (by falling E[x²], GPTQ's
"act-order"); groups are mlx's: a scale and a bias per `group_size` contiguous columns of a row, set from the
group's weights before any column is rounded ("static groups": a group's columns are no longer rounded together).
The result is mlx's own layout (packed uint32 words, scales,
biases in the float type), so mlx_lm.load reads it unchanged: only which integer each weight takes differs from
mx.quantize's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import mlx.core as mx
import numpy as np

DAMPING = 0.01  # of H's mean diagonal, added to its diagonal: keeps the inverse's Cholesky factor defined
MIN_STEP = 2.0**-14  # the least scale kept: float16's smallest normal (a flat group rounds to its bias anyway)
BLOCK_COLUMNS = 128  # columns whose errors are carried within the block before the rest is updated at once
# how far each group's candidate ranges stretch (−) or shrink (+) its minimum-to-maximum range, in steps of the
# grid: llama.cpp's make_qkx2_quants tries the same 21 (rmin −1, rdelta 0.1)
SCALE_STEPS = np.linspace(-1.0, 1.0, 21)


def gptq_quantize(weight: np.ndarray, hessian: np.ndarray, bits: int, group_size: int,
                  float_type: mx.Dtype = mx.float16) -> dict[str, mx.array]:
    """mlx's affine arrays for `weight` [rows, columns] ("weight": packed uint32, "scales", "biases" in
    `float_type`), rounded by GPTQ against `hessian` [columns, columns], the mean x xᵀ of the layer's inputs."""
    return gptq_widths(weight, hessian, [(bits, group_size)], float_type)[0]


def gptq_widths(weight: np.ndarray, hessian: np.ndarray, widths: Sequence[tuple[int, int]],
                float_type: mx.Dtype = mx.float16) -> list[dict[str, mx.array]]:
    """gptq_quantize's arrays of `weight` at each (bits, group size) of `widths`, every width in one
    pass (a row's rounding depends on H and that row only, so the widths' copies of the rows are carried as one
    matrix, and H's factor is computed once: a plan measures GPTQ at every width it may choose)."""
    rows, columns = weight.shape
    if hessian.shape != (columns, columns) or any(columns % group for _, group in widths):
        raise ValueError(f"GPTQ: a {weight.shape} weight takes a [{columns}, {columns}] matrix and group sizes "
                         f"dividing {columns}, not {hessian.shape} and {[group for _, group in widths]}")
    # act order: columns are rounded by falling E[x²], so the ones whose errors cost most are rounded while the most
    # columns remain to carry their errors (on the family test checkpoints, a layer's output error falls by a
    # fifth to a half); so each group's scale and bias are set from the whole group before any column is rounded
    order = np.argsort(-np.diag(hessian), kind="stable")
    w = weight.astype(np.float32)[:, order]
    w[:, np.diag(hessian)[order] <= 0] = 0.0  # as carry_errors zeroes them, before the groups' scales see them
    importance = np.maximum(np.diag(hessian), 0).astype(np.float32) + 1e-12
    unordered = np.empty_like(w)
    unordered[:, order] = w
    grids = []  # per width: (group size, scales, biases [rows, groups])
    for bits, group_size in widths:
        groups = columns // group_size
        # every group of every row at once: [rows × groups, group size], each with its columns' importance
        split = unordered.reshape(rows * groups, group_size)
        weights = np.tile(importance.reshape(groups, group_size), (rows, 1))
        scales, biases = group_scale(split, weights, 2**bits - 1, float_type)
        grids.append((group_size, scales.reshape(rows, groups), biases.reshape(rows, groups)))
    # each act-order column's scale, bias and top integer for every stacked row: a column is rounded in one step
    column_scales = np.concatenate([scales[:, order // group] for group, scales, _ in grids]).T.copy()
    column_biases = np.concatenate([biases[:, order // group] for group, _, biases in grids]).T.copy()
    tops = np.repeat([2.0**bits - 1 for bits, _ in widths], rows).astype(np.float32)
    q = np.empty((len(widths) * rows, columns), dtype=np.uint32)

    def round_column(w: np.ndarray, k: int) -> np.ndarray:  # the k-th column in act order, source column order[k]
        column = np.clip(np.rint((w[:, k] - column_biases[k]) / column_scales[k]), 0, tops)
        q[:, order[k]] = column
        return column * column_scales[k] + column_biases[k]

    carry_errors(np.tile(w, (len(widths), 1)), hessian[np.ix_(order, order)], round_column)
    return [{"weight": mx.array(pack(q[index * rows:(index + 1) * rows], bits)),
             "scales": mx.array(scales).astype(float_type), "biases": mx.array(biases).astype(float_type)}
            for index, ((bits, _), (_, scales, biases)) in enumerate(zip(widths, grids, strict=True))]


def carry_errors(weight: np.ndarray, hessian: np.ndarray,
                 round_column: Callable[[np.ndarray, int], np.ndarray], inverse: np.ndarray | None = None) -> None:
    """GPTQ's pass over `weight` [rows, columns] (float32, updated in place): column j rounded by
    `round_column(weight, j)` (its rounded values, one per row; the columns before j already rounded, the ones
    from j on holding the errors carried so far, so a grid fitted at j sees them), the column's error carried
    into the columns after it through the upper Cholesky factor of `hessian`⁻¹, a block of BLOCK_COLUMNS at a time.
    Whatever grid `round_column` rounds to (mlx's affine groups, Core ML's int4 blocks or palettes) is its own.
    `inverse`: `inverse_factor(hessian)`, where several roundings of one weight go against one H. A column no input
    reached (zero on H's diagonal) is zeroed in `weight`: nothing it multiplies ever arrives."""
    rows, columns = weight.shape
    weight[:, np.diag(hessian) <= 0] = 0.0
    inverse = inverse_factor(hessian) if inverse is None else inverse
    for start in range(0, columns, BLOCK_COLUMNS):
        end = min(start + BLOCK_COLUMNS, columns)
        errors = np.empty((rows, end - start), dtype=np.float32)
        for j in range(start, end):
            error = (weight[:, j] - round_column(weight, j)) / inverse[j, j]
            errors[:, j - start] = error
            weight[:, j + 1:end] -= np.outer(error, inverse[j, j + 1:end])
        weight[:, end:] -= errors @ inverse[start:end, end:]


def inverse_factor(hessian: np.ndarray) -> np.ndarray:
    """The upper Cholesky factor of H⁻¹ (float32), GPTQ's update weights; a dead column's diagonal set to 1."""
    h = hessian.astype(np.float64)  # a copy
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += DAMPING * np.mean(np.diag(h))
    inverse = np.linalg.inv(np.linalg.cholesky(h))  # L⁻¹, so H⁻¹ = L⁻ᵀ L⁻¹
    return np.linalg.cholesky(inverse.T @ inverse).T.astype(np.float32)


def group_scale(group: np.ndarray, importance: np.ndarray, top: int,
                 float_type: mx.Dtype) -> tuple[np.ndarray, np.ndarray]:
    """Each row's scale and bias for a group [rows, group size] (`importance` [group size], or a row of it per row),
    both as stored in `float_type`: of the ranges
    from its minimum to its maximum stretched or shrunk by SCALE_STEPS, the integers each gives, then the scale and
    bias fitting those best by least squares weighed by `importance` (each column's E[x²]), the one whose rounded
    group is nearest the group in that weighing (llama.cpp's make_qkx2_quants' search, with a free bias)."""
    low, high = group.min(axis=1, keepdims=True), group.max(axis=1, keepdims=True)
    span = np.maximum(high - low, MIN_STEP)
    w = importance if importance.ndim == 2 else importance[None, :]
    best_error = np.full(group.shape[0], np.inf, dtype=np.float32)
    best_scale, best_bias = np.maximum(span[:, 0] / top, MIN_STEP), low[:, 0].copy()
    for step in SCALE_STEPS:
        q = np.clip(np.rint((group - low) * ((top + step) / span)), 0, top)
        sum_w, sum_q, sum_q2 = w.sum(1), (w * q).sum(1), (w * q * q).sum(1)
        sum_x, sum_qx = (w * group).sum(1), (w * q * group).sum(1)
        det = sum_w * sum_q2 - sum_q * sum_q
        fitted = det > 0
        det = np.where(fitted, det, 1.0)
        scale = np.where(fitted, (sum_w * sum_qx - sum_x * sum_q) / det, span[:, 0] / top)
        bias = np.where(fitted, (sum_q2 * sum_x - sum_q * sum_qx) / det, low[:, 0])
        scale, bias = np.maximum(_stored(scale, float_type), MIN_STEP), _stored(bias, float_type)
        rounded = np.clip(np.rint((group - bias[:, None]) / scale[:, None]), 0, top) * scale[:, None] + bias[:, None]
        error = (w * (rounded - group) ** 2).sum(1)
        better = error < best_error
        best_error = np.where(better, error, best_error)
        best_scale, best_bias = np.where(better, scale, best_scale), np.where(better, bias, best_bias)
    return best_scale, best_bias


def _stored(values: np.ndarray, float_type: mx.Dtype) -> np.ndarray:
    """`values` as `float_type` holds them, back in float32 (numpy has no bfloat16)."""
    return np.asarray(mx.array(values).astype(float_type).astype(mx.float32))


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Integers in [0, 2^bits) packed as mlx packs them: a little-endian bit stream in uint32 words per row."""
    rows = q.shape[0]
    stream = ((q[..., None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8).reshape(rows, -1)
    return np.packbits(stream, axis=-1, bitorder="little").view(np.uint32)
