"""Core ML: ML Programs built with coremltools' MIL builder, their weights streamed straight into place.

One layout for every model size, so apps and runners never branch on it:

    <out_dir>/<model_name>-fp16-coreml/
        manifest.json            which package holds which layers; inputs, outputs, states, context length
        chunk_01.mlpackage ...   consecutive layers each (the first also embeds tokens, the last holds the
                                 final norm and the LM head); every package has two functions sharing one
                                 copy of the weights: "decode" (1 token) and "prefill" (a block of tokens)
        tokenizer files          copied from the source, what a Swift app bundles

Every function takes `position` (int32 [1], where its first token goes in the sequence) and carries the KV
cache of its layers in two states, `key_cache` and `value_cache` (fp16 [layers, kv_heads, context,
head_dim]); the causal mask and the RoPE angles are computed inside from `position`.

Weights are written once, in their final place. Each streamed tensor is cast to fp16 a block at a time and
appended to the weights/weight.bin of every package that uses it, in MIL blob storage format, by a writer
thread (`BlobWrites`): the stream goes on while the disk takes the bytes, and memory holds the blocks in flight,
not the tensor (a package whose tensors come out of order keeps its file open longer). When a package's last
tensor has arrived, its program is built, on a thread of its own, with placeholder consts (zero-byte broadcast
arrays) that name those blobs by weight id, and exported around them: the graph passes that run are those of
coremltools' default pipeline that change this graph, less the ones that read weight values.

The same checkpoint gives the same bytes: op names count from zero in every function, the spec is serialized
deterministically, and the package's Manifest.json identifiers derive from the spec (coremltools draws random
UUIDs). Packages are built in hidden work folders, fsynced, and renamed into place by `finish`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import queue
import shutil
import struct
import threading
import time
import uuid
import warnings
from abc import ABC, abstractmethod
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import coremltools as ct
import numpy as np
import torch
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Function, Program, types
from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY
from coremltools.proto import MIL_pb2, Model_pb2

from siliconvert.architectures import ModelSpec
from siliconvert.artifacts import Artifact, Writer
from siliconvert.checkpoint import value_range
from siliconvert.errors import CheckpointError, OutputError, RecipeError
from siliconvert.quantize.coreml import QuantizedWeight, quantize_weights, quantized_const
from siliconvert.recipe import CoreMLTarget

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

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
PREFILL_BLOCK = 64  # tokens per prefill call: ANE kernels like a fixed, moderately wide sequence axis
AUTO_CHUNK_BYTES = 1 << 30  # `chunks: auto`: ≤ ~1 GiB of fp16 weights per package, as ANE projects use
HEAD_SPLIT = 16384  # the ANE caps a convolution's output channels; a 32k–150k vocabulary head is split
MASK_VALUE = -30000.0  # additive mask: exp() of it is 0, yet adding it to any score stays finite in fp16
NORM_FLOOR = 2.0**-6  # RMSNorm divides by max(|x|, floor): an all-zero token must not divide by zero
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
# The passes of coremltools' default pipeline (and of its mlprogram backend) that change this graph, in their
# order there: int16 gather indices and their guard, and the clean-ups after them. Left out are the passes
# that read, compare or hash const values (noop_elimination, const_deduplication, remove_redundant_ops): weights
# here are placeholders, and a weight-sized pass is what the streamed writer avoids. The graph itself states
# what those would leave. A test holds the result to ct.convert's default pipeline, op for op and bit for bit.
PASSES = [
    "common::add_int16_cast",
    "common::guard_negative_gather_indices",
    "common::const_elimination",
    "common::dead_code_elimination",
    "common::add_int16_cast",
    "common::cast_optimization",
    "common::dead_code_elimination",
    "common::topological_reorder",
    "mil_backend::adjust_io_to_supported_types",
    "mil_backend::sanitize_name_strings",
    "nn_backend::handle_unused_inputs",
]
# (role, layer or None, "weight"/"bias"): what the graph builder asks for
Key = tuple[str, int | None, str]


@dataclass(frozen=True)
class Chunk:
    index: int
    layers: range
    first: bool  # embeds token ids
    last: bool  # ends with the final norm and the LM head

    @property
    def package(self) -> str:
        return f"chunk_{self.index + 1:02d}.mlpackage"

    def input_names(self) -> list[str]:
        return ["input_ids" if self.first else "hidden_states", "position"]

    def output_name(self) -> str:
        return "logits" if self.last else "hidden_states_out"


def plan_chunks(spec: ModelSpec, chunks: int | str) -> list[Chunk]:
    """Split the layers into consecutive chunks: `chunks` of them, or by AUTO_CHUNK_BYTES for "auto"."""
    if chunks == "auto":
        count = min(spec.num_layers, max(1, math.ceil(model_bytes(spec) / AUTO_CHUNK_BYTES)))
    elif chunks > spec.num_layers:
        raise RecipeError(f"coreml chunks: {chunks} is more than the model's {spec.num_layers} layers")
    else:
        count = int(chunks)
    bounds = np.linspace(0, spec.num_layers, count + 1).round().astype(int)
    return [
        Chunk(i, range(bounds[i], bounds[i + 1]), first=i == 0, last=i == count - 1) for i in range(count)
    ]


def layer_bytes(spec: ModelSpec) -> int:
    h, q, kv, ff = spec.hidden_size, spec.q_size, spec.kv_size, spec.intermediate_size
    return 2 * (h * (2 * q + 2 * kv) + 3 * h * ff)


def model_bytes(spec: ModelSpec) -> int:
    tables = 1 if spec.tie_word_embeddings else 2
    return spec.num_layers * layer_bytes(spec) + tables * 2 * spec.vocab_size * spec.hidden_size


def required_tensors(spec: ModelSpec, chunk: Chunk) -> set[Key]:
    """Every tensor the chunk's graph reads."""
    per_layer = [("attn_norm", "weight"), ("ffn_norm", "weight")]
    per_layer += [(role, "weight") for role in ("attn_q", "attn_k", "attn_v", "attn_output")]
    per_layer += [(role, "weight") for role in ("ffn_gate", "ffn_up", "ffn_down")]
    if spec.qkv_bias:
        per_layer += [("attn_q", "bias"), ("attn_k", "bias"), ("attn_v", "bias")]
    if spec.attn_output_bias:
        per_layer.append(("attn_output", "bias"))
    if spec.mlp_bias:
        per_layer += [("ffn_gate", "bias"), ("ffn_up", "bias"), ("ffn_down", "bias")]
    keys = {(role, layer, kind) for layer in chunk.layers for role, kind in per_layer}
    if chunk.first:
        keys.add(("token_embd", None, "weight"))
    if chunk.last:
        keys.add(("output_norm", None, "weight"))
        keys.add((head_role(spec), None, "weight"))
    return keys


