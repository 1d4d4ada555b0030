"""The main job: one streamed pass over the weights into every target, then validation and report.

    recipe → Checkpoint → tensors (once) → writers (mlx, gguf, coreml) → artifacts
           → reference logits → each artifact on its runtime → scores → gates → report
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import importlib
import importlib.metadata
import json
import os
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from siliconvert import __version__
from siliconvert.artifacts import Artifact, Writer, write_text_atomically
from siliconvert.calibration import Calibrations
from siliconvert.checkpoint import Checkpoint
from siliconvert.errors import ArtifactError, OutputError, RecipeError
from siliconvert.format import entry as format_entry
from siliconvert.progress import say, track
from siliconvert.recipe import BUILTIN_DEMO, Gates, Recipe, TargetSpec, Validate

if TYPE_CHECKING:
    from siliconvert.validate.reference import ReferenceForward


class Timings:
    """Where a run's time and memory went, stage by stage: written to <output>/timings.json.

    `convert` is the streamed pass (all writers); `convert.<format>`'s `busy_s` is the time spent inside that
    writer's calls (its share of the pass, since writers take turns on each tensor; background quantization
    threads are counted in the pass's CPU time, not in any writer's busy time), and a writer may add figures
    of its own (Core ML: `write_s` and `active_s`, for its writer thread). Peaks are VmHWM of the
    process that did the work: this one for the pass, the child that ran the reference or an artifact.
    Validation's runs overlap (validate/overlap.py): `validate` is its whole wall time, with the budget and the most
    runs that went at once; `validate.<artifact>`'s `wall_s` is its run and its scoring, `started_s` when its run
    began (after validation did) and `waited_s` how long it waited for the reference and for a quiet phase to time in.
    """

    SCHEMA = 1

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, float | int | None]] = {}

    def stage(self, name: str, **figures: float | int | None) -> None:
        self.stages.setdefault(name, {}).update({k: (round(v, 3) if isinstance(v, float) else v)
                                                 for k, v in figures.items()})

    def write(self, out_dir: Path) -> None:
        write_text_atomically(out_dir / "timings.json",
                              json.dumps({"schema": self.SCHEMA, "stages": self.stages}, indent=2) + "\n")


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class Outcome:
    report: dict | None
    artifacts: list[Artifact]
    out_dir: Path
    releases: list[Path] = field(default_factory=list)

    @property
    def failures(self) -> list[str]:
        if not self.report:
            return []
        return [f["message"] for a in self.report["artifacts"] for f in a["gates"]["failed"]]


def open_source(source: str, allow_pickle: bool = False) -> Checkpoint:
    if source == BUILTIN_DEMO:
        from siliconvert.demo import demo_checkpoint

        return Checkpoint.open(demo_checkpoint())
    return Checkpoint.open(source, allow_pickle=allow_pickle)


def run_recipe(recipe: Recipe, recipe_path: Path | None = None, *, allow_pickle: bool = False,
               force_release: bool = False) -> Outcome:
    """Convert, validate, gate, and write release folders for what passed (or everything, if forced)."""
    from siliconvert.commands.push import push, repo_for
    from siliconvert.commands.release import Digests, write_releases

    checkpoint = open_source(recipe.source, allow_pickle)
    preflight(recipe, checkpoint, recipe_path)
    out_dir = prepare_output(recipe.output_dir(recipe_path))
    say(f"[bold]{checkpoint.name}[/] ({checkpoint.spec.hf_architecture}) → {out_dir}")
    timings = Timings()
    # one per run: re-plans reuse what it measured; its forward makes the reference logits too, where validation will
    # need them (each layer read once for both)
    reference = reference_alongside(checkpoint, recipe.validate_, out_dir / ".cache")
    calibration = Calibrations(checkpoint, out_dir / ".cache", alongside=reference)
    produced = convert(checkpoint, recipe, out_dir / "artifacts", timings, calibration=calibration)
    if reference is not None and calibration.alongside is None:
        timings.stage("calibrate", with_reference=True)
    artifacts = [artifact for artifact, _ in produced]
    if not recipe.validate_.enabled:
        timings.write(out_dir)
        return Outcome(None, artifacts, out_dir)
    gates = {artifact.path: target.gates or recipe.validate_.gates for artifact, target in produced}
    replan = Replanner(checkpoint, recipe, produced, out_dir / "artifacts", timings, calibration=calibration)
    digests = Digests()  # the release folders' checksums, hashed while the artifacts are validated
    try:
        digests.ahead(artifact.path for artifact in artifacts)
        report = validate_artifacts(checkpoint, recipe.source, artifacts, recipe.validate_, gates, out_dir, timings,
                                    replan=replan)
        recipe_text = recipe_path.read_text(encoding="utf-8") if recipe_path else yaml.safe_dump(
            recipe.model_dump(mode="json", by_alias=True))
        started = time.perf_counter()
        releases = write_releases(report, recipe_text, checkpoint, out_dir, force=force_release,
                                  repo_prefix=recipe.release.repo_prefix, digests=digests)
        timings.stage("release", wall_s=time.perf_counter() - started)
    finally:
        digests.close()
    timings.write(out_dir)
    if recipe.release.push and (report["passed"] or force_release):
        for folder in releases:
            push(folder, repo_for(folder, recipe.release.repo_prefix))
    return Outcome(report, artifacts, out_dir, releases)


def reference_alongside(checkpoint: Checkpoint, settings: Validate, cache_dir: Path) -> ReferenceForward | None:
    """The reference's forward, to run in the calibration's pass, where the run validates and its logits are not
    cached yet (validate_artifacts then finds them in the cache); None otherwise."""
    from siliconvert.corpus import source_tokenizer, token_windows
    from siliconvert.validate.reference import reference_forward

    if not settings.enabled:
        return None
    windows = token_windows(source_tokenizer(checkpoint.path), settings.corpus, settings.tokens, settings.context)
    return reference_forward(checkpoint, windows, cache_dir)


def preflight(recipe: Recipe, checkpoint: Checkpoint, recipe_path: Path | None = None) -> None:
    """Every check that needs no weights, before the first tensor is read (minutes at 7B) and by `recipe
    --check`: the contexts fit the model's positions, the output folder can be written, the tokenizer loads,
    the corpus and the importance matrix's text are readable and long enough, Core ML's chunks fit the layers."""
    from siliconvert.corpus import source_tokenizer, token_windows

    where = recipe_path or "recipe"
    settings = recipe.validate_
    contexts = [(f"targets.{i}.{key}", tokens) for i, t in enumerate(recipe.targets) for key, tokens in t.positions()]
    if settings.enabled:
        contexts.append(("validate.context", settings.context))
        if settings.latency:
            latency = settings.prefill_tokens + settings.decode_tokens
            contexts.append(("validate.prefill_tokens + decode_tokens", latency))
    check_positions(checkpoint, contexts, where)
    check_output(recipe.output_dir(recipe_path))
    tokenizer = source_tokenizer(checkpoint.path)  # every target ships the tokenizer; validation runs it
    if settings.enabled:
        token_windows(tokenizer, settings.corpus, settings.tokens, settings.context)
    for index, target in enumerate(recipe.targets):
        format_entry(target.format).preflight(target, checkpoint, f"targets.{index}", where)
        format_entry(target.format).check_plan(target, checkpoint, f"targets.{index}", where)


def check_positions(checkpoint: Checkpoint, contexts: list[tuple[str, int]], where: Path | str) -> None:
    """Each (setting, tokens) must fit the positions the model was trained for."""
    positions = checkpoint.spec.max_position_embeddings
    for key, context in contexts:
        if context > positions:
            raise RecipeError(f"{key} is {context}, beyond the model's max_position_embeddings {positions} "
                              f"({checkpoint.path / 'config.json'})", where)


def check_output(out_dir: Path) -> None:
    """Refuse an output folder that cannot be made or written, creating nothing: its nearest existing
    ancestor must be a writable folder."""
    existing = out_dir.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"cannot create the output folder ({existing} is not a folder)", out_dir)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"cannot create the output folder ({existing} is not writable)", out_dir)


def convert(checkpoint: Checkpoint, recipe: Recipe, artifacts_dir: Path, timings: Timings | None = None, *,
            calibration: Calibrations | None = None) -> list[tuple[Artifact, TargetSpec]]:
    """Read every source tensor once and hand it to every target's writer.

    A target whose inputs (source fingerprint, target options, tool versions) match a stamp left by
    an earlier completed run is not rebuilt. Returns each artifact with the target that asked for it.
    What the writers calibrate on is measured first, one forward per text, by `calibration` (the run's;
    one cached beside the artifacts where none is given).
    """
    from siliconvert.validate.score import artifact_size, peak_rss_mb

    artifacts_dir.mkdir(parents=True, exist_ok=True)
    sweep_leftovers(artifacts_dir)
    # computed before anything is written: a finished artifact is stamped the moment it has its name
    keys = [stage_key(checkpoint, target) for target in recipe.targets]
    done = {index: found for index, key in enumerate(keys) if (found := read_stamp(artifacts_dir, key)) is not None}
    for found in done.values():
        say(f"up to date: {', '.join(a.path.name for a in found)}")
    todo = [(index, target) for index, target in enumerate(recipe.targets) if index not in done]
    timings = timings or Timings()
    formats = [t.format for t in recipe.targets]
    # a format asked for twice gets the target's index in its label
    labels = [f"convert.{t.format}" + (f"#{i}" if formats.count(t.format) > 1 else "") for i, t in todo]
    busy = dict.fromkeys(labels, 0.0)
    writers: list[Writer] = []
    started, cpu_started = time.perf_counter(), cpu_seconds()
    restore_torch_threads = None
    calibration = calibration or Calibrations(checkpoint, artifacts_dir.parent / ".cache")
    try:
        if needs := calibration_needs([target for _, target in todo]):
            begun = time.perf_counter()
            calibration.prepare(needs)
            timings.stage("calibrate", wall_s=time.perf_counter() - begun)
        for label, (_, target) in zip(labels, todo, strict=True):
            begun = time.perf_counter()
            writers.append(format_entry(target.format).writer(checkpoint, target, artifacts_dir, checkpoint.name,
                                                              calibration))
            busy[label] += time.perf_counter() - begun
        if writers:
            # after the writers are made: a plan's costs are measured on every core
            restore_torch_threads = limit_torch_threads(1)
            stream = track(checkpoint.tensors(), "converting tensors", total=len(checkpoint.tensor_infos))
            for info, array in stream:
                for label, writer in zip(labels, writers, strict=True):
                    begun = time.perf_counter()
                    writer.add(info, array)
                    busy[label] += time.perf_counter() - begun
                del array  # freed before the next tensor is read: memory holds one tensor (one expert stack)
        for label, writer, (index, _) in zip(labels, writers, todo, strict=True):
            begun = time.perf_counter()
            done[index] = writer.finish()
            write_stamp(artifacts_dir, keys[index], done[index])
            busy[label] += time.perf_counter() - begun
            timings.stage(label, busy_s=busy[label], bytes=sum(artifact_size(a.path) for a in done[index]),
                          **writer.figures())
    except BaseException as e:
        for writer in writers:
            # on a full disk, closing a half-written file fails again; the first error is the one to report,
            # and what is left has a hidden name the next run sweeps
            with contextlib.suppress(OSError):
                writer.abort()
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise OutputError("no space left on the device", artifacts_dir) from None
        raise
    finally:
        if restore_torch_threads:
            restore_torch_threads()
    if writers:
        timings.stage("convert", wall_s=time.perf_counter() - started, cpu_s=cpu_seconds() - cpu_started,
                      peak_rss_mb=peak_rss_mb())
    return [(artifact, target) for index, target in enumerate(recipe.targets) for artifact in done[index]]



def calibration_needs(targets: list[TargetSpec]) -> dict[str, set[str]]:
    """Calibration text → the parts the targets' writers ask for (each format entry's `calibration_needs`)."""
    needs: dict[str, set[str]] = {}
    for target in targets:
        for text, parts in format_entry(target.format).calibration_needs(target).items():
            needs.setdefault(text, set()).update(parts)
    return needs


def limit_torch_threads(threads: int) -> Callable[[], None]:
    """Run torch ops on at most `threads` threads until the returned function is called. The pass's own torch
    ops (the reader's range checks, Core ML's fp16 casts) are memory-bound: a second thread gains little, and
    beside the quantizer's threads each op waits for the slower of its two (measured: 2.2 ms for a 16 MB cast
    and range check on one thread, 15.5 ms on two)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(min(threads, before))
    return lambda: torch.set_num_threads(before)


