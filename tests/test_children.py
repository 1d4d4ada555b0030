"""siliconvert/children.py: a run's children end with it, even when it is killed by SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from siliconvert.children import PARENT_GONE_EXIT, child_pool

# a run that starts a child working on something long, says the child's pid, and waits to be killed
RUN = """
import os, sys, time
from siliconvert.children import child_pool
pool = child_pool()
pool.submit(time.sleep, 600)
print(next(iter(pool._processes)), flush=True)
time.sleep(600)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie has ended; only its parent has not read its status
        return stat.read().split(")")[-1].split()[0] != "Z"


def test_a_child_ends_when_its_run_is_killed():
    run = subprocess.Popen([sys.executable, "-c", RUN], stdout=subprocess.PIPE, text=True)
    child = int(run.stdout.readline())
    assert alive(child)
    run.send_signal(signal.SIGKILL)
    run.wait()
    deadline = time.monotonic() + 30
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(child), "the child outlived its killed run"


def test_a_child_runs_its_initializer_and_its_task():
    with child_pool(os.chdir, ("/",)) as pool:
        assert pool.submit(os.getcwd).result() == "/"
        assert pool.submit(os.getppid).result() == os.getpid()
    assert PARENT_GONE_EXIT != 0


# a signal that lands while a child is being started: after the child process exists, before it has its start-up
# data (`where` says which thread starts it); prints how the run ended and the pids of the children it started
SIGNAL_MID_START = """
import multiprocessing, os, signal, sys, threading, time
from multiprocessing import util
from siliconvert.children import Interrupted, child_pool, stopping_on_signals
started = []
spawn = util.spawnv_passfds
def spawn_then_signal(path, args, passfds):
    pid = spawn(path, args, passfds)
    if "resource_tracker" in repr(args):  # started first, for every run, before any child
        return pid
    started.append(pid)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.5)  # the handler runs on the main thread, here or while the other thread still starts the child
    return pid
util.spawnv_passfds = spawn_then_signal
try:
    with stopping_on_signals():
        pool = child_pool()
        if sys.argv[1] == "main":
            pool.submit(time.sleep, 600)
        else:
            threading.Thread(target=pool.submit, args=(time.sleep, 600), daemon=True).start()
            time.sleep(30)
    print("not interrupted")
except Interrupted as e:
    print("interrupted", e.signum)
print(*started, flush=True)
"""


def test_a_signal_while_a_child_starts_stops_it_without_a_word(tmp_path):
    """The child is stopped before it runs, and says nothing: a parent that unwound mid-start once left it dying
    on a half-read pipe with a traceback on the run's stderr (CI, 2026-12-07)."""
    for where in ("main", "thread"):
        run = subprocess.run([sys.executable, "-c", SIGNAL_MID_START, where], capture_output=True, text=True,
                             timeout=120)
        lines = run.stdout.splitlines()
        assert lines[0] == f"interrupted {int(signal.SIGTERM)}", (where, run.stdout, run.stderr)
        assert run.stderr == "", (where, run.stderr)
        for pid in map(int, lines[1].split()):
            assert not os.path.exists(f"/proc/{pid}") or not alive(pid), f"{where}: a child outlived the signal"
