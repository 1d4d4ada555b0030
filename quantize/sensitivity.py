"""What quantizing each tensor to each candidate type costs at the output, estimated one tensor at a time.

The estimate. A linear layer y = W x whose weight is quantized to Q(W) is off by e = (W − Q(W)) x. Over the
calibration text, with the input columns taken as uncorrelated, the expected ‖e‖² is
Σ_ij a_j (W_ij − Q(W)_ij)², where a_j is the mean of x_j² over the calibration tokens: exactly llama.cpp's
importance matrix, which siliconvert/calibration.py computes (`Calibration.importance`). Divided by the expected
‖y‖² = Σ_ij a_j W_ij² it is the tensor's *relative output error* r, free of the layer's scale. An embedding
table (no input columns: a row is looked up) weighs every column alike. Q is the format's own quantizer:
llama.cpp's (ggml_quantize_chunk with the same importance matrix, dequantized by gguf-py) for GGUF,
`mx.quantize` / `mx.dequantize` at the candidate's bits and group size for MLX, coremltools' linear quantizer
(the compression pass's own function) for Core ML.

Measured gains. The gains below were fitted on the demo model and are 30–50× off on others; a run measures each
weight's own gain on the model it converts (siliconvert/gains.py: the weight perturbed by noise of known r in a
streamed forward, KLD / r at the logits, per layer and weight), and the writers weigh costs by those
(`Calibration.gain`). ROLE_GAINS stay only as the fallback for a weight the sensitivity forward did not measure.
Measured gains are KLD per unit r already: kld_per_error stays 1 unless the re-plan loop fits it. A measured
weight also has a shrink gain: a candidate's error has a part that is the weight scaled, Δ ≈ α·W (`shrink_share`:
α², importance-weighted), which costs far more per unit r than the rest (4–200× on the demo model, where 2- and
3-bit types shrink by a few percent); its α² is weighed by the shrink gain, the rest of r by the noise gain
(siliconvert/gains.py says how both are measured and why).

Rounded inputs (GGUF). Where a weight is a quantized type, llama.cpp's CPU kernels round the matmul's input too,
to ggml's vec_dot_type of that type (`GGUF_INPUT_ROUNDING`: Q8_0, int8 in blocks of 32, for the 32-block types,
Q8_1 rounding alike; Q8_K, blocks of 256, for the K-quants): a floor of that type that its weights' errors lack (the
real SmolLM2-135M's planned Q4_1 GGUF measured 0.0031 where its weights' errors predicted 0.0001; every input
rounded to Q8_0 costs that model 0.0033). What each weight's input so rounded costs is measured on the model with
the gains (siliconvert/gains.py, `Calibration.input_kld`), and a GGUF candidate's cost is its weight's error ×
gain plus that (`gguf_costs`' `input_klds`), so a plan sees that Q4_K's 256-blocks round the input more coarsely
than Q5_0's 32-blocks, and a fixed recipe's prediction includes its floor.

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
set it) scales them all; the pipeline fits it after validation when a model's gains differ (planned again
under measured ≈ kld_floor + kld_per_error × summed error: siliconvert/commands/pipeline.py `fit_prediction`).
tests/test_plan_models.py holds the estimate to measured KLD of fixed recipes on the demo model. Not in the
costs: a runtime's own floor (MLX in a bfloat16 source's type costs the demo model about 0.002 of mean KLD at
any width; a plan computes in float16 where the stream fits it), which the re-plan loop fits as kld_floor; and
how sensitivity varies between layers of one role (measured on a SmolLM3 test checkpoint: layer 0's MLP 8× its
role's gain, layer 1's attention 0.07×), which the loop can only scale as a whole.

Mixtures of experts. An expert stack [experts, rows, columns] is one tensor of one type in both formats
(llama.cpp's ffn_*_exps, mlx-lm's SwitchLinear), each expert's matrix quantized with its own row of the
importance matrix ([experts, columns]: the mean x² of the tokens routed to it). An expert's error reaches the
output only for the tokens routed to it, so the stack's relative error is the mean of its experts' relative
errors weighted by the share of calibration tokens each was sent (`expert_error`); an expert no token reached
counts for nothing. Its gain is the dense feed-forward's: each token's block output is the gated sum of its
`used` experts' outputs, whose errors add as their outputs do, so the block's relative output error is the mean
of the chosen experts' relative errors, which over the tokens is the stack's weighted mean, and the block adds
it to the residual stream as a dense MLP does. Routers are never planned (F32 in llama.cpp, 8 bits in mlx-lm: a
router that picks other experts costs more than its bytes); a shared expert is a dense MLP.
Checked as ROLE_GAINS were measured (bench/moe_gains.py), on the trained 4-expert top-2 test checkpoints (Q8_0
files with one role group at Q4_0, 1024 positions): measured over predicted ΔKLD was, for the expert stacks
against attention, 3.45 / 6.08 (Qwen3-MoE), 2.30 / 3.90 (Qwen2-MoE, whose shared expert, a dense MLP, gave
3.71), 0.82 / 1.76 (Mixtral), 1.68 / 5.49 (OLMoE), and 8.3 / 8.2 at Q5_0 (Qwen3-MoE). So the stacks cost about
0.6× the dense gain relative to their neighbours (the chosen experts' outputs add partly in phase while their
errors do not), within the 1.8× the demo's gains varied by; planning with the stacks' gain at 0.3×–1.5× of it
changed the plans at Q4_K_M's size by at most a type on two stacks and their KLD by ≤ 10% (within noise), so
the dense gain is kept. The ratios also grow as the errors shrink, likely because an error upstream of a router
flips near-tied choices at a rate that goes with the error's size (√r), not its square (r): a cost this
first-order sum leaves to the pipeline's re-plan (kld_per_error).

Sampled rows. Every candidate of every format quantizes each row (output channel) on its own: llama.cpp's blocks,
mx.quantize's groups and coremltools' int8 per channel and int4 per block all run along a row, with the columns'
importance common to all rows. So a tensor's relative error is a ratio of sums over rows, which a sample of rows
estimates, and the sampled rows come out of the quantizer exactly as they do in the whole tensor. A tensor of more
than SAMPLED_WEIGHTS weights is measured on a sample of its rows (`sample_rows`: one row in each of equal strata,
the same rows of every expert of a stack), at least MIN_SAMPLED_ROWS of each matrix; its bytes are the whole
tensor's (every row stores alike). Smaller tensors (every test checkpoint's) are measured whole. The budget is
2²¹ weights because of what it measured (bench/plan_sampling.py, on 2 cores) on a 4096 × 11008 tensor (a 7B MLP's)
with rows of lognormal scale, outlier columns and a heavy-tailed importance: at 2²¹ (190 rows) over 300 draws of the
rows the worst candidate's estimate was off by 2.2% (GGUF), 2.1% (MLX) and 3.4% (Core ML int8, one scale per row)
sd, 6.0 / 5.8 / 8.6% at p99 (at 2²⁰: 9.0 / 8.1 / 15.5%), far inside the role gains' own 1.8×; the cost functions
ran 21×, 24× and 18× faster than on the whole tensor, and a Mistral-7B plan's measurement comes to about 15, 7 and
6 minutes instead of 3.6, 1.9 and 1.2 hours. Heavier-tailed values (Student t, 4 degrees) doubled Core ML int8's
spread: a single value sets its row's scale.

Only one tensor is in memory at a time (with two candidates' quantized copies): callers feed tensors as the
checkpoint streams them.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QType

from siliconvert.gains import Q8_0, Q8_K

# llama.cpp types a GGUF plan chooses from. K-quants and i-quants need rows of whole 256-blocks; the 32-block types
# (legacy Q4_0 … Q8_0, IQ4_NL, MXFP4) are what a narrower row can take, and what llama.cpp's fixed recipes fall back
# to; F16 fits every row, so no row shape leaves a tensor without an option (a Phi-3 of hidden 144 has no row a block
# divides), and it is where a quality goal below every quantized type's floor ends. The i-quants are the types
# llama.cpp's IQ* recipes use (IQ2_XXS 2.06 bits per weight, IQ2_S 2.5, IQ3_XXS 3.06, IQ3_S 3.44, IQ4_XS 4.25); the
# ternary TQ1_0 / TQ2_0 are not candidates: they keep only a model trained ternary, which a plan has no way to tell.
GGUF_CANDIDATES = (QType.IQ2_XXS, QType.IQ2_S, QType.Q2_K, QType.IQ3_XXS, QType.Q3_K, QType.IQ3_S, QType.IQ4_XS,
                   QType.IQ4_NL, QType.MXFP4, QType.Q4_0, QType.Q4_1, QType.Q4_K, QType.Q5_0, QType.Q5_1, QType.Q5_K,
                   QType.Q6_K, QType.Q8_0, QType.F16)
# Types llama.cpp makes only with an importance matrix (src/llama-quant.cpp tensor_requires_imatrix; ggml aborts
# on IQ2_XXS and IQ2_XS without one): not candidates of a tensor that has none (an embedding table)
GGUF_NEED_IMPORTANCE = (QType.IQ1_S, QType.IQ1_M, QType.IQ2_XXS, QType.IQ2_XS, QType.IQ2_S, QType.IQ3_XXS)
# How llama.cpp's CPU kernels round a matmul's input for each quantized weight type (ggml's type_traits vec_dot_type;
# Q8_1, Q4_1's and Q5_1's, rounds as Q8_0 does and differs only in also storing the block's sum; F16's input is
# rounded to float16, whose error is far below these)
GGUF_INPUT_ROUNDING = {QType.Q2_K: Q8_K, QType.Q3_K: Q8_K, QType.Q4_K: Q8_K, QType.Q5_K: Q8_K, QType.Q6_K: Q8_K,
                       QType.IQ2_XXS: Q8_K, QType.IQ2_S: Q8_K, QType.IQ3_XXS: Q8_K, QType.IQ3_S: Q8_K,
                       QType.IQ4_XS: Q8_K, QType.IQ4_NL: Q8_0, QType.MXFP4: Q8_0, QType.Q4_0: Q8_0, QType.Q4_1: Q8_0,
                       QType.Q5_0: Q8_0, QType.Q5_1: Q8_0, QType.Q8_0: Q8_0}
# (bits, group size) an MLX plan chooses from: every affine width mx.quantize has, at mlx-lm's group sizes
MLX_CANDIDATES = tuple((bits, group) for bits in (2, 3, 4, 5, 6, 8) for group in (32, 64, 128))
# and mx.quantize's float modes, (bits, group size) each: 4-bit floats with an 8-bit scale per 32 (4.25 bits per
# weight) or per 16 (4.5), 8-bit floats per 32 (8.25)
MLX_MODE_CANDIDATES = {"mxfp4": (4, 32), "nvfp4": (4, 16), "mxfp8": (8, 32)}
# precisions a Core ML plan chooses from (quantize/coreml.py): fp16, the fixed packages' int8 per channel and int4
# per block of 32, int4 in blocks of 16, 64 and 128 (5, 4.25 and 4.125 bits per weight with their fp16 scales), int4
# with zero points in blocks of 32, 64 and 128 (4.625, 4.3125, 4.16: on the real SmolLM2-135M's layers 0, 14 and 29
# by GPTQ, int4-zp-b64 left 0.87× int4's output error at fewer bits, int4-zp 0.61×: bench/README.md), and
# the palettes of 6 and 4 bits (a table of fp16 values per 16 output channels: a few hundredths of a bit more on a
# wide row). Not pal3 / pal2: on the demo model the estimate under-read their fixed packages' measured KLD (×1.16,
# ×1.20, against ×0.94–1.12 for pal6, pal4, int4), and a plan for mean KLD 0.001 that took pal3 for 12 of its 30
# weights measured 0.00127.
COREML_CANDIDATES = ("fp16", "int8", "pal6", "int4-b16", "int4", "int4-b64", "int4-b128", "int4-zp", "int4-zp-b64",
                     "int4-zp-b128", "pal4")
# Mean KLD per unit of relative output error, by role (measured on the demo model: see the module docstring).
# Roles are the architecture registry's (GGUF's base names); a layer role not listed takes attention's gain.
ROLE_GAINS = {"output": 0.165, "token_embd": 0.22, "attn": 0.0033, "ffn": 0.0015}
KLD_PER_ERROR = 1.0  # the gains' common scale, corrected per model by the re-plan loop
# Weights of a tensor measured at most, and rows of each matrix at least, when its rows are sampled
SAMPLED_WEIGHTS = 1 << 21
MIN_SAMPLED_ROWS = 16


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


def split_gains(gain: float, parts: Sequence[np.ndarray], importance: Sequence[np.ndarray | None]) -> list[float]:
    """Gains of the parts a weight measured whole is stored as (an expert stack's gate_up rows as gate and up):
    the whole's r is each part's r weighted by its share of the whole's importance-weighted Σ W², so a part's gain
    is the whole's times that share. `importance`: each part's, per column (a row per expert), or None."""
    if len(parts) == 1:
        return [gain]
    norms = []
    for part, columns in zip(parts, importance, strict=True):
        squares = np.square(part.astype(np.float64)).sum(-2)  # per column (per expert and column)
        norms.append(float((squares * columns).sum() if columns is not None else squares.sum()))
    total = sum(norms)
    return [gain * norm / total if total > 0 else gain / len(parts) for norm in norms]


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


def shrink_share(weight: np.ndarray, approx: np.ndarray, importance: np.ndarray | None) -> float:
    """α² of the part α·W of the error Q − W that is the weight scaled (its projection on W under the importance
    weights a_j): the part of `relative_error` that the shrink gain weighs."""
    weight = weight.astype(np.float64, copy=False)
    delta = approx.astype(np.float64, copy=False) - weight
    along, total = (delta * weight).sum(0), np.square(weight).sum(0)
    if importance is not None:
        along, total = along @ importance.astype(np.float64), total @ importance.astype(np.float64)
    else:
        along, total = along.sum(), total.sum()
    return float((along / total) ** 2) if total > 0 else 0.0


def expert_error(matrices: np.ndarray, approximations: Iterable[np.ndarray], importance: np.ndarray | None,
                 routed_tokens: np.ndarray | None = None) -> float:
    """The relative error of a stack of expert matrices [experts, rows, columns] stored as `approximations` (one
    matrix at a time): each expert's `relative_error` with its importance row ([experts, columns]), weighted by
    its share of `routed_tokens` (all alike where none are given or none were routed). One matrix is a dense
    weight."""
    return expert_errors(matrices, approximations, importance, routed_tokens)[0]


def expert_errors(matrices: np.ndarray, approximations: Iterable[np.ndarray], importance: np.ndarray | None,
                  routed_tokens: np.ndarray | None = None) -> tuple[float, float]:
    """`expert_error` and, weighted alike, its `shrink_share`."""
    experts = len(matrices)
    tokens = np.ones(experts) if routed_tokens is None or not np.sum(routed_tokens) else np.asarray(routed_tokens)
    shares = tokens / tokens.sum()
    rows = [None] * experts if importance is None else importance.reshape(experts, -1)
    error = shrunk = 0.0
    for matrix, approx, row, share in zip(matrices, approximations, rows, shares, strict=True):
        if share:
            error += float(share) * relative_error(matrix, approx, row)
            shrunk += float(share) * shrink_share(matrix, approx, row)
    return error, shrunk


def weighed(error: float, shrunk: float, gain: float, shrink_gain: float | None) -> float:
    """A candidate's predicted share of the mean KLD (over kld_per_error): its relative error × `gain`, or, where
    the weight's shrink gain was measured, its shrink share × that and the rest × `gain`."""
    if shrink_gain is None:
        return gain * error
    return gain * max(error - shrunk, 0.0) + shrink_gain * shrunk


def sample_rows(matrices: np.ndarray, budget: int | None = SAMPLED_WEIGHTS) -> np.ndarray:
    """The rows of `matrices` ([experts,] rows × columns) whose errors are measured: all of them (`matrices`
    itself) where it holds at most `budget` weights (None: no limit); else a copy of budget / (experts × columns)
    rows of each matrix, at least MIN_SAMPLED_ROWS, the same rows of every expert. The rows split into equal
    strata, one row taken from each at an offset drawn with a fixed seed: spread evenly over the tensor, yet not
    at one stride, which could fall in step with a structure that repeats along the rows (attention heads)."""
    rows = matrices.shape[-2]
    if budget is None or matrices.size <= budget:
        return matrices
    count = min(rows, max(MIN_SAMPLED_ROWS, budget // (matrices.size // rows)))
    starts = np.arange(count + 1) * rows // count
    offsets = np.random.default_rng(0).integers(0, np.diff(starts))
    return matrices[..., starts[:-1] + offsets, :]


def gguf_costs(name: str, weight: np.ndarray, importance: np.ndarray | None, quantizer, gain: float = 1.0,
               candidates: Sequence[QType] = GGUF_CANDIDATES, routed_tokens: np.ndarray | None = None,
               sample_budget: int | None = SAMPLED_WEIGHTS, shrink_gain: float | None = None,
               input_klds: Mapping[str, float] | None = None) -> TensorCosts:
    """Each candidate llama.cpp type a (rows × columns) float32 `weight` can take, quantized by ggml with
    `importance` (what the artifact's own quantization uses), its bytes and relative output error × `gain`, plus
    the mean KLD of the weight's input rounded as that type's kernels round it (`input_klds`: rounding → KLD,
    `Calibration.input_kld`; none measured: nothing added).
    An expert stack (experts × rows × columns, `importance` a row per expert) is quantized as ggml quantizes a
    3-D tensor, each expert with its own row; its error is `expert_error`'s, weighted by `routed_tokens`.
    The error is measured on `sample_rows(…, sample_budget)`; the bytes are the whole tensor's. `shrink_gain`:
    see `weighed`."""
    whole = weight.reshape(-1, *weight.shape[-2:])  # a view: a stack's gate half is not copied out
    matrices = sample_rows(whole, sample_budget)
    if matrices.dtype != np.float32 or matrices.strides[1:] != (4 * matrices.shape[-1], 4):
        matrices = np.ascontiguousarray(matrices, dtype=np.float32)
    fits = [qtype for qtype in candidates if matrices.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0
            and (importance is not None or qtype not in GGUF_NEED_IMPORTANCE)]
    options = []

    def measure(qtype: QType, work) -> None:
        data = work.result().reshape(len(matrices), matrices.shape[1], -1)
        approximations = (gguf.quants.dequantize(expert, qtype) for expert in data)
        error, shrunk = expert_errors(matrices, approximations, importance, routed_tokens)
        floor = (input_klds or {}).get(GGUF_INPUT_ROUNDING.get(qtype), 0.0)
        options.append(Option(qtype.name, data.nbytes // matrices.shape[1] * whole.shape[1],
                              weighed(error, shrunk, gain, shrink_gain) + floor))

    # two candidates in flight: the quantizer's threads stay busy while one is measured, and memory holds two
    # quantized copies of a layer's experts, not one per candidate
    pending: deque = deque()
    for qtype in fits:
        pending.append((qtype, quantizer.submit(matrices, qtype, importance)))
        if len(pending) == 2:
            measure(*pending.popleft())
    while pending:
        measure(*pending.popleft())
    return TensorCosts(name, whole.size, _sorted(options))


def mlx_option_name(bits: int, group_size: int, mode: str = "affine") -> str:
    """An MLX option's kind: "4bit-g64" (affine), or the float mode's name ("mxfp4")."""
    return f"{bits}bit-g{group_size}" if mode == "affine" else mode


def mlx_option(kind: str) -> tuple[int, int, str]:
    """(bits, group size, mode) of an MLX option's kind (`mlx_option_name`'s)."""
    if kind in MLX_MODE_CANDIDATES:
        return (*MLX_MODE_CANDIDATES[kind], kind)
    bits, _, group = kind.partition("bit-g")
    return int(bits), int(group), "affine"


def mlx_costs(name: str, weight: np.ndarray, importance: np.ndarray | None, scale_bytes: int, gain: float = 1.0,
              candidates: Sequence[tuple[int, int]] = MLX_CANDIDATES,
              routed_tokens: np.ndarray | None = None, sample_budget: int | None = SAMPLED_WEIGHTS,
              shrink_gain: float | None = None, modes: Sequence[str] = tuple(MLX_MODE_CANDIDATES),
              affine_rounding: Callable | None = None) -> TensorCosts:
    """Each candidate (bits, group size) mx.quantize can store a (rows × columns) `weight` in, with scales and
    biases of `scale_bytes` each per group (mlx-lm keeps the source's float type), and its relative error
    × `gain`. An expert stack (experts × rows × columns, as SwitchLinear holds it) is quantized whole, as
    mlx-lm quantizes it; its error is `expert_error`'s, `importance` a row per expert. The error is measured on
    `sample_rows(…, sample_budget)`; the bytes are the whole tensor's. `shrink_gain`: see `weighed`.
    `modes`: the float modes (MLX_MODE_CANDIDATES) tried too, an 8-bit scale per group and no bias.
    `affine_rounding`: (array, bits, group) → mx.quantize's (packed, scales, biases) made another way than by
    mx.quantize (`method: clip`'s search), for the affine options: their errors and shrink shares are that
    rounding's own."""
    import mlx.core as mx

    whole = weight.reshape(-1, *weight.shape[-2:])
    matrices = sample_rows(whole, sample_budget).astype(np.float32, copy=False)
    array = mx.array(matrices)
    options = []
    tried = [(bits, group, "affine") for bits, group in candidates] + [(*MLX_MODE_CANDIDATES[m], m) for m in modes]
    for bits, group, mode in tried:
        if matrices.shape[-1] % group:
            continue
        if mode == "affine" and affine_rounding is not None:
            packed, scales, *biases = affine_rounding(array, bits, group)
        else:
            packed, scales, *biases = mx.quantize(array, group, bits, mode=mode)
        per_group = 2 * scale_bytes if mode == "affine" else scales.dtype.size  # a scale and a bias, or a scale
        nbytes = (packed.nbytes + scales.size * per_group) // matrices.shape[1] * whole.shape[1]
        approximations = (np.asarray(mx.dequantize(expert[0], expert[1], expert[2] if biases else None, group, bits,
                                                   mode=mode, dtype=mx.float32))
                          for expert in zip(packed, scales, *biases, strict=True))
        error, shrunk = expert_errors(matrices, approximations, importance, routed_tokens)
        options.append(Option(mlx_option_name(bits, group, mode), nbytes, weighed(error, shrunk, gain, shrink_gain)))
    return TensorCosts(name, whole.size, _sorted(options))


def coreml_costs(name: str, weight: np.ndarray, importance: np.ndarray | None, gain: float = 1.0,
                 candidates: Sequence[str] = COREML_CANDIDATES,
                 sample_budget: int | None = SAMPLED_WEIGHTS, shrink_gain: float | None = None) -> TensorCosts:
    """Each candidate precision an (output × input channels) fp16 `weight` of a Core ML package can take, as
    coremltools' compression pass would store it (quantize/coreml.py `compress`), its bytes in weight.bin and
    its relative output error × `gain`. fp16 is the package's own copy: no error (the floor of fp16 compute is
    the fp16 package's, common to every plan). The error is measured on `sample_rows(…, sample_budget)` (a
    palette's on whole groups of them: its tables span groups of rows, so a sample of rows from across the weight
    gives a table a little wider in spread than a group of neighbours does, which errs on the side of caution);
    the bytes are the whole weight's. `shrink_gain`: see `weighed`."""
    from siliconvert.quantize.coreml import blob_bytes, compress, decompress, palette_of, stored_bytes

    sampled = sample_rows(weight, sample_budget)
    options = []
    for precision in candidates:
        if precision == "fp16":
            options.append(Option("fp16", blob_bytes(weight.size * 2), 0.0))
            continue
        palette = palette_of(precision)
        sample = sampled
        if palette and sampled is not weight:  # a sample of rows: whole groups of them
            sample = sampled[:len(sampled) // palette.group * palette.group]
        quantized = compress(sample, precision, importance)
        if quantized is not None:
            approx = decompress(quantized)
            error = weighed(relative_error(sample, approx, importance), shrink_share(sample, approx, importance),
                            gain, shrink_gain)
            options.append(Option(precision, stored_bytes(quantized, precision, rows=len(weight)), error))
    return TensorCosts(name, weight.size, _sorted(options))


def predicted_kld(total_error: float, kld_per_error: float = KLD_PER_ERROR) -> float:
    return kld_per_error * total_error


def error_of(costs: Sequence[TensorCosts], kinds: dict[str, str]) -> float:
    """Summed relative error of storing each tensor as `kinds` says (a fixed recipe's types, read from its
    artifact with `gguf_kinds` / `mlx_kinds`): how the estimate is held to measured KLD. A tensor `kinds` leaves out
    is one the recipe keeps in float (an MLX module no group fits, which a plan pads): no rounding error."""
    total = 0.0
    for tensor in costs:
        if tensor.name not in kinds:
            continue
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
    """Each quantized module's "<bits>bit-g<group>" (or float mode) in an MLX folder, as mlx_lm.load reads
    config.json."""
    quantization = json.loads((folder / "config.json").read_text())["quantization"]

    def kind(entry: dict) -> str:
        return mlx_option_name(entry["bits"], entry["group_size"], entry.get("mode", "affine"))

    weights = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    modules = {name.removesuffix(".scales") for name in weights if name.endswith(".scales")}
    return {module: kind(quantization[module]) if isinstance(quantization.get(module), dict) else kind(quantization)
            for module in modules}


def _sorted(options: list[Option]) -> tuple[Option, ...]:
    return tuple(sorted(options, key=lambda o: (o.nbytes, o.error, o.kind)))