def sweep_leftovers(artifacts_dir: Path) -> None:
    """Remove what a killed run left half-written. Writers work under hidden names (".name.partial",
    ".name.tmp-PID", scratch folders) and only a finished artifact gets a visible name; the stamps
    folder is the one hidden entry that is kept. One run at a time per output folder."""
    for entry in artifacts_dir.glob(".*"):
        if entry.name == ".stamps":
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


TOOLS = ("siliconvert", "mlx", "mlx-lm", "gguf", "llama-cpp-python", "coremltools", "numpy")


def stage_key(checkpoint: Checkpoint, target: TargetSpec) -> str:
    """What a target's artifacts depend on: the source, the target's options, the tools' versions."""
    versions = {}
    for tool in TOOLS:
        try:
            versions[tool] = importlib.metadata.version(tool)
        except importlib.metadata.PackageNotFoundError:
            versions[tool] = None
    inputs = {"source": checkpoint.fingerprint(), "name": checkpoint.name,
              "target": target.model_dump(mode="json", exclude={"gates"}), "tools": versions,
              "code": writer_code_digest()}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


@functools.cache
def writer_code_digest() -> str:
    """A hash of the code that writes artifacts (siliconvert's core, convert/, quantize/): a developer's
    change to a writer invalidates earlier stamps even when the version number stays the same."""
    digest = hashlib.sha256()
    for package in ("siliconvert", "siliconvert.convert", "siliconvert.quantize", "siliconvert.architectures"):
        folder = Path(importlib.import_module(package).__file__).parent
        for file in sorted(folder.glob("*.py")):
            digest.update(file.name.encode() + file.read_bytes())
    return digest.hexdigest()[:16]


