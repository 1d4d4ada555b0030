"""Validation's runs side by side (validate/overlap.py): the budget admits runs, the quiet phase keeps latency timed
alone, and overlapping runs score what serial ones do."""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import threading
import time
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
from test_formats import Toy

from siliconvert.artifacts import Artifact, Release, Writer
from siliconvert.errors import ArtifactError
from siliconvert.format import Format, register, unregister
from siliconvert.recipe import TargetSpec, Validate
from siliconvert.validate.overlap import Budget, Job, Need, QuietPhase, RunPhase, memory_budget, run_jobs

SPAWN = multiprocessing.get_context("spawn")


def test_a_run_bigger_than_the_budget_runs_alone_and_two_that_fit_run_together():
    budget = Budget(host=10, device=None, parallel=4)
    assert budget.fits(Need(50), [])  # alone: it starts when nothing else runs, rather than never
    assert not budget.fits(Need(50), [Need(1)])
    assert not budget.fits(Need(1), [Need(50)])
    assert budget.fits(Need(4), [Need(5)]) and not budget.fits(Need(6), [Need(5)])
    assert not Budget(host=100, device=10, parallel=4).fits(Need(1, 6), [Need(1, 5)])  # the GPU's memory too
    assert not Budget(host=100, device=None, parallel=2).fits(Need(1), [Need(1), Need(1)])  # and the count


def test_the_budget_is_a_share_of_the_memory_available_and_auto_counts_the_cores(monkeypatch):
    monkeypatch.setattr("siliconvert.validate.overlap.available_host_bytes", lambda: 10 * 2**30)
    monkeypatch.setattr("siliconvert.validate.overlap.free_gpu_bytes", lambda: None)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    budget = memory_budget("auto")
    assert budget == Budget(host=int(0.8 * 10 * 2**30), device=None, parallel=4)
    assert budget.as_report() == {"parallel": 4, "memory_budget_mb": 8192, "gpu_memory_budget_mb": None}
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert memory_budget("auto").parallel == 1  # two cores: overlapping runs would only take turns on them
    assert memory_budget(3).parallel == 3


def test_each_format_estimates_what_its_runner_holds(tmp_path):
    import siliconvert.formats  # noqa: F401 - registers the formats
    from siliconvert.format import artifact_bytes, entry

    gguf = tmp_path / "model-Q4_K_M.gguf"
    gguf.write_bytes(bytes(1000))
    # llama.cpp reads the file into memory on the CPU, into the GPU's with every layer offloaded; its cache beside
    assert entry("gguf").validation_memory(Artifact("gguf", "Q4_K_M", gguf), gpu=False) == (1200, 0)
    assert entry("gguf").validation_memory(Artifact("gguf", "Q4_K_M", gguf), gpu=True) == (250, 1200)
    mlx = tmp_path / "mlx"
    mlx.mkdir()
    (mlx / "config.json").write_text(json.dumps({"quantization": {"bits": 4, "group_size": 64}}))
    (mlx / "model.safetensors").write_bytes(bytes(1000))
    size = artifact_bytes(mlx)
    # mlx's CPU runs a quantized folder dequantized: 16 bits a weight beside the packed 4, and 32 more to widen them
    assert entry("mlx").validation_memory(Artifact("mlx", "4bit-g64", mlx), gpu=False) == (size + 12 * size, 0)
    assert entry("mlx").validation_memory(Artifact("mlx", "4bit-g64", mlx), gpu=True) == (size, size)
    coreml = tmp_path / "coreml"
    for name, size in (("a", 300), ("b", 500)):
        (coreml / f"{name}.mlpackage").mkdir(parents=True)
        (coreml / f"{name}.mlpackage" / "weight.bin").write_bytes(bytes(size))
    # the MIL interpreter widens float16 weights to float32, palettized 4-bit ones eight times
    assert entry("coreml").validation_memory(Artifact("coreml", "fp16", coreml), gpu=False) == (2 * 800 + 500, 0)
    assert entry("coreml").validation_memory(Artifact("coreml", "pal4", coreml), gpu=True) == (500, 8 * 800)


