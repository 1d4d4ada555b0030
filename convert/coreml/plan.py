"""A Core ML package planned per weight (precision: auto): each weight that coremltools' compression pass would
compress takes fp16, int8 per channel or int4 per block of 16 to 128 input channels, as quantize/plan.py picks
them from the plan's goal.

Planned on what the packages hold. Each chunk's fp16 package, once written, is read back (memory-mapped) one
weight at a time by weight id, after the writer's folds (fused projections split, branch scales folded, a large
head split into pieces): the values the pass would quantize. Their costs (quantize/sensitivity.py `coreml_costs`)
are measured on the build thread while the stream goes on; once every chunk is in, the writer makes the plan and
compresses each chunk at its weights' precisions. A weight's importance (the calibration run's mean x² per input
column, siliconvert/calibration.py) is its source tensor's: a fold splits or scales rows, which keeps
the columns' importance, and a relative error does not see a scale. A table that only embeds (a lookup) weighs
its columns alike; one that is the head too takes the head's inputs, as the MLX plan does. A mixture of
experts' package holds each expert's weights apart: each is planned on its own (unlike GGUF and MLX, whose stacks
take one type), with its own importance row and its gain times its share of the routed calibration tokens; the
routers are not planned (fp16).

Gains. A weight's gains are its source tensor's, measured on the model (siliconvert/gains.py: noise and shrink
gains, `Calibration.gain` / `shrink_gain`); a fold that scales rows changes neither its r nor its shrink share. A
source the graph reads as several weights (a fused projection split, FUSED in folds.py) and a source the
sensitivity forward did not measure take their role's gain fitted on the demo model (ROLE_GAINS): a measured gain
is split between parts by their share of the whole's importance-weighted Σ W², which needs every part at once,
and the parts are measured one weight at a time.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from siliconvert.architectures import ModelSpec
from siliconvert.calibration import BUILTIN, IMPORTANCE, SENSITIVITY, Calibrations
from siliconvert.convert.coreml.chunks import Chunk, Key, blobs_of, head_pieces, head_role, role_key
from siliconvert.convert.coreml.folds import EXPERT_STACKS, graph_keys
from siliconvert.gains import EMBEDDING, HEAD
from siliconvert.quantize.coreml import ZERO_POINTS, compressible, gptq_error_share, gptq_inverse
from siliconvert.quantize.plan import Plan, make_plan
from siliconvert.quantize.sensitivity import COREML_CANDIDATES, TensorCosts, coreml_costs, role_gain
from siliconvert.recipe import QuantPlan

HEAD_INPUTS = "lm_head.weight"  # the importance matrix's name for the head's inputs, tied or not
# model.mlmodel grows by the constexpr op and its consts' entries, in both functions, for each compressed weight
# (measured on the demo model: 294 bytes, int8 or int4); a size goal counts it for every planned weight, with room
SPEC_BYTES_PER_WEIGHT = 384
# and an int4-zp weight's spec holds its zero points' const too, in both functions (175 bytes more than int4's on the
# demo model): counted on that option, so that a plan weighs it against the zero points' gain
ZERO_POINT_SPEC_BYTES = 192
ROUTERS = ("ffn_gate_inp", "ffn_gate_inp_shexp")  # never planned: a rounded router picks other experts
# a plan of GPTQ-rounded weights (method: gptq) also takes pal3: rounded to nearest its estimate under-read the
# measured KLD (COREML_CANDIDATES says why it is left out there); by GPTQ its fixed package scores a third of that
# on the demo model, and each weight's share is measured per precision (gptq_error_share). A plan at Q4_K_M's bytes
# there took pal3 for 15 of 30 weights and measured 0.00027 (predicted 0.00029): bench/README.md
GPTQ_CANDIDATES = (*COREML_CANDIDATES, "pal3")


def plan_name(chunk: Chunk, weight: str) -> str:
    """A weight's name in the plan: its package and its weight id (a tied table may sit in two packages)."""
    return f"{chunk.package.removesuffix('.mlpackage')}/{weight}"


