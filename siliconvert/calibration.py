"""Calibration: what transformers' forward of the source measures on a text, done once for every writer.

Three writers measure the source model before they write, all through the same layer-by-layer forward
(siliconvert/streamed.py, float32 on the CPU):
- importance: the mean of x² of every input column entering each linear layer (what llama-imatrix collects:
  llama.cpp's importance matrix, and the weights of every plan's errors), over CALIBRATION_TOKENS of the text in
  windows of CALIBRATION_CONTEXT; a mixture's expert stacks get one row per expert, over the tokens the router
  sent to it, and those tokens are counted (`expert_tokens`: what a plan weighs each expert's error by).
- hessian: the mean x xᵀ of every dense linear layer's input, on the importance windows (what GPTQ weighs a
  layer's rounding errors by: quantize/gptq.py, for an MLX target's `method: gptq`); the layers reading one input
  share one matrix.
- hessian halves: the same over the first half of the importance windows, and the share of their tokens it holds:
  GPTQ fitted to that half and measured on the other (whose H follows from the whole's and the first half's) tells
  a Core ML plan how much of GPTQ's gain holds on text it was not fitted to (convert/coreml/plan.py).
- input peaks: the largest |x| entering each linear layer, on the importance windows (per expert for a stack, over
  the tokens routed to it): what a Core ML W8A8 package's per-tensor int8 activation scales are made of
  (quantize/coreml.py), as coremltools' linear_quantize_activations makes them from the range it sees in predictions.
- range: the residual stream's peak over the first RANGE_TOKENS tokens of the text, which sets the power of two
  that keeps the stream inside float16 (`FP16Range`): Core ML's packages run in fp16, and an MLX plan takes
  float16 for a bfloat16 source only where the stream leaves it room.
- sensitivity: each weight's gain to the mean KLD per unit of its relative output error, measured by perturbing it
  on a short window of the text (siliconvert/gains.py, in a second forward in the same child: its streams differ
  from the first's): what a plan's costs are weighed by in place of gains fitted on another model; and what
  rounding each weight's input as llama.cpp's kernels do costs (`input_kld`), a floor its weights' errors lack.

One forward measures every part asked for: the range window and the importance windows go through each decoder
layer while its weights are loaded, and the hooks know which window runs, so neither part sees the other's
windows (the results are those of separate forwards, bit for bit). It runs in a spawned child process, as the
reference does: what it imports and allocates leaves with it, so the writers' own memory stays what streaming
needs. Where a run validates, the reference's forward joins this one (`alongside`): each layer's weights are read
once for both, each in its own model, and its logits land in the cache validation reads.

`Calibrations` is the run's provider: the pipeline prepares what its targets need (one forward per text) before
the writers are built and hands it to each; results are kept in the object and in the output's cache folder.
The calibration text "builtin" is siliconvert.textdata.training_text(): text the demo models were trained on,
never the held-out text validation scores, so calibration cannot flatter the validation table.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterable, Mapping
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from siliconvert.architectures.base import Mamba2
from siliconvert.artifacts import cache_root, write_text_atomically
from siliconvert.checkpoint import Checkpoint
from siliconvert.children import child_pool
from siliconvert.errors import CheckpointError, RecipeError
from siliconvert.gains import EMBEDDING, HEAD, R0, SENSITIVITY_TOKENS, UNPLANNED_ROLES, sensitivity_tokens

if TYPE_CHECKING:
    import torch

    from siliconvert.streamed import SharedForward

CALIBRATION_TOKENS = 8192  # llama-imatrix's usual order of magnitude for small models; a few minutes on 7B CPU
CALIBRATION_CONTEXT = 512  # llama-imatrix's default chunk length
RANGE_TOKENS = 64  # the range window: the stream's peak is a property of the weights more than of the text
RANGE_TEXT_CHARS = 20000  # text tokenized for the range window, far more than RANGE_TOKENS need
CHARS_PER_TOKEN = 16  # tokens are rarely longer: tokenizing more text than that would be wasted

IMPORTANCE = "importance"  # the importance matrix and the tokens routed to each expert (the same hooks)
RANGE = "range"  # the residual stream's peak
SENSITIVITY = "sensitivity"  # each weight's measured gain to the mean KLD (siliconvert/gains.py)
HESSIAN = "hessian"  # the mean x xᵀ of every linear layer's input, on the importance windows (GPTQ's H)
HESSIAN_HALVES = "hessian_halves"  # the same over the first half of those windows (GPTQ's held-out check)
INPUT_PEAKS = "input_peaks"  # the largest |x| entering every linear layer, on the importance windows (W8A8's scales)
PARTS = (IMPORTANCE, RANGE, SENSITIVITY, HESSIAN, HESSIAN_HALVES, INPUT_PEAKS)
BUILTIN = "builtin"

FLOAT16_MAX = 65504.0
HEADROOM = 16.0  # the calibrated peak × this stays in fp16


def calibration_text(source: str) -> tuple[str, str]:
    """(name, text) of a calibration text: "builtin" or a UTF-8 file (a recipe's `imatrix`)."""
    if source == BUILTIN:
        from siliconvert.textdata import training_text

        return "builtin (siliconvert.textdata.training_text)", training_text()
    try:
        return source, Path(source).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"cannot read the imatrix calibration text ({e})", source) from None


