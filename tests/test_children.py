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
