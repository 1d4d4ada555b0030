"""Weight compression for Core ML packages through coremltools.optimize: int8 per output channel, int4 in
blocks of INT4_BLOCK input channels (each with its own scale), both symmetric.

coremltools compresses single-function models only (`linear_quantize_weights` refuses multifunction ones),
so the Core ML writer compresses each saved fp16 function package and merges the results, exactly as it
merges the fp16 ones. Quantizing is deterministic, so the two functions' weights still deduplicate.
Activations and compute stay fp16; the runtime dequantizes weights (`constexpr_blockwise_shift_scale`).
"""

from __future__ import annotations

import logging
from pathlib import Path

# On Linux coremltools warns at import that its prediction library is missing; compression does not need it.
logging.getLogger("coremltools").setLevel(logging.ERROR)
import coremltools as ct  # noqa: E402
from coremltools.optimize.coreml import (  # noqa: E402
    OpLinearQuantizerConfig,
    OptimizationConfig,
    linear_quantize_weights,
)

PRECISIONS = ("int8", "int4")
INT4_BLOCK = 32  # input channels per int4 scale: the block size Apple's examples use for LLMs
# Consts left in fp16 whatever the precision: the RoPE tables hold exact angles, not learned weights.
KEEP_FP16 = ("rope_cos_table", "rope_sin_table")


def compression_config(precision: str) -> OptimizationConfig:
    if precision == "int8":
        weights = OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel")
    elif precision == "int4":
        weights = OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int4", granularity="per_block", block_size=INT4_BLOCK
        )
    else:
        raise ValueError(f"Core ML compression is one of {PRECISIONS}, not {precision!r}")
    return OptimizationConfig(global_config=weights, op_name_configs=dict.fromkeys(KEEP_FP16))


def compress_function_package(source: Path, precision: str, destination: Path) -> None:
    """Quantize the weights of one saved single-function fp16 package into a new package."""
    model = ct.models.MLModel(str(source), skip_model_load=True)
    compressed = linear_quantize_weights(model, compression_config(precision))
    compressed.save(str(destination))
