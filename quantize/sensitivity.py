"""What quantizing each tensor to each candidate type costs at the output, estimated one tensor at a time.

The estimate. A linear layer y = W x whose weight is quantized to Q(W) is off by e = (W − Q(W)) x. Over the
calibration text, with the input columns taken as uncorrelated, the expected ‖e‖² is
Σ_ij a_j (W_ij − Q(W)_ij)², where a_j is the mean of x_j² over the calibration tokens: exactly llama.cpp's
importance matrix, which quantize/gguf.py already computes (`importance_matrix`). Divided by the expected
‖y‖² = Σ_ij a_j W_ij² it is the tensor's *relative output error* r, free of the layer's scale. An embedding
table (no input columns: a row is looked up) weighs every column alike. Q is the format's own quantizer:
llama.cpp's (ggml_quantize_chunk with the same importance matrix, dequantized by gguf-py) for GGUF,
`mx.quantize` / `mx.dequantize` at the candidate's bits and group size for MLX, coremltools' linear quantizer
(the compression pass's own function) for Core ML.

From errors to KLD. Small independent perturbations of the hidden states add up in the logits, and the
KL divergence of a softmax to a slightly perturbed one is second order in the perturbation, so to first
order the mean KLD is a sum of the tensors' relative errors, each times the gain of its path to the output:
predicted mean KLD = kld_per_error · Σ_tensors gain(role) · r. The gains differ by two orders of magnitude
between roles: an error in the output head lands on the logits, one in the embedding runs through every
layer at the scale of the residual stream, while a layer's own output is a small addition to that stream.
ROLE_GAINS were measured on the demo model, from GGUF files that were Q8_0 everywhere but one role group at
Q3_K or Q4_K (ΔKLD measured by llama.cpp over Δ summed r; the two widths agreed within 1.8×):
output 0.17 / 0.16, token_embd 0.29 / 0.16, attention 0.0039 / 0.0028, feed-forward 0.0017 / 0.0014.
A tied embedding is the head too: it gets both gains. `kld_per_error` (1 by default, a recipe's plan may
set it) scales them all; the pipeline corrects it after validation when a model's gains differ (planned
again with the prediction scaled by measured / predicted: siliconvert/pipeline.py). tests/test_plan_models.py
holds the estimate to measured KLD of fixed recipes on the demo model. Not modelled: a runtime's own floor
(MLX computes in the source's bfloat16, which costs the demo model about 0.002 of mean KLD at any width).

Only one tensor is in memory at a time (with its candidates' quantized copies): callers feed tensors as the
checkpoint streams them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QType

# llama.cpp types a GGUF plan chooses from. K-quants need rows of whole 256-blocks; the 32-block types
# (legacy Q4_0 … Q8_0, IQ4_NL) are what a narrower row can take, and what llama.cpp's fixed recipes fall back to.
GGUF_CANDIDATES = (QType.Q2_K, QType.Q3_K, QType.IQ4_NL, QType.Q4_0, QType.Q4_1, QType.Q4_K, QType.Q5_0,
                   QType.Q5_1, QType.Q5_K, QType.Q6_K, QType.Q8_0)
# (bits, group size) an MLX plan chooses from: every affine width mx.quantize has, at mlx-lm's group sizes
MLX_CANDIDATES = tuple((bits, group) for bits in (2, 3, 4, 5, 6, 8) for group in (32, 64, 128))
# precisions a Core ML plan chooses from (quantize/coreml.py): fp16, the fixed packages' int8 per channel and int4
# per block of 32, and int4 in blocks of 16, 64 and 128 (5, 4.25 and 4.125 bits per weight with their fp16 scales)
COREML_CANDIDATES = ("fp16", "int8", "int4-b16", "int4", "int4-b64", "int4-b128")
# Mean KLD per unit of relative output error, by role (measured on the demo model: see the module docstring).
# Roles are the architecture registry's (GGUF's base names); a layer role not listed takes attention's gain.
ROLE_GAINS = {"output": 0.165, "token_embd": 0.22, "attn": 0.0033, "ffn": 0.0015}
KLD_PER_ERROR = 1.0  # the gains' common scale, corrected per model by the re-plan loop


@dataclass(frozen=True)
class Option:
    """One way to store a tensor: its type's name, its bytes, and its relative output error times its role's
    gain (its predicted share of the mean KLD, over kld_per_error)."""

    kind: str
    nbytes: int
    error: float


@dataclass(frozen=True)
class TensorCosts:
    """Every candidate way to store one tensor, cheapest first."""

    name: str
    params: int
    options: tuple[Option, ...]


def role_gain(role: str, tied_head: bool = False) -> float:
    """The gain of a tensor's relative error to the mean KLD (ROLE_GAINS), for its architecture role."""
    if role == "token_embd":
        return ROLE_GAINS["token_embd"] + (ROLE_GAINS["output"] if tied_head else 0.0)
    if role == "output":
        return ROLE_GAINS["output"]
    return ROLE_GAINS.get(role.split("_")[0], ROLE_GAINS["attn"])


