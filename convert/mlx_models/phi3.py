"""Phi-3 / Phi-4-mini for mlx-lm, as transformers computes them: mlx-lm's phi3 with LongRoPE read as transformers
reads it.

siliconvert writes this file into an MLX folder (recipe `model_file: faithful`); `mlx_lm.load(path,
trust_remote_code=True)` runs it. mlx-lm's SuScaledRoPE rotates with the long factors at every length and takes
its attention factor from max / original positions. transformers rotates a forward whose last position lies
within `original_max_position_embeddings` with the short factors, and one that reaches past it with the long
factors at all its positions; its attention factor is the config's `attention_factor`, else derived from
`factor`, else from max / original positions. Everything else is mlx-lm's phi3, imported as it is.

A forward that reaches past the original context rotates all its positions with the long factors, those of
earlier forwards too: keys cached within the original context (short factors) are rotated again as the long
factors would have rotated them the first time a forward crosses it, so decoding computes what a forward over the
whole sequence computes (transformers' own generation keeps them, mixing the two; so does a cache that cannot
be rewritten here, mlx-lm's quantized one).
"""

import math

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import phi3
from mlx_lm.models.cache import KVCache

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

    def lengthen(self, keys: mx.array) -> mx.array:
        """Keys at positions 0, 1, … rotated with the short factors, rotated instead with the long ones."""
        rotated = keys.astype(mx.float32)
        for freqs, direction in ((self._short_freqs, -1.0), (self._long_freqs, 1.0)):
            rotated = mx.fast.rope(
                rotated, self.dims, traditional=False, base=None, scale=direction, offset=0, freqs=freqs
            )
        return rotated.astype(keys.dtype)


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

    def __call__(self, inputs: mx.array, cache=None):
        rope = self.layers[0].self_attn.rope
        if cache is not None and isinstance(rope, LongRoPE):
            offset = cache[0].offset
            if isinstance(offset, int) and 0 < offset <= rope.original_max_position_embeddings < (
                offset + inputs.shape[1]
            ):
                for layer_cache in cache:
                    if isinstance(layer_cache, KVCache):
                        keys = layer_cache.keys[..., :offset, :]
                        layer_cache.keys[..., :offset, :] = rope.lengthen(keys)
        return super().__call__(inputs, cache)
