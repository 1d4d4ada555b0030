"""CoreMLWriter: the streamed pass's Core ML writer.

Weights are written once, in their final place. Each streamed tensor is cast to fp16 a block at a time and
appended to the weights/weight.bin of every package that uses it, in MIL blob storage format, by a writer
thread (`BlobWrites`): the stream goes on while the disk takes the bytes, and memory holds the blocks in flight,
not the tensor (a package whose tensors come out of order keeps its file open longer). When a package's last
tensor has arrived, its program is built, on a thread of its own, with placeholder consts (zero-byte broadcast
arrays) that name those blobs by weight id, and exported around them: the graph passes that run are those of
coremltools' default pipeline that change this graph, less the ones that read weight values.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from siliconvert.architectures import ModelSpec
from siliconvert.artifacts import Artifact, Writer
from siliconvert.calibration import (
    BUILTIN,
    HESSIAN,
    HESSIAN_HALVES,
    IMPORTANCE,
    INPUT_PEAKS,
    RANGE,
    SENSITIVITY,
    Calibrations,
)
from siliconvert.checkpoint import TensorInfo
from siliconvert.convert.coreml.chunks import Chunk, Key, blobs_of, plan_chunks, role_key, weight_id
from siliconvert.convert.coreml.folds import graph_keys, graph_tensors, input_scale, tensor_shape
from siliconvert.convert.coreml.graph import (
    EXPERT_IDS,
    build_function,
    build_program,
    longrope_factors,
    required_tensors,
    state_shapes,
)
from siliconvert.convert.coreml.package import (
    PACKAGE_DATA,
    SPEC_VERSION,
    WEIGHT_FILE,
    BlobWrites,
    MILProtoExporter,
    PackageWriter,
    export,
    fsync_tree,
    replace_atomically,
    write_package,
)
from siliconvert.convert.coreml.plan import ColumnImportance, WeightPlanner
from siliconvert.convert.coreml.weights import PlaceholderWeights, QuantizedWeights, StoredWeights
from siliconvert.errors import CheckpointError, OutputError
from siliconvert.quantize.coreml import W8A8, activation_scale, quantize_weights
from siliconvert.quantize.plan import Plan
from siliconvert.recipe import CoreMLTarget

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
PREFILL_BLOCK = 64  # tokens per prefill call: ANE kernels like a fixed, moderately wide sequence axis


def active_seconds(intervals: list[tuple[float, float]]) -> float:
    """How long at least one of the intervals was under way (their union's length)."""
    total, reach = 0.0, -math.inf
    for begun, ended in sorted(intervals):
        if ended > reach:
            total += ended - max(begun, reach)
            reach = ended
    return total


def calibration_needs(target: CoreMLTarget) -> dict[str, set[str]]:
    """Calibration text → the parts a target's writer asks for: the residual stream's range (every package runs in
    fp16), a plan's importance and sensitivity, the importance every compressed package's weights are fitted
    to (a palette's k-means, int4 / int8 scales: quantize/coreml.py), a W8A8 package's activation peaks, and GPTQ's
    second moments for `method: gptq` (a plan's apart for each half of the text too: its GPTQ costs)."""
    compressed = len(target.precisions) > 1
    return {BUILTIN: {RANGE} | ({IMPORTANCE, SENSITIVITY} if target.plan else set())
            | ({IMPORTANCE} if compressed else set()) | ({INPUT_PEAKS} if W8A8 in target.precisions else set())
            | ({HESSIAN} if target.method == "gptq" else set())
            | ({HESSIAN_HALVES} if target.method == "gptq" and target.plan else set())}


class CoreMLWriter(Writer):
    """Writes each tensor into the packages that use it as it streams by, and builds a chunk's programs around
    its weights as soon as the stream completes it: fp16, then the compressed variants the target asks for
    (quantize/coreml.py); `finish` compresses a planned variant's chunks (plan.py), adds manifests and tokenizer
    files and moves the folders into place. `calibration`: the run's calibrations (made here where none is
    given)."""

    def __init__(self, checkpoint, target: CoreMLTarget, out_dir: Path, model_name: str, *,
                 calibration: Calibrations | None = None):
        self.checkpoint = checkpoint
        calibration = calibration or Calibrations.outside_a_run(checkpoint)
        self.spec: ModelSpec = checkpoint.spec
        self.target = target
        self.chunks = plan_chunks(self.spec, target.chunks)  # first: it refuses a trait no package builds
        self.model_name = model_name
        self.block = prefill_block(target.context)
        # The residual stream's scale (a power of two that keeps it in fp16: FP16Range in siliconvert/calibration.py)
        # and the scale of each branch's output, folded into the weights that write it (folds.py): the residual
        # multiplier × the former.
        self.fp16_range = calibration.fp16_range()
        self.stream_scale = self.fp16_range.scale
        self.branch_scale = self.spec.residual_scale * self.stream_scale
        # What enters the recurrent states (a short convolution's B·x), kept inside fp16 the same way: Core ML's
        # states are fp16 only, so a range past it is scaled, never widened
        self.state_range = calibration.state_range() if self.spec.state_numbers() else None
        self.state_scale = self.state_range.scale if self.state_range else 1.0
        # and the gated delta rule's and Mamba2's recurrent states themselves (a scale the graph applies to what
        # enters them, v or Δ·x, and takes out of the rule's output)
        recurrent = self.spec.mixer_layers("gated_delta") or self.spec.mixer_layers("mamba2")
        self.recurrent_range = calibration.recurrent_range() if recurrent else None
        self.recurrent_scale = self.recurrent_range.scale if self.recurrent_range else 1.0
        self.needed = [required_tensors(self.spec, chunk) for chunk in self.chunks]
        self.arrived: set[Key] = set()
        # The weights made from tensors that arrived as MXFP4 (weight ids), and how many of their values fp16 does
        # not hold exactly (E2M1 × 2^k is exact in fp16 for k in [−23, 13]): what `source_quantization` states
        quantization = checkpoint.quantization
        self.arrived_mxfp4 = set(quantization.tensors) if quantization and quantization.method == "mxfp4" else set()
        self.mxfp4_weights: set[str] = set()
        self.mxfp4_values = self.mxfp4_inexact = 0
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
        self.folders = {p: out_dir / f"{model_name}-{target.variant(p)}-coreml" for p in target.precisions}
        # a planned variant (precision: auto): its costs measured as each fp16 package is finished, its plan made
        # and its chunks compressed once all are (the fp16 packages' weight ids, kept for that)
        self.planned = target.plan.label if target.plan else None
        self.planner = (WeightPlanner(checkpoint, target.plan, calibration=calibration, gptq=target.method == "gptq")
                        if target.plan else None)
        self.quant_plan: Plan | None = None
        self.fp16_blobs: dict[int, dict[str, tuple[int, int]]] = {}
        # what compressed weights are fitted to (quantize/coreml.py: a palette's k-means, int4 / int8 scales)
        self.columns = (ColumnImportance(checkpoint, calibration.get(BUILTIN, {IMPORTANCE}).importance)
                        if len(target.precisions) > 1 else None)
        # a W8A8 package's activation scales: the peak |x| entering each linear layer, looked up as importance is
        self.input_peaks = (ColumnImportance(checkpoint, calibration.get(BUILTIN, {INPUT_PEAKS}).input_peaks)
                            if W8A8 in target.precisions else None)
        # what GPTQ rounds them against (`method: gptq`): the mean x xᵀ of each weight's source, found as its importance
        self.hessians = (ColumnImportance(checkpoint, calibration.hessians(BUILTIN))
                         if target.method == "gptq" else None)
        self.work = {p: f.with_name(f".{f.name}.tmp-{os.getpid()}") for p, f in self.folders.items()}
        self._state = "open"
        try:
            for folder in self.work.values():
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir(parents=True)
        except OSError as e:
            raise OutputError(f"cannot create a Core ML work folder ({e.strerror})", out_dir) from None

    def add(self, info: TensorInfo, array: np.ndarray) -> None:
        begun = time.perf_counter()
        try:
            self._add(info, array)
        finally:
            self.calls.append((begun, time.perf_counter()))

    def _add(self, info: TensorInfo, array: np.ndarray) -> None:
        if self._state != "open":
            raise RuntimeError(f"CoreMLWriter.add after {self._state}")
        name, key = info.name, role_key(info.role)
        if not any(part in needed for part in graph_keys(self.spec, key) for needed in self.needed):
            raise CheckpointError(f"tensor {name!r} ({key[0]}) is used by no Core ML package")
        if any(part in self.arrived for part in graph_keys(self.spec, key)):
            raise CheckpointError(f"tensor {name!r} arrived twice in the stream")
        if array.shape != tensor_shape(self.spec, key):
            raise CheckpointError(f"tensor {name!r} has shape {list(array.shape)}, the config implies "
                                  f"{list(tensor_shape(self.spec, key))}")
        for built in self.building:
            if built.done():
                built.result()  # a package that failed to build stops the pass here, not at `finish`
        users = set()
        for part, values in graph_tensors(self.spec, key, array, self.branch_scale, self.state_scale):
            self.arrived.add(part)
            if name in self.arrived_mxfp4:
                self.mxfp4_weights.add(weight_id(part))
                self.mxfp4_values += values.size
                self.mxfp4_inexact += int(np.count_nonzero(values.astype(np.float16).astype(np.float32) != values))
            for i, needed in enumerate(self.needed):
                if part in needed:
                    users.add(i)
                    package = self.writing.get(i) or self._open(self.chunks[i])
                    for blob, rows in blobs_of(self.spec, self.chunks[i], part):
                        package.write(blob, name, values[rows])
        for i in sorted(users):
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
        if self.planner is not None:
            self._compress_planned()
        options = {"compute_units": self.target.compute_units, "interpreter": self.target.interpreter,
                   "state_bytes": self.state_bytes()}
        if self.compute():  # the runner shows it (CoreMLRunner.compute): the report prints it per artifact
            options["compute"] = self.compute()
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
        plan = self.quant_plan.summary() if self.quant_plan else None
        return [Artifact("coreml", self.target.variant(p), folder, options, plan if p == self.planned else None,
                         source_quantization=self.arrived_statement(p))
                for p, folder in self.folders.items()]

    def arrived_statement(self, precision: str) -> str | None:
        """How a package stores the weights that arrived as MXFP4: as fp16, exact or not (Core ML has no MXFP4
        type), or re-quantized into the precision's int8 / int4 / palettes (the planned variant: where its plan
        compressed them); None where nothing arrived as MXFP4."""
        weights = len(self.mxfp4_weights)
        if not weights:
            return None
        if precision == "fp16":
            exact = ("every value exact" if not self.mxfp4_inexact else
                     f"{self.mxfp4_inexact} of {self.mxfp4_values} values not exact (past float16's range)")
            return f"MXFP4 stored as float16 in {weights} weights (Core ML has no MXFP4 type): {exact}"
        if precision != self.planned:  # every weight but the routers and kernels: the experts all are
            return f"MXFP4 re-quantized in {weights} of {weights} weights (as {precision})"
        chosen = [kind for chunk in self.chunks for weight, kind in
                  self.planner.precisions(self.quant_plan, chunk).items() if weight in self.mxfp4_weights]
        kinds = ", ".join(sorted(set(chosen))) or "none"
        return f"MXFP4 re-quantized in {len(chosen)} of {weights} weights (as {kinds}), the rest float16"

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
            "precision": self.target.variant(precision),
            "family": spec.family,
            "context_length": self.target.context,
            "vocab_size": spec.vocab_size,
            "hidden_size": spec.hidden_size,
            "functions": {"decode": 1, "prefill": self.block},  # function name → tokens per call
            "numerics": self.numerics(),
            "compute": self.compute(),
            "chunks": [
                {
                    "package": chunk.package,
                    "first_layer": chunk.layers.start,
                    "num_layers": len(chunk.layers),
                    "inputs": chunk.input_names(),
                    # a chunk with sparse layers also outputs their routers' choices (EXPERT_IDS)
                    "outputs": [*chunk.output_names(), *([EXPERT_IDS] if self.sparse_layers(chunk) else [])],
                    "sparse_layers": self.sparse_layers(chunk),
                    "states": {name: list(shape) for name, shape in
                               state_shapes(spec, chunk, self.target.context).items()},
                }
                for chunk in self.chunks
            ],
            "state_bytes": self.state_bytes(),
        }

    def state_bytes(self) -> dict[str, int]:
        """Bytes of fp16 state per sequence, over every package, by state: the KV cache at the full context
        (`kv_cache`, its keys and values), each recurrent state (`conv_state`: the short convolutions';
        `delta_conv_state` and `recurrent_state`: the gated delta rule's)."""
        totals: dict[str, int] = {}
        for chunk in self.chunks:
            for name, shape in state_shapes(self.spec, chunk, self.target.context).items():
                kind = "kv_cache" if name.startswith(("key_cache", "value_cache")) else name
                totals[kind] = totals.get(kind, 0) + 2 * math.prod(shape)
        return totals

    def sparse_layers(self, chunk: Chunk) -> list[int]:
        return [layer for layer in chunk.layers if self.spec.layers[layer].sparse]

    def compute(self) -> str | None:
        """What a mixture of experts costs here: the program evaluates every expert for every token (graph.py
        experts), E/k times the MLP compute of the k chosen. None for a dense model."""
        experts = self.spec.experts
        if experts is None or not self.spec.sparse_layers:
            return None
        shared = ", besides the shared expert" if experts.shared_intermediate_size else ""
        return (f"experts evaluated per token: {experts.count} of which {experts.used} used "
                f"({experts.count / experts.used:g}× the compute of the chosen experts' MLPs{shared})")

    def numerics(self) -> dict:
        """What the packages compute differently from the checkpoint's own arithmetic, and why the function is
        the same: choices a fixed context forces, and the scales folded into weights."""
        spec = self.spec
        numerics: dict = {"traits": spec.traits(), "norm_offset_folded": spec.norm_offset != 0.0,
                          "residual_stream_peak": self.fp16_range.peak, "residual_stream_scale": self.stream_scale,
                          "branch_scale_folded": self.branch_scale}
        longrope = {longrope_factors(layer.rope.scaling, self.target.context) for layer in spec.layers
                    if layer.rope is not None and layer.rope.kind == "longrope"}
        if self.state_range:  # the recurrent states' measured peak and the scale that keeps them in fp16
            numerics |= {"state_peak": self.state_range.peak, "state_scale": self.state_scale}
        if self.recurrent_range:
            numerics |= {"recurrent_peak": self.recurrent_range.peak, "recurrent_scale": self.recurrent_scale}
        if longrope:  # transformers picks the factors by sequence length; the package by its context
            numerics["longrope_factors"] = sorted(longrope)
        return numerics

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
        program = build_program(self.spec, chunk, self.block, self.target.context, PlaceholderWeights(package.blobs),
                                self.stream_scale, self.recurrent_scale)
        package.finish(program)
        del program
        self.syncing.append(self.syncer.submit(fsync_tree, package.path))
        if len(self.target.precisions) > 1:
            stored = StoredWeights(package.path / PACKAGE_DATA / "weights" / WEIGHT_FILE, package.blobs)
            # Only the model's weights are compressed (the shared consts, RoPE tables and index ranges, stay exact),
            # and routers stay fp16 (they are E × hidden, a sliver of a layer): a rounded router that picks other
            # experts sends the token through other weights altogether.
            routers = {weight_id(("ffn_gate_inp", layer, "weight")) for layer in self.sparse_layers(chunk)}
            # so do the short convolutions' kernels: kernel × hidden numbers each, which every token goes through,
            # and the gated delta rule's and Mamba2's kernels, decay rates and dt biases (and Mamba2's D)
            kernels = {weight_id(("shortconv.conv", layer, "weight")) for layer in chunk.mixer_layers("short_conv")}
            kernels |= {weight_id((role, layer, "weight")) for layer in chunk.mixer_layers("gated_delta")
                        for role in ("ssm_conv1d", "ssm_a", "ssm_dt")}
            kernels |= {weight_id((role, layer, "weight")) for layer in chunk.mixer_layers("mamba2")
                        for role in ("ssm_conv1d", "ssm_a", "ssm_dt", "ssm_d")}
            # and the attention sinks, a logit per head that several ops of the softmax read (graph.sink_softmax)
            if self.spec.attention_sinks:
                kernels |= {weight_id(("attn_sinks", layer, "weight")) for layer in chunk.mixer_layers("attention")}
            weights = package.blobs.keys() - routers - kernels
            for precision in self.target.precisions[1:]:
                if precision != self.planned:
                    self._compress(chunk, stored, precision, lambda w, p=precision: p if w in weights else None)
            if self.planner is not None:
                self.fp16_blobs[chunk.index] = package.blobs
                self.planner.measure(chunk, self._function(chunk, stored), self.needed[chunk.index], package.path)

    def _compress_planned(self) -> None:
        """The planned variant: the plan over every chunk's measured costs, then each chunk compressed at its
        weights' planned precisions, read back from its fp16 package."""
        copied = [self.checkpoint.path / "config.json", *self.checkpoint.tokenizer_files()]
        other = sum(f.stat().st_size for f in copied) + len(json.dumps(self.manifest(self.planned), indent=2)) + 1
        self.quant_plan = self.planner.plan(other)
        for chunk in self.chunks:
            stored = StoredWeights(self.work["fp16"] / chunk.package / PACKAGE_DATA / "weights" / WEIGHT_FILE,
                                   self.fp16_blobs[chunk.index])
            self._compress(chunk, stored, self.planned, self.planner.precisions(self.quant_plan, chunk).get)

    def _function(self, chunk: Chunk, stored: StoredWeights):
        """The chunk's one-token function on its stored fp16 weights: what coremltools' pass compresses."""
        return build_function(self.spec, chunk, 1, self.target.context, stored, self.stream_scale,
                              self.recurrent_scale)

    def _compress(self, chunk: Chunk, stored: StoredWeights, variant: str,
                  precision_of: Callable[[str], str | None]) -> None:
        """A compressed variant, each weight at `precision_of(weight id)` (None: fp16), read back from the fp16
        package (memory-mapped): coremltools' quantization pass runs on one function, and both functions take
        the weights it chose. Slower than the fp16 path, and it holds the chunk's compressed weights until its
        package is written."""
        importance = self.columns.by_weight(chunk, self.needed[chunk.index]) if self.columns else {}
        hessians = self.hessians.by_weight(chunk, self.needed[chunk.index]) if self.hessians else {}
        quantized = quantize_weights(self._function(chunk, stored), precision_of, importance.get, hessians.get)
        scales = self._input_scales(chunk, quantized.keys()) if variant == W8A8 else None
        program = build_program(self.spec, chunk, self.block, self.target.context,
                                QuantizedWeights(stored, quantized, scales), self.stream_scale, self.recurrent_scale)
        package = self.work[variant] / chunk.package
        (package / PACKAGE_DATA / "weights").mkdir(parents=True)
        write_package(package, export(program, MILProtoExporter(program, str(package / PACKAGE_DATA / "weights"),
                                                                SPEC_VERSION)))
        self.syncing.append(self.syncer.submit(fsync_tree, package))

    def _input_scales(self, chunk: Chunk, compressed) -> dict[str, np.float16]:
        """Weight id → the int8 scale of its layer's input, for the `compressed` weights of a chunk that a linear
        layer reads (an embedding's lookup reads none): the calibration's peak of the source layer's input, at the
        scale the graph holds that input (folds.py input_scale). Weights left fp16 (routers, kernels) keep fp16
        inputs."""
        scales = {}
        for key in self.needed[chunk.index]:
            for weight, rows in blobs_of(self.spec, chunk, key):
                peak = self.input_peaks.of(chunk, key, rows) if weight in compressed else None
                if peak is not None:
                    factor = input_scale(key[0], self.stream_scale, self.state_scale)
                    scales[weight] = activation_scale(float(np.max(peak)) * factor)
        return scales


def prefill_block(context: int) -> int:
    """Tokens per prefill call: PREFILL_BLOCK, or the largest power of two below it that divides the
    context, so that blocks tile the cache exactly (a block never writes past the last slot)."""
    block = PREFILL_BLOCK
    while context % block:
        block //= 2
    return block