@dataclass(frozen=True)
class FP16Range:
    """The residual stream's float16 range. Gemma's stream in real checkpoints passes 65 504: in fp16 it would
    become inf. Every norm that reads the stream is an RMSNorm, which is scale-invariant, so the whole stream can
    run at a scale s (Core ML folds it into the embedding and each branch's last weight: convert/coreml/folds.py);
    a power of two makes that exact. HEADROOM covers other texts and the stream between a layer's two adds,
    which the calibration does not see."""

    peak: float  # the largest |value| of the residual stream in the calibration forward
    scale: float  # the stream's scale: a power of two, 1 where the peak leaves room

    @classmethod
    def of_peak(cls, peak: float) -> FP16Range:
        scale = 1.0
        while peak * scale * HEADROOM > FLOAT16_MAX:
            scale /= 2
        return cls(peak, scale)


@dataclass(frozen=True)
class Calibration:
    """What the forward over one text measured; a part not asked for is None."""

    text: str  # the calibration text's name
    importance: dict[str, np.ndarray] | None = None  # HF weight name → mean x² per input column (a row per expert)
    expert_tokens: dict[str, np.ndarray] | None = None  # HF expert stack → calibration tokens routed per expert
    stream_peak: float | None = None  # the largest |value| of the residual stream, between layers
    # the largest |value| entering a recurrent state (a short convolution's B·x, a gated delta rule's conv input q,
    # k, v, Mamba2's conv input x, B, C), measured with the stream's peak; 0.0 for a model without one
    state_peak: float | None = None
    # the largest |value| of a gated delta rule's recurrent state S, or of Mamba2's h, over the range window's
    # tokens; 0.0 without one
    recurrent_peak: float | None = None
    importance_tokens: int | None = None  # tokens in the importance windows
    range_tokens: int | None = None  # tokens in the range window
    gains: dict[str, float] | None = None  # HF weight name → mean KLD per unit of relative output error
    shrink_gains: dict[str, float] | None = None  # HF weight name → mean KLD per unit α² of the weight scaled
    sensitivity_tokens: int | None = None  # tokens in the sensitivity window
    # rounding of a matmul's input (siliconvert/gains.py INPUT_ROUNDINGS) → HF weight name → mean KLD it costs
    input_klds: dict[str, dict[str, float]] | None = None
    # HF weight name → mean x xᵀ of its input [columns, columns] (float32; the layers reading one input share one
    # array); dense linear layers only, not expert stacks
    hessians: dict[str, np.ndarray] | None = None
    # the same over the first half of the importance windows (empty where there is one window), and the share of
    # the windows' tokens that half holds
    first_half_hessians: dict[str, np.ndarray] | None = None
    first_half_share: float | None = None
    # HF weight name → the largest |x| of its input over the importance windows (an expert stack: one per expert,
    # over the tokens routed to it; 0 for an expert none reached)
    input_peaks: dict[str, np.ndarray] | None = None

    @property
    def parts(self) -> frozenset[str]:
        return frozenset(part for part, value in ((IMPORTANCE, self.importance), (RANGE, self.stream_peak),
                                                  (SENSITIVITY, self.gains), (HESSIAN, self.hessians),
                                                  (HESSIAN_HALVES, self.first_half_hessians),
                                                  (INPUT_PEAKS, self.input_peaks))
                         if value is not None)

    def gain(self, name: str, tied_head: bool = False) -> float | None:
        """The measured gain of the HF weight `name` (None where not measured); a tied embedding is the head
        too: the embedding's gain plus the head's."""
        if self.gains is None or name not in self.gains:
            return None
        if tied_head and name == EMBEDDING:
            return self.gains[name] + self.gains.get(HEAD, 0.0)
        return self.gains[name]

    def shrink_gain(self, name: str, tied_head: bool = False) -> float | None:
        """The measured gain of the HF weight `name` scaled, per unit α² (None where not measured); a tied
        embedding's is the embedding's plus the head's."""
        if self.shrink_gains is None or name not in self.shrink_gains:
            return None
        if tied_head and name == EMBEDDING:
            return self.shrink_gains[name] + self.shrink_gains.get(HEAD, 0.0)
        return self.shrink_gains[name]

    def input_kld(self, name: str, rounding: str, tied_head: bool = False) -> float | None:
        """The mean KLD of the HF weight `name`'s input rounded by `rounding` (siliconvert/gains.py INPUT_ROUNDINGS),
        0 where that rounding never fits it; None where not measured. A tied embedding's matmul is the head's."""
        if self.input_klds is None or rounding not in self.input_klds:
            return None
        if name == EMBEDDING:  # looked up, no matmul: only the head multiplies by it
            return self.input_klds[rounding].get(HEAD, 0.0) if tied_head else 0.0
        return self.input_klds[rounding].get(name, 0.0)

    def merged(self, other: Calibration) -> Calibration:
        """This calibration with the parts `other` measured and this one lacks."""
        taken = {IMPORTANCE: ("importance", "expert_tokens", "importance_tokens"),
                 RANGE: ("stream_peak", "state_peak", "recurrent_peak", "range_tokens"),
                 SENSITIVITY: ("gains", "shrink_gains", "sensitivity_tokens", "input_klds"),
                 HESSIAN: ("hessians",), HESSIAN_HALVES: ("first_half_hessians", "first_half_share"),
                 INPUT_PEAKS: ("input_peaks",)}
        return replace(self, **{field: getattr(other, field)
                                for part in other.parts - self.parts for field in taken[part]})