class WeightPlanner:
    """Measures the costs of each chunk's weights as its fp16 package is finished (`measure`, on the build thread),
    then plans them (`plan`). `calibration`: the run's calibrations (none: Calibrations.outside_a_run). `gptq`:
    the weights will be rounded by GPTQ (method: gptq), so each candidate's error is GPTQ's share of its rounding
    error (`with_gptq_errors`), measured against the weight's calibration inputs' second moments."""

    def __init__(self, checkpoint, goal: QuantPlan, *, calibration: Calibrations | None = None, gptq: bool = False):
        self.spec: ModelSpec = checkpoint.spec
        self.goal = goal
        calibration = calibration or Calibrations.outside_a_run(checkpoint)
        calibrated = calibration.get(BUILTIN, {IMPORTANCE, SENSITIVITY})
        self.columns = ColumnImportance(checkpoint, calibrated.importance)
        # GPTQ's share of each candidate's error: fitted to the first half of the calibration text, measured on the
        # second (with_gptq_errors); on the whole text where it has one window
        self.hessians = self.held_out = None
        if gptq:
            halves = calibration.hessian_halves(BUILTIN)
            if halves:
                self.hessians = ColumnImportance(checkpoint, {name: first for name, (first, _) in halves.items()})
                self.held_out = ColumnImportance(checkpoint, {name: second for name, (_, second) in halves.items()})
            else:
                self.hessians = ColumnImportance(checkpoint, calibration.hessians(BUILTIN))
        self.candidates = GPTQ_CANDIDATES if gptq else COREML_CANDIDATES
        self.sources = self.columns.sources
        self.measured = calibrated
        # per expert stack (HF name), each expert's share of the calibration tokens routed (from the same run)
        self.expert_shares = {stack: _shares(tokens) for stack, tokens in calibrated.expert_tokens.items()}
        self.split_sources: set[str] = set()  # sources the graph reads as several weights (a fused projection)
        for source, info in checkpoint.tensor_infos.items():
            key = role_key(info.role)
            if len(graph_keys(self.spec, key)) > (self.spec.experts.count if key[0] in EXPERT_STACKS else 1):
                self.split_sources.add(source)  # an expert's gate_up too
        self.costs: list[TensorCosts] = []
        self.package_bytes = 0  # the packages' bytes outside the planned weights, with SPEC_BYTES_PER_WEIGHT each

    def measure(self, chunk: Chunk, function, needed: set[Key], package: Path) -> None:
        """Costs of the weights of `function` (the chunk's, built on its stored fp16 package) that the pass would
        compress; `needed` are the chunk's graph tensors, `package` its fp16 package."""
        blobs = {weight: (key, rows) for key in needed for weight, rows in blobs_of(self.spec, chunk, key)}
        planned_fp16 = planned = 0
        for weight, values in compressible(function, blobs):
            key, rows = blobs[weight]
            if key[0] in ROUTERS:
                continue  # fp16, as in the fixed int8 / int4 packages (writer.py says why)
            head = projects(self.spec, chunk, key, rows)
            embeds = chunk.first and key[0] == "token_embd"
            gain, shrink_gain, looked_up = self._gains(key, embeds, head, rows)
            importance = self.columns.of(chunk, key, rows)
            if key[0].endswith("]"):  # one expert of a stack (folds.expert_key): its share of the routed tokens,
                # so the experts' errors add up as the stack's does in a GGUF plan
                expert, stack = int(key[0][key[0].index("[") + 1:-1]), self.sources[key]
                shares = self.expert_shares.get(stack)
                share = shares[expert] if shares is not None else 1 / self.spec.experts.count
                gain, shrink_gain = gain * share, None if shrink_gain is None else shrink_gain * share
            costs = with_spec_bytes(coreml_costs(plan_name(chunk, weight), values, importance, gain, self.candidates,
                                                 shrink_gain=shrink_gain))
            hessian = self.hessians.of(chunk, key, rows) if self.hessians else None
            if hessian is not None:  # an embedding's lookup has none: GPTQ leaves it rounded to nearest
                costs = with_gptq_errors(costs, values, hessian, importance, looked_up,
                                         self.held_out.of(chunk, key, rows) if self.held_out else None)
            self.costs.append(costs)
            planned_fp16 += next(o.nbytes for o in costs.options if o.kind == "fp16")
            planned += 1
        package_bytes = sum(f.stat().st_size for f in package.rglob("*") if f.is_file())
        self.package_bytes += package_bytes - planned_fp16 + SPEC_BYTES_PER_WEIGHT * planned

    def _gains(self, key: Key, embeds: bool, head: bool, rows: slice) -> tuple[float, float | None, float]:
        """(gain, shrink gain, looked-up part) of a graph weight: its source's measured ones (a table that embeds and
        is the head has both paths'; a piece of a table has its rows' share of each), else its role's (no shrink
        gain). The looked-up part is the share of the gain the weight has as an embedding looked up."""
        measured = self.measured
        if key[0] in ("token_embd", "output"):
            share = len(range(self.spec.vocab_size)[rows]) / self.spec.vocab_size
            paths = ([EMBEDDING] if embeds else []) + ([HEAD] if head else [])
            if measured.gains is not None and all(measured.gain(path) is not None for path in paths):
                gains = {path: share * measured.gain(path) for path in paths}
                shrink = [measured.shrink_gain(path) for path in paths]
                shrink_gain = None if None in shrink else share * sum(shrink)
            else:
                gains = {path: share * role_gain(role) for path, role in ((EMBEDDING, "token_embd"), (HEAD, "output"))
                         if path in paths}
                shrink_gain = None
            gain = sum(gains.values())
            return gain, shrink_gain, gains.get(EMBEDDING, 0.0) / gain if gain > 0 else 0.0
        source = self.sources.get(key)
        if source is None or source in self.split_sources or measured.gain(source) is None:
            return role_gain(key[0]), None, 0.0
        return measured.gain(source), measured.shrink_gain(source), 0.0

    def plan(self, other_bytes: int) -> Plan:
        """The plan over every chunk's costs; `other_bytes` are the artifact's files beside the packages."""
        return make_plan(self.costs, self.goal, fixed_bytes=self.package_bytes + other_bytes)

    @staticmethod
    def precisions(plan: Plan, chunk: Chunk) -> dict[str, str]:
        """weight id → precision (int8, int4-b<n>, pal<bits>…) of the chunk's compressed weights (the rest stay
        fp16)."""
        prefix = plan_name(chunk, "")
        return {name.removeprefix(prefix): option.kind for name, option in plan.choices.items()
                if name.startswith(prefix) and option.kind != "fp16"}


