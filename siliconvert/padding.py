"""An MLP widened with zero units, so that its down projection's rows fit the runtimes' quantization blocks.

llama.cpp quantizes a row only in whole blocks (32 weights at least) and mlx only in whole groups (32, 64 or 128),
so where `intermediate_size` is no multiple of 32 (200, 688) every quant keeps the down projection in float. A
planned artifact instead pads the MLP to the next multiple of 32: the added units' gate and up rows are zero, so
they output act(0) · 0 = 0 whatever the activation, and the down projection's added columns multiply zeros: the
artifact computes what the checkpoint does, with rows that fit. Each format's writer says which tensors are the
MLP's (convert/gguf.py by GGUF names, convert/mlx.py by asking mlx-lm's model); this module holds what they share.
"""

from __future__ import annotations

import numpy as np

PADDED_BLOCK = 32  # the smallest block of llama.cpp's quantized types and mlx's smallest group


def padded_width(width: int) -> int | None:
    """The width an MLP of `width` units is padded to, or None where its rows already fit."""
    return None if width % PADDED_BLOCK == 0 else -(-width // PADDED_BLOCK) * PADDED_BLOCK


def padded_columns(importance: np.ndarray | None, width: int) -> np.ndarray | None:
    """An importance-matrix row (one value per input column) for a tensor padded to `width` columns: the padding's
    inputs are always zero. Any other (an expert stack's, a row per expert) is returned as it is."""
    if importance is None or importance.ndim != 1 or importance.size >= width:
        return importance
    return np.pad(importance, (0, width - importance.size))


def why(width: int, padded: int, runtime: str) -> dict:
    """What a plan's report says of the padding."""
    return {"from": width, "to": padded,
            "why": f"the down projection's rows of {width} fill no block of {PADDED_BLOCK}, so {runtime} keeps them in "
                   "float in every quant; the added MLP units have zero gate and up rows, so they output zero and the "
                   "artifact computes what the checkpoint does"}