def read_stamp(artifacts_dir: Path, key: str) -> list[Artifact] | None:
    """The artifacts a completed earlier run recorded under `key`, if they are all still there."""
    stamp = artifacts_dir / ".stamps" / f"{key}.json"
    try:
        entries = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return None
    artifacts = [Artifact(e["format"], e["quant"], artifacts_dir / e["path"], e["runner_options"], e.get("plan"),
                          e.get("float_type"), e.get("source_quantization")) for e in entries]
    return artifacts if all(a.path.exists() for a in artifacts) else None


def write_stamp(artifacts_dir: Path, key: str, artifacts: list[Artifact]) -> None:
    """Record a target as complete; written last and atomically, so a killed run leaves no stamp."""
    entries = [{"format": a.format, "quant": a.quant, "path": str(a.path.relative_to(artifacts_dir)),
                "runner_options": a.runner_options, "plan": a.plan, "float_type": a.float_type,
                "source_quantization": a.source_quantization} for a in artifacts]
    stamp = artifacts_dir / ".stamps" / f"{key}.json"
    stamp.parent.mkdir(exist_ok=True)
    # another target's stamp naming these files is stale now (a re-planned artifact keeps its name)
    paths = {e["path"] for e in entries}
    for other in stamp.parent.glob("*.json"):
        with contextlib.suppress(OSError, ValueError):
            if other != stamp and paths & {e["path"] for e in json.loads(other.read_text())}:
                other.unlink()
    write_text_atomically(stamp, json.dumps(entries, indent=2))