def head_role(spec: ModelSpec) -> str:
    return "token_embd" if spec.tie_word_embeddings else "output"


def tensor_shape(spec: ModelSpec, key: Key) -> tuple[int, ...]:
    """A tensor's shape in the checkpoint (HF layout: linear weights are (out, in))."""
    role, _, kind = key
    h, q, kv, ff = spec.hidden_size, spec.q_size, spec.kv_size, spec.intermediate_size
    out_in = {"attn_q": (q, h), "attn_k": (kv, h), "attn_v": (kv, h), "attn_output": (h, q), "ffn_gate": (ff, h),
              "ffn_up": (ff, h), "ffn_down": (h, ff), "token_embd": (spec.vocab_size, h),
              "output": (spec.vocab_size, h)}
    if role in out_in:
        return out_in[role] if kind == "weight" else out_in[role][:1]
    return (h,)  # the norms


def head_pieces(spec: ModelSpec) -> list[range]:
    """Rows of the LM head that each of its convolutions computes (one piece when the vocabulary fits)."""
    return [range(i, min(i + HEAD_SPLIT, spec.vocab_size)) for i in range(0, spec.vocab_size, HEAD_SPLIT)]


def weight_id(key: Key, piece: int | None = None) -> str:
    """The name of one blob in a package's weight.bin: a whole tensor, or one piece of a split LM head."""
    role, layer, kind = key
    name = f"{role}.{kind}" if layer is None else f"{role}.{layer}.{kind}"
    return name if piece is None else f"{name}#{piece}"


def blobs_of(spec: ModelSpec, chunk: Chunk, key: Key) -> list[tuple[str, slice]]:
    """(weight id, rows) of the blobs a chunk's weight.bin holds for one tensor: the whole tensor, or for a split
    LM head one blob per piece, since a const can only point at a whole blob. A tied table that both embeds and
    (split) projects in one chunk is stored both ways; unsplit, the two uses share one blob."""
    pieces = head_pieces(spec)
    whole = [(weight_id(key), slice(None))]
    if not (chunk.last and key[0] == head_role(spec)) or len(pieces) == 1:
        return whole
    split = [(weight_id(key, i), slice(rows.start, rows.stop)) for i, rows in enumerate(pieces)]
    return whole + split if chunk.first and key[0] == "token_embd" else split


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


def active_seconds(intervals: list[tuple[float, float]]) -> float:
    """How long at least one of the intervals was under way (their union's length)."""
    total, reach = 0.0, -math.inf
    for begun, ended in sorted(intervals):
        if ended > reach:
            total += ended - max(begun, reach)
            reach = ended
    return total


