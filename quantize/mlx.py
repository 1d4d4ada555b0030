"""MLX quantization policy: which tensors get quantized, and how (mx.quantize's mode, per group).

The rule is mlx-lm's own: a layer is quantized when mlx-lm's model code makes it a quantizable
module (Linear, Embedding, SwitchLinear; or whatever the model's `quant_predicate` says, at the bits
and group size it gives) and its input width is a multiple of the group size. Asking mlx-lm's model
object keeps us from restating that rule. Two additions:
- A layer whose input width is not a multiple of the group size takes the largest of mlx's group sizes below it
  that divides the width (`fitting_group`), under its own entry in config.json. mlx_lm.convert leaves such a layer
  in float without a word: a "4-bit" folder of a model whose rows are 160 wide came out all float16.
  A layer no group size fits stays in float, and the writer says which (`unfitted_modules`).
- A mixture of experts' routers (and a shared expert's sigmoid gate) are kept at ROUTER's 8 bits in every
  family, as mlx-lm's MoE files (Qwen3-MoE's, Qwen3-Next's and most others') have their predicate do; its
  Mixtral, OLMoE and Qwen2-MoE files have no predicate, and would route with 4-bit weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from siliconvert.quantize.gptq import gptq_widths
from siliconvert.quantize.sensitivity import TensorCosts, mlx_option, mlx_option_name, sample_rows


@dataclass(frozen=True)
class QuantPolicy:
    bits: int
    group_size: int
    mode: str = "affine"

    def config_entry(self) -> dict:
        """What mlx-lm expects under config.json's "quantization" key (and under a module's path there)."""
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}


# A router that picks other experts sends the token through other weights: 8 bits, as mlx-lm's predicates say
ROUTER = QuantPolicy(bits=8, group_size=64)
# mlx's MXFP4 (E2M1 values, an E8M0 scale per 32, no biases): what an MXFP4 source's weights are kept in
MXFP4 = QuantPolicy(bits=4, group_size=32, mode="mxfp4")
GROUP_SIZES = (32, 64, 128)  # mlx's affine group sizes
# mx.quantize's float modes have one group size each (recipe.MLX_MODES): a row no multiple of it stays in float
MODE_GROUP_SIZES = {"affine": GROUP_SIZES, "mxfp4": (32,), "nvfp4": (16,), "mxfp8": (32,)}


def fitting_group(width: int, group_size: int, mode: str = "affine") -> int | None:
    """`group_size` if it divides a row of `width`, else the largest smaller group size of the mode's that does."""
    return next((g for g in sorted(MODE_GROUP_SIZES[mode], reverse=True) if g <= group_size and width % g == 0),
                None)


def unfitted_modules(model: nn.Module, routers: Iterable[str] = (), mode: str = "affine") -> list[str]:
    """The quantizable modules of `model` whose rows no group size of the mode's divides: they stay in float."""
    routers = set(routers)
    return [path for path, module in model.named_modules()
            if hasattr(module, "to_quantized") and path not in routers
            and fitting_group(module.weight.shape[-1], max(MODE_GROUP_SIZES[mode]), mode) is None]


def quantizable_modules(model: nn.Module, policy: QuantPolicy, routers: Iterable[str] = ()) -> dict[str, QuantPolicy]:
    """The modules mlx-lm would quantize in `model` (an unquantized, lazily built model), by path, each with its
    policy: `policy`, or what the model's predicate gives the module, or ROUTER for the paths in `routers`."""
    model_predicate = getattr(model, "quant_predicate", None)
    routers = set(routers)
    chosen = {}
    for path, module in model.named_modules():
        if not hasattr(module, "to_quantized"):
            continue
        group = fitting_group(module.weight.shape[-1], policy.group_size, policy.mode)
        if group is None:
            continue
        rule = model_predicate(path, module) if model_predicate is not None else True
        if path in routers and rule and module.weight.shape[-1] % ROUTER.group_size == 0:
            rule = ROUTER.config_entry()
        if not rule:
            continue
        own = policy if group == policy.group_size else QuantPolicy(policy.bits, group, policy.mode)
        chosen[path] = own if rule is True else QuantPolicy(rule["bits"], rule["group_size"],
                                                            rule.get("mode", policy.mode))
    return chosen


def quantization_config(policy: QuantPolicy, modules: dict[str, QuantPolicy]) -> dict:
    """config.json's "quantization": the policy, and each module quantized otherwise under its path (mlx-lm's
    loader reads a module's own entry first)."""
    return policy.config_entry() | {path: own.config_entry() for path, own in sorted(modules.items()) if own != policy}


def quantize(weight: mx.array, policy: QuantPolicy) -> dict[str, mx.array]:
    """The arrays mlx-lm stores for a quantized weight, keyed by suffix: packed values and scales, and biases in
    the affine mode (the float modes have none)."""
    packed, scales, *biases = mx.quantize(weight, policy.group_size, policy.bits, mode=policy.mode)
    return {"weight": packed, "scales": scales} | ({"biases": biases[0]} if biases else {})


# each group's min and max scaled by these in `clip_quantize`'s search: the least weighted error of each is kept
CLIP_RATIOS = tuple(float(r) for r in np.linspace(1.0, 0.7, 13))


