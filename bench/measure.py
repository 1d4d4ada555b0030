"""Measuring one command as a process tree (wall, CPU, peak memory), the page cache, and the disk floor.

Memory, exactly:
- `max_process_rss_mb`: the kernel's high-water mark of resident memory of the largest single process of
  the tree (`ru_maxrss` from `wait4` on the command, taken by a small launcher that forks it). Exact,
  but one process at a time: a parent and a worker that peak together are not added up.
- `tree_rss_sampled_mb`: the largest sum of VmRSS over all live processes of the command's session,
  sampled every SAMPLE_INTERVAL_S. Adds concurrent processes up, but may miss a spike between samples.
- `peak_rss_mb`: the larger of the two, so never below either. RSS counts file pages a process has mapped
  (a memory-mapped checkpoint, for one); `tree_anon_sampled_mb` is the same sum without them.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SAMPLE_INTERVAL_S = 0.1  # ten scans of /proc a second: about 1% of a core, on a machine with two
MIB = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")
# ru_maxrss is in KiB on Linux and in bytes on macOS
MAXRSS_UNIT = 1 if sys.platform == "darwin" else 1024


@dataclass(frozen=True)
class Measurement:
    exit_code: int
    wall_s: float
    cpu_s: float  # user + system time of the child and every descendant it waited for
    max_process_rss_mb: float
    tree_rss_sampled_mb: float | None  # None where there is no /proc to sample
    tree_anon_sampled_mb: float | None
    samples: int

    @property
    def peak_rss_mb(self) -> float:
        return max(self.max_process_rss_mb, self.tree_rss_sampled_mb or 0.0)

    def as_dict(self) -> dict:
        return {
            "wall_s": round(self.wall_s, 3),
            "cpu_s": round(self.cpu_s, 3),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "exit_code": self.exit_code,
            "max_process_rss_mb": round(self.max_process_rss_mb, 1),
            "tree_rss_sampled_mb": None if self.tree_rss_sampled_mb is None else round(self.tree_rss_sampled_mb, 1),
            "tree_anon_sampled_mb": None if self.tree_anon_sampled_mb is None else round(self.tree_anon_sampled_mb, 1),
            "rss_samples": self.samples,
        }


def session_processes(session: int) -> list[int]:
    """Pids of the live processes whose session id is `session` (/proc/PID/stat, field 6)."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as stat_file:
                stat = stat_file.read()
        except OSError:  # it exited while we looked
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()  # the command name may hold spaces and parentheses
        if int(fields[3]) == session:
            members.append(int(entry.name))
    return members


def tree_memory(session: int) -> tuple[int, int]:
    """(resident bytes, anonymous resident bytes) summed over the session's processes."""
    resident = anonymous = 0
    for pid in session_processes(session):
        try:
            with open(f"/proc/{pid}/statm", "rb") as statm:
                _, rss_pages, shared_pages, *_ = (int(v) for v in statm.read().split())
        except (OSError, ValueError):
            continue
        resident += rss_pages * PAGE
        anonymous += (rss_pages - shared_pages) * PAGE  # statm's "shared" is file-backed + shmem pages
    return resident, anonymous


class TreeSampler(threading.Thread):
    """Samples the memory of a session until stopped; keeps the largest sums seen."""

    def __init__(self, session: int) -> None:
        super().__init__(daemon=True)
        self.session = session
        self.stopped = threading.Event()
        self.peak_rss = self.peak_anon = self.samples = 0

    def run(self) -> None:
        while True:
            rss, anon = tree_memory(self.session)
            self.peak_rss, self.peak_anon = max(self.peak_rss, rss), max(self.peak_anon, anon)
            self.samples += 1
            if self.stopped.wait(SAMPLE_INTERVAL_S):
                return