PLAN_TRIES = 3  # builds of a planned artifact in search of its plan's max_mean_kld
AIM = 0.9  # a plan planned again aims this far under its target: measured KLD moves by a few % between plans
LOOSEN_BELOW = 0.75  # a plan that met this far under its target is planned again with fewer bytes
FLOOR_SHARE = 0.75  # the most of a measured KLD a fitted runtime floor may explain


def fit_prediction(tries: list[dict], prior_floor: float) -> tuple[float, float]:
    """(kld_per_error, kld_floor) of the line measured mean KLD = floor + kld_per_error × summed error, fitted to
    the tries measured so far. The floor is what the runtime loses with no quantization at all (MLX rounding its
    activations to its float type); a prediction scaled as a whole would take it for quantization error and
    over-correct near it. Two tries at different errors give the line through them, kept where its floor lies
    between 0 and FLOOR_SHARE of the smaller measurement: a floor above that says the two measured alike, which
    at small KLD is the measurement's noise, not a floor (a line through noise would send the next plan to its
    most exact types). Otherwise, and after one try, the line through the last try from the floor the plan
    assumed."""
    last = tries[-1]
    if len(tries) >= 2:
        other = tries[-2]
        spread = last["summed_error"] - other["summed_error"]
        if abs(spread) > 1e-12:
            slope = (last["measured_mean_kld"] - other["measured_mean_kld"]) / spread
            floor = last["measured_mean_kld"] - slope * last["summed_error"]
            if slope > 0 and 0 <= floor <= FLOOR_SHARE * min(last["measured_mean_kld"], other["measured_mean_kld"]):
                return slope, floor
    floor = prior_floor if last["measured_mean_kld"] > prior_floor else 0.0
    return (last["measured_mean_kld"] - floor) / max(last["summed_error"], 1e-12), floor