def clip_quantize(weight: mx.array, policy: QuantPolicy, importance: np.ndarray | None) -> dict[str, mx.array]:
    """`quantize`'s arrays for an affine policy with each group's range searched (`method: clip`). mx.quantize maps a
    group's min and max to the ends of its grid, spending the grid on the group's one or two outliers; clipped to a
    fraction of that range the rest round finer. Each group keeps the fraction of CLIP_RATIOS whose error, weighted
    by its columns' `importance` (the calibration inputs' mean square; None: equal), is least (AWQ's clip search,
    per group and both ends). The arrays are mx.quantize's own: mlx-lm loads them unchanged."""
    group, bits = policy.group_size, policy.bits
    values = weight.astype(mx.float32).reshape(-1, weight.shape[-1] // group, group)
    weights = (mx.ones((1, 1, group)) if importance is None or importance.size != weight.shape[-1]
               else mx.array(importance, dtype=mx.float32).reshape(1, -1, group))
    low, high = mx.min(values, axis=-1, keepdims=True), mx.max(values, axis=-1, keepdims=True)
    best: dict[str, mx.array] = {}
    least = None
    for ratio in CLIP_RATIOS:
        clipped = mx.clip(values, low * ratio, high * ratio).astype(weight.dtype).reshape(weight.shape)
        arrays = quantize(clipped, policy)
        rounded = mx.dequantize(arrays["weight"], arrays["scales"], arrays["biases"], group, bits)
        error = mx.sum(mx.square(rounded.astype(mx.float32).reshape(values.shape) - values) * weights, axis=-1)
        if least is None:
            best, least = arrays, error
            continue
        better = error < least  # [rows, groups]; a group's packed words, scale and bias are its own
        best = {key: mx.where(better.reshape(*better.shape, 1), array.reshape(*better.shape, -1),
                              best[key].reshape(*better.shape, -1)).reshape(array.shape)
                for key, array in arrays.items()}
        least = mx.minimum(error, least)
    return best


def clip_rounding(importance: np.ndarray | None) -> Callable[[mx.array, int, int], tuple[mx.array, ...]]:
    """`clip_quantize` as a plan's costs round affine options (quantize/sensitivity.py `mlx_costs`): (array, bits,
    group) → mx.quantize's (packed, scales, biases). The clipped part of the error is mostly the weight shrunk, which
    the plan weighs by its own measured gain: an error-share of mx.quantize's costs would weigh it as noise, and chose
    2-bit widths on the demo whose mean KLD came out 7× the prediction."""
    def rounding(array: mx.array, bits: int, group: int) -> tuple[mx.array, ...]:
        arrays = clip_quantize(array, QuantPolicy(bits, group), importance)
        return arrays["weight"], arrays["scales"], arrays["biases"]
    return rounding


# rows of a weight GPTQ rounds to measure its share of rounding's error (`gptq_error_shares`): its rows are
# independent given H, so a sample tells the whole's share
GPTQ_SAMPLED_ROWS = 128


def gptq_error_shares(weight: np.ndarray, hessian: np.ndarray, float_type: mx.Dtype = mx.float16,
                      widths: Sequence[tuple[int, int]] = ((4, 64),)) -> dict[str, float]:
    """Per affine (bits, group size) of `widths` that divides a row, by its option kind ("4bit-g64"): the output
    error (tr ΔW H ΔWᵀ) of `weight` [rows, columns] rounded by GPTQ against `hessian`, over its error rounded to
    nearest, on a sample of rows. GPTQ carries a column's error into the columns its inputs correlate with: a layer
    reading correlated inputs keeps a twentieth of rounding's error, one whose inputs are nearly independent half of
    it (on the small Qwen3 test checkpoint, at 4-bit g64: the MLPs 0.05–0.08, the first layer's q, k and v
    projections 0.5). The share is each width's own: on the real SmolLM2-135M, whose weights are Q4_1 values (4 bits
    in blocks of 32), GPTQ's fitted grid finds them again at 4-bit g32 (a share of 0.005) where at g64 it keeps
    0.2–0.3, and at 8 bits, where the float type's rounding of the scales weighs more, 0.3–0.5."""
    fitting = [(bits, group) for bits, group in widths if weight.shape[-1] % group == 0]
    rows = sample_rows(weight.astype(np.float32), GPTQ_SAMPLED_ROWS * weight.shape[-1])

    def output_error(arrays: dict[str, mx.array], bits: int, group: int) -> float:  # as mlx dequantizes them
        rounded = mx.dequantize(arrays["weight"], arrays["scales"], arrays["biases"], group, bits)
        delta = np.asarray(rounded.astype(mx.float32), dtype=np.float64) - rows
        return float(np.sum((delta @ hessian) * delta))

    shares = {}
    for (bits, group), carried in zip(fitting, gptq_widths(rows, hessian, fitting, float_type), strict=True):
        rounding = output_error(quantize(mx.array(rows).astype(float_type), QuantPolicy(bits, group)), bits, group)
        carried = output_error(carried, bits, group)
        shares[mlx_option_name(bits, group)] = min(1.0, carried / rounding) if rounding > 0 else 1.0
    return shares


def with_gptq_errors(costs: TensorCosts, shares: Mapping[str, float], looked_up: float = 0.0) -> TensorCosts:
    """A plan's candidates for a module its target rounds by GPTQ: each affine option's error times GPTQ's
    measured share of it at that option's width (`gptq_error_shares`, by kind); the float modes are rounded to
    nearest whatever the method. `looked_up`: the part of the error's weight a tied embedding has as an embedding,
    whose looked-up rows keep rounding's error (GPTQ lowers only its part as the head)."""
    return replace(costs, options=tuple(
        replace(option, error=option.error * (looked_up + (1 - looked_up) * shares[option.kind]))
        if mlx_option(option.kind)[2] == "affine" else option for option in costs.options))