def calibrate(checkpoint: Checkpoint, source: str, parts: Iterable[str], *, tokens: int = CALIBRATION_TOKENS,
              context: int = CALIBRATION_CONTEXT, alongside: SharedForward | None = None) -> Calibration:
    """Measure `parts` of the calibration text `source` ("builtin" or a file) in one forward of `checkpoint`,
    run in a spawned child process. The importance windows are the text's first `tokens` tokens in windows of
    `context`; the sensitivity window is its first `sensitivity_window(checkpoint)` tokens. `alongside` (the
    reference's forward, say) joins that forward: each layer's weights are read once for both."""
    parts = _checked(parts)
    name, text = calibration_text(source)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint.path), trust_remote_code=False)
    range_window = importance_windows = sensitivity_window = None
    if RANGE in parts:
        range_window = np.array(tokenizer.encode(text[:RANGE_TEXT_CHARS], add_special_tokens=False,
                                                      verbose=False)[:RANGE_TOKENS], dtype=np.int64)
        if not len(range_window):
            raise RecipeError("the tokenizer gives no tokens of this text to measure the residual stream's range "
                              "on (an MLX target's dtype, set, needs none)", name)
    if parts & {IMPORTANCE, HESSIAN, HESSIAN_HALVES, INPUT_PEAKS}:
        # verbose=False: longer than the model's positions by design (cut into windows), not worth a warning
        ids = tokenizer(text[: tokens * CHARS_PER_TOKEN], add_special_tokens=False, verbose=False)["input_ids"][:tokens]
        if len(ids) < context:
            raise RecipeError(f"{len(ids)} tokens are too few to calibrate an importance matrix (need {context})",
                              name)
        importance_windows = np.array([ids[start:start + context]
                                       for start in range(0, len(ids) - context + 1, context)])
    if SENSITIVITY in parts:
        from siliconvert.gains import check_traits

        check_traits(checkpoint.spec)  # before any forward: a plan's gains refuse what they cannot measure
        sensitivity_window = np.array(tokenizer.encode(text[:SENSITIVITY_TOKENS * CHARS_PER_TOKEN],
                                                       add_special_tokens=False, verbose=False)
                                      [:sensitivity_window_tokens(checkpoint)])
    with child_pool() as pool:
        try:
            return pool.submit(_forward, checkpoint, name, range_window, importance_windows,
                               sensitivity_window, HESSIAN in parts, INPUT_PEAKS in parts, alongside,
                               HESSIAN_HALVES in parts).result()
        except BrokenProcessPool:
            raise CheckpointError("the calibration forward (transformers) crashed; out of memory?",
                                  checkpoint.path) from None


