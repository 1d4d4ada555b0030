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

A planned package (precision: auto) gives each weight its own precision, int4 also in blocks of 16, 64 or 128
(`int4-b<n>`): the pass takes one config per op, and `quantize_weights` asks `precision_of` for each weight id.
The planner's costs (quantize/sensitivity.py `coreml_costs`) quantize each weight with the pass's own function
(`compress`), on the weights the pass would compress (`compressible`), so the estimate is of the bytes the
package holds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass

import numpy as np

# On Linux coremltools warns at import that its prediction library is missing; compression does not need it.
logging.getLogger("coremltools").setLevel(logging.ERROR)
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import Function, Program  # noqa: E402
from coremltools.converters.mil.mil.passes.graph_pass import PassOption  # noqa: E402
from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY  # noqa: E402
from coremltools.optimize._utils import dequantize_by_scale_and_zp, select_input_output_channel_axis  # noqa: E402
from coremltools.optimize.coreml import OpLinearQuantizerConfig, OptimizationConfig  # noqa: E402
from coremltools.optimize.coreml._config import CompressionGranularity  # noqa: E402
from coremltools.optimize.coreml._quantization_passes import linear_quantize_weights  # noqa: E402

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
    """int8: per output channel; int4: per block of INT4_BLOCK input channels; int4-b<n> (a plan's other
    candidates): per block of n."""
    if precision == "int8":
        return OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel")
    dtype, _, block = precision.partition("-b")
    if dtype == "int4" and (block.isdigit() or not block):
        return OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_block",
                                       block_size=int(block or INT4_BLOCK))
    raise ValueError(f"Core ML compression is one of {PRECISIONS}, not {precision!r}")


def quantize_weights(function: Function, precision_of: Callable[[str], str | None]) -> dict[str, QuantizedWeight]:
    """Run coremltools' linear_quantize_weights pass over the consts with a weight_id of a one-function program,
    each at `precision_of(weight id)` (None: left fp16, as the shared consts must be: RoPE tables and index ranges
    carry weight ids too); return what it made of each, by weight id. Weights it leaves alone (asked to, too
    small, or 1-D) are absent. `function` is consumed: the pass rewrites it."""
    uses = []  # (weight id, the op that reads its const, under which input, its precision)
    for op in function.operations:
        if op.op_type == "const" and op.weight_id is not None and (precision := precision_of(op.weight_id)):
            (reader,) = op.outputs[0].child_ops
            uses.append((op.weight_id, reader, next(k for k, v in reader.inputs.items() if v is op.outputs[0]),
                         precision))
    program = Program()
    program.add_function("main", function)
    quantizer = PASS_REGISTRY["compression::linear_quantize_weights"]
    config = OptimizationConfig(op_name_configs={reader.inputs[key].op.name: weight_config(precision)
                                                 for _, reader, key, precision in uses})
    quantizer.set_options([PassOption("config", config)])
    quantizer.apply(program)
    quantized: dict[str, QuantizedWeight] = {}
    for weight, reader, key, _ in uses:
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


def compressible(function: Function, weights: Collection[str]) -> Iterator[tuple[str, np.ndarray]]:
    """(weight id, values as output channels × input channels) of each of `weights` the pass would compress, once
    per weight id, as coremltools decides it (`need_compress_const`: rank above 1, more values than the configs'
    weight_threshold). The values are the const's own (memory-mapped from a stored package: one at a time)."""
    quantizer = PASS_REGISTRY["compression::linear_quantize_weights"]
    threshold = weight_config("int8").weight_threshold
    seen = set()
    for op in function.operations:
        if op.op_type != "const" or op.weight_id not in weights or op.weight_id in seen:
            continue
        with function:  # the pass asks inside the function (it reads the opset version there)
            if not quantizer.need_compress_const(op, False, threshold):
                continue
        # `compress` lays blocks along axis 1 of a (rows × columns) view: the pass must read the weight so too
        if select_input_output_channel_axis(op) != (1, 0):
            raise RuntimeError(f"coremltools reads {op.weight_id} with other channel axes than (out, in)")
        seen.add(op.weight_id)
        value = op.outputs[0].val
        yield op.weight_id, value.reshape(value.shape[0], -1)


def compress(weight: np.ndarray, precision: str) -> QuantizedWeight | None:
    """An (output channels × input channels) weight as the pass compresses it at `precision`, through the
    pass's own function (`blockwise_compress_by_dtype`, with the block sizes it infers for such a weight); None
    where it cannot (input channels not a whole number of blocks), as the pass then leaves it fp16."""
    config = weight_config(precision)
    columns = config.block_size if config.granularity == CompressionGranularity.PER_BLOCK else 0
    made = linear_quantize_weights.blockwise_compress_by_dtype(weight, config.dtype, config.mode, [1, columns])
    return None if made is None else QuantizedWeight(made.data, made.scale, made.offset)


def decompress(weight: QuantizedWeight) -> np.ndarray:
    """The fp16 values the runtime makes of a compressed weight (what the pass's own `decompress` computes)."""
    return dequantize_by_scale_and_zp(weight.data, weight.scale, weight.offset)


def stored_bytes(weight: QuantizedWeight, precision: str, rows: int | None = None) -> int:
    """Bytes of a compressed weight in weight.bin: its data at the precision's bits (int4 packs two to a byte),
    its scales and zero points, each a blob of its own. `rows`: the whole weight's output channels where `weight`
    is a sample of its rows (every row stores alike; the blobs' padding is the whole weight's)."""
    bits = weight_config(precision).dtype.get_bitwidth()
    rows = rows or len(weight.data)

    def values(part: np.ndarray) -> int:  # the whole weight's count of this part's values
        return part.size // len(part) * rows

    parts = [values(weight.data) * bits // 8,
             *(values(part) * part.itemsize for part in (weight.scale, weight.offset) if part is not None)]
    return sum(blob_bytes(n) for n in parts)


def blob_bytes(nbytes: int) -> int:
    """A blob's share of weight.bin: a 64-byte record, then its data padded to 64 bytes (MIL blob storage v2,
    convert/coreml/package.py)."""
    return 64 + -(-nbytes // 64) * 64


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
