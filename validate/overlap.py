"""Validation's runs side by side: each in its own process, started within a memory budget, timed in a quiet phase.

The reference (validate/reference.py) and each artifact's run (score.run_artifact, a process of its own) are
independent until scoring, so they run at once where memory allows:

- Budget (`memory_budget`): BUDGET_SHARE of the host's available memory (MemAvailable) and, with a CUDA GPU, of its
  free memory, read when validation starts; and at most `parallel` runs at once (`validate.parallel`; "auto": one
  per CORES_PER_RUN cores, as every runtime spreads its work over all the cores it finds).
- Admission (`Budget.fits`, `run_jobs`): runs start in the order given, each when its estimated memory (its
  format's `validation_memory`, and its logits in the child and in the parent) fits beside the runs going. A run
  that alone exceeds the budget starts when nothing else runs: it runs alone rather than never. No run overtakes an
  earlier one that waits, so `parallel: 1` is the serial order: the reference, then each artifact in turn. A job
  marked `alone` (a planned artifact built again, which rewrites files other runs may read) starts once the others
  have ended, and none starts beside it.
- Quiet phase (`QuietPhase`): latency is timed only while nothing else works. A run is busy from its start until
  its child has its logits, its KV-cache check and its token ids (`RunPhase.done`); the parent is busy while it
  computes the reference, scores a run or rebuilds an artifact (`QuietPhase.busy`). A child times its latency
  (`RunPhase.timing`) once no one is busy and no other child is timing, and nothing becomes busy while a child
  times (`QuietPhase.begin` waits). One multiprocessing Condition guards a busy count and a timing flag in shared
  memory; each child gets them when its process starts (the only time multiprocessing objects can travel).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing.context import BaseContext
from typing import Any

from siliconvert.checkpoint import Checkpoint

BUDGET_SHARE = 0.8  # of the available memory: the page cache and the parent's own growth keep the rest
CORES_PER_RUN = 4  # "auto" runs at most one run per this many cores at once
LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Need:
    """What one run holds at its peak, estimated: bytes of host memory, and of GPU memory."""

    host: int
    device: int = 0


@dataclass(frozen=True)
class Budget:
    host: int  # bytes the runs may hold together on the host
    device: int | None  # on the GPU; None: no GPU here
    parallel: int  # runs at once, at most

    def fits(self, need: Need, running: list[Need]) -> bool:
        """Whether a run needing `need` may start beside `running`: always when nothing runs (a run bigger than the
        budget runs alone), else within the count and the memory left."""
        if not running:
            return True
        if len(running) >= self.parallel:
            return False
        if sum(r.host for r in running) + need.host > self.host:
            return False
        return self.device is None or sum(r.device for r in running) + need.device <= self.device

    def as_report(self) -> dict[str, float | int | None]:
        """report.json's `validation` (before the runs say how many went at once)."""
        return {"parallel": self.parallel, "memory_budget_mb": round(self.host / 2**20),
                "gpu_memory_budget_mb": None if self.device is None else round(self.device / 2**20)}


