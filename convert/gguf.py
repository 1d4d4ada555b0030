"""GGUF: the single file llama.cpp, Ollama and LM Studio load, written with gguf-py in one streamed pass.

`GGUFWriter` writes the header, the key/values (hyper-parameters from the ModelSpec, tokenizer) and every
tensor's info up front, then each tensor's data as it arrives. F32/F16/BF16 it converts itself; quantized
types (Q8_0, Q4_K_M, ...) are made by llama.cpp's own code, tensor by tensor, on a pool of threads while the
stream goes on (siliconvert.quantize.gguf): a few tensors are in flight at a time, never the model. Where
this llama.cpp lacks the per-tensor planner, K-quants are made the old way, by llama.cpp's whole-file
quantizer on a full-precision GGUF written in the same pass.

Two things llama.cpp cannot tell from the file if they are wrong, so they are derived with care here:
- RoPE layout. HF Llama/Mistral rotate dimension i with i + head_dim/2 ("rotate half"); llama.cpp's
  `llama` architecture rotates adjacent pairs (2i, 2i+1). llama.cpp's converter (LlamaModel.permute)
  reorders the rows of q and k per head so that pairs become adjacent; Qwen2 runs NEOX-style rope in
  llama.cpp, which is rotate-half, so its rows stay as they are.
- The tokenizer: convert/gguf_vocab.py writes a vocabulary llama.cpp tokenizes as the source does.

A mixture of experts arrives as one stack per layer and part (transformers' gate_up [E, 2·ff, d], down
[E, d, ff]); llama.cpp's ffn_gate_exps and ffn_up_exps are the two halves of the first, written from views
of it, and the quantizer takes each expert's rows with that expert's importance-matrix row.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QType
from gguf import LlamaFileType

from siliconvert import padding
from siliconvert.architectures import TensorRole
from siliconvert.artifacts import Artifact, Writer, sync_file
from siliconvert.calibration import BUILTIN, IMPORTANCE, SENSITIVITY, Calibration, Calibrations
from siliconvert.checkpoint import Checkpoint, TensorInfo
from siliconvert.convert.gguf_arch import GGUFArch
from siliconvert.convert.gguf_vocab import add_tokenizer
from siliconvert.errors import CheckpointError, RecipeError, RuntimeMissingError
from siliconvert.gains import EMBEDDING, HEAD
from siliconvert.progress import track
from siliconvert.quantize.gguf import (
    LLAMA_CPP_QUANTS,
    QuantizedTensor,
    TensorQuantizer,
    plan_types,
    quantize,
)
from siliconvert.quantize.mxfp4 import exact_mxfp4
from siliconvert.quantize.plan import Plan, make_plan
from siliconvert.quantize.sensitivity import TensorCosts, gguf_costs, role_gain, split_gains
from siliconvert.recipe import GGUF_QUANTS, GGUFTarget

# ---- knowledge as data ---------------------------------------------------------------------------


# Types chosen without llama.cpp's planner: (tensor type of the 2-D weights, general.file_type); F32 is no recipe
# type, but the lossless one of a float32 source (LOSSLESS), which the whole-file quantizer reads.
DIRECT_TYPES = {
    "F32": (QType.F32, LlamaFileType.ALL_F32),
    **{name: (QType[name], LlamaFileType[f"MOSTLY_{name}"]) for name, (chosen, _) in GGUF_QUANTS.items()
       if chosen == "direct"},
}
# general.file_type of a planned file: the file type whose main type holds most of the planned weights
PLANNED_FILE_TYPES = {
    QType.Q2_K.name: LlamaFileType.MOSTLY_Q2_K, QType.Q3_K.name: LlamaFileType.MOSTLY_Q3_K_M,
    QType.IQ4_NL.name: LlamaFileType.MOSTLY_IQ4_NL, QType.Q4_0.name: LlamaFileType.MOSTLY_Q4_0,
    QType.Q4_1.name: LlamaFileType.MOSTLY_Q4_1, QType.Q4_K.name: LlamaFileType.MOSTLY_Q4_K_M,
    QType.Q5_0.name: LlamaFileType.MOSTLY_Q5_0, QType.Q5_1.name: LlamaFileType.MOSTLY_Q5_1,
    QType.Q5_K.name: LlamaFileType.MOSTLY_Q5_K_M,
    QType.Q6_K.name: LlamaFileType.MOSTLY_Q6_K, QType.Q8_0.name: LlamaFileType.MOSTLY_Q8_0,
    QType.F16.name: LlamaFileType.MOSTLY_F16,
    QType.IQ4_XS.name: LlamaFileType.MOSTLY_IQ4_XS, QType.IQ3_S.name: LlamaFileType.MOSTLY_IQ3_S,
    QType.IQ3_XXS.name: LlamaFileType.MOSTLY_IQ3_XXS, QType.IQ2_S.name: LlamaFileType.MOSTLY_IQ2_S,
    QType.IQ2_XXS.name: LlamaFileType.MOSTLY_IQ2_XXS, QType.MXFP4.name: LlamaFileType.MOSTLY_MXFP4_MOE,
}
# The lossless full-precision type for a source dtype: what llama.cpp's quantizer reads.
LOSSLESS = {"BF16": "BF16", "F16": "F16", "F32": "F32"}
FLOAT_TYPES = (QType.F32, QType.F16, QType.BF16)  # converted here; every other type is llama.cpp's work
# Tokens llama.cpp's vocabulary loader looks up by name in a model whose general.name says phi3 (llama-vocab.cpp)
PHI3_NAME_TOKENS = ("</s>", "<unk>", "<s>", "<|endoftext|>")
# 2-D tensors llama.cpp's converter always writes as F32: the routers (a shared expert's [1, hidden] gate too), and
# the short convolutions' kernels (ggml's ssm_conv takes F32 only; llama.cpp's quantizer never touches them)
FLOAT32_ROLES = (".ffn_gate_inp.", ".ffn_gate_inp_shexp.", ".shortconv.conv.", ".ssm_conv1d.")
IN_FLIGHT_BYTES = 384 << 20  # float32 source bytes waiting for the quantizer before the stream waits
# A planned file pads a dense gated MLP (siliconvert/padding.py, GGUFWriter._padded_ffn_width): the axis of each of
# its tensors (numpy order) that is the MLP's width
PADDED_FFN_AXES = {"ffn_gate": 0, "ffn_up": 0, "ffn_down": 1}


# ---- the writer ----------------------------------------------------------------------------------


def calibration_needs(target: GGUFTarget) -> dict[str, set[str]]:
    """Calibration text → the parts a target's writer asks for: an importance matrix (and, for a mixture's plan,
    the tokens routed per expert, from the same hooks) where llama.cpp quantizes with one or a plan weighs by it,
    and for a plan each weight's measured gain."""
    if not _uses_imatrix(target):
        return {}
    # a plan's costs are weighed by the gains measured on this model, on the same text
    return {_imatrix_text(target): {IMPORTANCE} | ({SENSITIVITY} if target.plan else set())}


