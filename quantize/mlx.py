"""MLX quantization policy: which tensors get quantized, and how (mlx's affine, per group).

The rule is mlx-lm's own: a layer is quantized when mlx-lm's model code makes it a quantizable
module (Linear, Embedding; or whatever the model's `quant_predicate` says) and its input width is a
multiple of the group size. Asking mlx-lm's model object keeps us from restating that rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn


@dataclass(frozen=True)
class QuantPolicy:
    bits: int
    group_size: int
    mode: str = "affine"

    def config_entry(self) -> dict:
        """What mlx-lm expects under config.json's "quantization" key."""
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}


def quantizable_modules(model: nn.Module, policy: QuantPolicy) -> set[str]:
    """Paths of the modules mlx-lm would quantize in `model` (an unquantized, lazily built model)."""
    model_predicate = getattr(model, "quant_predicate", None)
    paths = set()
    for path, module in model.named_modules():
        if not hasattr(module, "to_quantized") or module.weight.shape[-1] % policy.group_size:
            continue
        if model_predicate is not None and not model_predicate(path, module):
            continue
        paths.add(path)
    return paths


def quantize(weight: mx.array, policy: QuantPolicy) -> dict[str, mx.array]:
    """The three arrays mlx-lm stores for a quantized weight, keyed by suffix."""
    packed, scales, biases = mx.quantize(weight, policy.group_size, policy.bits, mode=policy.mode)
    return {"weight": packed, "scales": scales, "biases": biases}
