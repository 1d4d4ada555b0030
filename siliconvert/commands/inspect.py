"""`siliconvert inspect` and `siliconvert doctor`: what a path is, and what runs here."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import sys
from pathlib import Path
from typing import Any

from siliconvert.errors import NotAnArtifact
from siliconvert.format import detect_artifact
from siliconvert.format import entry as format_entry


def describe(path: str) -> dict[str, Any]:
    """A JSON-able description of a checkpoint folder, hub id, or artifact."""
    from siliconvert.checkpoint import Checkpoint

    try:
        return _describe_artifact(Path(path))
    except NotAnArtifact:
        pass  # no format claims it: a checkpoint, or an error from reading it as one
    checkpoint = Checkpoint.open(path)
    infos = checkpoint.tensor_infos.values()
    return {
        "kind": "checkpoint",
        "name": checkpoint.name,
        "path": str(checkpoint.path),
        "parameters": sum(int(_prod(i.shape)) for i in infos),
        "dtypes": sorted({i.dtype for i in infos}),
        "shards": len(set().union(*(i.files() for i in infos))),
        "tokenizer": [f.name for f in checkpoint.tokenizer_files()],
        "spec": dataclasses.asdict(checkpoint.spec) | {"layers": len(checkpoint.spec.layers)},
        "traits": checkpoint.spec.traits(),
    }


def _describe_artifact(path: Path) -> dict[str, Any]:
    artifact = detect_artifact(path)
    return {"kind": "artifact", "format": artifact.format, "quant": artifact.quant, "path": str(path),
            **format_entry(artifact.format).describe(artifact)}


def _prod(shape: tuple[int, ...]) -> int:
    total = 1
    for d in shape:
        total *= d
    return total


def runtimes() -> dict[str, str]:
    """Each runtime siliconvert can use, with its version and the device it would run on."""
    found: dict[str, str] = {}

    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    torch_version = version("torch")
    if torch_version:
        from siliconvert.validate.reference import reference_device

        found["reference"] = f"torch {torch_version}, transformers {version('transformers')}: " \
                             f"{reference_device()[2]}, {reference_device()[1]}"
    if version("mlx"):
        from siliconvert import mlx_blas
        from siliconvert.validate.runners.mlx import mlx_device_name, widens

        products = f", float32 products through {mlx_blas.blas}" if widens() else ""
        found["mlx"] = f"mlx {version('mlx')}, mlx-lm {version('mlx-lm')}: {mlx_device_name()}{products}"
    else:
        found["mlx"] = "not installed"
    if version("llama-cpp-python"):
        import llama_cpp

        gpu = "GPU offload" if llama_cpp.llama_supports_gpu_offload() else "CPU only"
        found["llama.cpp"] = f"llama-cpp-python {version('llama-cpp-python')}: {gpu}"
    else:
        found["llama.cpp"] = "not installed"
    coreml = version("coremltools")
    if coreml and sys.platform == "darwin":
        found["coreml"] = f"coremltools {coreml}: Core ML runtime (macOS)"
    elif coreml:
        from siliconvert.validate.runners.mil.torch_ops import TorchEngine

        found["coreml"] = (f"coremltools {coreml}: conversion only; scoring by the MIL interpreter on torch, "
                           f"{TorchEngine().device_name} (emulated)")
    else:
        found["coreml"] = "not installed"
    return found
