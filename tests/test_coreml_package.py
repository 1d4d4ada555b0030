"""Packages written around streamed weights: the fp16 cast, weight files as coremltools' blob writer writes
them, write errors that reach the caller, byte-for-byte reproducible and loadable packages."""

from __future__ import annotations

import os

import numpy as np
import pytest
from coreml_programs import random_weights, spec_of, streamed_package

from siliconvert.convert.coreml.chunks import plan_chunks
from siliconvert.convert.coreml.package import BlobWrites, PackageWriter, cast_float16
from siliconvert.errors import CheckpointError


def test_cast_float16_is_numpys_cast_and_refuses_what_overflows():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.standard_normal(5000) * scale for scale in (1e-7, 1e-3, 1, 1e3, 3e4)])
    # subnormals, the largest halves, rounding ties, and the largest values that still round to a finite half
    values = np.concatenate([np.clip(values, -65504, 65504), [65519.99, -65519.99, 2.0**-25, 3 * 2.0**-25]])
    out = np.empty(values.size, np.float16)
    for dtype in (np.float32, np.float64, np.float16):
        cast_float16("t", values.astype(dtype), out)
        assert np.array_equal(out.view(np.uint16), values.astype(dtype).astype(np.float16).view(np.uint16)), dtype
    for beyond in (65520.0, -70000.0, np.nan):
        for dtype in (np.float32, np.float64):
            with pytest.raises(CheckpointError, match=r"'big'.*float16 range"):
                cast_float16("big", np.array([1.0, beyond], dtype), np.empty(2, np.float16))


def test_weight_files_are_what_coremltools_blob_writer_writes(tmp_path, monkeypatch):
    """The blobs laid out here and written by BlobWrites' thread (a workaround: coremltools' writer holds the
    GIL while it writes) make the same file, byte for byte, as coremltools' own writer; what the exporter
    appends afterwards through coremltools' writer lands where it would."""
    from coremltools.libmilstoragepython import _BlobStorageWriter

    from siliconvert.convert.coreml import package

    monkeypatch.setattr(package, "WRITE_BLOCK_VALUES", 1000)  # blobs of several blocks, and blocks in flight
    monkeypatch.setattr(package, "WRITE_BUFFERS", 2)
    rng = np.random.default_rng(0)
    blobs = [rng.standard_normal(n).astype(np.float32) for n in (1, 31, 32, 1000, 2500, 0, 7)]
    small = np.arange(5, dtype=np.float32)  # a small const the exporter appends: RoPE tables are float32

    writes = BlobWrites()
    ours = PackageWriter(tmp_path / "ours.mlpackage", writes)
    for i, values in enumerate(blobs):
        ours.write(f"w{i}", "t", values)
    writes.drain(ours.fd)
    os.pwrite(ours.fd, package.STORAGE_HEADER.pack(len(blobs), package.STORAGE_VERSION).ljust(64, b"\0"), 0)
    ours.close()
    writes.close()
    appended = _BlobStorageWriter(str(ours.weight_file), truncate_file=False)
    small_at = appended.write_float_data(small)
    del appended

    theirs = _BlobStorageWriter(str(tmp_path / "theirs.bin"))
    offsets = [theirs.write_fp16_data(values.astype(np.float16).view(np.uint16)) for values in blobs]
    their_small_at = theirs.write_float_data(small)
    del theirs
    assert [ours.blobs[f"w{i}"][0] for i in range(len(blobs))] == offsets and small_at == their_small_at
    assert ours.weight_file.read_bytes() == (tmp_path / "theirs.bin").read_bytes()
    assert writes.write_s > 0 and writes.intervals


def test_blob_write_errors_reach_the_caller(tmp_path):
    writes = BlobWrites()
    fd = os.open(tmp_path / "f", os.O_RDONLY | os.O_CREAT)  # a write to it fails, as on a full disk
    try:
        writes.write(fd, 0, b"data")
        with pytest.raises(OSError):
            writes.drain(fd)
        with pytest.raises(OSError):
            writes.buffer()
    finally:
        os.close(fd)
        writes.close()


def test_packages_are_reproducible_and_loadable(tmp_path):
    from coremltools.libmodelpackage import ModelPackage

    spec = spec_of(num_hidden_layers=2)
    (chunk,) = plan_chunks(spec, 1)
    weights = random_weights(spec, chunk)
    for name in ("a", "b"):
        streamed_package(tmp_path / f"{name}.mlpackage", spec, chunk, weights)
    a, b, c = (tmp_path / f"{name}.mlpackage" for name in "abc")
    files = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    assert files == ["Data/com.apple.CoreML/model.mlmodel", "Data/com.apple.CoreML/weights/weight.bin", "Manifest.json"]
    for file in files:  # coremltools draws random identifiers for Manifest.json; here they derive from the spec
        assert (a / file).read_bytes() == (b / file).read_bytes(), file
    package = ModelPackage(str(a))
    assert package.getRootModel().path().endswith("Data/com.apple.CoreML/model.mlmodel")
    assert package.findItemByNameAuthor("weights", "com.apple.CoreML").path().endswith("Data/com.apple.CoreML/weights")
    # other weights of the same shapes: the spec names blobs, not values, so only weight.bin differs
    streamed_package(c, spec, chunk, random_weights(spec, chunk, seed=1))
    assert [(a / f).read_bytes() == (c / f).read_bytes() for f in files] == [True, False, True]
