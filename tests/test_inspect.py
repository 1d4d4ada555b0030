"""`siliconvert inspect` and `doctor`: what a path is (a checkpoint or an artifact), and what runs here."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from siliconvert.commands.inspect import describe, runtimes
from siliconvert.errors import CheckpointError


def header_shapes(folder: Path) -> list[list[int]]:
    """Every tensor's shape, read from the safetensors header itself."""
    data = (folder / "model.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    return [info["shape"] for name, info in header.items() if name != "__metadata__"]


def test_a_checkpoint_is_described_by_its_files_and_spec(random_llama):
    described = describe(str(random_llama))
    assert described["kind"] == "checkpoint" and described["name"] == random_llama.name
    assert described["parameters"] == sum(int(np.prod(shape)) for shape in header_shapes(random_llama))
    assert described["dtypes"] == ["BF16"] and described["shards"] == 1
    assert "tokenizer.json" in described["tokenizer"]
    assert described["spec"]["layers"] == 2 and described["spec"]["vocab_size"] == 96
    json.dumps(described)  # what the command prints


def test_an_artifact_is_described_by_its_format(tmp_path):
    path = tmp_path / "Tiny-Q8_0.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    described = describe(str(path))
    # the quant the file holds (no general.file_type: its matrices' type), not the one its name claims
    assert (described["kind"], described["format"], described["quant"]) == ("artifact", "gguf", "F32")
    assert described["tensors"] == 1 and described["metadata"]["general.architecture"] == "llama"


def test_what_is_neither_is_refused_as_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError):
        describe(str(tmp_path))


def test_runtimes_name_each_runtime_with_a_status():
    found = runtimes()
    assert {"reference", "mlx", "llama.cpp", "coreml"} <= set(found)
    assert all(isinstance(status, str) and status for status in found.values())
    assert found["coreml"].endswith(("MIL interpreter on torch, CPU (emulated)", "on torch, CUDA (emulated)",
                                     "Core ML runtime (macOS)"))
    # mlx's CPU here, its float32 products taken by torch's BLAS (siliconvert/mlx_blas.py)
    assert found["mlx"].endswith("CPU (mlx), float32 products through torch's BLAS")