def memory_budget(parallel: int | str) -> Budget:
    """The budget for `validate.parallel` ("auto" or a count of runs at once), from the memory free now."""
    if parallel == "auto":
        parallel = max(1, (os.cpu_count() or 1) // CORES_PER_RUN)
    free_gpu = free_gpu_bytes()
    return Budget(int(BUDGET_SHARE * available_host_bytes()),
                  None if free_gpu is None else int(BUDGET_SHARE * free_gpu), int(parallel))


def available_host_bytes() -> int:
    """MemAvailable (what can be allocated without swapping), or half the physical memory where /proc is absent."""
    with contextlib.suppress(OSError):
        for line in open("/proc/meminfo", encoding="ascii"):  # noqa: SIM115 - read to the line it needs
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def free_gpu_bytes() -> int | None:
    """Free memory of the first CUDA GPU this process sees (nvidia-smi: asking CUDA itself would make a context in
    this process, which holds memory on the GPU until it ends); None without one."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
    if not visible or visible == "-1":
        return None
    try:
        answer = subprocess.run([smi, "--query-gpu=memory.free", "--format=csv,noheader,nounits", "-i", visible],
                                capture_output=True, text=True, timeout=30, check=True).stdout
        return int(answer.split()[0]) * 2**20
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def logits_bytes(windows: int, context: int, vocab: int) -> int:
    """A run's float32 logits, held twice: in its child, and in the parent until the run is scored."""
    return 2 * 4 * windows * context * vocab


def reference_need(checkpoint: Checkpoint, logits: int, gpu: bool) -> Need:
    """The reference run's peak (validate/reference.py): one decoder layer's weights at a time beside the embedding,
    the head and the norms, in float32 on the CPU and float16 on a GPU; and its logits."""
    layers: dict[int, int] = {}
    outside = 0
    for name, info in checkpoint.tensor_infos.items():
        elements = 1
        for size in info.shape:
            elements *= size
        if found := LAYER_INDEX.search(name):
            layers[int(found[1])] = layers.get(int(found[1]), 0) + elements
        else:
            outside += elements
    elements = outside + max(layers.values(), default=0)
    return Need(logits + 2 * elements, 2 * elements) if gpu else Need(logits + 4 * elements)


class QuietPhase:
    """Who is busy, shared with every run's child (see the module's docstring)."""

    def __init__(self, context: BaseContext) -> None:
        self.context = context
        self.condition = context.Condition()
        self.busy_count = context.RawValue("i", 0)
        self.timing_now = context.RawValue("b", False)

    def begin(self) -> None:
        """Become busy, once no child is timing."""
        with self.condition:
            self.condition.wait_for(lambda: not self.timing_now.value)
            self.busy_count.value += 1

    def end(self) -> None:
        with self.condition:
            self.busy_count.value -= 1
            self.condition.notify_all()

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """The parent's own work (the reference, scoring, a rebuild), during which no child times."""
        self.begin()
        try:
            yield
        finally:
            self.end()

    def run(self) -> RunPhase:
        """A run's busy phase, begun now, before its process starts."""
        self.begin()
        return RunPhase(self, self.context.Event())


@dataclass
class RunPhase:
    """One run's busy phase: ended by its child when its logits are in, or by the parent when the run ends (a child
    that crashed or measured no latency), whichever comes first."""

    quiet: QuietPhase
    ended: Any  # a multiprocessing Event
    waited_s: float = 0.0  # in the child: how long its latency runs waited for the quiet phase

    def done(self) -> None:
        quiet = self.quiet
        with quiet.condition:
            if not self.ended.is_set():
                self.ended.set()
                quiet.busy_count.value -= 1
                quiet.condition.notify_all()

    @contextlib.contextmanager
    def timing(self) -> Iterator[None]:
        """The child's latency runs: alone, once no one is busy and no other child times."""
        self.done()
        quiet, asked = self.quiet, time.perf_counter()
        with quiet.condition:
            quiet.condition.wait_for(lambda: quiet.busy_count.value == 0 and not quiet.timing_now.value)
            quiet.timing_now.value = True
        self.waited_s = time.perf_counter() - asked
        try:
            yield
        finally:
            with quiet.condition:
                quiet.timing_now.value = False
                quiet.condition.notify_all()


@dataclass
class Job:
    """One run: `start(phase)` runs in a thread of the parent (it waits on the run's process) and returns what
    `finished` gets."""

    name: str
    need: Need
    start: Callable[[RunPhase], Any]
    alone: bool = False  # it starts once no other job runs, and none starts beside it
    started_s: float = 0.0  # since run_jobs began
    run_s: float = 0.0  # its start's wall time
    ended_at: float = 0.0  # time.perf_counter() when its start returned
    extra: dict[str, Any] = field(default_factory=dict)  # the caller's (say, the artifact it runs)


def run_jobs(jobs: list[Job], budget: Budget, quiet: QuietPhase,
             finished: Callable[[Job, Any], list[Job]]) -> int:
    """Run `jobs` as the budget admits them, in their order; `finished(job, result)` is called in this thread, busy,
    as each ends (in the order they were given, of those that ended together) and may answer with jobs to run next
    (ahead of those waiting). A job's error is raised once the jobs running have ended. Returns the most that ran
    at once."""
    pending = deque(jobs)
    running: dict[Any, tuple[int, Job]] = {}
    began, order, most = time.perf_counter(), 0, 0

    def admits(job: Job) -> bool:
        going = [other for _, other in running.values()]
        if going and (job.alone or any(other.alone for other in going)):
            return False
        return budget.fits(job.need, [other.need for other in going])

    def timed(job: Job, phase: RunPhase) -> Any:
        started = time.perf_counter()
        try:
            return job.start(phase)
        finally:
            job.ended_at = time.perf_counter()
            job.run_s = job.ended_at - started

    # leaving this block on an error waits for the runs going (their processes cannot be stopped half-way)
    with ThreadPoolExecutor(max_workers=budget.parallel, thread_name_prefix="validate") as threads:
        while pending or running:
            while pending and admits(pending[0]):
                job = pending.popleft()
                phase = quiet.run()
                job.started_s = time.perf_counter() - began
                future = threads.submit(timed, job, phase)
                # as soon as it ends, also while this thread scores or after another run's error: a child that
                # crashed while busy must not keep the others from timing
                future.add_done_callback(lambda _, phase=phase: phase.done())
                running[future] = (order, job)
                order += 1
            most = max(most, len(running))
            ended, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in sorted(ended, key=lambda f: running[f][0]):
                _, job = running.pop(future)
                result = future.result()
                with quiet.busy():
                    pending.extendleft(reversed(finished(job, result)))
    return most