def test_the_reference_holds_one_layer_beside_the_embedding_and_the_head(random_llama):
    from siliconvert.checkpoint import Checkpoint
    from siliconvert.validate.overlap import reference_need

    # random_llama: a 96 × 32 embedding and head and the final norm; two layers, each q and o 32 × 32, k and v
    # 16 × 32 (two key-value heads), the MLP 3 × 32 × 64 and two norms
    held = 2 * 96 * 32 + 32 + 2 * 32 * 32 + 2 * 16 * 32 + 3 * 32 * 64 + 2 * 32
    checkpoint = Checkpoint.open(random_llama)
    assert reference_need(checkpoint, 1000, gpu=False) == Need(1000 + 4 * held)  # float32 on the CPU
    assert reference_need(checkpoint, 1000, gpu=True) == Need(1000 + 2 * held, 2 * held)  # float16 on the GPU


def jobs_that_record(needs: dict[str, int], spans: dict[str, tuple[float, float]], seconds: float = 0.3,
                     fails: str | None = None) -> list[Job]:
    def start(name: str, phase: RunPhase) -> str:
        began = time.monotonic()
        time.sleep(seconds)
        spans[name] = (began, time.monotonic())
        if name == fails:
            raise ArtifactError("the toy runtime crashed while running the artifact", name)
        return name
    return [Job(name, Need(host), lambda phase, name=name: start(name, phase)) for name, host in needs.items()]


def overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def test_runs_that_fit_go_together_and_one_beyond_the_budget_goes_alone_in_its_turn():
    spans: dict[str, tuple[float, float]] = {}
    ended: list[str] = []
    most = run_jobs(jobs_that_record({"a": 4, "b": 4, "big": 50, "c": 4}, spans), Budget(10, None, 4),
                    QuietPhase(SPAWN), lambda job, result: ended.append(result) or [])
    assert overlap(spans["a"], spans["b"]) and most == 2
    assert not any(overlap(spans["big"], spans[other]) for other in "abc")
    assert spans["c"][0] >= spans["big"][1]  # no run overtakes an earlier one waiting
    assert sorted(ended) == ["a", "b", "big", "c"]


def test_parallel_1_runs_in_the_order_given_and_a_rebuilt_artifact_runs_next():
    spans: dict[str, tuple[float, float]] = {}
    jobs = jobs_that_record({"reference": 1, "a": 1, "b": 1}, spans, seconds=0.05)
    rebuilt = jobs_that_record({"a, rebuilt": 1}, spans, seconds=0.05)

    def finished(job: Job, result: str) -> list[Job]:
        return rebuilt if result == "a" else []
    assert run_jobs(jobs, Budget(10**12, None, 1), QuietPhase(SPAWN), finished) == 1
    order = sorted(spans, key=lambda name: spans[name][0])
    assert order == ["reference", "a", "a, rebuilt", "b"]
    assert all(spans[before][1] <= spans[after][0] for before, after in itertools.pairwise(order))


def test_a_job_marked_alone_waits_for_the_runs_going_and_runs_alone():
    spans: dict[str, tuple[float, float]] = {}
    jobs = jobs_that_record({"a": 1, "rebuild": 1, "b": 1}, spans, seconds=0.2)
    jobs[1].alone = True
    run_jobs(jobs, Budget(10**12, None, 4), QuietPhase(SPAWN), lambda job, result: [])
    assert spans["rebuild"][0] >= spans["a"][1] and spans["b"][0] >= spans["rebuild"][1]


def test_an_error_in_one_run_is_raised_once_the_runs_going_have_ended():
    spans: dict[str, tuple[float, float]] = {}
    jobs = jobs_that_record({"fails": 1, "slow": 1}, spans, fails="fails")
    jobs[1].start = lambda phase: time.sleep(1) or spans.setdefault("slow", (0, time.monotonic()))
    with pytest.raises(ArtifactError, match="crashed") as error:
        run_jobs(jobs, Budget(10, None, 2), QuietPhase(SPAWN), lambda job, result: [])
    assert error.value.where == "fails" and "slow" in spans