class CoreMLWriter(Writer):
    """Writes each tensor into the packages that use it as it streams by, and builds a chunk's programs around
    its weights as soon as the stream completes it: fp16, then the compressed variants the target asks for
    (quantize/coreml.py); `finish` adds manifests and tokenizer files and moves the folders into place."""

    def __init__(self, checkpoint, target: CoreMLTarget, out_dir: Path, model_name: str):
        self.checkpoint = checkpoint
        self.spec: ModelSpec = checkpoint.spec
        self.target = target
        self.model_name = model_name
        self.block = prefill_block(target.context)
        self.chunks = plan_chunks(self.spec, target.chunks)
        self.needed = [required_tensors(self.spec, chunk) for chunk in self.chunks]
        self.arrived: set[Key] = set()
        self.writing: dict[int, PackageWriter] = {}  # fp16 packages with weights still to come, by chunk
        # A package whose weights have all arrived is built (its programs made and exported, its compressed
        # variants made) on a thread of its own, one at a time, while the stream goes on: building is Python and
        # takes the GIL, but the stream spends most of a pass waiting on other writers' threads with it released.
        # Only that thread uses coremltools' MIL builder (its block stack is global) while the pass runs.
        self.builder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="coreml-build")
        self.building: list[Future] = []
        self.builds: list[tuple[float, float]] = []  # when the builder was at work, for `figures`
        # Finished packages are fsynced in a background thread (fsync releases the GIL), so the disk catches
        # up while the next chunk's tensors are cast and written; `finish` waits for every one.
        self.syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="coreml-fsync")
        self.syncing: list[Future] = []
        self.writes = BlobWrites()
        self.calls: list[tuple[float, float]] = []  # when the stream was inside this writer, for `figures`
        out_dir = Path(out_dir)
        self.out_dir = out_dir
        self.folders = {p: out_dir / f"{model_name}-{p}-coreml" for p in target.precisions}
        self.work = {p: f.with_name(f".{f.name}.tmp-{os.getpid()}") for p, f in self.folders.items()}
        self._state = "open"
        try:
            for folder in self.work.values():
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir(parents=True)
        except OSError as e:
            raise OutputError(f"cannot create a Core ML work folder ({e.strerror})", out_dir) from None

    def add(self, name: str, array: np.ndarray) -> None:
        begun = time.perf_counter()
        try:
            self._add(name, array)
        finally:
            self.calls.append((begun, time.perf_counter()))

    def _add(self, name: str, array: np.ndarray) -> None:
        if self._state != "open":
            raise RuntimeError(f"CoreMLWriter.add after {self._state}")
        key = self._key(name)
        users = [i for i, needed in enumerate(self.needed) if key in needed]
        if not users:
            return  # a stored copy of a tied head, or rotary inv_freq: the graph rebuilds these from the spec
        if key in self.arrived:
            raise CheckpointError(f"tensor {name!r} arrived twice in the stream")
        if array.shape != tensor_shape(self.spec, key):
            raise CheckpointError(f"tensor {name!r} has shape {list(array.shape)}, the config implies "
                                  f"{list(tensor_shape(self.spec, key))}")
        for built in self.building:
            if built.done():
                built.result()  # a package that failed to build stops the pass here, not at `finish`
        self.arrived.add(key)
        for i in users:
            package = self.writing.get(i) or self._open(self.chunks[i])
            for blob, rows in blobs_of(self.spec, self.chunks[i], key):
                package.write(blob, name, array[rows])
        for i in users:
            if self.needed[i] <= self.arrived:
                self.building.append(self.builder.submit(self._build, self.chunks[i], self.writing.pop(i)))

    def finish(self) -> list[Artifact]:
        begun = time.perf_counter()
        try:
            return self._finish()
        finally:
            self.calls.append((begun, time.perf_counter()))

    def figures(self) -> dict[str, float]:
        """`write_s` and `build_s`: the time of the threads that write weights and build packages, overlapping
        the stream; `active_s`: how long the stream was inside this writer or either thread was at work."""
        return {"write_s": self.writes.write_s, "build_s": sum(end - begin for begin, end in self.builds),
                "active_s": active_seconds(self.calls + self.writes.intervals + self.builds)}

    def _finish(self) -> list[Artifact]:
        if self._state != "open":
            raise RuntimeError(f"CoreMLWriter.finish after {self._state}")
        missing = [c.package for c in self.chunks if not self.needed[c.index] <= self.arrived]
        if missing:
            raise CheckpointError(f"the tensor stream ended before {', '.join(missing)} could be built")
        for built in self.building:
            built.result()
        self._state = "finished"
        self.builder.shutdown()
        self.writes.close()
        options = {"compute_units": self.target.compute_units}
        try:
            for precision, work in self.work.items():
                (work / MANIFEST).write_text(json.dumps(self.manifest(precision), indent=2) + "\n")
                for file in [self.checkpoint.path / "config.json", *self.checkpoint.tokenizer_files()]:
                    shutil.copyfile(file, work / file.name)
                self.syncing.append(self.syncer.submit(fsync_tree, work))  # the packages' files are synced already
            for synced in self.syncing:
                synced.result()
        except OSError as e:
            raise OutputError(f"cannot write the Core ML packages ({e.strerror})", self.out_dir) from None
        finally:
            self.syncer.shutdown()
        for precision, work in self.work.items():
            replace_atomically(work, self.folders[precision])
        fsync_tree(self.out_dir, recurse=False)  # the renames themselves
        return [Artifact("coreml", p, folder, options) for p, folder in self.folders.items()]

    def abort(self) -> None:
        self._state = "aborted"
        self.builder.shutdown(cancel_futures=True)  # waits for a build under way: it may hold a file open
        self.writes.close()
        for package in self.writing.values():
            package.close()
        self.writing.clear()
        self.syncer.shutdown(cancel_futures=True)
        for folder in self.work.values():
            shutil.rmtree(folder, ignore_errors=True)

    def manifest(self, precision: str) -> dict:
        spec = self.spec
        return {
            "format": "siliconvert-coreml",
            "version": MANIFEST_VERSION,
            "model_name": self.model_name,
            "precision": precision,
            "family": spec.family,
            "context_length": self.target.context,
            "vocab_size": spec.vocab_size,
            "hidden_size": spec.hidden_size,
            "functions": {"decode": 1, "prefill": self.block},  # function name → tokens per call
            "chunks": [
                {
                    "package": chunk.package,
                    "first_layer": chunk.layers.start,
                    "num_layers": len(chunk.layers),
                    "inputs": chunk.input_names(),
                    "outputs": [chunk.output_name()],
                    "states": {name: [len(chunk.layers), spec.num_kv_heads, self.target.context,
                                      spec.head_dim] for name in ("key_cache", "value_cache")},
                }
                for chunk in self.chunks
            ],
        }

    def _open(self, chunk: Chunk) -> PackageWriter:
        try:
            self.writing[chunk.index] = PackageWriter(self.work["fp16"] / chunk.package, self.writes)
        except OSError as e:
            raise OutputError(f"cannot create a Core ML package ({e.strerror})", self.work["fp16"]) from None
        return self.writing[chunk.index]

    def _build(self, chunk: Chunk, package: PackageWriter) -> None:
        begun = time.perf_counter()
        try:
            self._build_package(chunk, package)
        finally:
            self.builds.append((begun, time.perf_counter()))

    def _build_package(self, chunk: Chunk, package: PackageWriter) -> None:
        program = build_program(self.spec, chunk, self.block, self.target.context, PlaceholderWeights(package.blobs))
        package.finish(program)
        del program
        self.syncing.append(self.syncer.submit(fsync_tree, package.path))
        if len(self.target.precisions) > 1:
            stored = StoredWeights(package.path / PACKAGE_DATA / "weights" / WEIGHT_FILE, package.blobs)
            for precision in self.target.precisions[1:]:
                self._compress(chunk, stored, precision)

    def _compress(self, chunk: Chunk, stored: StoredWeights, precision: str) -> None:
        """A compressed variant, read back from the fp16 package just written (memory-mapped): coremltools'
        quantization pass runs on one function, and both functions take the weights it chose. Slower than the
        fp16 path, and it holds the chunk's compressed weights until its package is written."""
        quantized = quantize_weights(build_function(self.spec, chunk, 1, self.target.context, stored), precision)
        program = build_program(self.spec, chunk, self.block, self.target.context,
                                QuantizedWeights(stored, quantized))
        package = self.work[precision] / chunk.package
        (package / PACKAGE_DATA / "weights").mkdir(parents=True)
        write_package(package, export(program, MILProtoExporter(program, str(package / PACKAGE_DATA / "weights"),
                                                                SPEC_VERSION)))
        self.syncing.append(self.syncer.submit(fsync_tree, package))

    def _key(self, name: str) -> Key | None:
        role = self.checkpoint.family.role_of(name)
        return (role.role, role.layer, role.kind) if role else None


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
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def prefill_block(context: int) -> int:
    """Tokens per prefill call: PREFILL_BLOCK, or the largest power of two below it that divides the
    context, so that blocks tile the cache exactly (a block never writes past the last slot)."""
    block = PREFILL_BLOCK
    while context % block:
        block //= 2
    return block


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


