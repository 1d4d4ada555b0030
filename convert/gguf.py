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
- The BPE pre-tokenizer. llama.cpp names its pre-tokenizers; the name is chosen here from the regexes
  tokenizer.json actually applies (`BPE_PRE_TOKENIZERS`), never from a hash of sample outputs.
"""

from __future__ import annotations

import json
import math
import os
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QType
from gguf import LlamaFileType, TokenType
from sentencepiece import sentencepiece_model_pb2

from siliconvert.artifacts import Artifact, Writer, sync_file
from siliconvert.checkpoint import Checkpoint
from siliconvert.convert.gguf_arch import GGUFArch
from siliconvert.errors import CheckpointError, RecipeError
from siliconvert.quantize.gguf import (
    LLAMA_CPP_QUANTS,
    QuantizedTensor,
    TensorQuantizer,
    calibration_text,
    importance_matrix,
    plan_types,
    quantize,
)
from siliconvert.recipe import GGUFTarget

# ---- knowledge as data ---------------------------------------------------------------------------


# Types chosen without llama.cpp's planner: (tensor type of the 2-D weights, general.file_type).
DIRECT_TYPES = {
    "F32": (QType.F32, LlamaFileType.ALL_F32),
    "F16": (QType.F16, LlamaFileType.MOSTLY_F16),
    "BF16": (QType.BF16, LlamaFileType.MOSTLY_BF16),
    "Q8_0": (QType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
}
# The lossless full-precision type for a source dtype: what llama.cpp's quantizer reads.
LOSSLESS = {"BF16": "BF16", "F16": "F16", "F32": "F32"}
FLOAT_TYPES = (QType.F32, QType.F16, QType.BF16)  # converted here; every other type is llama.cpp's work
IN_FLIGHT_BYTES = 384 << 20  # float32 source bytes waiting for the quantizer before the stream waits

# Regexes tokenizers' pre-tokenizers apply, as tokenizer.json spells them.
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""  # ByteLevel's own
SINGLE_DIGITS = r"\p{N}"  # Digits(individual_digits=True)
LLAMA3_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
               r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN35_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+"""
                r"""[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
# The splits a byte-level BPE applies, in order → llama.cpp's pre-tokenizer implementing exactly them
# (src/llama-vocab.cpp), and whether that pre-tokenizer looks whole words up before merging (ignore_merges).
BPE_PRE_TOKENIZERS: dict[tuple[str, ...], tuple[str, bool]] = {
    (GPT2_SPLIT,): ("gpt-2", False),
    (SINGLE_DIGITS, GPT2_SPLIT): ("starcoder", False),
    (LLAMA3_SPLIT,): ("llama-bpe", True),
    (QWEN2_SPLIT,): ("qwen2", False),
    (QWEN35_SPLIT,): ("qwen35", False),
}
# Normalizers llama.cpp's BPE tokenizer may skip: NFC leaves already-composed text (nearly all text) as is.
HARMLESS_NORMALIZERS = (None, "NFC")


# ---- the writer ----------------------------------------------------------------------------------


class GGUFWriter(Writer):
    """Streams a checkpoint into `<model_name>-<QUANT>.gguf` files, one per quant in the target."""

    def __init__(self, checkpoint: Checkpoint, target: GGUFTarget, out_dir: Path, model_name: str):
        self.checkpoint, self.target, self.out_dir, self.model_name = checkpoint, target, out_dir, model_name
        self.arch = GGUFArch(checkpoint.spec, checkpoint.path)
        self.names = _tensor_names(self.arch.arch)
        self.order = [i.name for i in checkpoint.stream_order() if self._gguf_name(i.name) is not None]
        self._pending = deque(self.order)
        self._index = 0  # position of the next tensor in self.order
        shapes = [(self._gguf_name(n), checkpoint.tensor_infos[n].shape) for n in self.order]
        quantized = any(q not in DIRECT_TYPES for q in target.quants)
        self.imatrix = self._importance_matrix() if target.imatrix and quantized else None
        # quant → (general.file_type, every tensor's type in self.order)
        self.plans: dict[str, tuple[LlamaFileType, list[QType]]] = {}
        for quant in target.quants:
            plan = self._plan(quant, shapes)
            if plan is not None:
                self.plans[quant] = plan
        # Quants whose per-tensor plan this llama.cpp cannot give: its whole-file quantizer makes them.
        self.from_file = [q for q in target.quants if q not in self.plans]
        if self.from_file and self._full_precision() not in self.plans:
            self.plans[self._full_precision()] = self._plan(self._full_precision(), shapes)
        self.metadata = self._metadata()
        out_dir.mkdir(parents=True, exist_ok=True)
        self.files: dict[str, tuple[Path, gguf.GGUFWriter]] = {}
        for quant, (file_type, types) in self.plans.items():
            temp = out_dir / f".{model_name}-{quant}.gguf.partial"
            self.files[quant] = (temp, self._open(temp, file_type, types))
        needs_llama_cpp = any(t not in FLOAT_TYPES for _, types in self.plans.values() for t in types)
        self.quantizer = TensorQuantizer() if needs_llama_cpp else None
        # tensors handed to the quantizer, oldest first: (per file: bytes or work in progress, source bytes)
        self._queue: deque[tuple[list[np.ndarray | QuantizedTensor], int]] = deque()
        self._in_flight = 0

    def add(self, name: str, array: np.ndarray) -> None:
        gguf_name = self._gguf_name(name)
        if gguf_name is None:
            return  # dropped: rotary caches, or the stored copy of a tied head
        if not self._pending or self._pending[0] != name:
            expected = self._pending[0] if self._pending else "nothing"
            raise ValueError(f"GGUF writer got tensor {name!r} out of order (expected {expected})")
        self._pending.popleft()
        array = self._to_llama_cpp_layout(name, array)
        parts = [self._encode(name, gguf_name, array, types[self._index]) for _, types in self.plans.values()]
        self._index += 1
        self._queue.append((parts, array.nbytes))
        self._in_flight += array.nbytes
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
        return [Artifact("gguf", q, self._path(q)) for q in self.target.quants]

    def abort(self) -> None:
        if self.quantizer is not None:
            self.quantizer.close()
        for temp, writer in self.files.values():
            writer.close()
            temp.unlink(missing_ok=True)

    def _encode(self, name: str, gguf_name: str, array: np.ndarray, qtype: QType) -> np.ndarray | QuantizedTensor:
        """The tensor's bytes in `qtype`, or llama.cpp's work in progress on them."""
        if qtype not in FLOAT_TYPES:
            imatrix = self.imatrix.get(gguf_name) if self.imatrix else None
            return self.quantizer.submit(array.reshape(-1, array.shape[-1]), qtype, imatrix)
        data = gguf.quants.quantize(array, qtype)
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
        return self.out_dir / f"{self.model_name}-{quant}.gguf"

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
            return DIRECT_TYPES[quant][1], [_storage_type(name, shape, quant) for name, shape in shapes]
        planned = plan_types(gguf.MODEL_ARCH_NAMES[self.arch.arch], self.checkpoint.spec, shapes, quant,
                             has_imatrix=self.imatrix is not None)
        if planned is None:
            return None
        # What llama.cpp leaves unquantized keeps the type it has in the full-precision file it would read.
        kept = self._full_precision()
        types = [t if t is not None else _storage_type(name, shape, kept)
                 for t, (name, shape) in zip(planned, shapes, strict=True)]
        return LLAMA_CPP_QUANTS[quant], types

    def _metadata(self) -> gguf.GGUFWriter:
        """The key/values every file shares, gathered once in a writer that has no file."""
        metadata = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[self.arch.arch])
        metadata.add_name(self.model_name)
        self.arch.add_hyperparameters(metadata)
        add_tokenizer(metadata, self.checkpoint)
        return metadata

    def _open(self, path: Path, file_type: LlamaFileType, types: list[QType]) -> gguf.GGUFWriter:
        """Write everything but the tensor data: header, key/values, tensor infos (phases of gguf-py's writer)."""
        writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[self.arch.arch])
        for key, value in self.metadata.kv_data[0].items():
            if key != gguf.Keys.General.ARCHITECTURE:  # every writer adds its own
                writer.add_key_value(key, value.value, value.type, value.sub_type)
        # last, in this order, where llama.cpp's quantizer puts them (it sets both anew)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_file_type(file_type)
        extra = self.arch.extra_tensors()
        for name, values in extra.items():  # extra tensors come first: their data exists before the stream starts
            writer.add_tensor_info(self.names[name] + ".weight", values.shape, np.dtype(np.float32), values.nbytes)
        infos = self.checkpoint.tensor_infos
        for name, qtype in zip(self.order, types, strict=True):
            writer.add_tensor_info(self._gguf_name(name), infos[name].shape, np.dtype(np.float32),
                                   _nbytes(infos[name].shape, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for values in extra.values():
            writer.write_tensor_data(values)
        return writer

    # ---- tensors ---------------------------------------------------------------------------------
    def _gguf_name(self, hf_name: str) -> str | None:
        """GGUF's name for an HF tensor, or None for tensors llama.cpp does not take."""
        family, spec = self.checkpoint.family, self.checkpoint.spec
        if family.is_droppable(hf_name):
            return None
        role = family.role_of(hf_name)
        if role is None:
            raise CheckpointError(f"tensor {hf_name!r} has no role in the {spec.family} description",
                                  self.checkpoint.path)
        if role.role == "output" and spec.tie_word_embeddings:
            return None  # llama.cpp reuses token_embd when output.weight is absent
        base = self.arch.gguf_role(role.role)
        if base not in self.names:
            raise CheckpointError(f"llama.cpp's {self.arch.arch.name.lower()} has no tensor {base!r}",
                                  self.checkpoint.path)
        return f"{self.names[base].format(bid=role.layer)}.{role.kind}"

    def _to_llama_cpp_layout(self, name: str, array: np.ndarray) -> np.ndarray:
        role = self.checkpoint.family.role_of(name)
        return self.arch.to_llama_cpp(role.role, role.kind, array)

    def _importance_matrix(self) -> dict[str, np.ndarray]:
        """llama.cpp's importance matrix keyed by GGUF weight names (see quantize.gguf.importance_matrix)."""
        tie = self.checkpoint.spec.tie_word_embeddings
        name, text = calibration_text(self.target.imatrix)
        by_hf_name = importance_matrix(self.checkpoint.path, text, where=name)
        renamed = {}
        for hf_name, values in by_hf_name.items():
            # A tied head multiplies by token_embd, so llama.cpp looks its statistics up under that name.
            gguf_name = "token_embd.weight" if tie and hf_name == "lm_head.weight" else self._gguf_name(hf_name)
            if gguf_name is None:
                raise RecipeError(f"importance matrix entry {hf_name!r} has no GGUF tensor", name)
            renamed[gguf_name] = values
        return renamed


def _tensor_names(arch: gguf.MODEL_ARCH) -> dict[str, str]:
    """Role (GGUF's base name, as the architecture registry names roles) → gguf-py's name template, for the
    tensors llama.cpp's `arch` loads: "attn_output" → "blk.{bid}.attn_output"."""
    templates = (gguf.TENSOR_NAMES[kind] for kind in gguf.MODEL_TENSORS[arch])
    return {template.rsplit(".", 1)[-1]: template for template in templates}


def _storage_type(gguf_name: str, shape: tuple[int, ...], quant: str) -> QType:
    # Norms and other vectors stay F32, as llama.cpp's converter keeps them: they are tiny and ggml's
    # norm/add kernels take F32. A row that does not fill whole blocks cannot be Q8_0: F16, as there.
    if len(shape) == 1 or gguf_name.endswith("_norm.weight"):
        return QType.F32
    qtype = DIRECT_TYPES[quant][0]
    return qtype if shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0 else QType.F16


def _nbytes(shape: tuple[int, ...], qtype: QType) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape[:-1]) * shape[-1] // block * size


# ---- tokenizer -----------------------------------------------------------------------------------


def add_tokenizer(writer: gguf.GGUFWriter, checkpoint: Checkpoint) -> None:
    """Vocabulary, merges or scores, special tokens, add-bos/eos flags and chat template."""
    folder, vocab_size = checkpoint.path, checkpoint.spec.vocab_size
    tokenizer_json = _read_json(folder / "tokenizer.json")
    if tokenizer_json is not None and _is_byte_level_bpe(tokenizer_json):
        _add_byte_level_bpe(writer, tokenizer_json, vocab_size, folder / "tokenizer.json")
        model = "gpt2"
    elif (folder / "tokenizer.model").is_file():
        _add_sentencepiece(writer, folder, tokenizer_json, vocab_size)
        model = "llama"
    elif tokenizer_json is not None:
        raise CheckpointError("not a byte-level BPE tokenizer, and there is no tokenizer.model "
                              "(SentencePiece) next to it", folder / "tokenizer.json")
    else:
        raise CheckpointError("no tokenizer (neither tokenizer.json nor tokenizer.model)", folder)
    special = gguf.SpecialVocab(folder, load_merges=model == "gpt2", n_vocab=vocab_size)
    if model == "llama":  # SentencePiece's own ids fill what tokenizer_config.json leaves out
        proto = _sentencepiece_proto(folder / "tokenizer.model")
        for kind in ("unk", "bos", "eos", "pad"):
            token_id = getattr(proto.trainer_spec, f"{kind}_id")
            if 0 <= token_id < vocab_size:
                special.special_token_ids.setdefault(kind, token_id)
    # Both flags always written: llama.cpp's defaults differ by tokenizer kind and pre-tokenizer.
    # Without a word from the files, transformers adds a BOS for SentencePiece (LlamaTokenizer) only.
    special.add_special_token.setdefault("bos", model == "llama")
    special.add_special_token.setdefault("eos", False)
    template, special.chat_template = special.chat_template, None
    special.add_to_gguf(writer, quiet=True)
    if template is not None:
        _add_chat_templates(writer, template)


def _add_byte_level_bpe(writer: gguf.GGUFWriter, tokenizer: dict, vocab_size: int, where: Path) -> None:
    pre = bpe_pre_tokenizer(tokenizer, where)
    vocab: dict[int, tuple[str, TokenType]] = {i: (t, TokenType.NORMAL) for t, i in tokenizer["model"]["vocab"].items()}
    for added in tokenizer.get("added_tokens", []):
        # Special added tokens are control tokens (parsed only on request, like transformers' specials);
        # other added tokens llama.cpp matches everywhere, as transformers does.
        vocab[added["id"]] = (added["content"], TokenType.CONTROL if added["special"] else TokenType.USER_DEFINED)
    if max(vocab) >= vocab_size:
        raise CheckpointError(f"token id {max(vocab)} does not fit the model's vocab_size {vocab_size}", where)
    tokens = [vocab.get(i, (f"[PAD{i}]", TokenType.UNUSED)) for i in range(vocab_size)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list([text for text, _ in tokens])
    writer.add_token_types([kind for _, kind in tokens])


def bpe_pre_tokenizer(tokenizer: dict, where: Path) -> str:
    """llama.cpp's name for the pre-tokenizer tokenizer.json describes, from the regexes it applies."""
    normalizer = (tokenizer.get("normalizer") or {}).get("type")
    if normalizer not in HARMLESS_NORMALIZERS:
        raise CheckpointError(f"normalizer {normalizer!r} has no llama.cpp equivalent", where)
    splits = []
    for step in _flatten(tokenizer.get("pre_tokenizer")):
        kind = step["type"]
        if kind == "Split" and "Regex" in step["pattern"] and step["behavior"] == "Isolated" and not step["invert"]:
            splits.append(step["pattern"]["Regex"])
        elif kind == "Digits" and step.get("individual_digits"):
            splits.append(SINGLE_DIGITS)
        elif kind == "ByteLevel" and not step.get("add_prefix_space"):
            if step.get("use_regex", True):
                splits.append(GPT2_SPLIT)
        else:
            raise CheckpointError(f"pre-tokenizer step {json.dumps(step)} has no llama.cpp equivalent", where)
    if tuple(splits) not in BPE_PRE_TOKENIZERS:
        raise CheckpointError(f"llama.cpp has no pre-tokenizer splitting text by {splits}", where)
    name, ignore_merges = BPE_PRE_TOKENIZERS[tuple(splits)]
    if bool(tokenizer["model"].get("ignore_merges")) != ignore_merges:
        raise CheckpointError(f"ignore_merges={not ignore_merges} does not match llama.cpp's {name!r} "
                              f"pre-tokenizer, which has ignore_merges={ignore_merges}", where)
    return name


def _add_sentencepiece(writer: gguf.GGUFWriter, folder: Path, tokenizer_json: dict | None, vocab_size: int) -> None:
    where = folder / "tokenizer.model"
    proto = _sentencepiece_proto(where)
    if proto.trainer_spec.model_type != proto.trainer_spec.BPE:
        raise CheckpointError("only SentencePiece BPE models have a llama.cpp equivalent", where)
    if len(proto.pieces) > vocab_size:
        raise CheckpointError(f"{len(proto.pieces)} pieces do not fit the model's vocab_size {vocab_size}", where)
    # SentencePiece's piece types are numbered as GGUF's token types (normal, unknown, control, ...).
    tokens = [(p.piece, p.score, TokenType(p.type)) for p in proto.pieces]
    tokens += [(f"[PAD{i}]", -1000.0, TokenType.UNUSED) for i in range(len(tokens), vocab_size)]
    for token_id, content, special in _added_tokens(folder, tokenizer_json):
        if token_id < len(proto.pieces) and proto.pieces[token_id].piece == content:
            continue  # the piece itself (<s>, </s>, <unk>): SentencePiece's type is already right
        if token_id >= vocab_size:
            raise CheckpointError(f"added token {content!r} (id {token_id}) does not fit vocab_size {vocab_size}",
                                  folder)
        kind = TokenType.CONTROL if special else TokenType.USER_DEFINED
        tokens[token_id] = (content if special else content.replace("▁", " "), -1000.0, kind)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([text for text, _, _ in tokens])
    writer.add_token_scores([score for _, score, _ in tokens])
    writer.add_token_types([kind for _, _, kind in tokens])
    writer.add_add_space_prefix(proto.normalizer_spec.add_dummy_prefix)


def _added_tokens(folder: Path, tokenizer_json: dict | None) -> list[tuple[int, str, bool]]:
    """(id, text, special) of tokens added on top of the SentencePiece model, wherever transformers keeps them."""
    added = {t["id"]: (t["content"], t["special"]) for t in (tokenizer_json or {}).get("added_tokens", [])}
    config = _read_json(folder / "tokenizer_config.json") or {}
    for token_id, token in config.get("added_tokens_decoder", {}).items():
        added.setdefault(int(token_id), (token["content"], token.get("special", False)))
    return [(i, content, special) for i, (content, special) in sorted(added.items())]


def _add_chat_templates(writer: gguf.GGUFWriter, template: str | list[dict[str, str]]) -> None:
    # gguf-py's add_chat_template lists named templates from a set, in hash order: sorted here instead,
    # so that the same input gives the same bytes.
    if isinstance(template, str):
        writer.add_chat_template(template)
        return
    named = {t["name"]: t["template"] for t in template}
    for name in sorted(set(named) - {"default"}):
        writer.add_string(gguf.Keys.Tokenizer.CHAT_TEMPLATE_N.format(name=name), named[name])
    writer.add_array(gguf.Keys.Tokenizer.CHAT_TEMPLATES, sorted(set(named) - {"default"}))
    if "default" in named:
        writer.add_chat_template(named["default"])


def _is_byte_level_bpe(tokenizer: dict) -> bool:
    steps = [*_flatten(tokenizer.get("pre_tokenizer")), tokenizer.get("decoder") or {}]
    model = tokenizer.get("model", {})
    return (model.get("type") == "BPE" and not model.get("byte_fallback")
            and any(s.get("type") == "ByteLevel" for s in steps))


def _flatten(step: dict | None) -> list[dict]:
    if step is None:
        return []
    if step["type"] == "Sequence":
        return [s for inner in step["pretokenizers"] for s in _flatten(inner)]
    return [step]


def _sentencepiece_proto(path: Path) -> Any:
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception:  # protobuf's DecodeError, or worse on a damaged file
        raise CheckpointError("not a SentencePiece model", path) from None
    return proto


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"not valid JSON ({e})", path) from None
