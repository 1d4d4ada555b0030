"""What a stage produces, and the writer life cycle every target follows.

The pipeline reads the checkpoint once and hands each tensor to every writer (`add`), then asks each
for its artifacts (`finish`). Writers write under temporary names and rename only when complete, so
an interrupted run never leaves a file that looks finished.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from siliconvert.checkpoint import TensorInfo


def sync_file(path: Path) -> None:
    """Flush a finished file (or a folder, for the names it holds) to the disk before it is renamed into place:
    otherwise a crash soon after the rename can leave the final name on a file whose data never reached it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def cache_root(cache_dir: Path | None = None) -> Path:
    """Where siliconvert keeps what it builds once for every run (the demo checkpoints, the calibrations of writers
    built outside a run): `cache_dir`, else $SILICONVERT_CACHE, else ~/.cache/siliconvert."""
    return Path(cache_dir or os.environ.get("SILICONVERT_CACHE", "~/.cache/siliconvert")).expanduser()


def write_text_atomically(path: Path, text: str) -> None:
    """Write `path` under a hidden temporary name, then rename: readers see the old file or the new."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


@dataclass(frozen=True)
class Artifact:
    format: str  # a registered format's name: "mlx", "gguf", "coreml"
    quant: str  # e.g. "4bit-g64", "Q4_K_M", "fp16"
    path: Path  # the folder or file a user ships
    runner_options: dict = field(default_factory=dict)  # what the runner needs beyond the path
    plan: dict | None = None  # a planned quantization's choices and prediction (quantize/plan.py Plan.summary)
    # the float type a writer chose for what it does not quantize, and why: {"dtype": "float16", "reason": "..."}
    float_type: dict | None = None
    # where weights arrived quantized (an MXFP4 source), how this artifact stores them: kept exact, or re-quantized
    source_quantization: str | None = None


# The prompt a model card's "How to run" examples give
CARD_PROMPT = "Write a haiku about the sea."


@dataclass(frozen=True)
class Release:
    """A release folder to write: report entries of one format whose files go in one folder (and Hub repo)."""

    name: str  # the folder's name, and the Hub repo's name
    model: str  # the name files inside take (GGUF: <model>-<QUANT>.gguf)
    format: str
    shipped: list[dict]  # report.json artifact entries whose files go in
    left_out: list[dict]  # entries of this release that failed their gates and stay out
    repo_id: str | None  # org/name when the recipe names a repo prefix

    @property
    def forced(self) -> list[dict]:
        return [e for e in self.shipped if not e["gates"]["passed"]]


class Writer(ABC):
    """Consumes the checkpoint's tensor stream; produces one or more artifacts."""

    @abstractmethod
    def add(self, info: TensorInfo, array: np.ndarray) -> None:
        """Take one source tensor: its info (HF name, resolved role) and its values (HF layout). Called once per
        tensor, in stream order; tensors no target uses (rotary caches, a tied head's stored copy) never come."""

    @abstractmethod
    def finish(self) -> list[Artifact]:
        """Complete every file, move it to its final name, and describe what was made."""

    def abort(self) -> None:  # noqa: B027 - optional hook
        """Remove temporary files after a failure."""

    def figures(self) -> dict[str, float]:
        """Measurements of its own for timings.json, beyond the time the stream spent in its calls (for example
        the time of a thread that writes while the stream goes on). None by default."""
        return {}
