"""Phi-3 / Phi-4-mini for mlx-lm, as transformers computes them: mlx-lm's phi3 with LongRoPE read as transformers
reads it.

siliconvert writes this file into an MLX folder (recipe `model_file: faithful`); `mlx_lm.load(path,
trust_remote_code=True)` runs it. mlx-lm's SuScaledRoPE rotates with the long factors at every length and takes
its attention factor from max / original positions. transformers rotates a forward whose last position lies
within `original_max_position_embeddings` with the short factors, and one that reaches past it with the long
factors at all its positions; its attention factor is the config's `attention_factor`, else derived from
`factor`, else from max / original positions. Everything else is mlx-lm's phi3, imported as it is.

As in transformers, a cache filled with the short factors keeps them when later tokens cross into the long
ones: a generation that crosses the original context mixes the two, there as here.
"""

import math

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import phi3

ModelArgs = phi3.ModelArgs


class LongRoPE(nn.Module):
    def __init__(self, dims: int, base: float, original_max_position_embeddings: int, short_factor, long_factor,
                 attention_factor: float):
        super().__init__()
        self.dims = dims
        self.original_max_position_embeddings = original_max_position_embeddings
        wavelengths = base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
        self._short_freqs = mx.array(short_factor, dtype=mx.float32) * wavelengths
        self._long_freqs = mx.array(long_factor, dtype=mx.float32) * wavelengths
        self.attention_factor = attention_factor

    def __call__(self, x: mx.array, offset=0):
        last = x.shape[-2] + (offset if isinstance(offset, int) else mx.max(offset).item())
        long = last > self.original_max_position_embeddings
        return mx.fast.rope(
            x.at[..., : self.dims].multiply(self.attention_factor),
            self.dims,
            traditional=False,
            base=None,
            scale=1.0,
            offset=offset,
            freqs=self._long_freqs if long else self._short_freqs,
        )


def attention_factor(args: ModelArgs, original: int) -> float:
    scaling = args.rope_scaling
    if scaling.get("attention_factor") is not None:
        return scaling["attention_factor"]
    factor = scaling.get("factor") or args.max_position_embeddings / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


class Model(phi3.Model):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        scaling = args.rope_scaling
        if scaling and scaling["type"] in ("longrope", "su"):
            original = scaling.get("original_max_position_embeddings", args.original_max_position_embeddings)
            head_dim = args.hidden_size // args.num_attention_heads
            for layer in self.layers:  # in place of mlx-lm's SuScaledRoPE
                layer.self_attn.rope = LongRoPE(
                    int(head_dim * args.partial_rotary_factor),
                    args.rope_theta,
                    original,
                    scaling["short_factor"],
                    scaling["long_factor"],
                    attention_factor(args, original),
                )
