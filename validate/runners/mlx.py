"""MLX runner: the artifact opened by `mlx_lm.load`, exactly as a user would open it."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np

from siliconvert.validate.runners.base import Runner


def mlx_device_name() -> str:
    device = mx.default_device()
    if device.type == mx.cpu:
        return "CPU (mlx)"
    name = mx.device_info().get("device_name", "GPU")
    backend = "Metal" if mx.metal.is_available() else "CUDA"
    return f"{name} GPU ({backend})" if backend == "Metal" else f"{name} ({backend})"


class MLXRunner(Runner):
    runtime = "mlx"

    def __init__(self, path: Path, options: dict) -> None:
        from mlx_lm import load

        self.model, self.tokenizer = load(str(path))
        self.device = mlx_device_name()
        self.cache = None

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        return self._last(self.model(mx.array(tokens)[None]), all_positions=True)

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def start(self, prompt: np.ndarray) -> np.ndarray:
        from mlx_lm.models.cache import make_prompt_cache

        self.cache = make_prompt_cache(self.model)
        return self._last(self.model(mx.array(prompt)[None], cache=self.cache))

    def step(self, token: int) -> np.ndarray:
        return self._last(self.model(mx.array([[token]]), cache=self.cache))

    @staticmethod
    def _last(out: mx.array, all_positions: bool = False) -> np.ndarray:
        out = out[0] if all_positions else out[0, -1]
        return np.array(out.astype(mx.float32))