# ---- where the graph takes its weights from ----------------------------------------------------


class WeightConsts(ABC):
    """Makes the const (or constexpr) op of one use of a weight in the function being built. Uses with the same
    weight id read the same bytes, within a function and across the two."""

    @abstractmethod
    def const(self, weight: str, shape: tuple[int, ...], name: str): ...


class PlaceholderWeights(WeightConsts):
    """Consts whose bytes are already in the package's weight.bin: the value is a zero-byte broadcast of the
    right shape and dtype (what type inference needs), and StreamedExporter points the const at the blob."""

    def __init__(self, blobs: dict[str, tuple[int, int]]):
        self.blobs = blobs

    def const(self, weight: str, shape: tuple[int, ...], name: str):
        if self.blobs[weight][1] != 2 * math.prod(shape):
            raise RuntimeError(f"blob {weight} holds {self.blobs[weight][1]} bytes, not fp16 {shape}")
        var = mb.const(val=np.broadcast_to(np.float16(0), shape), name=name)
        var.op.weight_id = weight
        return var


class StoredWeights(WeightConsts):
    """Consts with the values of a finished fp16 package, memory-mapped from its weight.bin."""

    def __init__(self, path: Path, blobs: dict[str, tuple[int, int]]):
        self.data = np.memmap(path, dtype=np.uint8, mode="r")
        self.blobs = blobs

    def values(self, weight: str, shape: tuple[int, ...]) -> np.ndarray:
        sentinel, _, size, start = BLOB_RECORD.unpack_from(self.data, self.blobs[weight][0])
        if sentinel != BLOB_SENTINEL or size != 2 * math.prod(shape):
            raise RuntimeError(f"blob {weight} in {self.data.filename} is not fp16 {shape}")
        return self.data[start:start + size].view(np.float16).reshape(shape)

    def const(self, weight: str, shape: tuple[int, ...], name: str):
        var = mb.const(val=self.values(weight, shape), name=name)
        var.op.weight_id = weight
        return var