def with_spec_bytes(costs: TensorCosts) -> TensorCosts:
    """A weight's candidates with the spec bytes a zero-point option adds (ZERO_POINT_SPEC_BYTES), cheapest first."""
    options = (replace(option, nbytes=option.nbytes + ZERO_POINT_SPEC_BYTES) if ZERO_POINTS in option.kind
               else option for option in costs.options)
    return replace(costs, options=tuple(sorted(options, key=lambda o: (o.nbytes, o.error, o.kind))))


def with_gptq_errors(costs: TensorCosts, weight: np.ndarray, hessian: np.ndarray,
                     importance: np.ndarray | None, looked_up: float = 0.0,
                     held_out: np.ndarray | None = None) -> TensorCosts:
    """A weight's candidates as GPTQ will round them: each compressed option's error times GPTQ's measured share of
    it at that precision (`gptq_error_share`, every precision on one factor of H⁻¹); fp16 stays exact. `held_out`:
    the second moments of text `hessian`'s was not measured on, where the share is measured (GPTQ fits the text it
    is rounded against: on the real SmolLM2-135M its share of int4's layer error was 0.29 there and 0.50 on the
    other half of the text, pal4's 0.17 and 0.34; bench/README.md). `looked_up`:
    the part of the error's weight a tied table has as the embedding, costed at rounding's error (GPTQ lowers only
    the head's part), as the MLX plan costs it (quantize/mlx.py with_gptq_errors). That is optimistic: rounded
    against the head's inputs, the real SmolLM2-135M's table looks up 1.7× rounding's error at int4; costing that was
    tried in MLX and made its plan worse (bench/README.md, "Why the real model's Core ML GPTQ plans miss")."""
    inverse = gptq_inverse(hessian)
    return replace(costs, options=tuple(
        option if option.kind == "fp16"
        else replace(option, error=option.error * (looked_up + (1 - looked_up) * gptq_error_share(
            weight, hessian, option.kind, importance, inverse=inverse, measured_on=held_out)))
        for option in costs.options))


def projects(spec: ModelSpec, chunk: Chunk, key: Key, rows: slice) -> bool:
    """Whether a blob of a chunk is (a piece of) the LM head: the head's table in the last chunk, whole where the
    head is not split (a tied table embeds and projects through one blob), else a piece of it."""
    return chunk.last and key[0] == head_role(spec) and (rows != slice(None) or len(head_pieces(spec)) == 1)


class ColumnImportance:
    """Each graph weight's importance: the calibration's mean x² per input column of its source tensor (`importance`:
    HF name → row, a row per expert for a stack). A fold splits or scales rows, which keeps the columns'
    importance; a table that is the head takes the head's inputs (tied or not), one that only embeds has none (its
    columns weigh alike); an expert of a stack takes its own row."""

    def __init__(self, checkpoint, importance: dict[str, np.ndarray]):
        self.spec: ModelSpec = checkpoint.spec
        self.importance = importance
        self.sources: dict[Key, str] = {}  # each graph tensor's source (HF) name, whose importance its columns take
        for source, info in checkpoint.tensor_infos.items():
            self.sources.update(dict.fromkeys(graph_keys(self.spec, role_key(info.role)), source))

    def of(self, chunk: Chunk, key: Key, rows: slice) -> np.ndarray | None:
        head = projects(self.spec, chunk, key, rows)
        importance = self.importance.get(HEAD_INPUTS if head else self.sources[key])
        if importance is not None and key[0].endswith("]"):  # one expert of a stack (folds.expert_key)
            importance = importance.reshape(self.spec.experts.count, -1)[int(key[0][key[0].index("[") + 1:-1])]
        return importance

    def by_weight(self, chunk: Chunk, needed: set[Key]) -> dict[str, np.ndarray | None]:
        """weight id → importance of the blobs of a chunk's graph tensors `needed`."""
        return {weight: self.of(chunk, key, rows) for key in needed for weight, rows in blobs_of(self.spec, chunk, key)}


def _shares(tokens: np.ndarray) -> np.ndarray:
    """Each expert's share of the routed calibration tokens (all alike where none were routed)."""
    return tokens / tokens.sum() if tokens.sum() else np.full(len(tokens), 1 / len(tokens))
