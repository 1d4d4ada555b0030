"""Package storage: weights cast to fp16 into MIL blob storage as they stream in, the exporter that points the
program's consts at those blobs, and the package's files.

Each streamed tensor is cast to fp16 a block at a time and appended to the weights/weight.bin of every package
that uses it, by a writer thread (`BlobWrites`): the stream goes on while the disk takes the bytes, and memory
holds the blocks in flight, not the tensor. Once the package's program is built (graph.py) around placeholder
consts that name those blobs by weight id, StreamedExporter exports it with each const pointing at its blob,
and write_package writes model.mlmodel and a Manifest.json whose identifiers derive from the spec.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import struct
import threading
import time
import uuid
import warnings
from pathlib import Path

import coremltools as ct
import numpy as np
import torch
from coremltools.converters.mil.mil import Program
from coremltools.proto import MIL_pb2, Model_pb2

from siliconvert.artifacts import sync_file
from siliconvert.checkpoint import value_range
from siliconvert.errors import CheckpointError, OutputError

# coremltools internals (not public API; written against coremltools 9.0): the MIL exporter and the blob
# writer that ct.convert uses, which the streamed writer drives itself so that no weight is written twice.
try:
    from coremltools.converters.mil.backend.mil.helper import create_file_value_tensor
    from coremltools.converters.mil.backend.mil.load import CoreMLProtoExporter, MILProtoExporter
    from coremltools.libmilstoragepython import _BlobStorageWriter
except ImportError as e:
    raise ImportError(f"the Core ML writer needs coremltools' MIL exporter and blob writer (coremltools 9): {e}") from e
if not all(hasattr(MILProtoExporter, m) for m in ("get_milproto_value", "get_blob_writer", "export")):
    raise ImportError(f"coremltools {ct.__version__}'s MILProtoExporter lacks the methods the Core ML writer "
                      "overrides (get_milproto_value, get_blob_writer); it is written against coremltools 9")

WRITE_BLOCK_VALUES = 8 << 20  # fp16 values cast and written at a time (16 MB)
WRITE_BUFFERS = 4  # blocks in flight to the writer thread (4 × 16 MB): all the Core ML writer holds of the weights
FLOAT16_LIMIT = 65520.0  # the smallest magnitude that rounds to inf in fp16 (65504 is the largest finite half)
SPEC_VERSION = ct.target.iOS18  # stateful and multifunction models need iOS 18 / macOS 15
PACKAGE_DATA = Path("Data/com.apple.CoreML")  # inside an .mlpackage: model.mlmodel and weights/weight.bin
WEIGHT_FILE = "weight.bin"
WEIGHT_URL = "@model_path/weights/weight.bin"  # how a const names weight.bin in the spec
# MIL blob storage v2 (coremltools' MILBlob/Blob/StorageFormat.hpp): a 64-byte header (blob count, version 2),
# then per blob a 64-byte record (sentinel, dtype, size in bytes, data offset; the rest reserved, zero) and its
# data, each record at a multiple of 64 bytes.
STORAGE_HEADER = struct.Struct("<II")
STORAGE_VERSION = 2
BLOB_RECORD = struct.Struct("<IIQQ")
BLOB_SENTINEL = 0xDEADBEEF
BLOB_FLOAT16 = 1
BLOB_ALIGNMENT = 64


def cast_float16(name: str, values: np.ndarray, out: np.ndarray) -> None:
    """Cast flat `values` into `out` (flat fp16, the same size), refusing values past fp16's range: they would
    become inf. The range is checked on the source, one min/max pass, rather than on the result."""
    if values.dtype == np.float16:
        out[:] = values
        return
    low, high = value_range(values)
    if not max(-low, high) < FLOAT16_LIMIT:  # written so that a NaN fails too
        raise CheckpointError(f"tensor {name!r} has values beyond the float16 range (±65504)")
    if values.dtype == np.float32:
        # torch's cast is vectorized (F16C) and ~15× faster than numpy's float → half loop; both round to nearest
        # even, so the bits are the same. float64 goes through numpy: torch would round twice, via float32.
        with warnings.catch_warnings():  # a read-only source warns; torch only reads it
            warnings.simplefilter("ignore", UserWarning)
            torch.from_numpy(out).copy_(torch.from_numpy(values))
    else:
        np.copyto(out, values, casting="unsafe")


class BlobWrites:
    """Writes blocks of bytes at given offsets of open files, on a thread of its own.

    A workaround: coremltools' blob writer (_BlobStorageWriter) holds the GIL while it writes (measured: a
    Python thread gets 2–10 % of its progress meanwhile), so writing 14 GB of packages through it stopped the
    whole stream for as long as the disk took. Here the caller lays the blobs out itself (offsets follow from
    sizes), casts each block into one of WRITE_BUFFERS reused buffers, and this thread writes them with
    os.pwrite, which releases the GIL. A caller waits only when every buffer is still in flight: then the disk
    is the bottleneck. `write_s` is this thread's time in writes; `intervals` when it was writing.
    """

    def __init__(self) -> None:
        self.free: queue.SimpleQueue[np.ndarray] = queue.SimpleQueue()
        self.allocated = 0
        self.pending: queue.SimpleQueue = queue.SimpleQueue()
        self.outstanding: dict[int, int] = {}  # file descriptor → writes queued for it and not yet done
        self.progress = threading.Condition()
        self.error: OSError | None = None
        self.write_s = 0.0
        self.intervals: list[tuple[float, float]] = []
        self.thread = threading.Thread(target=self._run, name="coreml-write", daemon=True)
        self.thread.start()

    def buffer(self) -> np.ndarray:
        """A flat fp16 buffer of WRITE_BLOCK_VALUES to cast into; waits for one while all are in flight."""
        self.raise_error()
        if self.free.empty() and self.allocated < WRITE_BUFFERS:
            self.allocated += 1
            return np.empty(WRITE_BLOCK_VALUES, np.float16)
        return self.free.get()

    def write(self, fd: int, offset: int, data: np.ndarray | bytes, buffer: np.ndarray | None = None) -> None:
        """Queue `data` for writing at `offset` of `fd`; `buffer` (from `buffer()`, holding `data`) is reused
        once it is written."""
        self.raise_error()
        with self.progress:
            self.outstanding[fd] = self.outstanding.get(fd, 0) + 1
        self.pending.put((fd, offset, data, buffer))

    def drain(self, fd: int) -> None:
        """Wait until everything queued for `fd` so far is written."""
        with self.progress:
            self.progress.wait_for(lambda: not self.outstanding.get(fd))
        self.raise_error()

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self.pending.put(None)
        self.thread.join()

    def _run(self) -> None:
        while (item := self.pending.get()) is not None:
            fd, offset, data, buffer = item
            try:
                if self.error is None:  # after an error, the rest is dropped: the run is failing
                    begun = time.perf_counter()
                    view = memoryview(data).cast("B")
                    while view:
                        written = os.pwrite(fd, view, offset)
                        view, offset = view[written:], offset + written
                    ended = time.perf_counter()
                    self.write_s += ended - begun
                    self.intervals.append((begun, ended))
            except OSError as e:
                self.error = e
            finally:
                if buffer is not None:
                    self.free.put(buffer)
                with self.progress:
                    self.outstanding[fd] -= 1
                    self.progress.notify_all()


class PackageWriter:
    """An fp16 package being written: its weight.bin grows blob by blob as the chunk's tensors stream in, written
    by `writes`' thread; at `finish` the header gets its blob count and coremltools' own blob writer, opened on
    the file, appends the program's few small consts."""

    def __init__(self, path: Path, writes: BlobWrites):
        self.path = path
        self.writes = writes
        weights = path / PACKAGE_DATA / "weights"
        weights.mkdir(parents=True)
        self.weight_file = weights / WEIGHT_FILE
        self.fd = os.open(self.weight_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.end = BLOB_ALIGNMENT  # the storage header comes first
        self.blobs: dict[str, tuple[int, int]] = {}  # weight id → (offset of its blob record, bytes)

    def write(self, weight_id: str, name: str, values: np.ndarray) -> None:
        """Append `values` (any float dtype) as an fp16 blob; `name` is the source tensor's, for errors."""
        record = -(-self.end // BLOB_ALIGNMENT) * BLOB_ALIGNMENT
        data = record + BLOB_ALIGNMENT
        flat = np.ascontiguousarray(values).reshape(-1)
        self.writes.write(self.fd, record, BLOB_RECORD.pack(BLOB_SENTINEL, BLOB_FLOAT16, 2 * flat.size, data)
                          .ljust(BLOB_ALIGNMENT, b"\0"))
        for start in range(0, flat.size, WRITE_BLOCK_VALUES):
            block = flat[start:start + WRITE_BLOCK_VALUES]
            buffer = self.writes.buffer()
            cast_float16(name, block, buffer[:block.size])
            self.writes.write(self.fd, data + 2 * start, buffer[:block.size], buffer)
        self.blobs[weight_id] = (record, 2 * flat.size)
        self.end = data + 2 * flat.size

    def finish(self, program: Program) -> None:
        self.writes.drain(self.fd)
        os.pwrite(self.fd, STORAGE_HEADER.pack(len(self.blobs), STORAGE_VERSION).ljust(BLOB_ALIGNMENT, b"\0"), 0)
        os.close(self.fd)
        self.fd = -1
        writer = _BlobStorageWriter(str(self.weight_file), truncate_file=False)
        model = export(program, StreamedExporter(program, self.weight_file.parent, writer, self.blobs))
        del writer  # closes weight.bin: coremltools' blob writer has no close(), its destructor does it
        write_package(self.path, model)

    def close(self) -> None:
        """Close the file without finishing it (the run is failing)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class StreamedExporter(MILProtoExporter):
    """coremltools' MIL exporter for a program whose weights are already in weights/weight.bin.

    A workaround of coremltools internals: the stock exporter writes every const's value into a new weight.bin
    (copying it with flatten().tobytes() on the way). Here a const whose weight id names a streamed blob points
    at that blob instead (its value is a placeholder, never read), and the few small consts left (RoPE tables,
    index ranges) are appended to the same file by the writer that wrote the weights."""

    def __init__(self, program: Program, weights_dir: Path, writer: _BlobStorageWriter,
                 blobs: dict[str, tuple[int, int]]):
        super().__init__(program, str(weights_dir), SPEC_VERSION)
        self.writer = writer
        self.blobs = blobs

    def get_blob_writer(self, weight_path: str) -> _BlobStorageWriter:
        return self.writer

    def get_milproto_value(self, var) -> MIL_pb2.Value:
        weight = getattr(var.op, "weight_id", None)
        if weight in self.blobs:
            return create_file_value_tensor(file_name=WEIGHT_URL, offset=self.blobs[weight][0], dim=var.shape,
                                            data_type=MIL_pb2.FLOAT16)
        return super().get_milproto_value(var)


def export(program: Program, exporter: MILProtoExporter) -> Model_pb2.Model:
    """The model spec of a multifunction program, as coremltools' mlprogram backend makes it (its `load`)."""
    program._check_early_error_out_for_invalid_program()
    mil = exporter.export()
    return CoreMLProtoExporter(program, mil, predicted_feature_name=None, predicted_probabilities_name=None,
                               classifier_config=None, convert_to="mlprogram", convert_from="milinternal",
                               specification_version=SPEC_VERSION).export(SPEC_VERSION)


def write_package(package: Path, model: Model_pb2.Model) -> None:
    """Write model.mlmodel and Manifest.json around a package's weights/weight.bin.

    coremltools' own path (_create_mlpackage, then MLModel.save) copies weight.bin twice and gives the package
    random item identifiers; this writes the same files in place, identifiers derived from the spec."""
    spec = model.SerializeToString(deterministic=True)
    (package / PACKAGE_DATA / "model.mlmodel").write_bytes(spec)
    (package / "Manifest.json").write_text(package_manifest(spec))


def package_manifest(spec: bytes) -> str:
    """Manifest.json as coremltools' ModelPackage writes it (keys sorted, 4-space indent)."""
    digest = hashlib.sha256(spec).hexdigest()
    items = {
        "model.mlmodel": ("CoreML Model Specification", "com.apple.CoreML/model.mlmodel"),
        "weights": ("CoreML Model Weights", "com.apple.CoreML/weights"),
    }
    identifiers = {name: str(uuid.uuid5(uuid.NAMESPACE_OID, f"{digest}/{name}")) for name in items}
    entries = {identifiers[name]: {"author": "com.apple.CoreML", "description": description, "name": name,
                                   "path": path} for name, (description, path) in items.items()}
    return json.dumps({"fileFormatVersion": "1.0.0", "itemInfoEntries": dict(sorted(entries.items())),
                       "rootModelIdentifier": identifiers["model.mlmodel"]}, indent=4) + "\n"


def fsync_tree(folder: Path, recurse: bool = True) -> None:
    """fsync every file and folder under `folder` (folders too: they hold the new names), and `folder`."""
    paths = [*folder.rglob("*"), folder] if recurse else [folder]
    for path in sorted(paths, key=lambda p: len(p.parts), reverse=True):  # a folder after what it holds
        sync_file(path)


def replace_atomically(work: Path, final: Path) -> None:
    """Move a completed folder to its final name, replacing an older build only once the new one is whole."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    try:
        if final.exists():
            final.rename(old)
        work.rename(final)
    except OSError as e:
        raise OutputError(f"cannot move the Core ML package into place ({e.strerror})", final) from None
    shutil.rmtree(old, ignore_errors=True)
