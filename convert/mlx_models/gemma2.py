"""Gemma 2 for mlx-lm, as transformers computes it: mlx-lm's gemma2 with the sliding window it leaves out.

siliconvert writes this file into an MLX folder (recipe `model_file: faithful`); `mlx_lm.load(path,
trust_remote_code=True)` runs it. mlx-lm's own gemma2 attends over the whole context in every layer, where
Gemma 2's sliding layers (`layer_types`) see a key at most `sliding_window` - 1 positions back: past the window
its logits are another model's. Everything else (norms, soft-caps, GeGLU, the tied head) is mlx-lm's gemma2,
imported as it is.
"""

from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.models import gemma2
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache, RotatingKVCache


@dataclass
class ModelArgs(gemma2.ModelArgs):
    sliding_window: int | None = None
    layer_types: list[str] | None = None  # "sliding_attention" or "full_attention" per layer

    def __post_init__(self):
        if self.layer_types is None:
            self.layer_types = ["full_attention"] * self.num_hidden_layers
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise ValueError("sliding layers need sliding_window")


class GemmaModel(gemma2.GemmaModel):
    def __call__(self, inputs: mx.array, cache=None):
        h = self.embed_tokens(inputs)
        h = h * (self.args.hidden_size**0.5)

        if cache is None:
            cache = [None] * len(self.layers)

        # one mask per kind of layer, made with the cache of the first layer of that kind
        kinds = self.args.layer_types
        windows = {"sliding_attention": self.args.sliding_window, "full_attention": None}
        masks = {
            kind: create_attention_mask(
                h, cache[kinds.index(kind)], window_size=windows[kind], return_array=True
            )
            for kind in set(kinds)
        }

        for layer, c, kind in zip(self.layers, cache, kinds, strict=True):
            h = layer(h, masks[kind], c)

        return self.norm(h)


class Model(gemma2.Model):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.model = GemmaModel(args)  # in place of gemma2's, which has no windows

    def make_cache(self):
        # a sliding layer keeps its window's keys and values only, as transformers' sliding cache does
        return [
            RotatingKVCache(max_size=self.args.sliding_window)
            if kind == "sliding_attention"
            else KVCache()
            for kind in self.args.layer_types
        ]
