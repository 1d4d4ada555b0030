"""Runners, one per runtime, each named by its format's entry as "module:Class" and imported only in the child
process that runs an artifact, so that the child loads only its own runtime."""

from __future__ import annotations

import importlib
from pathlib import Path

from siliconvert.validate.runners.base import Latency, Runner


def open_runner(runner: str, path: Path, options: dict) -> Runner:
    """The runner `runner` ("module:Class"; a format whose runner depends on the platform resolves it in the
    module) on the artifact at `path`."""
    module_name, _, class_name = runner.partition(":")
    runner_class = getattr(importlib.import_module(module_name), class_name)
    return runner_class(path, options)


__all__ = ["Latency", "Runner", "open_runner"]
