"""gpt-oss for mlx-lm, as transformers computes it: mlx-lm's gpt_oss with YaRN's correction range as the config says.

siliconvert writes this file into an MLX folder (recipe `model_file: faithful`); `mlx_lm.load(path,
trust_remote_code=True)` runs it. YaRN blends each rotary dimension's original frequency with its interpolated one
along a linear ramp between two correction dimensions. mlx-lm's YarnRoPE always rounds those out to whole dimensions
(floor, ceil); gpt-oss's config says `truncate: false`, and transformers then ramps between the exact fractional
ones, so the dimensions at the ramp's ends rotate at other frequencies in mlx-lm. Here the rope is transformers'
(`_compute_yarn_parameters`): the range truncated or not as `rope_scaling` says, the attention factor from
`attention_factor`, else mscale over mscale_all_dim where both are set, else from the factor. Everything else
(sinks, windows, the experts and their clamped SwiGLU, the router) is mlx-lm's gpt_oss, imported as it is.
"""

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import gpt_oss


@dataclass
class ModelArgs(gpt_oss.ModelArgs):
    max_position_embeddings: int = 131072  # YaRN's factor where the config gives none: this over the original


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


class YarnRoPE(nn.Module):
    """YaRN as transformers computes it, its correction range truncated only where `truncate` is not false."""

    def __init__(self, dims: int, base: float, scaling: dict, max_position_embeddings: int):
        super().__init__()
        original = scaling["original_max_position_embeddings"]
        factor = scaling.get("factor") or max_position_embeddings / original
        beta_fast = scaling.get("beta_fast") or 32
        beta_slow = scaling.get("beta_slow") or 1

        def correction_dim(rotations: float) -> float:
            return dims * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dims - 1)
        if low == high:
            high += 0.001  # a ramp of one point
        # 1 where a dimension keeps its original frequency, 0 where it is interpolated
        extrapolated = 1 - mx.clip((mx.arange(dims // 2, dtype=mx.float32) - low) / (high - low), 0, 1)
        inv_freq = base ** -(mx.arange(0, dims, 2, dtype=mx.float32) / dims)
        inv_freq = inv_freq / factor * (1 - extrapolated) + inv_freq * extrapolated
        self._freqs = 1 / inv_freq  # mx.fast.rope's freqs are wavelengths over 2π: 1 / inverse frequency

        attention_factor = scaling.get("attention_factor")
        if attention_factor is None:
            mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
            attention_factor = (yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
                                if mscale and mscale_all_dim else yarn_mscale(factor))
        self.attention_factor = attention_factor
        self.dims = dims

    def __call__(self, x: mx.array, offset=0):
        # transformers scales cos and sin by the factor: q and k each once, so q·k by its square
        return mx.fast.rope(
            x.at[..., : self.dims].multiply(self.attention_factor),
            self.dims,
            traditional=False,
            base=None,
            scale=1.0,
            offset=offset,
            freqs=self._freqs,
        )


class Model(gpt_oss.Model):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        scaling = args.rope_scaling
        if scaling and scaling.get("rope_type", scaling.get("type")) == "yarn":
            for layer in self.layers:  # in place of mlx-lm's YarnRoPE
                layer.self_attn.rope = YarnRoPE(args.head_dim, args.rope_theta, scaling, args.max_position_embeddings)