class QuantizedWeights(WeightConsts):
    """The compressed form coremltools' pass chose for each weight (quantize/coreml.py); fp16 for the rest."""

    def __init__(self, stored: StoredWeights, quantized: dict[str, QuantizedWeight]):
        self.stored = stored
        self.quantized = quantized

    def const(self, weight: str, shape: tuple[int, ...], name: str):
        if weight in self.quantized:
            return quantized_const(self.quantized[weight], weight, name)
        return self.stored.const(weight, shape, name)


# ---- the graph ---------------------------------------------------------------------------------
# Activations are channels-first (1, C, 1, S), the layout the Neural Engine works in natively; linears are
# 1×1 convolutions over it (the ANE's fastest op, and no transposes between layers). Attention works per
# KV-head group in (1, kv_heads, group × S, head_dim) without repeating K and V for grouped-query heads.


def build_program(spec: ModelSpec, chunk: Chunk, block: int, context: int, weights: WeightConsts) -> Program:
    """The chunk's two functions, "decode" (1 token, the default) and "prefill" (`block` tokens), after PASSES."""
    program = Program()
    for name, tokens in (("decode", 1), ("prefill", block)):
        # Passes run on each function alone, as ct.convert runs them: some keep state from one function to the
        # next (add_int16_cast's target dtype), which would make prefill depend on decode. They are called
        # directly: PassPipelineManager validates the whole program after every pass (the exporters do once).
        alone = Program()
        alone.add_function("main", build_function(spec, chunk, tokens, context, weights))
        for graph_pass in PASSES:
            PASS_REGISTRY[graph_pass](alone)
        program.add_function(name, alone.functions["main"])
    program.default_function_name = "decode"
    program.export_as_multifunction = True
    return program