def time_when_quiet(phase: RunPhase, times) -> None:
    """A child: its latency runs (one second long), and when they began and ended."""
    times.put("ready")
    with phase.timing():
        began = time.monotonic()
        time.sleep(1)
        ended = time.monotonic()  # inside: once the timing is left, the parent may begin at once
    times.put((began, ended))


def test_a_child_times_its_latency_only_when_no_one_works_and_no_one_starts_work_meanwhile():
    quiet = QuietPhase(SPAWN)
    other = quiet.run()  # another run, still computing its logits
    phase = quiet.run()
    times = SPAWN.Queue()
    child = SPAWN.Process(target=time_when_quiet, args=(phase, times))
    child.start()
    with quiet.busy():  # the parent scoring, say
        assert times.get(timeout=60) == "ready"
        time.sleep(0.5)  # the child waits
    time.sleep(0.5)
    assert times.empty()  # the other run is still busy
    quiet_from = time.monotonic()  # before the other run is done: the child may begin at once
    other.done()
    deadline = time.monotonic() + 60
    while not quiet.timing_now.value:  # the child begins timing (a loaded machine may take a while)
        assert time.monotonic() < deadline, "the child never began timing"
        time.sleep(0.01)
    quiet.begin()  # new work waits for the child's timing to end
    begun = time.monotonic()
    quiet.end()
    timed_from, timed_to = times.get(timeout=30)
    child.join(timeout=30)
    assert timed_from >= quiet_from and begun >= timed_to


# ---- through the pipeline: a crash names its artifact; overlapping runs score as serial ones ----

class CrashingTarget(TargetSpec):
    format: Literal["crashing"]


class CrashingRunner:
    """A runtime that dies in native code, as one sometimes does: its process ends without a word."""

    def __init__(self, path: Path, options: dict) -> None:
        os._exit(1)


class Crashing(Format):
    name, target, runner, library, tags, looks_like = (
        "crashing", CrashingTarget, f"{__name__}:CrashingRunner", "none", (), "nothing")

    def writer(self, checkpoint, target, out_dir: Path, model_name: str, calibration) -> Writer:
        raise NotImplementedError

    def detect(self, path: Path) -> Artifact | None:
        return None

    def release_name(self, model: str, quant: str) -> str:
        return model

    def summary(self, release: Release) -> str:
        return ""

    def usage(self, release: Release, folder: Path) -> list[str]:
        return []


@pytest.fixture
def toy_and_crashing():
    register(Toy())
    register(Crashing())
    yield
    unregister("toy")
    unregister("crashing")


def test_a_crash_in_one_of_the_overlapping_runs_names_its_artifact(toy_and_crashing, demo_model, tmp_path):
    from siliconvert.commands.pipeline import open_source, validate_artifacts

    # the toy runner opens a Hugging Face folder: the demo checkpoint itself
    toy, crashing = Artifact("toy", "float32", demo_model), Artifact("crashing", "x", tmp_path / "crashing-artifact")
    crashing.path.mkdir()
    settings = Validate(tokens=64, context=32, latency=False, parallel=3)
    gates = {artifact.path: settings.gates for artifact in (toy, crashing)}
    with pytest.raises(ArtifactError, match="the crashing runtime crashed") as error:
        validate_artifacts(open_source(str(demo_model)), str(demo_model), [toy, crashing], settings, gates,
                           tmp_path / "out")
    assert error.value.where == str(crashing.path)