class Replanner:
    """The re-plan loop for `max_mean_kld` plans. After validation the prediction is fitted to what was measured
    (fit_prediction: the estimator's scale for this model, and the runtime's floor once two tries tell it) and the
    artifact planned and written again, aiming at AIM × the target: when it missed, or when it met with room to
    spare (measured under LOOSEN_BELOW × the target: fewer bytes would do). Not when the plan cannot move that way
    (every tensor already at its most exact, or cheapest, type). At most PLAN_TRIES builds; if the last misses
    after an earlier one met, or an earlier one met with fewer bytes, the smallest one that met is written again
    (same plan, same bytes). Each try is said and goes into the report's plan."""

    def __init__(self, checkpoint: Checkpoint, recipe: Recipe, produced: list[tuple[Artifact, TargetSpec]],
                 artifacts_dir: Path, timings: Timings, *, calibration: Calibrations | None = None):
        self.checkpoint, self.recipe, self.artifacts_dir, self.timings = checkpoint, recipe, artifacts_dir, timings
        self.calibration = calibration  # the run's, so a rebuild measures nothing again
        self.targets = {artifact.path: target for artifact, target in produced if artifact.plan is not None}
        self.tries: dict[Path, list[dict]] = {}
        self.met: dict[Path, list[tuple[int, TargetSpec]]] = {}  # (bytes, target) of the tries that met

    def __call__(self, artifact: Artifact, entry: dict) -> Artifact | None:
        """Record how `artifact` did in its report `entry`; a rebuilt artifact to score next, or None."""
        target = self.targets.get(artifact.path)
        if target is None:
            return None
        goal, plan = target.plan.max_mean_kld, artifact.plan
        measured = entry["metrics"]["mean_kld"]
        met = goal is None or measured <= goal
        history = self.tries.setdefault(artifact.path, [])
        closeness = {"measured_mean_kld": measured,
                     "measured_over_predicted": _ratio(measured, plan["predicted_mean_kld"])}
        if history and history[-1].get("restored"):  # the smallest try that met, written again: done
            entry["plan"] = {**plan, **closeness, "tries": list(history)}
            return None
        history.append({"try": len(history) + 1, "predicted_mean_kld": plan["predicted_mean_kld"],
                        "measured_mean_kld": measured, "summed_error": plan["summed_error"],
                        "bits_per_weight": plan["bits_per_weight"], "bytes": entry["size_bytes"], "met": met})
        # how close the prediction was, for every goal: a size or bits-per-weight plan is not planned again (its
        # allocation under a prediction scaled as a whole is the same one), so this is what says it held
        entry["plan"] = {**plan, **closeness, "tries": list(history)}
        if goal is None:
            return None
        if met:
            self.met.setdefault(artifact.path, []).append((entry["size_bytes"], target))
        loose = met and measured < LOOSEN_BELOW * goal
        stuck = plan.get("cheapest") if loose else plan.get("most_exact") and not met
        if stuck:
            say(f"{artifact.format} {artifact.quant}: measured mean KLD {measured:.5f} against {goal:g}, and every "
                f"tensor already has its {'cheapest' if loose else 'most exact'} type: not planned again")
        if len(history) >= PLAN_TRIES or (met and not loose) or stuck:
            best = min(self.met.get(artifact.path, []), key=lambda m: m[0], default=None)
            if best is None or (met and best[0] >= entry["size_bytes"]):
                return None
            history[-1]["restored"] = True
            why = "an earlier try met with fewer bytes" if met else "the last try missed"
            say(f"{artifact.format} {artifact.quant}: {why}; writing again the smallest that met {goal:g}")
            return self._build(artifact.path, best[1])
        slope, floor = fit_prediction(history, plan.get("kld_floor", 0.0))
        say(f"{artifact.format} {artifact.quant}: measured mean KLD {measured:.5f} "
            f"{'is far under' if met else 'misses'} the plan's {goal:g} (predicted {plan['predicted_mean_kld']:.5f}); "
            f"planning again with KLD ≈ {floor:.5f} + {slope:.4g} × error fitted to {len(history)} "
            f"{'try' if len(history) == 1 else 'tries'}, aiming at {AIM:g}× the target "
            f"(try {len(history) + 1} of {PLAN_TRIES})")
        # aiming at AIM × goal under the fitted line is meeting goal under the line scaled by 1 / AIM
        rescaled = target.plan.model_copy(update={"kld_per_error": slope / AIM, "kld_floor": floor / AIM})
        return self._build(artifact.path, format_entry(target.format).replanned(target, rescaled))

    def _build(self, path: Path, target: TargetSpec) -> Artifact:
        self.targets[path] = target
        produced = convert(self.checkpoint, self.recipe.model_copy(update={"targets": [target]}),
                           self.artifacts_dir, self.timings, calibration=self.calibration)
        return next(artifact for artifact, _ in produced if artifact.path == path)