# Linux keeps a process's peak across exec: a command started from a big process (vfork or fork) begins with
# that process's resident size as its own ru_maxrss. So a small launcher forks the command itself, waits for
# it, and hands back the command's own rusage: its peak then starts at the launcher's few MB.
LAUNCHER = """
import json, os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump({"cpu_s": usage.ru_utime + usage.ru_stime, "maxrss": usage.ru_maxrss}, f)
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


def run_measured(command: Sequence[str], log_path: Path, env: dict[str, str] | None = None) -> Measurement:
    """Run `command` (its output to `log_path`) in a new session, and measure it and its descendants.

    The new session lets the sampler find every descendant, even one whose parent died, and lets an
    interrupt stop the whole tree. Wall time runs from just before the fork to the child's exit.
    """
    can_sample = Path("/proc/self/statm").exists()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    usage_file = log_path.with_name(f".{log_path.name}.rusage")
    usage_file.unlink(missing_ok=True)
    with log_path.open("wb") as log:
        started = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(usage_file), *command], stdout=log,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                 start_new_session=True)
        sampler = TreeSampler(child.pid)
        if can_sample:
            sampler.start()
        try:
            _, status = os.waitpid(child.pid, 0)
        except BaseException:
            os.killpg(child.pid, signal.SIGTERM)  # the session's process group: the child leads it
            child.wait()
            raise
        finally:
            sampler.stopped.set()
        wall = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)  # reaped here: tell Popen not to wait again
        if can_sample:
            sampler.join()
    own = json.loads(usage_file.read_text())  # the command's own, from the launcher
    usage_file.unlink()
    return Measurement(
        exit_code=child.returncode,
        wall_s=wall,
        cpu_s=own["cpu_s"],
        max_process_rss_mb=own["maxrss"] * MAXRSS_UNIT / MIB,
        tree_rss_sampled_mb=sampler.peak_rss / MIB if can_sample else None,
        tree_anon_sampled_mb=sampler.peak_anon / MIB if can_sample else None,
        samples=sampler.samples,
    )


# ---- page cache ----------------------------------------------------------------------------------------

def evict_from_page_cache(paths: Iterable[Path]) -> bool:
    """Drop these files' clean pages from the page cache (posix_fadvise DONTNEED: no root needed, and
    nothing else on the machine is touched). False where the call does not exist (macOS)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)  # dirty pages are not dropped: write them first
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    return libc


def resident_fraction(paths: Iterable[Path]) -> float:
    """The fraction of these files' pages in the page cache (mincore on a mapping of each file)."""
    libc = _libc()
    resident = total = 0
    for path in paths:
        size = path.stat().st_size
        if size == 0:
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if address in (None, ctypes.c_void_p(-1).value):
                raise OSError(ctypes.get_errno(), f"mmap failed: {path}")
            try:
                pages = ctypes.create_string_buffer((size + PAGE - 1) // PAGE)
                if libc.mincore(address, size, pages) != 0:
                    raise OSError(ctypes.get_errno(), f"mincore failed: {path}")
            finally:
                libc.munmap(address, size)
        finally:
            os.close(fd)
        flags = np.frombuffer(pages.raw, dtype=np.uint8)
        resident += int(np.count_nonzero(flags & 1))
        total += flags.size
    return resident / total if total else 0.0


# ---- disk floor ----------------------------------------------------------------------------------------

FLOOR_BLOCK = 64 << 20


def sequential_write_seconds(path: Path, size: int) -> float:
    """Seconds to write `size` bytes to a new file at `path` in 64 MiB blocks and fsync it; the file is
    deleted afterwards. Random bytes, so no layer below can compress or skip them."""
    block = memoryview(os.urandom(min(FLOOR_BLOCK, max(size, 1))))
    try:
        started = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            remaining = size
            while remaining:
                remaining -= os.write(fd, block[: min(remaining, len(block))])
            os.fsync(fd)
        finally:
            os.close(fd)
        return time.perf_counter() - started
    finally:
        path.unlink(missing_ok=True)
