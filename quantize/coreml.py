"""Weight compression for Core ML packages through coremltools.optimize: int8 per output channel, int4 in
blocks of INT4_BLOCK input channels (each with its own scale), both symmetric.

coremltools compresses single-function models only (`linear_quantize_weights` refuses multifunction ones), and
its pass would quantize a weight shared by two functions twice. So the Core ML writer builds one function
("decode") with the fp16 weights read back from the finished fp16 package, runs coremltools' own pass
(`compression::linear_quantize_weights`) over it, and gives both functions of the compressed package the
constexpr ops the pass chose: one copy of each compressed weight, whose bytes the pass computed. Only weights
are compressed; other consts (RoPE tables, index ranges) stay exact, and so do the weights the writer keeps
(a mixture of experts' routers). Activations and compute stay fp16; the
runtime dequantizes weights (`constexpr_blockwise_shift_scale`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

# On Linux coremltools warns at import that its prediction library is missing; compression does not need it.
logging.getLogger("coremltools").setLevel(logging.ERROR)
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import Function, Program  # noqa: E402
from coremltools.converters.mil.mil.passes.graph_pass import PassOption  # noqa: E402
from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY  # noqa: E402
from coremltools.optimize.coreml import OpLinearQuantizerConfig, OptimizationConfig  # noqa: E402

PRECISIONS = ("int8", "int4")
INT4_BLOCK = 32  # input channels per int4 scale: the block size Apple's examples use for LLMs
QUANTIZED_OP = "constexpr_blockwise_shift_scale"  # what the pass makes for iOS 18 targets


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight as coremltools' pass compressed it: data (int8, or int4 in an int8-backed dtype), scales, and
    zero points (None when symmetric)."""

    data: np.ndarray
    scale: np.ndarray
    offset: np.ndarray | None

    def same_as(self, other: QuantizedWeight) -> bool:
        return all((a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))
                   for a, b in ((self.data, other.data), (self.scale, other.scale), (self.offset, other.offset)))


def weight_config(precision: str) -> OpLinearQuantizerConfig:
    if precision == "int8":
        return OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel")
    if precision == "int4":
        return OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_block",
                                       block_size=INT4_BLOCK)
    raise ValueError(f"Core ML compression is one of {PRECISIONS}, not {precision!r}")


def quantize_weights(function: Function, precision: str, keep: frozenset[str] = frozenset()
                     ) -> dict[str, QuantizedWeight]:
    """Run coremltools' linear_quantize_weights pass over the weight consts (consts with a weight_id) of a
    one-function program, except those in `keep`; return what it made of each, by weight id. Weights it leaves
    alone (kept, too small, or 1-D) are absent. `function` is consumed: the pass rewrites it."""
    uses = []  # (weight id, the op that reads its const, under which input)
    for op in function.operations:
        if op.op_type == "const" and op.weight_id is not None and op.weight_id not in keep:
            (reader,) = op.outputs[0].child_ops
            uses.append((op.weight_id, reader, next(k for k, v in reader.inputs.items() if v is op.outputs[0])))
    program = Program()
    program.add_function("main", function)
    quantizer = PASS_REGISTRY["compression::linear_quantize_weights"]
    config = OptimizationConfig(op_name_configs={reader.inputs[key].op.name: weight_config(precision)
                                                 for _, reader, key in uses})
    quantizer.set_options([PassOption("config", config)])
    quantizer.apply(program)
    quantized: dict[str, QuantizedWeight] = {}
    for weight, reader, key in uses:
        op = reader.inputs[key].op  # the const itself, or the constexpr the pass put in its place
        if op.op_type != QUANTIZED_OP:
            continue
        offset = op.inputs.get("offset")
        made = QuantizedWeight(op.data.val, op.scale.val, None if offset is None else offset.val)
        # A tied table both embeds (gather) and projects (conv) under one weight id; the pass takes output
        # channels on axis 0 for both, so both uses must come out the same to share one copy.
        if weight in quantized and not quantized[weight].same_as(made):
            raise RuntimeError(f"coremltools quantized the two uses of {weight} differently")
        quantized[weight] = made
    return quantized


def quantized_const(weight: QuantizedWeight, weight_id: str, name: str):
    """The op the pass makes for a compressed weight, in the function being built. Its consts carry weight ids
    derived from the weight's, so that both functions point at one copy of the compressed bytes."""
    parts = {"data": weight.data, "scale": weight.scale, "offset": weight.offset}
    consts = {}
    for part, value in parts.items():
        if value is not None:
            consts[part] = mb.const(val=value, name=f"{name}_{part}")
            consts[part].op.weight_id = f"{weight_id}/{part}"
    return mb.constexpr_blockwise_shift_scale(**consts, name=f"{name}_quantized")
