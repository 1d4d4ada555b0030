"""Runners by artifact format, imported lazily so that a child process loads only its own runtime."""

from __future__ import annotations

import importlib
from pathlib import Path

from siliconvert.validate.runners.base import Latency, Runner

# format → "module:Class" (a format whose runner depends on the platform resolves it in the module)
RUNNERS: dict[str, str] = {
    "mlx": "siliconvert.validate.runners.mlx:MLXRunner",
    "gguf": "siliconvert.validate.runners.gguf:LlamaCppRunner",
    "coreml": "siliconvert.validate.runners.coreml:CoreMLRunner",
}


def open_runner(fmt: str, path: Path, options: dict) -> Runner:
    module_name, _, class_name = RUNNERS[fmt].partition(":")
    runner_class = getattr(importlib.import_module(module_name), class_name)
    return runner_class(path, options)


__all__ = ["RUNNERS", "Latency", "Runner", "open_runner"]