def _ratio(measured: float, predicted: float) -> float | None:
    return round(measured / predicted, 3) if predicted > 0 else None


def validate_artifacts(checkpoint: Checkpoint, source: str, artifacts: list[Artifact], settings: Validate,
                       gates: dict[Path, Gates], out_dir: Path, timings: Timings | None = None,
                       replan: Callable[[Artifact, dict], Artifact | None] | None = None) -> dict:
    """Score every artifact against the reference on the same windows; write the report. `replan` may answer
    an artifact's entry with a rebuilt artifact, which is scored in its place.

    The reference and the artifacts' runs go at once, each in its own process, as the memory budget admits them
    (validate/overlap.py; `settings.parallel`: 1 runs them one after the other); each run is scored as it ends,
    once the reference is in; a planned artifact's answer from `replan` (and its rebuild) comes in a job that
    starts once the runs going have ended, and runs alone."""
    import multiprocessing

    import numpy as np

    from siliconvert.corpus import source_tokenizer, token_windows
    from siliconvert.validate import gates as gate_checks
    from siliconvert.validate import overlap
    from siliconvert.validate.reference import reference_expert_choices, reference_logits
    from siliconvert.validate.report import artifact_entry, build_report, write_report
    from siliconvert.validate.score import RunOutput, run_artifact, score
    from siliconvert.validate.tokenizer import tokenizer_probes

    for artifact in artifacts:  # another model's artifact would end in a runtime's crash on the source's ids
        rows = format_entry(artifact.format).vocab_size(artifact)
        if rows is not None and rows != checkpoint.spec.vocab_size:
            raise ArtifactError(f"its vocabulary has {rows} tokens, the source's {checkpoint.spec.vocab_size} "
                                f"({checkpoint.path / 'config.json'}): it was not converted from this source",
                                artifact.path)
    tokenizer = source_tokenizer(checkpoint.path)
    windows = token_windows(tokenizer, settings.corpus, settings.tokens, settings.context)
    probes = {fmt: tokenizer_probes(tokenizer, windows.probe_text, fmt) for fmt in {a.format for a in artifacts}}
    timings = timings or Timings()
    validation_started = time.perf_counter()
    budget = overlap.memory_budget(settings.parallel)
    gpu = budget.device is not None
    logits = overlap.logits_bytes(*windows.tokens.shape, checkpoint.spec.vocab_size)
    latency = (settings.prefill_tokens, settings.decode_tokens) if settings.latency else None
    reference: dict = {}  # its logits, its description and the experts its routers chose, once computed
    waiting: list[tuple[overlap.Job, tuple[Artifact, RunOutput, float] | None]] = []  # ended before the reference
    entries: dict[int, dict] = {}  # by the artifact's place in `artifacts`
    klds: dict[int, tuple[str, np.ndarray]] = {}

    def artifact_job(place: int, artifact: Artifact, scored_entry: dict | None = None) -> overlap.Job:
        """The run of `artifact`; with `scored_entry` (a planned artifact's, just scored), first `replan`'s answer to
        it, alone: a rebuild rewrites artifacts (Core ML's fp16 folder beside its planned one), which no other run may
        be reading."""
        host, device = format_entry(artifact.format).validation_memory(artifact, gpu)

        def start(phase: overlap.RunPhase) -> tuple[Artifact, RunOutput, float] | None:
            began, running = time.perf_counter(), artifact
            if scored_entry is not None and (running := replan(artifact, scored_entry)) is None:
                return None
            rebuild_s = time.perf_counter() - began
            say(f"validating {running.format} {running.quant}")
            return running, run_artifact(running, format_entry(running.format).runner, windows, latency,
                                         probes[running.format].artifact_texts, phase), rebuild_s
        return overlap.Job(f"{artifact.format} {artifact.quant}", overlap.Need(host + logits, device), start,
                           alone=scored_entry is not None, extra={"place": place})

    def scored(job: overlap.Job, outcome: tuple[Artifact, RunOutput, float] | None) -> list[overlap.Job]:
        if outcome is None:  # replan answered that there is nothing to build again
            return []
        (artifact, run, rebuild_s), place = outcome, job.extra["place"]
        started = time.perf_counter()
        result = score(artifact, run, reference["logits"], windows, probes[artifact.format],
                       settings.tokenizer == "strict", reference["choices"], checkpoint.spec.sparse_layers)
        peak = getattr(run, "peak_rss_mb", None) or (run.latency.peak_rss_mb if run.latency else None)
        # its run and its scoring, not its rebuild (timed as a conversion) nor its waits for the reference and for
        # the quiet phase (those are `waited_s`)
        timings.stage(f"validate.{artifact.format} {artifact.quant}",
                      wall_s=job.run_s - rebuild_s - run.quiet_wait_s + time.perf_counter() - started,
                      peak_rss_mb=peak, started_s=job.started_s, waited_s=run.quiet_wait_s + started - job.ended_at)
        failures = gate_checks.check(result, gates[artifact.path])
        entries[place] = artifact_entry(result, failures, gates[artifact.path].model_dump())
        klds[place] = (f"{entries[place]['format']} {entries[place]['quant']}", result.kld)
        if replan is None:
            return []
        if artifact.plan is not None:  # it may be built again: in a job of its own, once no other run goes
            return [artifact_job(place, artifact, entries[place])]
        rebuilt = replan(artifact, entries[place])  # nothing to build: the answer comes at once
        return [artifact_job(place, rebuilt)] if rebuilt is not None else []

    def finished(job: overlap.Job, result) -> list[overlap.Job]:
        if job is not reference_job:
            if "logits" not in reference:
                waiting.append((job, result))
                return []
            return scored(job, result)
        reference["logits"], reference["info"] = result
        info = reference["info"]
        # a cached reference costs only the load: its peak belongs to the run that computed it
        timings.stage("reference", wall_s=job.run_s, cached=bool(info.get("cached")),
                      peak_rss_mb=None if info.get("cached") else info.get("peak_rss_mb"))
        reference["choices"] = reference_expert_choices(checkpoint, windows, out_dir / ".cache")
        follow = [rebuilt for ended, run in waiting for rebuilt in scored(ended, run)]
        waiting.clear()
        return follow

    reference_job = overlap.Job("reference", overlap.reference_need(checkpoint, logits, gpu),
                                lambda phase: reference_logits(checkpoint, windows, out_dir / ".cache"))
    jobs = [reference_job] + [artifact_job(place, artifact) for place, artifact in enumerate(artifacts)]
    most = overlap.run_jobs(jobs, budget, overlap.QuietPhase(multiprocessing.get_context("spawn")), finished)
    validation = {**budget.as_report(), "most_at_once": most}
    timings.stage("validate", wall_s=time.perf_counter() - validation_started, **validation)
    reference_info = reference["info"]
    spec = checkpoint.spec
    report = build_report(
        source=source,
        source_info={"name": checkpoint.name, "path": str(checkpoint.path), "architecture": spec.hf_architecture,
                     "family": spec.family, "traits": spec.traits(),
                     "fingerprint": checkpoint.fingerprint(),
                     "dtype": spec.source_dtype,
                     "quantization": checkpoint.quantization.description if checkpoint.quantization else None},
        reference=reference_info,
        corpus={"name": windows.corpus, "tokens": int(windows.tokens.size), "context": settings.context,
                "windows": int(windows.tokens.shape[0]), "positions": int(np.prod(windows.targets.shape))},
        artifacts=[entries[place] for place in range(len(artifacts))],
        version=__version__,
        validation=validation,
    )
    write_report(out_dir, report, dict(klds[place] for place in range(len(artifacts))))
    return report


def prepare_output(out_dir: Path) -> Path:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the output folder ({e.strerror})", out_dir) from None
    if not os.access(out_dir, os.W_OK):
        raise OutputError("the output folder is not writable", out_dir)
    return out_dir.resolve()
