"""The child processes a run works in (the calibration and reference forwards, each artifact's runtime): spawned,
never forked (torch's and mlx's threads do not survive a fork), one task each, and gone when the run is gone.

A run killed by SIGKILL cannot end its children, and a pool's worker would then wait forever on its task queue
(it holds that pipe's write end itself, so it never reads an end of file), keeping its gigabytes of weights: so
every child watches its parent and exits once the parent is gone.

SIGTERM or SIGINT (`stopping_on_signals`) stops every child before the run unwinds. A child being started is not
yet among multiprocessing's children, and a parent that unwinds while writing the child's start-up data leaves it
to die on a half-read pipe with a traceback on the run's stderr: so starts hold a lock the signal handler waits
for, a signal that lands in the starting thread itself is raised again once the start is done, and no child
starts after a signal."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

PARENT_POLL_S = 1.0  # how often a child looks for its parent
PARENT_GONE_EXIT = 70  # a child's exit status once its parent is gone (EX_SOFTWARE: nobody reads it)


STOPPED_BY = (signal.SIGTERM, signal.SIGINT)


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT reached the command: it unwinds like Ctrl-C, and exits 128 + the signal's number."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class _Starts:
    """Who is starting a child now, and whether a signal has stopped the run."""

    def __init__(self) -> None:
        # reentrant: a second signal can land in the handler while it holds the lock (Ctrl-C pressed twice)
        self.lock = threading.RLock()
        self.starter: int | None = None  # the thread holding `lock`
        self.deferred: int | None = None  # the signal that stopped the run, or landed in the starter itself
        self.stopped = False


_STARTS = _Starts()


class _ChildPool(ProcessPoolExecutor):
    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        # A spawn-context pool starts its worker inside submit: that start is what the lock guards.
        with _STARTS.lock:
            if _STARTS.stopped:
                raise Interrupted(_STARTS.deferred or signal.SIGTERM)
            _STARTS.starter = threading.get_ident()
            try:
                future = super().submit(fn, *args, **kwargs)
            finally:
                _STARTS.starter = None
        if _STARTS.deferred is not None and not _STARTS.stopped:
            signal.raise_signal(_STARTS.deferred)  # the handler runs now, the started child among those it stops
        return future


def child_pool(initializer: Callable[..., None] | None = None, initargs: tuple[Any, ...] = ()) -> ProcessPoolExecutor:
    """A pool of one spawned worker that exits when this process is gone; `initializer(*initargs)` runs in it first."""
    return _ChildPool(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                      initializer=_start_child, initargs=(os.getpid(), initializer, initargs))


@contextlib.contextmanager
def stopping_on_signals() -> Iterator[None]:
    """Within: SIGTERM and SIGINT stop every child the run started, then raise `Interrupted` in the main thread."""
    previous = {signum: signal.signal(signum, _stop_children) for signum in STOPPED_BY}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _STARTS.stopped, _STARTS.deferred = False, None


def _stop_children(signum: int, _frame: Any) -> None:
    """Stop every child (the reference, calibration and artifact runners, each a pool's worker) before unwinding:
    a pool's exit waits for its worker, which only the terminal's Ctrl-C would reach."""
    if _STARTS.starter == threading.get_ident():
        _STARTS.deferred = signum  # this thread is starting a child: stop once it has started
        return
    with _STARTS.lock:  # another thread's start finishes first: a spawn and one pipe write
        _STARTS.stopped, _STARTS.deferred = True, signum
        children = multiprocessing.active_children()
    for child in children:
        child.terminate()
    for child in children:
        child.join(timeout=5)
        if child.is_alive():
            child.kill()
    raise Interrupted(signum)


def _start_child(parent: int, initializer: Callable[..., None] | None, initargs: tuple[Any, ...]) -> None:
    threading.Thread(target=_exit_without, args=(parent,), daemon=True, name="exit-without-parent").start()
    if initializer is not None:
        initializer(*initargs)


def _exit_without(parent: int) -> None:
    while os.getppid() == parent:  # an orphan is adopted: its parent's id changes
        time.sleep(PARENT_POLL_S)
    os._exit(PARENT_GONE_EXIT)