def _uses_imatrix(target: GGUFTarget) -> bool:
    # a plan weighs each tensor's error by the importance matrix, and quantizes with it
    return target.imatrix_text is not None and any(q not in DIRECT_TYPES for q in target.quants)


def _imatrix_text(target: GGUFTarget) -> str:
    return target.imatrix_text or BUILTIN


class GGUFWriter(Writer):
    """Streams a checkpoint into `<model_name>-<QUANT>.gguf` files, one per quant in the target. `calibration`:
    the run's calibrations (none: Calibrations.outside_a_run, cached in the user's cache)."""

    def __init__(self, checkpoint: Checkpoint, target: GGUFTarget, out_dir: Path, model_name: str, *,
                 calibration: Calibrations | None = None):
        self.checkpoint, self.target, self.out_dir, self.model_name = checkpoint, target, out_dir, model_name
        self.calibration = calibration or Calibrations.outside_a_run(checkpoint)
        self.arch = GGUFArch(checkpoint.spec, checkpoint.path)
        self.names = _tensor_names(self.arch.arch)
        self.order = checkpoint.stream_order()
        self._pending = deque(info.name for info in self.order)
        # every GGUF tensor (name, numpy shape) in file order: one per checkpoint tensor, or its parts
        self.outputs = [output for info in self.order for output in self._outputs(info)]
        self._index = 0  # position of the next tensor in self.outputs
        self.imatrix = self._importance_matrix() if _uses_imatrix(target) else None
        self.padded_ffn = self._padded_ffn_width() if "auto" in target.quants else None
        self.metadata = self._metadata()  # before the plans: a planned file's header is measured with it
        # quant → (general.file_type, every tensor's type in self.outputs)
        self.plans: dict[str, tuple[LlamaFileType, list[QType]]] = {}
        self.quant_plan: Plan | None = None  # the planned file's choices, for "auto"
        self.costs: list[TensorCosts] = []  # the planned tensors' measured candidates
        for quant in target.quants:
            plan = self._planned(self._file_outputs(quant)) if quant == "auto" else self._plan(quant, self.outputs)
            if plan is not None:
                self.plans[quant] = plan
        # Quants whose per-tensor plan this llama.cpp cannot give: its whole-file quantizer makes them.
        self.from_file = [q for q in target.quants if q not in self.plans]
        if self.from_file and self._full_precision() not in self.plans:
            self.plans[self._full_precision()] = self._plan(self._full_precision(), self.outputs)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.files: dict[str, tuple[Path, gguf.GGUFWriter]] = {}
        for quant, (file_type, types) in self.plans.items():
            temp = out_dir / f".{self._path(quant).name}.partial"
            self.files[quant] = (temp, self._open(temp, quant, file_type, types))
        # ... and MXFP4 for the stacks that arrived as MXFP4, encoded here exactly (quantize/mxfp4.py); MXFP4 of any
        # other weight (MXFP4_MOE, a plan's choice) is llama.cpp's to round
        arrived = self._arrived_mxfp4()
        sources = [info.name for info in self.order for _ in self._outputs(info)]
        needs_llama_cpp = any(t not in FLOAT_TYPES and not (t == QType.MXFP4 and source in arrived)
                              for _, types in self.plans.values() for source, t in zip(sources, types, strict=True))
        self.quantizer = TensorQuantizer() if needs_llama_cpp else None
        # tensors handed to the quantizer, oldest first: (per file: bytes or work in progress, source bytes)
        self._queue: deque[tuple[list[np.ndarray | QuantizedTensor], int]] = deque()
        self._in_flight = 0

    def add(self, info: TensorInfo, array: np.ndarray) -> None:
        if not self._pending or self._pending[0] != info.name:
            expected = self._pending[0] if self._pending else "nothing"
            raise ValueError(f"GGUF writer got tensor {info.name!r} out of order (expected {expected})")
        self._pending.popleft()
        role = info.role
        array = self.arch.to_llama_cpp(role.role, role.kind, array)
        # the parts are views of `array`: an expert stack is held once, until its last part is written
        for gguf_name, part in zip(self._gguf_names(role), self.arch.split(role.role, array), strict=True):
            encoded = [self._encode(info.name, gguf_name, self._padded(quant, gguf_name, part), types[self._index])
                       for quant, (_, types) in self.plans.items()]
            self._index += 1
            self._queue.append((encoded, part.nbytes))
            self._in_flight += part.nbytes
            self._write_finished(wait=False)

    def finish(self) -> list[Artifact]:
        if self._pending:
            raise ValueError(f"GGUF writer finished before tensor {self._pending[0]!r} arrived")
        self._write_finished(wait=True)
        if self.quantizer is not None:
            self.quantizer.close()
        finals: dict[str, Path] = {}
        for quant, (temp, writer) in self.files.items():
            writer.close()
            final = self._path(quant)
            if quant in self.target.quants:
                sync_file(temp)
                os.replace(temp, final)
                finals[quant] = final
            else:
                finals[quant] = temp  # the intermediate full-precision file: input to the quantizer only
        if self.from_file:
            source = finals[self._full_precision()]
            for quant in self.from_file:
                quantize(source, self._path(quant), quant, imatrix=self.imatrix)
        for temp, _ in self.files.values():
            temp.unlink(missing_ok=True)
        return [Artifact("gguf", self.target.file_quant(q), self._path(q),
                         plan=self._plan_summary() if q == "auto" else None,
                         source_quantization=self._arrived_statement(q)) for q in self.target.quants]

    def abort(self) -> None:
        if self.quantizer is not None:
            self.quantizer.close()
        for temp, writer in self.files.values():
            writer.close()
            temp.unlink(missing_ok=True)

    def _encode(self, name: str, gguf_name: str, array: np.ndarray, qtype: QType) -> np.ndarray | QuantizedTensor:
        """The tensor's bytes in `qtype`, or llama.cpp's work in progress on them."""
        if qtype == QType.MXFP4 and name in self._arrived_mxfp4():
            return ggml_mxfp4(*exact_mxfp4(array))
        if qtype not in FLOAT_TYPES:
            imatrix = self.imatrix.get(gguf_name) if self.imatrix else None
            return self.quantizer.submit(array, qtype, padding.padded_columns(imatrix, array.shape[-1]))
        data = np.ascontiguousarray(gguf.quants.quantize(array, qtype))  # F32 comes back as the (view) it got
        if data.dtype == np.float16 and not np.isfinite(data).all():
            raise CheckpointError(f"tensor {name!r} overflows float16; ask for BF16 instead", self.checkpoint.path)
        return data

    def _write_finished(self, wait: bool) -> None:
        """Write the oldest tensors whose bytes are ready, in order. Past IN_FLIGHT_BYTES of tensors in
        flight, wait for them: that is what bounds memory when the quantizer is slower than the stream."""
        while self._queue:
            parts, nbytes = self._queue[0]
            ready = all(isinstance(p, np.ndarray) or p.done() for p in parts)
            if not (ready or wait or self._in_flight > IN_FLIGHT_BYTES):
                return
            for part, (_, writer) in zip(parts, self.files.values(), strict=True):
                writer.write_tensor_data(part if isinstance(part, np.ndarray) else part.result())
            self._queue.popleft()
            self._in_flight -= nbytes

    # ---- plan ------------------------------------------------------------------------------------
    def _path(self, quant: str) -> Path:
        return self.out_dir / f"{self.model_name}-{self.target.file_quant(quant)}.gguf"

    def _full_precision(self) -> str:
        """The file llama.cpp's quantizer reads: one the user asked for, else lossless for the source."""
        for quant in ("BF16", "F16"):
            if quant in self.target.quants:
                return quant
        dtypes = {i.dtype for i in self.checkpoint.tensor_infos.values() if len(i.shape) > 1}
        return LOSSLESS[dtypes.pop()] if len(dtypes) == 1 else "F32"

    def _plan(self, quant: str,
              shapes: Sequence[tuple[str, tuple[int, ...]]]) -> tuple[LlamaFileType, list[QType]] | None:
        """(general.file_type, each tensor's type) for `quant`, or None where only llama.cpp's whole-file
        quantizer can tell."""
        if quant in DIRECT_TYPES:
            return DIRECT_TYPES[quant][1], self._kept_mxfp4([_storage_type(name, shape, quant)
                                                             for name, shape in shapes])
        planned = plan_types(gguf.MODEL_ARCH_NAMES[self.arch.arch], self.checkpoint.spec, shapes, quant,
                             has_imatrix=self.imatrix is not None, head_count_kv=self._planner_head_count_kv())
        if planned is None:
            return None
        # What llama.cpp leaves unquantized keeps the type it has in the full-precision file it would read.
        kept = self._full_precision()
        types = [t if t is not None else _storage_type(name, shape, kept)
                 for t, (name, shape) in zip(planned, shapes, strict=True)]
        return LLAMA_CPP_QUANTS[quant], self._kept_mxfp4(types)

    def _arrived_statement(self, quant: str) -> str | None:
        """How the file stores the tensors that arrived as MXFP4: kept, or re-quantized as which types."""
        arrived = self._arrived_mxfp4()
        if not arrived or quant not in self.plans:
            return None
        sources = [info.name for info in self.order for _ in self._outputs(info)]
        types = [qtype.name for source, qtype in zip(sources, self.plans[quant][1], strict=True) if source in arrived]
        kept = types.count(QType.MXFP4.name)
        other = sorted(set(types) - {QType.MXFP4.name})
        return (f"MXFP4 kept exact in {kept} of {len(types)} tensors" if not other else
                f"MXFP4 re-quantized in {len(types) - kept} of {len(types)} tensors (as {', '.join(other)}): "
                "the type asked for spends fewer bits per weight than MXFP4's 4.25")

    def _arrived_mxfp4(self) -> set[str]:
        quantization = self.checkpoint.quantization
        return set(quantization.tensors) if quantization is not None and quantization.method == "mxfp4" else set()

    def _kept_mxfp4(self, types: list[QType]) -> list[QType]:
        """The types with each weight that arrived as MXFP4 kept MXFP4 (exact: the source's own values), wherever
        the type chosen spends at least MXFP4's 4.25 bits per weight; a smaller type re-quantizes it as chosen."""
        arrived = self._arrived_mxfp4()
        if not arrived:
            return types
        sources = [info.name for info in self.order for _ in self._outputs(info)]
        return [QType.MXFP4 if source in arrived and _bits(qtype) >= _bits(QType.MXFP4) else qtype
                for source, qtype in zip(sources, types, strict=True)]

    def _planner_head_count_kv(self) -> int:
        """The k/v heads llama.cpp's quantizer sees: layer 0's (its n_gqa() reads layer 0; 0 for a recurrent one)."""
        return self.arch.layer_head_count_kv[0]

    def _planned(self, shapes: Sequence[tuple[str, tuple[int, ...]]]) -> tuple[LlamaFileType, list[QType]]:
        """(general.file_type, each tensor's type) of the planned file: every tensor llama.cpp would quantize
        gets the type quantize/plan.py picks from its measured costs (a read of the weights before the
        conversion's, one tensor at a time); what llama.cpp leaves unquantized stays as in a fixed quant. An expert
        stack is one tensor of one type, its experts weighed by the calibration tokens routed to each; the routers
        stay F32 (llama.cpp never quantizes them), a shared expert is planned as the dense tensors it is."""
        quantizable = plan_types(gguf.MODEL_ARCH_NAMES[self.arch.arch], self.checkpoint.spec, shapes, "Q4_K_M",
                                 has_imatrix=True, head_count_kv=self._planner_head_count_kv())
        if quantizable is None:
            raise RuntimeMissingError("this llama.cpp does not export the per-tensor planner (llama_quant_*) "
                                      "a planned GGUF needs")
        kept = self._full_precision()
        sources = [info.name for info in self.order for _ in self._outputs(info)]  # each output's HF tensor
        planned: dict[str, set[str]] = {}  # HF tensor → its outputs llama.cpp would quantize
        for hf, (gguf_name, _), qtype in zip(sources, shapes, quantizable, strict=True):
            if qtype is not None:
                planned.setdefault(hf, set()).add(gguf_name)
        routed: dict[str, np.ndarray] = {}  # HF expert stack → calibration tokens per expert
        if self.checkpoint.spec.experts is not None:
            routed = self.calibration.expert_tokens(_imatrix_text(self.target))  # the importance matrix's run
        measured = self.calibration.get(_imatrix_text(self.target), {SENSITIVITY})
        quantizer = TensorQuantizer()
        costs = self.costs
        try:
            stream = track(self.checkpoint.tensors(), "measuring llama.cpp types per tensor",
                           total=len(self.checkpoint.tensor_infos))
            for info, array in stream:
                if info.name in planned:
                    role = info.role.role
                    parts = self.arch.split(role, self.arch.to_llama_cpp(role, "weight", array))
                    gains = self._gains(info, parts, measured)
                    floors = self._input_klds(info, parts, measured)
                    for gguf_name, part, (gain, shrink_gain), floor in zip(self._gguf_names(info.role), parts, gains,
                                                                           floors, strict=True):
                        if gguf_name in planned[info.name]:
                            padded = self._padded("auto", gguf_name, part)
                            importance = padding.padded_columns(self.imatrix.get(gguf_name), padded.shape[-1])
                            cost = gguf_costs(gguf_name, padded, importance, quantizer, gain,
                                              routed_tokens=routed.get(info.name), shrink_gain=shrink_gain,
                                              input_klds=floor)
                            # bits per weight count the checkpoint's weights, not the padding's zeros
                            costs.append(dataclasses.replace(cost, params=part.size))
        finally:
            quantizer.close()
        # a row width no block divides (an intermediate_size of 200, say) still has F16, a candidate of every row
        fixed_types = [_storage_type(name, shape, kept) for name, shape in shapes]
        fixed = sum(_nbytes(shape, qtype) for shape, qtype, q in zip((shape for _, shape in shapes), fixed_types,
                                                                      quantizable, strict=True) if q is None)
        # each tensor's data starts on the file's alignment: up to alignment − 1 bytes of padding after the one before,
        # whatever type the plan gives it (a hybrid's many small F32 tensors made a planned file 96 bytes too big)
        alignment = (gguf.GGUF_DEFAULT_ALIGNMENT - 1) * len(shapes)
        self.quant_plan = make_plan(costs, self.target.plan,
                                    fixed_bytes=fixed + self._header_bytes(fixed_types) + alignment)
        types = [QType[self.quant_plan.choices[name].kind] if name in self.quant_plan.choices else fixed_type
                 for (name, _), fixed_type in zip(shapes, fixed_types, strict=True)]
        weights: dict[str, int] = {}
        for cost in costs:
            kind = self.quant_plan.choices[cost.name].kind
            weights[kind] = weights.get(kind, 0) + cost.params
        return PLANNED_FILE_TYPES[max(sorted(weights), key=weights.get)], types

    def _gains(self, info: TensorInfo, parts: list[np.ndarray],
               measured: Calibration) -> list[tuple[float, float | None]]:
        """Each GGUF part's (gain, shrink gain) to the mean KLD: the ones measured on this model (split by share
        where the checkpoint tensor is stored as parts; an embedding written again as the head has each path's
        own), or, for a weight the sensitivity forward did not measure, its role's gain fitted on the demo model
        (fitted on real quantization errors: no shrink gain)."""
        tied = self.checkpoint.spec.tie_word_embeddings
        names = self._gguf_names(info.role)
        if measured.gain(info.name) is None:
            return [(role_gain(info.role.role, tied), None)] * len(parts)
        if info.role.role == "token_embd" and len(parts) > 1:  # token_embd and output, one table
            paths = [HEAD if name == "output.weight" else EMBEDDING for name in names]
            return [(measured.gain(path), measured.shrink_gain(path)) for path in paths]
        columns = [self.imatrix.get(name) for name in names]
        gains = split_gains(measured.gain(info.name, tied), parts, columns)
        shrink_gain = measured.shrink_gain(info.name, tied)
        shrink_gains = [None] * len(parts) if shrink_gain is None else split_gains(shrink_gain, parts, columns)
        return list(zip(gains, shrink_gains, strict=True))

    def _input_klds(self, info: TensorInfo, parts: list[np.ndarray],
                    measured: Calibration) -> list[dict[str, float] | None]:
        """Each GGUF part's mean KLD of its input rounded by each of llama.cpp's roundings, measured on this model
        (`Calibration.input_kld`; split by share where the checkpoint tensor is stored as parts; the head's where an
        embedding is the head too), or None where it was not measured."""
        if not measured.input_klds or measured.gain(info.name) is None:
            return [None] * len(parts)
        tied = self.checkpoint.spec.tie_word_embeddings
        names = self._gguf_names(info.role)
        if info.role.role == "token_embd" and len(parts) > 1:  # token_embd and output, one table
            return [{kind: measured.input_kld(HEAD if name == "output.weight" else EMBEDDING, kind)
                     for kind in measured.input_klds} for name in names]
        columns = [self.imatrix.get(name) for name in names]
        split = {kind: split_gains(measured.input_kld(info.name, kind, tied), parts, columns)
                 for kind in measured.input_klds}
        return [{kind: shares[index] for kind, shares in split.items()} for index in range(len(parts))]

    def _header_bytes(self, types: list[QType]) -> int:
        """Bytes of the file before the tensors' data (header, key/values, tensor infos, the extra tensors):
        a size goal counts them. Measured by writing them; the types do not change their size."""
        scratch = self.out_dir / f".{self._path('auto').name}.header.partial"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        writer = self._open(scratch, "auto", LlamaFileType.MOSTLY_Q4_K_M, types)
        try:
            writer.fout[0].flush()
            return scratch.stat().st_size
        finally:
            writer.close()
            scratch.unlink(missing_ok=True)

    def _metadata(self) -> gguf.GGUFWriter:
        """The key/values every file shares, gathered once in a writer that has no file."""
        metadata = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[self.arch.arch])
        metadata.add_name(self.model_name)
        self.arch.add_hyperparameters(metadata)
        add_tokenizer(metadata, self.checkpoint)
        self._check_name_rules(metadata)
        return metadata

    def _check_name_rules(self, metadata: gguf.GGUFWriter) -> None:
        """llama.cpp's vocabulary loader changes token attributes by the model's *name*: for a name containing
        "phi3" or "phi-3" it looks up these tokens and fails to load the file when one is missing."""
        if not any(key in self.model_name.lower() for key in ("phi3", "phi-3")):
            return
        tokens = set(metadata.kv_data[0][gguf.Keys.Tokenizer.LIST].value)
        missing = [t for t in PHI3_NAME_TOKENS if t not in tokens]
        if missing:
            raise CheckpointError(f"llama.cpp cannot load a GGUF named {self.model_name!r} (the checkpoint's name): "
                                  f"its loader looks up {', '.join(missing)} in any model named phi3 or phi-3, and "
                                  "this vocabulary has none", self.checkpoint.path)

    def _open(self, path: Path, quant: str, file_type: LlamaFileType, types: list[QType]) -> gguf.GGUFWriter:
        """Write everything but the tensor data of `quant`'s file: header, key/values, tensor infos (phases of
        gguf-py's writer)."""
        architecture = gguf.MODEL_ARCH_NAMES[self.arch.arch]
        writer = gguf.GGUFWriter(path, architecture)
        padded_key = gguf.Keys.LLM.FEED_FORWARD_LENGTH.format(arch=architecture) if self._pads(quant) else None
        for key, value in self.metadata.kv_data[0].items():
            if key == padded_key:
                writer.add_key_value(key, self.padded_ffn, value.type)
            elif key != gguf.Keys.General.ARCHITECTURE:  # every writer adds its own
                writer.add_key_value(key, value.value, value.type, value.sub_type)
        # last, in this order, where llama.cpp's quantizer puts them (it sets both anew)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_file_type(file_type)
        extra = self.arch.extra_tensors()
        for name, values in extra.items():  # extra tensors come first: their data exists before the stream starts
            writer.add_tensor_info(self.names[name] + ".weight", values.shape, np.dtype(np.float32), values.nbytes)
        for (name, shape), qtype in zip(self._file_outputs(quant), types, strict=True):
            writer.add_tensor_info(name, shape, np.dtype(np.float32), _nbytes(shape, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for values in extra.values():
            writer.write_tensor_data(values)
        return writer

    def _plan_summary(self) -> dict:
        summary = self.quant_plan.summary()
        if self.padded_ffn is not None:
            summary["padded_ffn"] = padding.why(self.checkpoint.spec.intermediate_size, self.padded_ffn, "llama.cpp")
        return summary

    # ---- padding ---------------------------------------------------------------------------------
    def _padded_ffn_width(self) -> int | None:
        """The width a planned file pads the dense MLP to (siliconvert/padding.py), or None for none: where every
        quant keeps ffn_down F16 (llama-quantize's Q4_K_M too), a third of a small model's bytes. Only a gated MLP
        (ffn_gate, ffn_up, ffn_down) of one width in every layer, and only where no other tensor is as wide, since
        llama.cpp sizes them all by the one feed_forward_length key."""
        spec = self.checkpoint.spec
        width = spec.intermediate_size
        padded = padding.padded_width(width)
        if (padded is None or spec.experts is not None or self.arch.dense_as_shared
                or any(spec.layer_intermediate_size(i) != width for i in range(spec.num_layers))):
            return None
        counts = {base: 0 for base in PADDED_FFN_AXES}
        for name, shape in self.outputs:
            base = _base_name(name)
            if base in PADDED_FFN_AXES:
                counts[base] += name.endswith(".weight") and shape[PADDED_FFN_AXES[base]] == width
            elif width in shape:
                return None
        return padded if set(counts.values()) == {spec.num_layers} else None

    def _pads(self, quant: str) -> bool:
        return quant == "auto" and self.padded_ffn is not None

    def _file_outputs(self, quant: str) -> list[tuple[str, tuple[int, ...]]]:
        """`self.outputs` as `quant`'s file holds them: the planned file's MLP padded."""
        if not self._pads(quant):
            return self.outputs
        return [(name, self._padded_shape(quant, name, shape)) for name, shape in self.outputs]

    def _padded_shape(self, quant: str, gguf_name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        axis = PADDED_FFN_AXES.get(_base_name(gguf_name))
        if not self._pads(quant) or axis is None or axis >= len(shape):
            return shape
        return (*shape[:axis], self.padded_ffn, *shape[axis + 1:])

    def _padded(self, quant: str, gguf_name: str, array: np.ndarray) -> np.ndarray:
        """A tensor as `quant`'s file holds it: an MLP tensor of the planned file padded with zeros to its width."""
        shape = self._padded_shape(quant, gguf_name, array.shape)
        if shape == array.shape:
            return array
        return np.pad(array, [(0, new - old) for old, new in zip(array.shape, shape, strict=True)])

    # ---- tensors ---------------------------------------------------------------------------------
    def _gguf_names(self, role: TensorRole) -> list[str]:
        """GGUF's names for a checkpoint tensor of this role (an expert stack of gate and up rows is two). A tied
        checkpoint streams no head: llama.cpp reuses token_embd when output.weight is absent."""
        names = []
        for base in self.arch.gguf_roles(role.role):
            if base not in self.names:
                raise CheckpointError(f"llama.cpp's {self.arch.arch.name.lower()} has no tensor {base!r}",
                                      self.checkpoint.path)
            suffix = self.arch.suffix(base, role.kind, role.role)
            names.append(self.names[base].format(bid=role.layer) + (f".{suffix}" if suffix else ""))
        return names

    def _outputs(self, info: TensorInfo) -> list[tuple[str, tuple[int, ...]]]:
        """(GGUF name, numpy shape) of each tensor a checkpoint tensor is written as."""
        return list(zip(self._gguf_names(info.role), self.arch.shapes(info.role.role, info.shape), strict=True))

    def _importance_matrix(self) -> dict[str, np.ndarray]:
        """llama.cpp's importance matrix keyed by GGUF weight names (see siliconvert/calibration.py)."""
        tie = self.checkpoint.spec.tie_word_embeddings
        calibrated = self.calibration.get(_imatrix_text(self.target), {IMPORTANCE})
        name = calibrated.text
        renamed = {}
        for hf_name, values in calibrated.importance.items():
            # A tied head multiplies by token_embd, so llama.cpp looks its statistics up under that name (or
            # under output's, where the embedding is written again as the head).
            head = "output.weight" if self.arch.head_from_embedding else "token_embd.weight"
            info = self.checkpoint.tensor_infos.get(hf_name)
            gguf_names = ([head] if tie and hf_name == "lm_head.weight"
                          else self._gguf_names(info.role) if info is not None else [])
            if not gguf_names:
                raise RecipeError(f"importance matrix entry {hf_name!r} has no GGUF tensor", name)
            for gguf_name in gguf_names:  # gate and up of an expert stack read the same inputs
                renamed[gguf_name] = values if info is None else self.arch.importance_columns(info.role.role, values)
        return renamed


def _tensor_names(arch: gguf.MODEL_ARCH) -> dict[str, str]:
    """Role (GGUF's base name, as the architecture registry names roles) → gguf-py's name template, for the
    tensors llama.cpp's `arch` loads: "attn_output" → "blk.{bid}.attn_output", "shortconv.conv" →
    "blk.{bid}.shortconv.conv"."""
    templates = (gguf.TENSOR_NAMES[kind] for kind in gguf.MODEL_TENSORS[arch])
    return {template.removeprefix("blk.{bid}."): template for template in templates}


def _base_name(gguf_name: str) -> str:
    """A layer tensor's GGUF base name ("blk.3.ffn_down.weight" → "ffn_down"); "" for a tensor of no layer."""
    parts = gguf_name.split(".")
    return parts[2] if parts[0] == "blk" and len(parts) > 2 else ""


def _storage_type(gguf_name: str, shape: tuple[int, ...], quant: str) -> QType:
    # Norms and other vectors stay F32, as llama.cpp's converter keeps them: they are tiny and ggml's
    # norm/add kernels take F32. So does a mixture of experts' router, there and in llama.cpp's quantizer:
    # a rounded router picks other experts. So does every tensor whose name ends in no ".weight" (Mamba2's A and D,
    # [heads, 1]), there. A row that does not fill whole blocks cannot be Q8_0: F16, as there.
    if len(shape) == 1 or not gguf_name.endswith(".weight") or gguf_name.endswith("_norm.weight") or any(
            role in gguf_name for role in FLOAT32_ROLES):
        return QType.F32
    qtype = DIRECT_TYPES[quant][0]
    return qtype if shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0 else QType.F16


def _bits(qtype: QType) -> float:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return 8 * size / block


def ggml_mxfp4(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """MXFP4 blocks (codes [..., blocks, 16] in the hub's order: value 2j low, 2j + 1 high nibble; scales
    [..., blocks]) as ggml's block_mxfp4 rows [..., blocks × 17]: the scale byte, then value j low and j + 16 high."""
    values = np.stack([codes & 0x0F, codes >> 4], axis=-1).reshape(*codes.shape[:-1], 32)
    packed = values[..., :16] | (values[..., 16:] << 4)
    return np.concatenate([scales[..., None], packed], axis=-1).reshape(*codes.shape[:-2], -1)


def _nbytes(shape: tuple[int, ...], qtype: QType) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape[:-1]) * shape[-1] // block * size