def build_function(spec: ModelSpec, chunk: Chunk, tokens: int, context: int, weights: WeightConsts) -> Function:
    """`tokens` tokens through the chunk's layers."""
    # The builder names ops from a process-wide counter that ct.convert clears after each conversion; from
    # zero in every function, the names (and so model.mlmodel) are the same in every run.
    mb.name_count.clear()
    h, kvh, d, layers = spec.hidden_size, spec.num_kv_heads, spec.head_dim, len(chunk.layers)
    needed = required_tensors(spec, chunk)
    first_input = (mb.TensorSpec((1, tokens), dtype=types.int32) if chunk.first
                   else mb.TensorSpec((1, h, 1, tokens), dtype=types.fp16))
    inputs = {
        chunk.input_names()[0]: first_input,
        "position": mb.TensorSpec((1,), dtype=types.int32),
        "key_cache": mb.StateTensorSpec((layers, kvh, context, d), dtype=types.fp16),
        "value_cache": mb.StateTensorSpec((layers, kvh, context, d), dtype=types.fp16),
    }

    def linear(x, role: str, layer: int, name: str):
        """HF's (out, in) weight as a 1×1 convolution's (out, in, 1, 1), over (1, C_in, 1, S)."""
        out, inp = tensor_shape(spec, (role, layer, "weight"))
        weight = weights.const(weight_id((role, layer, "weight")), (out, inp, 1, 1), f"{name}_weight")
        bias = None
        if (role, layer, "bias") in needed:
            bias = weights.const(weight_id((role, layer, "bias")), (out,), f"{name}_bias")
        return mb.conv(x=x, weight=weight, bias=bias, name=name)

    def norm(x, role: str, layer: int | None, name: str):
        weight = weights.const(weight_id((role, layer, "weight")), (1, h, 1, 1), f"{name}_weight")
        return rms_norm(x, weight, spec.rms_norm_eps, name)

    with Function(inputs, opset_version=ct.target.iOS18) as function:
        position = function.inputs["position"]
        # (S,); one token is at `position` itself (adding 0 is what noop_elimination would remove)
        positions = position if tokens == 1 else mb.add(x=position, y=np.arange(tokens, dtype=np.int32),
                                                         name="positions")
        cos, sin = rope_angles(spec, context, positions, tokens)
        shared = Shared(position, cos, sin, causal_mask(spec, context, positions, tokens),
                        CacheState(function.inputs["key_cache"]), CacheState(function.inputs["value_cache"]))
        if chunk.first:
            # The table as (V, C, 1, 1), the LM head's conv layout: an unsplit tied head is the same blob.
            table = weights.const(weight_id(("token_embd", None, "weight")), (spec.vocab_size, h, 1, 1),
                                  "embed_tokens")
            x = mb.gather(x=table, indices=function.inputs["input_ids"], axis=0)  # (1, S, C, 1, 1)
            x = mb.transpose(x=mb.reshape(x=x, shape=[1, tokens, h]), perm=[0, 2, 1])
            x = mb.reshape(x=x, shape=[1, h, 1, tokens], name="embeddings")
        else:
            x = function.inputs["hidden_states"]
        for local, layer in enumerate(chunk.layers):
            attention_in = norm(x, "attn_norm", layer, f"l{layer}_attn_norm")
            x = mb.add(x=x, y=attention(spec, attention_in, linear, layer, local, shared),
                       name=f"l{layer}_attn_residual")
            mlp_in = norm(x, "ffn_norm", layer, f"l{layer}_ffn_norm")
            gate = linear(mlp_in, "ffn_gate", layer, f"l{layer}_ffn_gate")
            up = linear(mlp_in, "ffn_up", layer, f"l{layer}_ffn_up")
            hidden = mb.mul(x=mb.silu(x=gate), y=up, name=f"l{layer}_ffn_act")
            x = mb.add(x=x, y=linear(hidden, "ffn_down", layer, f"l{layer}_ffn_down"), name=f"l{layer}_ffn_residual")
        if chunk.last:
            x = norm(x, "output_norm", None, "output_norm")
            head, pieces = (head_role(spec), None, "weight"), head_pieces(spec)
            parts = [mb.conv(x=x, weight=weights.const(weight_id(head, i if len(pieces) > 1 else None),
                                                       (len(rows), h, 1, 1), f"lm_head_{i}_weight"),
                             name=f"lm_head_{i}")
                     for i, rows in enumerate(pieces)]
            x = mb.concat(values=parts, axis=1) if len(parts) > 1 else parts[0]  # (1, V, 1, S)
            out = mb.transpose(x=mb.squeeze(x=x, axes=[2]), perm=[0, 2, 1], name="logits")  # (1, S, V)
        else:
            out = mb.identity(x=x, name="hidden_states_out")
        function.set_outputs([out])
    return function


def shared_const(value: np.ndarray, name: str):
    """A const that depends on the spec and context alone: one blob serves both functions."""
    var = mb.const(val=value, name=name)
    var.op.weight_id = name
    return var


