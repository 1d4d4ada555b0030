"""What quantizing each tensor to each candidate type costs at the output, estimated one tensor at a time.

The estimate. A linear layer y = W x whose weight is quantized to Q(W) is off by e = (W − Q(W)) x. Over the
calibration text, with the input columns taken as uncorrelated, the expected ‖e‖² is
Σ_ij a_j (W_ij − Q(W)_ij)², where a_j is the mean of x_j² over the calibration tokens: exactly llama.cpp's
importance matrix, which quantize/gguf.py already computes (`importance_matrix`). Divided by the expected
‖y‖² = Σ_ij a_j W_ij² it is the tensor's *relative output error* r, free of the layer's scale. An embedding
table (no input columns: a row is looked up) weighs every column alike. Q is the format's own quantizer:
llama.cpp's (ggml_quantize_chunk with the same importance matrix, dequantized by gguf-py) for GGUF,
`mx.quantize` / `mx.dequantize` at the candidate's bits and group size for MLX.

From errors to KLD. Small independent perturbations of the hidden states add up in the logits, and the
KL divergence of a softmax to a slightly perturbed one is second order in the perturbation, so to first
order the mean KLD is a sum of the tensors' relative errors, each times the gain of its path to the output.
The planner takes one gain for all tensors: predicted mean KLD = KLD_PER_ERROR · Σ_tensors r. The constant
was fitted on the demo model (`bench/plan.py` prints the fit: measured mean KLD of the fixed recipes over
their Σ r), and tests/test_plan.py holds the estimate to the measured KLD of fixed recipes on the demo
model (same order of recipes, within a factor). A model whose gains differ is corrected after validation:
the pipeline scales the prediction by measured / predicted and plans again (siliconvert/pipeline.py).

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
# Fitted on the demo model: mean KLD per unit of summed relative output error (see the module docstring).
KLD_PER_ERROR = 0.05


@dataclass(frozen=True)
class Option:
    """One way to store a tensor: its type's name, its bytes, and its relative output error."""

    kind: str
    nbytes: int
    error: float


@dataclass(frozen=True)
class TensorCosts:
    """Every candidate way to store one tensor, cheapest first."""

    name: str
    params: int
    options: tuple[Option, ...]


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


def gguf_costs(name: str, weight: np.ndarray, importance: np.ndarray | None, quantizer,
               candidates: Sequence[QType] = GGUF_CANDIDATES) -> TensorCosts:
    """Each candidate llama.cpp type a (rows × columns) float32 `weight` can take, quantized by ggml with
    `importance` (what the artifact's own quantization uses), its bytes and relative output error."""
    rows = np.ascontiguousarray(weight.reshape(-1, weight.shape[-1]), dtype=np.float32)
    fits = [qtype for qtype in candidates if rows.shape[1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0]
    pending = [(qtype, quantizer.submit(rows, qtype, importance)) for qtype in fits]
    options = []
    for qtype, work in pending:
        data = work.result()
        approx = gguf.quants.dequantize(data, qtype).reshape(rows.shape)
        options.append(Option(qtype.name, data.nbytes, relative_error(rows, approx, importance)))
    return TensorCosts(name, rows.size, _sorted(options))


def mlx_option_name(bits: int, group_size: int) -> str:
    return f"{bits}bit-g{group_size}"


def mlx_costs(name: str, weight: np.ndarray, importance: np.ndarray | None, scale_bytes: int,
              candidates: Sequence[tuple[int, int]] = MLX_CANDIDATES) -> TensorCosts:
    """Each candidate (bits, group size) mx.quantize can store a (rows × columns) `weight` in, with scales and
    biases of `scale_bytes` each per group (mlx-lm keeps the source's float type), and its relative error."""
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
        options.append(Option(mlx_option_name(bits, group), nbytes, relative_error(rows, approx, importance)))
    return TensorCosts(name, rows.size, _sorted(options))


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
