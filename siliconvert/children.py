"""The child processes a run works in (the calibration and reference forwards, each artifact's runtime): spawned,
never forked (torch's and mlx's threads do not survive a fork), one task each, and gone when the run is gone.

A run killed by SIGKILL cannot end its children, and a pool's worker would then wait forever on its task queue
(it holds that pipe's write end itself, so it never reads an end of file), keeping its gigabytes of weights: so
every child watches its parent and exits once the parent is gone."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

PARENT_POLL_S = 1.0  # how often a child looks for its parent
PARENT_GONE_EXIT = 70  # a child's exit status once its parent is gone (EX_SOFTWARE: nobody reads it)


def child_pool(initializer: Callable[..., None] | None = None, initargs: tuple[Any, ...] = ()) -> ProcessPoolExecutor:
    """A pool of one spawned worker that exits when this process is gone; `initializer(*initargs)` runs in it first."""
    return ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_start_child, initargs=(os.getpid(), initializer, initargs))


def _start_child(parent: int, initializer: Callable[..., None] | None, initargs: tuple[Any, ...]) -> None:
    threading.Thread(target=_exit_without, args=(parent,), daemon=True, name="exit-without-parent").start()
    if initializer is not None:
        initializer(*initargs)


def _exit_without(parent: int) -> None:
    while os.getppid() == parent:  # an orphan is adopted: its parent's id changes
        time.sleep(PARENT_POLL_S)
    os._exit(PARENT_GONE_EXIT)