def rms_norm(x, weight, eps: float, name: str):
    """RMSNorm over channels, with a (1, C, 1, 1) weight, that cannot overflow fp16.

    Squaring an fp16 activation overflows past |x| = 256, and summing C squares long before that. Dividing
    each token by its max |x| first keeps every square ≤ 1 and their mean in [1/C, 1]; the factor cancels
    out of x / rms(x) except in eps, which is divided by the same factor squared.
    """
    peak = mb.maximum(x=mb.reduce_max(x=mb.abs(x=x), axes=[1], keep_dims=True), y=np.float16(NORM_FLOOR))
    scaled = mb.real_div(x=x, y=peak)
    mean_square = mb.reduce_mean(x=mb.mul(x=scaled, y=scaled), axes=[1], keep_dims=True)
    # eps / peak² as (√eps / peak)²: √eps (1e-3 for eps = 1e-6) is a normal fp16 number, eps itself is not
    root_eps = mb.real_div(x=np.float16(math.sqrt(eps)), y=peak)
    rms_inverse = mb.rsqrt(x=mb.add(x=mean_square, y=mb.mul(x=root_eps, y=root_eps)))
    normed = mb.mul(x=scaled, y=rms_inverse)
    return mb.mul(x=normed, y=weight, name=name)


class CacheState:
    """One KV state (layers, KVH, context, D) of a function, read once; each layer's write chains on the
    previous one. Re-reading the state per layer would be wrong: coremltools' remove_redundant_ops pass
    treats read_state as pure and merges repeated reads, so a later layer would write back a cache from
    before the earlier layers' writes (the MIL interpreter caught this)."""

    def __init__(self, state):
        self.state = state
        self.value = mb.read_state(input=state)

    def write(self, update, local: int, begin, end):
        """Write (1, KVH, S, D) at [local layer, :, position:position+S] (`begin`, `end`); return the layer's
        whole cache. `coreml_update_state` is what makes the write persist between calls."""
        _, kvh, context, d = self.value.shape
        updated = mb.slice_update(x=self.value, update=update, begin=begin, end=end)
        self.value = mb.coreml_update_state(state=self.state, value=updated)
        if self.value.shape[0] == 1:  # a one-layer chunk: the layer's cache is the whole state (no no-op slice)
            return self.value
        return mb.slice_by_index(x=self.value, begin=[local, 0, 0, 0], end=[local + 1, kvh, context, d])


@dataclass(frozen=True)
class Shared:
    """What every layer of one function uses: the block's start position, RoPE angles, mask and caches."""

    position: object  # MIL vars throughout
    cos: object
    sin: object
    mask: object
    keys: CacheState
    values: CacheState


def attention(spec: ModelSpec, x, linear, layer: int, local: int, shared: Shared):
    """Grouped-query attention over the whole cache, through the chunk's states (`local` = layer index in it)."""
    heads, kvh, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
    group, s, context = heads // kvh, x.shape[-1], shared.mask.shape[-1]
    q = linear(x, "attn_q", layer, f"l{layer}_q")  # (1, H·D, 1, S)
    k = linear(x, "attn_k", layer, f"l{layer}_k")
    v = linear(x, "attn_v", layer, f"l{layer}_v")
    q = rope(mb.reshape(x=q, shape=[1, heads, d, s]), shared.cos, shared.sin)  # (1, H, D, S)
    k = rope(mb.reshape(x=k, shape=[1, kvh, d, s]), shared.cos, shared.sin)
    k = mb.transpose(x=k, perm=[0, 1, 3, 2])  # (1, KVH, S, D)
    # Where this block goes in the layer's cache; keys and values share it (the graph states once what
    # coremltools' remove_redundant_ops would otherwise merge).
    begin = mb.concat(values=[np.array([local, 0], np.int32), shared.position, np.array([0], np.int32)], axis=0)
    end = mb.add(x=begin, y=np.array([1, kvh, s, d], np.int32))
    keys = shared.keys.write(k, local, begin, end)  # (1, KVH, context, D)
    v = mb.transpose(x=mb.reshape(x=v, shape=[1, kvh, d, s]), perm=[0, 1, 3, 2])
    values = shared.values.write(v, local, begin, end)
    q = mb.mul(x=mb.transpose(x=q, perm=[0, 1, 3, 2]), y=np.float16(1 / math.sqrt(d)))  # (1, H, S, D)
    # Query heads h = kv·group + g share KV head kv: grouping rows as (kv, g·S) needs no repeated K/V.
    q = reshape(q, [1, kvh, group * s, d])
    scores = mb.matmul(x=q, y=keys, transpose_y=True)  # (1, KVH, G·S, context)
    scores = mb.add(x=reshape(scores, [1, heads, s, context]), y=shared.mask)
    probs = reshape(mb.softmax(x=scores, axis=-1), [1, kvh, group * s, context])
    out = reshape(mb.matmul(x=probs, y=values), [1, heads, s, d])
    out = mb.reshape(x=mb.transpose(x=out, perm=[0, 1, 3, 2]), shape=[1, heads * d, 1, s])
    return linear(out, "attn_output", layer, f"l{layer}_o")


