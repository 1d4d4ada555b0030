"""What a stage produces, and the writer life cycle every target follows.

The pipeline reads the checkpoint once and hands each tensor to every writer (`add`), then asks each
for its artifacts (`finish`). Writers write under temporary names and rename only when complete, so
an interrupted run never leaves a file that looks finished.
"""

from __future__ import annotations

import json
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


def write_text_atomically(path: Path, text: str) -> None:
    """Write `path` under a hidden temporary name, then rename: readers see the old file or the new."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


@dataclass(frozen=True)
class Artifact:
    format: str  # "mlx", "gguf", "coreml"
    quant: str  # e.g. "4bit-g64", "Q4_K_M", "fp16"
    path: Path  # the folder or file a user ships
    runner_options: dict = field(default_factory=dict)  # what the runner needs beyond the path
    plan: dict | None = None  # a planned quantization's choices and prediction (quantize/plan.py Plan.summary)


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


def detect_artifact(path: Path) -> Artifact:
    """Recognise an artifact on disk by its layout (for `siliconvert validate`)."""
    from siliconvert.errors import ArtifactError

    if path.suffix == ".gguf" and path.is_file():
        # Hub convention <Model>-<QUANT>.gguf: the quant is the last dash-separated part (a plan's, two parts).
        model, _, quant = path.stem.rpartition("-")
        return Artifact("gguf", f"auto-{quant}" if model.endswith("-auto") else quant, path)
    manifest = path / "manifest.json"
    if manifest.is_file() and any(path.glob("*.mlpackage")):  # siliconvert's Core ML layout: chunks + manifest
        return Artifact("coreml", json.loads(manifest.read_text()).get("precision", "fp16"), path)
    shards = sorted(path.glob("model*.safetensors")) if path.is_dir() else []
    if shards and _safetensors_format(shards[0]) == "mlx":
        quantization = json.loads((path / "config.json").read_text()).get("quantization")
        if quantization:
            return Artifact("mlx", f"{quantization['bits']}bit-g{quantization['group_size']}", path)
        return Artifact("mlx", "fp16", path)
    raise ArtifactError(
        "not a recognised artifact (a .gguf file, a Core ML folder with manifest.json, or an MLX folder)", path
    )


def _safetensors_format(path: Path) -> str | None:
    """The "format" a safetensors writer recorded in its header metadata ("mlx", "pt", ...)."""
    with path.open("rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if header_len > 100 * 1024 * 1024:
            return None
        try:
            return json.loads(f.read(header_len)).get("__metadata__", {}).get("format")
        except (ValueError, AttributeError):
            return None