def test_a_planned_artifact_is_built_again_once_the_first_round_has_ended_and_scored_in_its_place(
        toy_and_crashing, demo_model, tmp_path):
    from siliconvert.commands.pipeline import open_source, validate_artifacts

    planned = Artifact("toy", "planned", demo_model, plan={"goal": "toy"})
    other = Artifact("toy", "float32", demo_model)
    answers: list[tuple[str, float]] = []

    def replan(artifact: Artifact, entry: dict) -> Artifact | None:
        answers.append((artifact.quant, time.perf_counter()))
        entry["replanned"], entry["plan"] = True, None  # the toy's plan is a marker: the report has none to show
        return Artifact("toy", "rebuilt", demo_model, plan={"goal": "toy"}) if artifact.quant == "planned" else None

    settings = Validate(tokens=64, context=32, latency=False, parallel=3)
    out = tmp_path / "out"
    report = validate_artifacts(open_source(str(demo_model)), str(demo_model), [planned, other], settings,
                                {demo_model: settings.gates}, out, replan=replan)
    assert [(a["quant"], a.get("replanned")) for a in report["artifacts"]] == [("rebuilt", True), ("float32", True)]
    assert sorted(quant for quant, _ in answers) == ["float32", "planned", "rebuilt"]
    rebuilt_at = dict(answers)["planned"]
    assert rebuilt_at >= dict(answers)["float32"]  # the other run scored (and answered) before the rebuild began


@pytest.mark.slow
def test_overlapping_runs_score_what_serial_runs_score(demo_model, tmp_path):
    """MLX, GGUF and Core ML on the demo model, validated one after the other (`parallel: 1`, as the recipe runs
    them), then again all at once beside a fresh reference: the same scores, bit for bit."""
    from siliconvert.commands.pipeline import open_source, run_recipe, validate_artifacts
    from siliconvert.recipe import parse_recipe

    settings = {"tokens": 128, "context": 32, "prefill_tokens": 8, "decode_tokens": 4}
    recipe = parse_recipe({"source": str(demo_model), "output": str(tmp_path / "serial"),
                           "targets": [{"format": "mlx", "bits": 4, "group_size": 64},
                                       {"format": "gguf", "quants": ["Q4_K_M"]}, {"format": "coreml"}],
                           "validate": {**settings, "parallel": 1}})
    serial = run_recipe(recipe)
    stages = json.loads((tmp_path / "serial" / "timings.json").read_text())["stages"]
    runs = ["reference", "validate.mlx 4bit-g64", "validate.gguf Q4_K_M", "validate.coreml fp16"]
    starts = [stages[run].get("started_s", 0.0) for run in runs]
    assert starts == sorted(starts) and starts[1] >= stages["reference"]["wall_s"]  # today's order, one at a time
    assert serial.report["validation"]["most_at_once"] == 1

    both = Validate(**settings, parallel=4)
    overlapped = validate_artifacts(open_source(str(demo_model)), str(demo_model), serial.artifacts, both,
                                    {artifact.path: both.gates for artifact in serial.artifacts}, tmp_path / "overlap")
    assert overlapped["validation"]["most_at_once"] > 1
    assert not overlapped["reference"]["cached"]  # computed beside the runs, not read back
    for one, other in zip(serial.report["artifacts"], overlapped["artifacts"], strict=True):
        assert (one["format"], one["quant"]) == (other["format"], other["quant"])
        for key in ("metrics", "kv_cache", "tokenizer", "tokenizer_match", "gates"):
            assert one[key] == other[key], (one["format"], key)
        # timed in the quiet phase, by every runtime that is timed (the MIL interpreter, an emulator, is not)
        assert other["latency"]["decode_tps"] > 0 if other["format"] != "coreml" else other["latency"] is None
    assert "Validation: up to 4 runs at once within" in (tmp_path / "overlap" / "report.md").read_text()
    assert np.isfinite([a["metrics"]["mean_kld"] for a in overlapped["artifacts"]]).all()


def test_threads_left_behind_are_none():
    """run_jobs' threads end with it (a run's thread waits on its process, and must not outlive validation)."""
    run_jobs(jobs_that_record({"a": 1}, {}, seconds=0.01), Budget(10, None, 2), QuietPhase(SPAWN),
             lambda job, result: [])
    assert not [t for t in threading.enumerate() if t.name.startswith("validate")]