def sensitivity_window_tokens(checkpoint: Checkpoint) -> int:
    """Tokens of the sensitivity window: SENSITIVITY_TOKENS, fewer for a model whose streams would cost more
    than the budget (siliconvert/gains.py `sensitivity_tokens`)."""
    perturbed = [info for info in checkpoint.tensor_infos.values()
                 if info.role is not None and info.role.layer is not None and info.role.kind == "weight"
                 and len(info.shape) >= 2 and info.role.role not in UNPLANNED_ROLES]
    layers = checkpoint.spec.num_layers
    return sensitivity_tokens(layers, -(-len(perturbed) // max(layers, 1)))


class Calibrations:
    """The run's calibrations, per text: measured once (`prepare` takes everything the targets need, one forward
    per text), kept here, and cached in `cache_dir` (None: not on disk) under the checkpoint's fingerprint, the
    text's digest, the part and its token counts. A part asked for that was not prepared is measured then."""

    def __init__(self, checkpoint: Checkpoint, cache_dir: Path | None, *, tokens: int = CALIBRATION_TOKENS,
                 context: int = CALIBRATION_CONTEXT, alongside: SharedForward | None = None):
        self.checkpoint, self.cache_dir, self.tokens, self.context = checkpoint, cache_dir, tokens, context
        # a forward to run in the first calibration forward (the reference's, in a run that validates); None once run
        self.alongside = alongside
        self._measured: dict[str, Calibration] = {}  # text source → what is known of it

    @classmethod
    def outside_a_run(cls, checkpoint: Checkpoint) -> Calibrations:
        """The calibrations of a writer built outside a run (by the API, or a test), cached in the user's cache
        (siliconvert.artifacts.cache_root) under the same keys a run's are: a checkpoint measured once is measured."""
        return cls(checkpoint, cache_root() / "calibration")

    def prepare(self, needs: Mapping[str, Iterable[str]]) -> None:
        """Measure what is not yet known of each text source's parts: one forward per text at most."""
        for source, parts in needs.items():
            self.get(source, parts)

    def get(self, source: str, parts: Iterable[str]) -> Calibration:
        """The calibration of the text `source` holding at least `parts`."""
        parts = _checked(parts)
        known = self._measured.get(source)
        for part in sorted(parts - (known.parts if known else frozenset())):
            cached = self._read(source, part)
            if cached is not None:
                known = known.merged(cached) if known else cached
        missing = parts - (known.parts if known else frozenset())
        if missing:
            alongside, self.alongside = self.alongside, None
            measured = calibrate(self.checkpoint, source, missing, tokens=self.tokens, context=self.context,
                                 alongside=alongside)
            for part in sorted(missing):
                self._write(source, part, measured)
            known = known.merged(measured) if known else measured
        self._measured[source] = known
        return known

    def importance(self, source: str = BUILTIN) -> dict[str, np.ndarray]:
        """HF weight name → mean x² per input column over the text (see the module's docstring)."""
        return self.get(source, {IMPORTANCE}).importance

    def expert_tokens(self, source: str = BUILTIN) -> dict[str, np.ndarray]:
        """HF expert stack → calibration tokens the router sent to each expert (none for a dense model)."""
        return self.get(source, {IMPORTANCE}).expert_tokens

    def hessians(self, source: str = BUILTIN) -> dict[str, np.ndarray]:
        """HF weight name → mean x xᵀ of its input over the text: GPTQ's H (dense linear layers)."""
        return self.get(source, {HESSIAN}).hessians

    def hessian_halves(self, source: str = BUILTIN) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """HF weight name → (mean x xᵀ over the first half of the importance windows, over the second half): GPTQ
        fitted to the first and measured on the second. The second is the whole's less the first's, by their shares
        of the tokens; a shared input's pair is shared too. Empty where the text had one window."""
        measured = self.get(source, {HESSIAN, HESSIAN_HALVES})
        share, pairs, made = measured.first_half_share, {}, {}
        for name, first in measured.first_half_hessians.items():
            whole = measured.hessians[name]
            if id(first) not in made:
                made[id(first)] = (first, ((whole - share * first) / (1 - share)).astype(np.float32))
            pairs[name] = made[id(first)]
        return pairs

    def fp16_range(self) -> FP16Range:
        """The residual stream's float16 range, measured on the builtin text."""
        return FP16Range.of_peak(self.get(BUILTIN, {RANGE}).stream_peak)

    def state_range(self) -> FP16Range:
        """The float16 range of the recurrent states (what enters them: a short convolution's B·x), measured with
        the residual stream's, with the same headroom."""
        return FP16Range.of_peak(self.get(BUILTIN, {RANGE}).state_peak)

    def recurrent_range(self) -> FP16Range:
        """The float16 range of the gated delta rule's and Mamba2's recurrent states, measured with the residual
        stream's, with the same headroom."""
        return FP16Range.of_peak(self.get(BUILTIN, {RANGE}).recurrent_peak)

    # ---- the disk cache: a file per part, written atomically ----------------------------------------

    def _file(self, source: str, part: str) -> Path | None:
        if self.cache_dir is None:
            return None
        text_digest = hashlib.sha256(calibration_text(source)[1].encode()).hexdigest()[:16]
        # a Mamba2 model's range measured before its states' peaks were is measured again
        ranged = f"{RANGE_TOKENS}-mamba2" if self.checkpoint.spec.mamba2 is not None else f"{RANGE_TOKENS}"
        counts = {IMPORTANCE: f"{self.tokens}x{self.context}", HESSIAN: f"{self.tokens}x{self.context}",
                  HESSIAN_HALVES: f"{self.tokens}x{self.context}",
                  INPUT_PEAKS: f"{self.tokens}x{self.context}", RANGE: ranged,
                  SENSITIVITY: f"{sensitivity_window_tokens(self.checkpoint)}-r{R0}-shrink-inputs"}[part]
        # input peaks: a few numbers per layer
        suffix = ".npz" if part in (IMPORTANCE, HESSIAN, HESSIAN_HALVES) else ".json"
        return self.cache_dir / f"calibration-{self.checkpoint.fingerprint()}-{text_digest}-{part}-{counts}{suffix}"

    def _read(self, source: str, part: str) -> Calibration | None:
        file = self._file(source, part)
        if file is None or not file.is_file():
            return None
        if part == RANGE:
            stored = json.loads(file.read_text())
            if "recurrent_peak" not in stored:  # measured before state peaks were: measured again
                return None
            return Calibration(stored["text"], stream_peak=stored["stream_peak"], state_peak=stored["state_peak"],
                               recurrent_peak=stored["recurrent_peak"], range_tokens=stored["tokens"])
        if part == INPUT_PEAKS:
            stored = json.loads(file.read_text())
            return Calibration(stored["text"], input_peaks={name: np.array(peak, np.float32)
                                                            for name, peak in stored["peaks"].items()})
        if part == SENSITIVITY:
            stored = json.loads(file.read_text())
            return Calibration(stored["text"], gains=stored["gains"], shrink_gains=stored["shrink_gains"],
                               sensitivity_tokens=stored["tokens"], input_klds=stored["input_klds"])
        if part in (HESSIAN, HESSIAN_HALVES):
            with np.load(file) as stored:
                kept = {key.partition(":")[2]: stored[key] for key in stored.files if key.startswith("hessian:")}
                matrices = {name: kept[key] for name, key in json.loads(str(stored["shared"])).items()}
                if part == HESSIAN:
                    return Calibration(str(stored["text"]), hessians=matrices)
                return Calibration(str(stored["text"]), first_half_hessians=matrices,
                                   first_half_share=float(stored["share"]))
        with np.load(file) as stored:
            tables: dict[str, dict[str, np.ndarray]] = {"importance": {}, "expert_tokens": {}}
            for key in stored.files:
                table, _, name = key.partition(":")
                if table in tables:
                    tables[table][name] = stored[key]
            return Calibration(str(stored["text"]), importance_tokens=int(stored["tokens"]), **tables)

    def _write(self, source: str, part: str, measured: Calibration) -> None:
        file = self._file(source, part)
        if file is None:
            return
        file.parent.mkdir(parents=True, exist_ok=True)
        if part == RANGE:
            write_text_atomically(file, json.dumps({"text": measured.text, "stream_peak": measured.stream_peak,
                                                    "state_peak": measured.state_peak,
                                                    "recurrent_peak": measured.recurrent_peak,
                                                    "tokens": measured.range_tokens}))
            return
        if part == INPUT_PEAKS:
            peaks = {name: peak.tolist() for name, peak in measured.input_peaks.items()}
            write_text_atomically(file, json.dumps({"text": measured.text, "peaks": peaks}))
            return
        if part == SENSITIVITY:  # JSON keeps a float's every bit (repr round-trips)
            write_text_atomically(file, json.dumps({"text": measured.text, "gains": measured.gains,
                                                    "shrink_gains": measured.shrink_gains,
                                                    "input_klds": measured.input_klds,
                                                    "tokens": measured.sensitivity_tokens}))
            return
        temp = file.with_name(f".{file.name}.tmp-{os.getpid()}")
        if part in (HESSIAN, HESSIAN_HALVES):  # each shared array once, and which name reads which
            matrices = measured.hessians if part == HESSIAN else measured.first_half_hessians
            first = {}
            for name, matrix in matrices.items():
                first.setdefault(id(matrix), name)
            shared = {name: first[id(matrix)] for name, matrix in matrices.items()}
            arrays = {f"hessian:{name}": matrices[name] for name in set(shared.values())}
            share = {} if part == HESSIAN else {"share": np.array(measured.first_half_share)}
            with temp.open("wb") as out:
                np.savez(out, text=np.array(measured.text), shared=np.array(json.dumps(shared)), **share, **arrays)
            os.replace(temp, file)
            return
        arrays = {f"importance:{name}": values for name, values in measured.importance.items()}
        arrays |= {f"expert_tokens:{name}": values for name, values in measured.expert_tokens.items()}
        with temp.open("wb") as out:
            np.savez(out, text=np.array(measured.text), tokens=np.array(measured.importance_tokens), **arrays)
        os.replace(temp, file)


def _checked(parts: Iterable[str]) -> frozenset[str]:
    parts = frozenset(parts)
    if unknown := parts - set(PARTS):
        raise ValueError(f"unknown calibration parts {sorted(unknown)}: the parts are {', '.join(PARTS)}")
    return parts


# ---- the forward, in the child process ---------------------------------------------------------------


class _LinearInputHooks:
    """A pre-hook on every linear layer (`_linear(weight name)`) and on every stack of experts (`_experts(stack)`)."""

    def attach(self, model) -> None:
        import torch

        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_pre_hook(self._linear(f"{name}.weight"))
            elif isinstance(getattr(module, "gate_up_proj", None), torch.nn.Parameter):  # a stack of experts
                module.register_forward_pre_hook(self._experts(name))


class _Importance(_LinearInputHooks):
    """Hooks collecting, while `active`, the mean x² per input column of every linear layer's input (keyed by the
    HF weight name) and, for a mixture's expert stacks (`...experts.gate_up_proj`, `...experts.down_proj`), one
    row per expert over the tokens the router sent to it, as llama-imatrix collects it for llama.cpp's per-expert
    matrix multiply (an expert no token reached gets ones, as llama-quantize gives it)."""

    def __init__(self) -> None:
        self.active = False
        self.sums: dict[str, torch.Tensor] = {}  # weight name → Σ x² per column (float64)
        self.rows: dict[str, int] = {}
        self.expert_sums: dict[str, torch.Tensor] = {}  # stack name → [experts, columns]
        self.expert_rows: dict[str, torch.Tensor] = {}  # stack name → [experts]

    def _linear(self, name: str):
        def hook(_module, inputs):
            if not self.active:
                return
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            self.sums[name] = self.sums.get(name, 0) + (x * x).sum(0)
            self.rows[name] = self.rows.get(name, 0) + x.shape[0]
        return hook

    def _experts(self, name: str):

        # transformers' experts module is called with (hidden states [tokens, hidden], chosen ids [tokens, k],
        # weights); each expert's gated MLP is recomputed here on its tokens for the input of its down rows
        def hook(module, inputs):
            if not self.active:
                return
            hidden, chosen = inputs[0].reshape(-1, inputs[0].shape[-1]).double(), inputs[1]
            experts = module.gate_up_proj.shape[0]
            for expert in range(experts):
                routed = hidden[(chosen == expert).any(-1)]
                if not len(routed):
                    continue
                self._add_expert_rows(f"{name}.gate_up_proj", experts, expert, routed)
                self._add_expert_rows(f"{name}.down_proj", experts, expert, _expert_inner(module, expert, routed))
        return hook

    def _add_expert_rows(self, name: str, experts: int, expert: int, x: torch.Tensor) -> None:
        import torch

        if name not in self.expert_sums:
            self.expert_sums[name] = torch.zeros(experts, x.shape[-1], dtype=torch.float64)
            self.expert_rows[name] = torch.zeros(experts, dtype=torch.float64)
        self.expert_sums[name][expert] += (x * x).sum(0)
        self.expert_rows[name][expert] += x.shape[0]

    def results(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(importance matrix, tokens routed per expert)."""
        import torch

        matrix = {name: (self.sums[name] / self.rows[name]).float().numpy() for name in sorted(self.sums)}
        for name in sorted(self.expert_sums):
            rows_of = self.expert_rows[name][:, None]
            matrix[name] = torch.where(rows_of > 0, self.expert_sums[name] / rows_of.clamp(min=1), 1.0).float().numpy()
        return matrix, {name: self.expert_rows[name].numpy() for name in sorted(self.expert_rows)}


class _SecondMoments:
    """Hooks collecting, while `active`, the mean x xᵀ of every linear layer's input (keyed by the HF weight name):
    what GPTQ weighs a layer's rounding errors by. The layers that read one tensor (q, k and v; gate and up) share
    one matrix, summed once."""

    def __init__(self) -> None:
        self.active = False
        self.first_half = False  # the window running is in the first half of the importance windows
        self.sums: dict[str, torch.Tensor] = {}  # the first weight name reading an input → Σ x xᵀ (float64)
        self.rows: dict[str, int] = {}
        self.first_sums: dict[str, torch.Tensor] = {}  # the same over the first half's windows
        self.first_rows: dict[str, int] = {}
        self.shared: dict[str, str] = {}  # weight name → the name its input's sum is kept under
        self._last: tuple[object, str] = (None, "")  # the last input seen, and its name: a layer reading it next shares

    def attach(self, model) -> None:
        import torch

        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_pre_hook(self._linear(f"{name}.weight"))

    def _linear(self, name: str):
        def hook(_module, inputs):
            if not self.active:
                return
            if inputs[0] is self._last[0]:
                self.shared[name] = self._last[1]
                return
            self._last, self.shared[name] = (inputs[0], name), name
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            product = (x.T @ x).double()
            self.sums[name] = self.sums.get(name, 0) + product
            self.rows[name] = self.rows.get(name, 0) + x.shape[0]
            if self.first_half:
                self.first_sums[name] = self.first_sums.get(name, 0) + product
                self.first_rows[name] = self.first_rows.get(name, 0) + x.shape[0]
        return hook

    def results(self) -> dict[str, np.ndarray]:
        means = {key: (self.sums[key] / self.rows[key]).float().numpy() for key in self.sums}
        return {name: means[key] for name, key in sorted(self.shared.items())}

    def first_half_results(self) -> tuple[dict[str, np.ndarray], float]:
        """The first half's means, as `results`, and its share of the tokens (empty, 0: no first half)."""
        if not self.first_sums:
            return {}, 0.0
        means = {key: (self.first_sums[key] / self.first_rows[key]).float().numpy() for key in self.first_sums}
        key = next(iter(self.first_rows))
        return ({name: means[key] for name, key in sorted(self.shared.items())},
                self.first_rows[key] / self.rows[key])


class _InputPeaks(_LinearInputHooks):
    """Hooks recording, while `active`, the largest |x| of every linear layer's input (keyed by the HF weight name)
    and, for a mixture's expert stacks, of each expert's gate_up and down inputs over the tokens routed to it."""

    def __init__(self) -> None:
        self.active = False
        self.peaks: dict[str, np.ndarray] = {}

    def _record(self, name: str, peak: np.ndarray) -> None:
        self.peaks[name] = np.maximum(self.peaks[name], peak) if name in self.peaks else peak

    def _linear(self, name: str):
        def hook(_module, inputs):
            if self.active:
                self._record(name, np.array(float(inputs[0].abs().max()), np.float32))
        return hook

    def _experts(self, name: str):
        def hook(module, inputs):  # called as _Importance's hook is: (hidden states, chosen ids, weights)
            if not self.active:
                return
            hidden, chosen = inputs[0].reshape(-1, inputs[0].shape[-1]).double(), inputs[1]
            experts = module.gate_up_proj.shape[0]
            outer, inner = np.zeros(experts, np.float32), np.zeros(experts, np.float32)
            for expert in range(experts):
                routed = hidden[(chosen == expert).any(-1)]
                if len(routed):
                    outer[expert] = float(routed.abs().max())
                    inner[expert] = float(_expert_inner(module, expert, routed).abs().max())
            self._record(f"{name}.gate_up_proj", outer)
            self._record(f"{name}.down_proj", inner)
        return hook


class _StreamPeak:
    """Hooks recording, while `active`, the largest |value| of each decoder layer's input and output, and of
    what enters each recurrent state: B·x of each short convolution, from the output of its in_proj (the modules
    named in `state_modules`), whose rows are B, C and x (architectures/base.py ShortConv); a gated delta rule's
    conv input, its in_proj_qkv's output (`delta_modules`; Qwen3-Next's in_proj_qkvz, its z rows with them); and
    the rule's recurrent state at every token (`recurrent_peaks`), recomputed from what transformers' chunked rule
    is called with (`watch_rule`). Of Mamba2 (`mamba`), the xBC rows of its in_proj's output (`mamba_modules`) and
    its state h at every token, recomputed from what transformers' scan is called with (`watch_scan`)."""

    def __init__(self, state_modules: list[str], delta_modules: list[str], mamba_modules: list[str] = (),
                 mamba: Mamba2 | None = None) -> None:
        self.active = False
        self.peaks: list[float] = []
        self.state_modules = state_modules
        self.delta_modules = delta_modules
        self.mamba_modules = mamba_modules
        self.mamba = mamba
        self.state_peaks: list[float] = [0.0]
        self.recurrent_peaks: list[float] = [0.0]
        self.watched: list[tuple[object, str, object]] = []  # (modeling module, a function's name, its own function)

    def attach(self, model) -> None:
        for layer in model.model.layers:
            layer.register_forward_pre_hook(
                lambda _, args, kwargs: self._record(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
            layer.register_forward_hook(lambda _, __, output: self._record(output))
        for name in self.state_modules:
            model.get_submodule(name).register_forward_hook(lambda _, __, output: self._record_bx(output))
        for name in self.delta_modules:
            model.get_submodule(name).register_forward_hook(lambda _, __, output: self._record_delta_input(output))
        for name in self.mamba_modules:
            model.get_submodule(name).register_forward_hook(lambda _, __, output: self._record_xbc(output))
        if self.delta_modules:
            self.watch_rule(sys.modules[type(model).__module__])
        if self.mamba_modules:
            self.watch_scan(sys.modules[type(model).__module__])

    def watch_rule(self, modeling) -> None:
        """Route the modeling module's `torch_chunk_gated_delta_rule` (which its forward calls by that name)
        through one that records the recurrent state's peak first; `unwatch` puts the module's own back."""
        rule = modeling.torch_chunk_gated_delta_rule

        def recorded(query, key, value, g, beta, *args, **kwargs):
            if self.active:
                self.recurrent_peaks.append(recurrent_peak(key, value, g, beta))
            return rule(query, key, value, g, beta, *args, **kwargs)

        self.watched.append((modeling, "torch_chunk_gated_delta_rule", rule))
        modeling.torch_chunk_gated_delta_rule = recorded

    def watch_scan(self, modeling) -> None:
        """Route the modeling module's `mamba2_scan_forward` (which each Mamba2 layer's forward calls by that name)
        through one that records the peak of h first; `unwatch` puts the module's own back."""
        scan = modeling.mamba2_scan_forward

        def recorded(module, hidden_states, b, c, dt, *args, **kwargs):
            if self.active:
                self.recurrent_peaks.append(mamba2_state_peak(module, hidden_states, b, dt))
            return scan(module, hidden_states, b, c, dt, *args, **kwargs)

        self.watched.append((modeling, "mamba2_scan_forward", scan))
        modeling.mamba2_scan_forward = recorded

    def unwatch(self) -> None:
        for modeling, name, function in self.watched:
            setattr(modeling, name, function)
        self.watched.clear()

    def _record_xbc(self, projected) -> None:
        if self.active:
            inner = self.mamba.inner_size
            self.state_peaks.append(float(projected[..., inner: inner + self.mamba.conv_channels].abs().max()))

    def _record_delta_input(self, output) -> None:
        if self.active:
            self.state_peaks.append(float(output.abs().max()))

    def _record_bx(self, bcx) -> None:
        if self.active:
            b, _, x = bcx.chunk(3, dim=-1)
            self.state_peaks.append(float((b * x).abs().max()))

    def _record(self, hidden) -> None:
        if self.active:
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
            self.peaks.append(float(hidden.abs().max()))


def recurrent_peak(key: torch.Tensor, value: torch.Tensor, g: torch.Tensor, beta: torch.Tensor) -> float:
    """The largest |value| the gated delta rule's state S takes over the tokens, from the rule's inputs as
    transformers passes them ((batch, tokens, heads, dims), k not yet L2-normalised), from a zero state: one step
    per token (architectures/base.py GatedDelta), in float32."""
    import torch

    key = key.float() * torch.rsqrt((key.float() ** 2).sum(-1, keepdim=True) + 1e-6)  # transformers' l2norm
    key = key.repeat_interleave(value.shape[2] // key.shape[2], dim=2)
    value, g, beta = value.float(), g.float(), beta.float()
    state = torch.zeros(key.shape[0], value.shape[2], key.shape[-1], value.shape[-1])
    peak = 0.0
    for t in range(key.shape[1]):
        k = key[:, t, :, :, None]  # (batch, heads, dk, 1)
        state = state * g[:, t, :, None, None].exp()
        correction = (value[:, t] - (state * k).sum(-2)) * beta[:, t, :, None]  # (batch, heads, dv)
        state = state + k * correction[:, :, None, :]
        peak = max(peak, float(state.abs().max()))
    return peak


def mamba2_state_peak(module, x: torch.Tensor, b: torch.Tensor, dt: torch.Tensor) -> float:
    """The largest |value| Mamba2's state h takes over the tokens, from a zero state: one step per token
    (architectures/base.py Mamba2), in float32, from what transformers' scan is called with (x (batch, tokens,
    heads × head_dim), B `b` (batch, tokens, groups × state_size), dt before its bias and softplus) and the layer's
    A_log, dt_bias and time_step_limit."""
    import torch

    batch, tokens, _ = x.shape
    heads, groups = module.num_heads, module.n_groups
    low, high = module.time_step_limit
    step = torch.nn.functional.softplus(dt.float() + module.dt_bias.float()).clamp(low, high)  # (batch, tokens, H)
    decay = torch.exp(step * -torch.exp(module.A_log.float()))
    x = x.float().view(batch, tokens, heads, -1) * step[..., None]  # Δ·x
    b = b.float().view(batch, tokens, groups, -1).repeat_interleave(heads // groups, dim=2)
    state = torch.zeros(batch, heads, x.shape[-1], b.shape[-1])
    peak = 0.0
    for t in range(tokens):
        state = state * decay[:, t, :, None, None] + x[:, t, :, :, None] * b[:, t, :, None, :]
        peak = max(peak, float(state.abs().max()))
    return peak


def _forward(checkpoint: Checkpoint, text_name: str, range_window: np.ndarray | None,
             importance_windows: np.ndarray | None, sensitivity_window: np.ndarray | None = None,
             hessian: bool = False, input_peaks: bool = False,
             alongside: SharedForward | None = None, hessian_halves: bool = False) -> Calibration:
    """One float32 forward over the range window (first, if any) and the importance windows (if any: with
    `hessian`, each linear layer's input's second moments too, with `hessian_halves` over the first half of the
    windows apart as well, with `input_peaks` its peak), `alongside`'s stream
    in the same pass (its own model, device and dtype: each result is that of a pass of its own, bit for bit); then
    the sensitivity forward over its window (if any)."""
    import torch

    from siliconvert.gains import measured_gains
    from siliconvert.streamed import CheckpointWeights, Stream, streamed_forward

    windows = ([] if range_window is None else [range_window]) + list(() if importance_windows is None
                                                                      else importance_windows)
    # the modules whose output makes what enters a recurrent state: each short convolution's in_proj
    state_modules = [name.removesuffix(".weight") for name, info in checkpoint.tensor_infos.items()
                     if info.role is not None and info.role.role == "shortconv.in_proj" and info.role.kind == "weight"]
    delta_modules = [name.removesuffix(".weight") for name, info in checkpoint.tensor_infos.items()
                     if info.role is not None and info.role.role in ("delta_qkv", "delta_qkvz")
                     and info.role.kind == "weight"]
    # and each Mamba2 layer's in_proj, whose xBC rows enter its conv state
    mamba_modules = [name.removesuffix(".weight") for name, info in checkpoint.tensor_infos.items()
                     if info.role is not None and info.role.role == "ssm_in" and info.role.kind == "weight"]
    importance = _Importance()
    moments = _SecondMoments()
    peaks_in = _InputPeaks()
    peak = _StreamPeak(state_modules, delta_modules, mamba_modules, checkpoint.spec.mamba2)
    first_importance = 0 if range_window is None else 1

    def window_started(index: int | None) -> None:  # None: another stream's windows run
        peak.active = range_window is not None and index == 0
        importance.active = importance_windows is not None and index is not None and index >= first_importance
        moments.active = (hessian or hessian_halves) and importance.active
        moments.first_half = (hessian_halves and moments.active
                              and index - first_importance < len(importance_windows) // 2)
        peaks_in.active = input_peaks and importance.active

    def attach(model) -> None:
        if importance_windows is not None:
            importance.attach(model)
        if hessian or hessian_halves:
            moments.attach(model)
        if input_peaks:
            peaks_in.attach(model)
        if range_window is not None:
            peak.attach(model)

    calibration = Calibration(text_name)
    # the reference's stream first: on a GPU its kernels run while the CPU runs the calibration's windows
    streams = [alongside.stream()] if alongside is not None else []
    if windows:
        streams.append(Stream(windows, "cpu", torch.float32, prepare=attach, keep_logits=False,
                              window_started=window_started))
    if streams:
        label = "calibration (transformers, layer by layer)"
        label = f"{label[:-1]}, with the reference logits)" if alongside is not None else label
        try:
            logits = streamed_forward(checkpoint.transformers_config(), CheckpointWeights(checkpoint), streams,
                                      label=label)
        finally:
            peak.unwatch()
        if alongside is not None:
            alongside.finish(logits[0])
    if sensitivity_window is not None:
        # the weights a plan quantizes (a bias is never quantized: gpt-oss's expert biases are 2-D)
        roles = {name: info.role.role for name, info in checkpoint.tensor_infos.items()
                 if info.role is not None and info.role.kind == "weight"}
        gains = measured_gains(checkpoint.transformers_config(), CheckpointWeights(checkpoint), sensitivity_window,
                               roles, label="sensitivity (each weight perturbed, layer by layer)")
        calibration = replace(calibration, gains=gains.noise, shrink_gains=gains.shrink, input_klds=gains.inputs,
                              sensitivity_tokens=len(sensitivity_window))
    if importance_windows is not None:
        matrix, routed = importance.results()
        calibration = replace(calibration, importance=matrix, expert_tokens=routed,
                              importance_tokens=int(importance_windows.size))
    if hessian or hessian_halves:
        calibration = replace(calibration, hessians=moments.results())
    if hessian_halves:
        halves, share = moments.first_half_results()
        calibration = replace(calibration, first_half_hessians=halves, first_half_share=share)
    if input_peaks:
        calibration = replace(calibration, input_peaks=dict(sorted(peaks_in.peaks.items())))
    if range_window is not None:
        calibration = replace(calibration, stream_peak=max(peak.peaks), state_peak=max(peak.state_peaks),
                              recurrent_peak=max(peak.recurrent_peaks), range_tokens=len(range_window))
    return calibration


def _expert_inner(module, expert: int, routed: torch.Tensor) -> torch.Tensor:
    """One expert's gated activation (the input of its down rows) on its tokens, as transformers' experts module
    computes it: SiLU(gate)·up of gate_up [2·ff, hidden] (gate rows, then up rows), or, for gpt-oss's transposed
    stack with biases and interleaved gate and up columns, its own clamped SwiGLU (`_apply_gate`)."""
    import torch

    weight = module.gate_up_proj[expert].double()
    if getattr(module, "is_transposed", False):
        gate_up = routed @ weight + module.gate_up_proj_bias[expert].double()
        return module._apply_gate(gate_up)
    gate, up = torch.nn.functional.linear(routed, weight).chunk(2, -1)
    return module.act_fn(gate) * up