def reshape(x, shape: list[int]):
    """mb.reshape, or `x` itself where it has that shape already (one query head per KV head): the graph
    states what coremltools' noop_elimination, which PASSES leave out, would make of it."""
    return x if tuple(x.shape) == tuple(shape) else mb.reshape(x=x, shape=shape)


def rope(x, cos, sin):
    """Rotate-half RoPE (HF's convention) on (1, N, D, S): halves of the head dimension rotate together."""
    _, n, d, s = x.shape
    x1 = mb.slice_by_index(x=x, begin=[0, 0, 0, 0], end=[1, n, d // 2, s])
    x2 = mb.slice_by_index(x=x, begin=[0, 0, d // 2, 0], end=[1, n, d, s])
    first = mb.sub(x=mb.mul(x=x1, y=cos), y=mb.mul(x=x2, y=sin))
    second = mb.add(x=mb.mul(x=x2, y=cos), y=mb.mul(x=x1, y=sin))
    return mb.concat(values=[first, second], axis=2)


def rope_angles(spec: ModelSpec, context: int, positions, tokens: int):
    """cos and sin (1, 1, D/2, S) for the block's positions, gathered from tables over the whole context."""
    inv_freq, attention_factor = rope_frequencies(spec, context)
    angles = inv_freq[:, None] * np.arange(context)[None, :]  # (D/2, context), computed in float64
    tables = [(np.cos(angles) * attention_factor).astype(np.float16),
              (np.sin(angles) * attention_factor).astype(np.float16)]
    half = spec.head_dim // 2
    return [mb.reshape(x=mb.gather(x=shared_const(table, f"{name}_table"), indices=positions, axis=1),
                       shape=[1, 1, half, tokens], name=name)
            for table, name in zip(tables, ("rope_cos", "rope_sin"), strict=True)]


def rope_frequencies(spec: ModelSpec, context: int) -> tuple[np.ndarray, float]:
    """Inverse frequencies and the attention factor (yarn scales cos/sin), as transformers computes them."""
    d = spec.head_dim
    inv_freq = 1.0 / spec.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    scaling = spec.rope_scaling
    if scaling is None:
        return inv_freq, 1.0
    kind, factor = scaling["rope_type"], float(scaling.get("factor") or 1.0)
    original = scaling.get("original_max_position_embeddings", spec.max_position_embeddings)
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "dynamic":
        if context > spec.max_position_embeddings:
            raise CheckpointError("dynamic RoPE scaling beyond max_position_embeddings is not supported "
                                  "by the Core ML target (its frequencies change with the sequence length)")
        return inv_freq, 1.0  # below that length transformers uses the unscaled frequencies
    if kind == "llama3":
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        wavelen = 2 * math.pi / inv_freq
        smooth = (original / wavelen - low) / (high - low)
        scaled = np.where(wavelen > original / low, inv_freq / factor, inv_freq)
        medium = (wavelen >= original / high) & (wavelen <= original / low)
        return np.where(medium, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled), 1.0
    # yarn: blend interpolated and extrapolated frequencies over a ramp of dimensions; scale cos/sin
    factor = float(scaling.get("factor") or spec.max_position_embeddings / original)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 0.1 * m * math.log(scale) + 1.0 if scale > 1 else 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    def correction(rotations: float) -> float:
        return d * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(spec.rope_theta))

    low, high = correction(scaling.get("beta_fast") or 32), correction(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    ramp = np.clip((np.arange(d // 2) - low) / (high - low if high != low else 1e-3), 0, 1)
    return inv_freq / factor * ramp + inv_freq * (1 - ramp), float(attention_factor)


def causal_mask(spec: ModelSpec, context: int, positions, tokens: int):
    """Additive mask (1, 1, S, context): 0 where key ≤ query (and within a sliding window), else MASK_VALUE.
    Slots past the sequence hold stale or zero K/V; the mask is what keeps them out."""
    key_index = shared_const(np.arange(context, dtype=np.int32)[None, :], "key_index")
    query = mb.reshape(x=positions, shape=[tokens, 1])
    allowed = mb.less_equal(x=key_index, y=query)
    if spec.sliding_window and spec.sliding_window < context:
        recent = mb.greater(x=key_index, y=mb.sub(x=query, y=np.int32(spec.sliding_window)))
        allowed = mb.logical_and(x=allowed, y=recent)
    # (allowed − 1) × |MASK_VALUE| rather than `select`: coremltools 9 infers select's output shape from
    # its two value operands alone, so select(cond (S, context), scalar, scalar) would claim a scalar.
    allowed = mb.cast(x=allowed, dtype="fp16")
    mask = mb.mul(x=mb.sub(x=allowed, y=np.float16(1)), y=np.float16(-MASK_VALUE))
    return mb.reshape(x=mask, shape=[1, 1, tokens, context], name="causal_mask")