def relative_error(weight: np.ndarray, approx: np.ndarray, importance: np.ndarray | None) -> float:
    """Σ a_j (W − Q)²_ij / Σ a_j W²_ij for a (rows × columns) weight; a_j = 1 where there is no importance."""
    weight = weight.astype(np.float64, copy=False)
    delta = np.square(weight - approx.astype(np.float64, copy=False)).sum(0)
    total = np.square(weight).sum(0)
    if importance is not None:
        delta, total = delta @ importance.astype(np.float64), total @ importance.astype(np.float64)
    else:
        delta, total = delta.sum(), total.sum()
    return float(delta / total) if total > 0 else 0.0


def gguf_costs(name: str, weight: np.ndarray, importance: np.ndarray | None, quantizer, gain: float = 1.0,
               candidates: Sequence[QType] = GGUF_CANDIDATES) -> TensorCosts:
    """Each candidate llama.cpp type a (rows × columns) float32 `weight` can take, quantized by ggml with
    `importance` (what the artifact's own quantization uses), its bytes and relative output error × `gain`."""
    rows = np.ascontiguousarray(weight.reshape(-1, weight.shape[-1]), dtype=np.float32)
    fits = [qtype for qtype in candidates if rows.shape[1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0]
    pending = [(qtype, quantizer.submit(rows, qtype, importance)) for qtype in fits]
    options = []
    for qtype, work in pending:
        data = work.result()
        approx = gguf.quants.dequantize(data, qtype).reshape(rows.shape)
        options.append(Option(qtype.name, data.nbytes, gain * relative_error(rows, approx, importance)))
    return TensorCosts(name, rows.size, _sorted(options))


def mlx_option_name(bits: int, group_size: int) -> str:
    return f"{bits}bit-g{group_size}"


def mlx_costs(name: str, weight: np.ndarray, importance: np.ndarray | None, scale_bytes: int, gain: float = 1.0,
              candidates: Sequence[tuple[int, int]] = MLX_CANDIDATES) -> TensorCosts:
    """Each candidate (bits, group size) mx.quantize can store a (rows × columns) `weight` in, with scales and
    biases of `scale_bytes` each per group (mlx-lm keeps the source's float type), and its relative error
    × `gain`."""
    import mlx.core as mx

    rows = weight.reshape(-1, weight.shape[-1]).astype(np.float32, copy=False)
    array = mx.array(rows)
    options = []
    for bits, group in candidates:
        if rows.shape[1] % group:
            continue
        packed, scales, biases = mx.quantize(array, group, bits)
        approx = np.asarray(mx.dequantize(packed, scales, biases, group, bits))
        nbytes = packed.nbytes + 2 * scales.size * scale_bytes
        options.append(Option(mlx_option_name(bits, group), nbytes, gain * relative_error(rows, approx, importance)))
    return TensorCosts(name, rows.size, _sorted(options))


def coreml_costs(name: str, weight: np.ndarray, importance: np.ndarray | None, gain: float = 1.0,
                 candidates: Sequence[str] = COREML_CANDIDATES) -> TensorCosts:
    """Each candidate precision an (output × input channels) fp16 `weight` of a Core ML package can take, as
    coremltools' compression pass would store it (quantize/coreml.py `compress`), its bytes in weight.bin and
    its relative output error × `gain`. fp16 is the package's own copy: no error (the floor of fp16 compute is
    the fp16 package's, common to every plan)."""
    from siliconvert.quantize.coreml import blob_bytes, compress, decompress, stored_bytes

    options = []
    for precision in candidates:
        if precision == "fp16":
            options.append(Option("fp16", blob_bytes(weight.size * 2), 0.0))
            continue
        quantized = compress(weight, precision)
        if quantized is not None:
            options.append(Option(precision, stored_bytes(quantized, precision),
                                  gain * relative_error(weight, decompress(quantized), importance)))
    return TensorCosts(name, weight.size, _sorted(options))


def predicted_kld(total_error: float, kld_per_error: float = KLD_PER_ERROR) -> float:
    return kld_per_error * total_error


def error_of(costs: Sequence[TensorCosts], kinds: dict[str, str]) -> float:
    """Summed relative error of storing each tensor as `kinds` says (a fixed recipe's types, read from its
    artifact with `gguf_kinds` / `mlx_kinds`): how the estimate is held to measured KLD."""
    total = 0.0
    for tensor in costs:
        found = [o.error for o in tensor.options if o.kind == kinds[tensor.name]]
        if not found:
            raise ValueError(f"{tensor.name} is stored as {kinds[tensor.name]}, not a measured candidate")
        total += found[0]
    return total


def gguf_kinds(path: Path) -> dict[str, str]:
    """Each tensor's llama.cpp type in a GGUF file."""
    reader = gguf.GGUFReader(path)
    return {t.name: t.tensor_type.name for t in reader.tensors}


def mlx_kinds(folder: Path) -> dict[str, str]:
    """Each quantized module's "<bits>bit-g<group>" in an MLX folder, as mlx_lm.load reads config.json."""
    quantization = json.loads((folder / "config.json").read_text())["quantization"]
    default = mlx_option_name(quantization["bits"], quantization["group_size"])
    weights = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    modules = {name.removesuffix(".scales") for name in weights if name.endswith(".scales")}
    return {module: mlx_option_name(quantization[module]["bits"], quantization[module]["group_size"])
            if isinstance(quantization.get(module), dict) else default for module in modules}


def _sorted(options: list[Option]) -> tuple[Option, ...]:
    return tuple(sorted(options, key=lambda o: (o.nbytes, o.error, o.kind)))
