"""The source checkpoint: config, tokenizer files and a stream of tensors, one at a time.

Weights are never loaded as a model. Each safetensors header is checked here first (so a truncated
or hostile file gets a one-line error naming it), then tensors are read one by one through
safetensors' own reader and handed out as numpy arrays. bfloat16 comes out as float32 (exact);
float16 and float32 come out as they are.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import struct
import sys
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from stat import S_ISREG
from typing import Any

import numpy as np

from siliconvert.architectures import Family, ModelSpec, TensorRole, registry
from siliconvert.architectures.base import transformers_config
from siliconvert.config_check import check_config
from siliconvert.errors import CheckpointError, short

# Tokenizer files a release carries along, whichever the source has.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    # FP8 is read as its bytes: a weight with its scale beside it is dequantized (`read_tensor`), any other is refused
    "F8_E4M3": np.uint8, "F8_E5M2": np.uint8, "F8_E8M0": np.uint8,
}
FP8_DTYPES = frozenset({"F8_E4M3", "F8_E5M2", "F8_E8M0"})
# FP8 weights dequantized in the stream: their dtype → torch's name for it (its 256 values are read from torch)
FP8_WEIGHT_DTYPES = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
# What an FP8 weight's scale is named beside it (`<weight>_scale_inv`: transformers' fp8, DeepSeek's and Qwen's FP8
# releases; `<weight>_scale`: compressed-tensors' and Mistral's): both multiply the weight
FP8_SCALE_SUFFIXES = ("_scale_inv", "_scale")
# MXFP4 (the OCP microscaling format gpt-oss ships its experts in): `<weight>_blocks` [..., rows, groups, 16] bytes,
# two E2M1 values each (the low nibble first), and `<weight>_scales` [..., rows, groups], one E8M0 power of two
# (2^(byte − 127)) per 32 values; transformers' FP4_VALUES by nibble
MXFP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                        dtype=np.float32)
MXFP4_GROUP = 32
# The last part of a tensor name that only a quantized export writes (GPTQ/AWQ packing, bitsandbytes' states,
# FP8 and compressed-tensors scales, MXFP4 blocks, MLX's affine scales): a checkpoint holding one is quantized,
# whatever its config says.
QUANTIZED_TENSOR_SUFFIXES = (
    ".qweight", ".qzeros", ".g_idx", ".scales", ".biases", ".weight_scale", ".weight_scale_inv", ".input_scale",
    ".weight_packed", ".weight_zero_point", ".weight_shape", ".weight_global_scale", ".SCB", ".weight_format",
    ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4",
    ".quant_state.bitsandbytes__fp4", "_blocks", "_scales",
)
# A header larger than this is not a weights file; refusing it early avoids reading gigabytes of JSON.
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shard: Path
    dtype: str  # safetensors dtype code, e.g. "BF16"
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the shard (safetensors); -1 for a pickle entry
    nbytes: int
    # A stack of experts assembled from per-expert tensors: the parts, in row-major order (`stacked`)
    parts: tuple[TensorInfo, ...] = ()
    # What the tensor is in the model, resolved once by `Checkpoint.open` (None only in a shard's raw index, read
    # before the family is known): writers plan and convert by it, never by the name
    role: TensorRole | None = None
    # An FP8 weight's scale, one per block of `scale_block` rows × columns (per tensor: one block): read as their
    # product
    scale: TensorInfo | None = None
    scale_block: tuple[int, int] = (0, 0)
    # How the stream's layout is made from transformers' parameter (what the files hold, or an MXFP4 stack
    # dequantizes to), step by step: "transposed" swaps the last two axes, "interleaved" takes axis 1's even entries
    # then its odd ones (gpt-oss's gate and up). `shape` is the streamed one; transformers' forward reads without
    # (`read_model_tensor`)
    layout: tuple[str, ...] = ()

    def files(self) -> set[Path]:
        """The files the tensor's bytes come from."""
        if self.parts:
            return set().union(*(part.files() for part in self.parts))
        return {self.shard} | ({self.scale.shard} if self.scale is not None else set())


@dataclass(frozen=True)
class SourceQuantization:
    """How a checkpoint that arrives quantized is read: its method and what that means, for the report."""

    method: str  # config.json's quant_method
    description: str
    block: tuple[int, int] | None = None  # FP8's weight_block_size (rows, columns); None: per tensor or per row
    # the tensors that arrive quantized, by name (MXFP4 stacks: a format that holds MXFP4 keeps them exact)
    tensors: tuple[str, ...] = ()


def source_quantization(config: dict[str, Any], where: Path) -> SourceQuantization | None:
    """The quantization a checkpoint arrives in, where it is dequantized in the stream (FP8 weights with scales, per
    tensor or per block, activations quantized dynamically); every other method is refused, naming it."""
    settings = config.get("quantization_config")
    if isinstance(settings, dict) and str(settings.get("quant_method", "")).lower() == "mxfp4":
        refuse_quantized_config({key: value for key, value in config.items() if key != "quantization_config"}, where)
        return SourceQuantization("mxfp4", "MXFP4 weights (E2M1 values, a power-of-two scale per 32), dequantized to "
                                           "float32 one tensor at a time as they stream (the values transformers' "
                                           "MXFP4 dequantization gives)")
    if isinstance(settings, dict) and str(settings.get("quant_method", "")).lower() == "fp8":
        if settings.get("activation_scheme", "dynamic") != "dynamic":
            raise CheckpointError(f"quantization_config.activation_scheme is {settings['activation_scheme']!r}: FP8 "
                                  "with static activation scales is not supported (dynamic is)", where)
        block = settings.get("weight_block_size")
        if block is not None and not (isinstance(block, list) and len(block) == 2
                                      and all(isinstance(b, int) and not isinstance(b, bool) and b > 0
                                              for b in block)):
            raise CheckpointError(f"quantization_config.weight_block_size {short(block)} is not two positive "
                                  "integers", where)
        blocks = f"{block[0]}×{block[1]} block scales" if block else "per-tensor scales"
        refuse_quantized_config({key: value for key, value in config.items() if key != "quantization_config"}, where)
        return SourceQuantization("fp8", f"FP8 weights with {blocks}, dequantized to float32 one tensor at a time "
                                         "as they stream (as transformers' FP8 dequantization computes them)",
                                  tuple(block) if block else None)
    refuse_quantized_config(config, where)
    return None


def pair_fp8_scales(tensors: dict[str, TensorInfo], quantization: SourceQuantization | None,
                    where: Path) -> dict[str, TensorInfo]:
    """Each FP8 weight with its scale attached (the scale tensors themselves leave the index), for a source whose
    config says FP8; any FP8 tensor without a scale, or a scale without its weight, is refused."""
    if quantization is None or quantization.method != "fp8":
        return tensors
    paired = dict(tensors)
    for name, info in tensors.items():
        if info.dtype not in FP8_DTYPES:
            continue
        scale_name = next((name + suffix for suffix in FP8_SCALE_SUFFIXES if name + suffix in tensors), None)
        if info.dtype not in FP8_WEIGHT_DTYPES or scale_name is None or len(info.shape) != 2:
            raise CheckpointError(f"tensor {short(name)} ({info.dtype} {list(info.shape)}) is FP8 without a scale "
                                  f"beside it ({name}_scale_inv)", info.shard)
        scale = paired.pop(scale_name)
        if scale.dtype not in ("F32", "BF16", "F16") or len(scale.shape) > 2 or scale.parts:
            raise CheckpointError(f"tensor {short(scale_name)} ({scale.dtype} {list(scale.shape)}) is not a "
                                  "float scale of at most two axes", scale.shard)
        block = _scale_blocks(info.shape, scale.shape, quantization.block, scale_name, scale.shard)
        paired[name] = replace(info, scale=scale, scale_block=block)
    if not any(info.scale is not None for info in paired.values()):
        raise CheckpointError("quantization_config says the weights are FP8, but no tensor is", where)
    return paired


def pair_mxfp4_blocks(tensors: dict[str, TensorInfo], quantization: SourceQuantization | None,
                      where: Path) -> tuple[dict[str, TensorInfo], SourceQuantization | None]:
    """Each MXFP4 `<weight>_blocks` with its `<weight>_scales` as one tensor `<weight>` (dtype "MXFP4") of the shape
    transformers dequantizes it to ([..., columns, rows]: its experts hold inputs × outputs), for a source whose
    config says MXFP4; the quantization, naming the paired tensors. Blocks without scales, or of another shape, are
    refused."""
    if quantization is None or quantization.method != "mxfp4":
        return tensors, quantization
    paired = dict(tensors)
    for name, blocks in tensors.items():
        if not name.endswith("_blocks"):
            continue
        weight = name.removesuffix("_blocks")
        scales = paired.pop(weight + "_scales", None)
        if scales is None or blocks.dtype != "U8" or scales.dtype != "U8" or len(blocks.shape) < 3 or (
                blocks.shape[-1] != MXFP4_GROUP // 2 or scales.shape != blocks.shape[:-1]):
            raise CheckpointError(f"tensor {short(name)} ({blocks.dtype} {list(blocks.shape)}) is not MXFP4 blocks "
                                  f"[..., rows, groups, 16] with U8 scales [..., rows, groups] beside it "
                                  f"({weight}_scales)", blocks.shard)
        if weight in paired:
            raise CheckpointError(f"tensor {short(weight)} is stored both as floats and as MXFP4 blocks", blocks.shard)
        *outer, rows, groups, _ = blocks.shape
        del paired[name]
        paired[weight] = TensorInfo(weight, blocks.shard, "MXFP4", (*outer, groups * MXFP4_GROUP, rows),
                                    blocks.offset, blocks.nbytes, scale=scales)
    mxfp4 = tuple(sorted(name for name, info in paired.items() if info.dtype == "MXFP4"))
    if not mxfp4:
        raise CheckpointError("quantization_config says the weights are MXFP4, but no tensor has _blocks and "
                              "_scales", where)
    return paired, replace(quantization, tensors=mxfp4)


def _scale_blocks(shape: tuple[int, ...], scale_shape: tuple[int, ...], block: tuple[int, int] | None, name: str,
                  where: Path) -> tuple[int, int]:
    """The block of weights each scale covers (rows, columns): the config's weight_block_size, whose grid (rounded
    up at the edges) the scale must have; without one, a scale per tensor, per row or per column."""
    rows, cols = shape
    scale_rows, scale_cols = _scale_grid(scale_shape)
    if block is None:
        if scale_rows not in (1, rows) or scale_cols not in (1, cols):
            raise CheckpointError(f"tensor {short(name)} {list(scale_shape)} scales blocks of its weight "
                                  f"{list(shape)}, but quantization_config names no weight_block_size", where)
        return rows // scale_rows, cols // scale_cols
    if (scale_rows, scale_cols) != (-(-rows // block[0]), -(-cols // block[1])):
        raise CheckpointError(f"tensor {short(name)} {list(scale_shape)} is not the grid of {block[0]}×{block[1]} "
                              f"blocks over its weight {list(shape)}", where)
    return block


def _scale_grid(scale_shape: tuple[int, ...]) -> tuple[int, int]:
    """A scale's (rows, columns) of blocks: one per tensor (no axis), one per row (one axis), or a grid."""
    return (*scale_shape, 1, 1)[:2]


def stacked(name: str, experts: list[list[TensorInfo]]) -> TensorInfo:
    """One tensor [experts, k·rows, cols] of each expert's k equal parts [rows, cols] (gate and up, say) one
    under the other: what transformers' loader builds from per-expert tensors. Nothing is read here."""
    parts = [part for expert in experts for part in expert]
    first = parts[0]
    for part in parts:
        if part.shape != first.shape or part.dtype != first.dtype or len(part.shape) != 2:
            raise CheckpointError(f"tensor {part.name!r} ({part.dtype} {list(part.shape)}) cannot be stacked with "
                                  f"{first.name!r} ({first.dtype} {list(first.shape)}) into {name!r}", part.shard)
    rows, cols = first.shape
    return TensorInfo(name, first.shard, first.dtype, (len(experts), len(experts[0]) * rows, cols), first.offset,
                      sum(part.nbytes for part in parts), tuple(parts))


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check one safetensors header by the format's rules, as the safetensors library enforces them:
    the header's length within the file, a UTF-8 JSON object that starts with '{', known dtypes, each byte span
    equal to its shape × dtype size, spans that tile the data section exactly (no overlap, no hole, nothing
    after the last) and `__metadata__` a string → string map."""
    size = regular_file(path).st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError("truncated safetensors file (no header)", path)
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(
                f"safetensors header length {header_len} is absurd for a {size}-byte file", path
            )
        raw = f.read(header_len)
    header = _parse_header(raw, path)
    data_start, data_size = 8 + header_len, size - 8 - header_len
    infos: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            _check_metadata(entry, path)
            continue
        dtype, shape, begin, end = _header_entry(name, entry, path)
        if end > data_size:
            raise CheckpointError(
                f"truncated: tensor {short(name)} ends at byte {data_start + end} but the file has {size}", path
            )
        infos[name] = TensorInfo(name, path, dtype, shape, data_start + begin, end - begin)
        spans.append((begin, end, name))
    _check_tiling(spans, data_size, path)
    return infos


def check_tokenizer(path: Path, files: dict[str, dict], config: dict[str, Any], vocab_size: int) -> None:
    """What the tokenizer files promise, checked before any format writes them: each id names one string and lies
    inside the embedding's `vocab_size` rows, the special token ids too, and the chat template parses and renders.
    A GGUF's vocabulary is a list by id: two strings on one id make it differ from run to run."""
    owners: dict[int, str] = {}  # id → the string that holds it

    def claim(token_id: Any, text: Any, file: str) -> None:
        if not isinstance(token_id, int) or isinstance(token_id, bool) or not 0 <= token_id < vocab_size:
            raise CheckpointError(f"token {short(text)} has id {short(token_id)}, outside the model's vocabulary "
                                  f"of {vocab_size} (config.json's vocab_size)", path / file)
        if owners.setdefault(token_id, text) != text:
            raise CheckpointError(f"id {token_id} is given to two strings, {short(owners[token_id])} and "
                                  f"{short(text)}", path / file)

    model = files.get("tokenizer.json", {}).get("model")
    vocab = model.get("vocab") if isinstance(model, dict) else None
    if isinstance(vocab, dict):  # BPE and WordLevel: string → id (Unigram's list numbers itself)
        for text, token_id in vocab.items():
            claim(token_id, text, "tokenizer.json")
    elif isinstance(vocab, list):  # Unigram: [piece, score] by id
        owners.update((i, piece[0]) for i, piece in enumerate(vocab) if isinstance(piece, list) and piece)
    for added in files.get("tokenizer.json", {}).get("added_tokens") or []:
        if isinstance(added, dict):
            _check_added_flags(added, f"added token {short(added.get('content'))}", path / "tokenizer.json")
            claim(added.get("id"), added.get("content"), "tokenizer.json")
    tokenizer_config = files.get("tokenizer_config.json", {})
    decoder = tokenizer_config.get("added_tokens_decoder")
    for token_id, added in decoder.items() if isinstance(decoder, dict) else ():
        if isinstance(added, dict):
            _check_added_flags(added, f"added_tokens_decoder[{short(token_id)}]", path / "tokenizer_config.json")
        claim(int(token_id) if str(token_id).isdigit() else token_id,
              added.get("content") if isinstance(added, dict) else added, "tokenizer_config.json")
    _check_special_strings(path, tokenizer_config, set(owners.values()) if vocab is not None else None)
    generation = path / "generation_config.json"
    for source, settings in (("config.json", config),
                             ("generation_config.json", load_json(generation.read_bytes(), "the file", generation)
                              if generation.is_file() else {})):
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = settings.get(key) if isinstance(settings, dict) else None
            for token_id in value if isinstance(value, list) else [] if value is None else [value]:
                if not isinstance(token_id, int) or isinstance(token_id, bool):
                    raise CheckpointError(f"{key} {short(token_id)} is not a token id", path / source)
                if not 0 <= token_id < vocab_size:
                    # transformers' config classes carry their family's real ids (OLMo's eos 50279): a small model
                    # built from one keeps them. No embedding row holds it, so no format can use it: said, not fatal
                    warnings.warn(f"{path / source}: {key} {token_id} is outside the model's vocabulary of "
                                  f"{vocab_size}; the artifacts' runtimes will not see it", stacklevel=2)
    _check_chat_template(path, files)


def _check_added_flags(added: dict, what: str, where: Path) -> None:
    """An added token's flags are booleans: tokenizers refuses anything else when it loads the file, gguf-py
    takes any truthy value for special (a control token in the GGUF where the source has a normal one)."""
    for flag in ("special", "lstrip", "rstrip", "normalized", "single_word"):
        if flag in added and not isinstance(added[flag], bool):
            raise CheckpointError(f"{what}.{flag} must be true or false, not {short(added[flag])}", where)


def _check_special_strings(path: Path, tokenizer_config: dict, vocabulary: set[str] | None) -> None:
    """tokenizer_config.json's bos and eos name strings the vocabulary holds (transformers would give one it
    lacks an id past the embedding's rows, and gguf-py no id at all), and its add_bos/eos flags are booleans.
    `vocabulary` is None where only a SentencePiece model knows it (tokenizer.model without tokenizer.json)."""
    where = path / "tokenizer_config.json"
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = tokenizer_config.get(key)
        text = value.get("content") if isinstance(value, dict) else value
        if value is not None and not isinstance(text, str):
            raise CheckpointError(f"{key} {short(value)} is not a token string", where)
        if key in ("bos_token", "eos_token") and text is not None and vocabulary is not None and text not in vocabulary:
            raise CheckpointError(f"{key} {short(text)} is not in the vocabulary (tokenizer.json)", where)
    for key in ("add_bos_token", "add_eos_token"):
        if tokenizer_config.get(key) is not None and not isinstance(tokenizer_config[key], bool):
            raise CheckpointError(f"{key} must be true or false, not {short(tokenizer_config[key])}", where)


def _check_chat_template(path: Path, files: dict[str, dict]) -> None:
    """Parse the chat template and render it for one user message with transformers' own renderer (its sandbox,
    globals and `generation` tag), as an app's `apply_chat_template` does. One that cannot render is refused, not
    shipped: every format carries the source's tokenizer files as they are, and a chat app on the artifact would
    fail on its first message."""
    from jinja2 import TemplateSyntaxError
    from transformers.utils.chat_template_utils import render_jinja_template

    templates: list[tuple[str, Any]] = []
    if (jinja := path / "chat_template.jinja").is_file():
        templates.append((jinja.name, jinja.read_bytes().decode("utf-8", "replace")))
    for file in ("tokenizer_config.json", "chat_template.json"):  # gguf-py reads the second where the first has none
        chat = files.get(file, {}).get("chat_template")
        for named in chat if isinstance(chat, list) else [{"template": chat}] if chat is not None else []:
            templates.append((file, named.get("template") if isinstance(named, dict) else named))
    for file, text in templates:
        if not isinstance(text, str):
            raise CheckpointError(f"the chat template is not a string ({type(text).__name__})", path / file)
        try:
            render_jinja_template([[{"role": "user", "content": "Hello"}]], chat_template=text,
                                  add_generation_prompt=True, bos_token="<s>", eos_token="</s>")
        except TemplateSyntaxError as e:
            raise CheckpointError(f"the chat template is not valid Jinja (line {e.lineno}: {short(e.message)})",
                                  path / file) from None
        except Exception as e:  # a template may raise anything on content it does not expect
            raise CheckpointError(f"the chat template cannot render one user message ({type(e).__name__}: "
                                  f"{short(str(e))}); fix it or remove it", path / file) from None


def refuse_quantized_config(config: dict[str, Any], where: Path) -> None:
    """Refuse a checkpoint whose config says it arrives quantized (transformers' `quantization_config`, the older
    `compression_config` of compressed-tensors, MLX's `quantization`), naming the method: its weights are not
    floats (`source_quantization` takes FP8 before this is asked)."""
    for holder, settings in (("", config), ("text_config.", config.get("text_config"))):
        if not isinstance(settings, dict):
            continue
        for key in ("quantization_config", "compression_config", "quantization"):
            quantization = settings.get(key)
            if quantization is None:
                continue
            method = quantization.get("quant_method") if isinstance(quantization, dict) else None
            if key == "quantization" and method is None:
                method = "mlx"  # mlx-lm writes {"group_size": 64, "bits": 4} under this key
            if not isinstance(method, str):
                raise CheckpointError(f"{holder}{key} {short(quantization)} says the weights are quantized, without a "
                                      "quant_method; siliconvert reads float weights only", where)
            raise CheckpointError(f"{holder}{key}.quant_method is {method!r}: the weights are quantized, and "
                                  "siliconvert reads float weights only (read as floats they would convert to "
                                  "garbage); convert from the unquantized release", where)


def refuse_quantized_tensors(tensors: Iterable[TensorInfo]) -> None:
    """Refuse a tensor only a quantized export holds (an FP8 weight, a GPTQ `qweight`, an FP8 `weight_scale_inv`),
    naming it: a checkpoint whose config.json lost its quantization_config is still quantized."""
    tensors = list(tensors)
    for info in tensors:  # an FP8 weight first: it says more than the scale stored beside it
        if info.dtype in FP8_DTYPES and info.scale is None:
            raise CheckpointError(f"tensor {short(info.name)} has dtype {info.dtype}: FP8-quantized weights, but "
                                  "config.json has no quantization_config saying how they are scaled", info.shard)
    for info in tensors:
        if info.name.endswith(QUANTIZED_TENSOR_SUFFIXES):
            raise CheckpointError(f"tensor {short(info.name)} ({info.dtype} {list(info.shape)}) is part of a "
                                  "quantized weight; siliconvert reads float weights only, convert from the "
                                  "unquantized release", info.shard)


def regular_file(path: Path) -> os.stat_result:
    """The file's stat, refusing anything but a regular file (a FIFO or a device would hang or never end)."""
    try:
        stat = path.stat()
    except OSError as e:
        raise CheckpointError(f"cannot read ({e.strerror})", path) from None
    if not S_ISREG(stat.st_mode):
        raise CheckpointError("not a regular file", path)
    return stat


def load_json(raw: bytes, what: str, where: Path) -> Any:
    """JSON from `what` (the whole file, or its safetensors header), refusing invalid UTF-8, keys given twice
    (a reader that keeps the first and one that keeps the last would see different files) and nesting too
    deep to parse."""

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [key for key, _ in pairs]
        if len(set(keys)) != len(keys):
            twice = next(key for key in keys if keys.count(key) > 1)
            raise CheckpointError(f"key {short(twice)} appears twice in {what}", where)
        return dict(pairs)

    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=unique)
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{what} is not UTF-8 (invalid byte at position {e.start})", where) from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{what} is not valid JSON ({e})", where) from None
    except RecursionError:
        raise CheckpointError(f"{what} is nested too deeply to be read", where) from None


def _parse_header(raw: bytes, path: Path) -> dict[str, Any]:
    if not raw.startswith(b"{"):
        raise CheckpointError("safetensors header is not a JSON object (it must start with '{')", path)
    header = load_json(raw, "the safetensors header", path)
    if not isinstance(header, dict):
        raise CheckpointError("safetensors header is not a JSON object", path)
    return header


def _check_metadata(metadata: Any, path: Path) -> None:
    if not isinstance(metadata, dict):
        raise CheckpointError("safetensors __metadata__ is not a JSON object", path)
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise CheckpointError(
                f"safetensors __metadata__ must map strings to strings; {short(key)} holds {short(value)}", path
            )


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _header_entry(name: str, entry: Any, path: Path) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one tensor's header entry, offsets relative to the data section."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise CheckpointError(f"safetensors header entry for {short(name)} is malformed "
                              "(needs dtype, shape and data_offsets)", path)
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"tensor {short(name)} has unknown dtype {short(dtype)}", path)
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise CheckpointError(f"tensor {short(name)} has an invalid shape {short(shape)}", path)
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise CheckpointError(f"tensor {short(name)} has invalid data_offsets {short(offsets)} "
                              "(two non-negative integers)", path)
    begin, end = offsets
    itemsize = 2 if dtype == "BF16" else np.dtype(SAFETENSORS_DTYPES[dtype]).itemsize
    if end < begin or end - begin != math.prod(shape) * itemsize:
        raise CheckpointError(f"tensor {short(name)} has data offsets that do not match its shape "
                              f"({end - begin} bytes for {dtype} {shape})", path)
    return dtype, tuple(shape), begin, end


def _check_tiling(spans: list[tuple[int, int, str]], data_size: int, path: Path) -> None:
    """The tensors' byte spans must cover the data section exactly once: an overlap would read one tensor's
    weights from another's bytes, a hole or a tail is data no tensor owns (the format forbids all three)."""
    position, previous = 0, None
    for begin, end, name in sorted(spans):
        if begin < position:
            raise CheckpointError(f"tensor {short(name)} (bytes {begin}-{end}) overlaps tensor {short(previous)}", path)
        if begin > position:
            raise CheckpointError(f"bytes {position}-{begin} of the data belong to no tensor (a hole before "
                                  f"tensor {short(name)})", path)
        position, previous = end, name
    if position != data_size:
        raise CheckpointError(f"{data_size - position} bytes after the last tensor belong to no tensor", path)


READ_BLOCK = 32 << 20  # bytes read at a time when widening bfloat16: the only copy beside the result


def read_tensor(info: TensorInfo) -> np.ndarray:
    """Read one tensor from disk, in the stream's layout; bfloat16 widens to float32 exactly."""
    if info.dtype == "MXFP4" and info.layout[:1] == ("transposed",):  # dequantized in the stream's layout directly
        return _read_mxfp4(info, info.layout[1:])
    if info.layout:
        return streamed_layout(read_model_tensor(info), info.layout)
    if info.dtype == "MXFP4":
        return _read_mxfp4(info)
    if info.parts:
        return _read_stack(info)
    if info.scale is not None:
        return _read_fp8(info)
    if info.offset < 0:  # a pickle entry (--allow-pickle)
        tensor = _pickle_tensors(info.shard)[info.name]
        return (tensor.float() if info.dtype == "BF16" else tensor).numpy()
    if info.dtype == "BF16":
        return _read_bfloat16(info)
    array = np.empty(info.shape, dtype=SAFETENSORS_DTYPES[info.dtype])
    with info.shard.open("rb") as f:
        f.seek(info.offset)
        if f.readinto(memoryview(array).cast("B")) != info.nbytes:
            raise CheckpointError(f"truncated while reading tensor {info.name!r}", info.shard)
    return array


def read_model_tensor(info: TensorInfo) -> np.ndarray:
    """One tensor as transformers' model holds the parameter (the stream's layout undone, never computed)."""
    if not info.layout:
        return read_tensor(info)
    shape = info.shape[:-2] + info.shape[:-3:-1] if "transposed" in info.layout else info.shape
    return read_tensor(replace(info, layout=(), shape=shape))


def streamed_layout(array: np.ndarray, layout: tuple[str, ...]) -> np.ndarray:
    """transformers' parameter in the stream's layout (`TensorInfo.layout`): one copy, at the end."""
    for step in layout:
        if step == "transposed":
            array = array.swapaxes(-1, -2)
        elif step == "interleaved":
            array = np.concatenate([array[:, 0::2], array[:, 1::2]], axis=1)
        else:
            raise ValueError(f"unknown layout step {step!r}")
    return np.ascontiguousarray(array)


MXFP4_AT_ONCE = 1 << 14  # blocks of 32 dequantized at a time: the scratch beside the result (about 2 MB)


def mxfp4_parts(info: TensorInfo) -> tuple[np.ndarray, np.ndarray]:
    """An MXFP4 tensor's stored bytes: blocks [..., rows, groups, 16] and scales [..., rows, groups]."""
    scales = read_tensor(info.scale)
    blocks = read_tensor(replace(info, dtype="U8", shape=(*info.scale.shape, MXFP4_GROUP // 2), scale=None, layout=()))
    return blocks, scales


def _read_mxfp4(info: TensorInfo, row_steps: tuple[str, ...] | None = None) -> np.ndarray:
    """An MXFP4 tensor as transformers dequantizes it: each nibble's E2M1 value (low nibble first) times 2^(scale −
    127), exact in float32 (and in the bfloat16 transformers computes it in), then rows and columns swapped as its
    experts hold them (a view). With `row_steps` (the stream's layout after its "transposed"), the rows as the stream
    orders them instead, reordered in the bytes before any value is made: no float copy. Memory: the float32 result,
    the bytes (an eighth of it) and a scratch of about 2 MB."""
    blocks, scales = mxfp4_parts(info)
    for step in row_steps or ():
        if step != "interleaved":
            raise ValueError(f"unknown layout step {step!r} after 'transposed'")
        blocks = np.concatenate([blocks[:, 0::2], blocks[:, 1::2]], axis=1)
        scales = np.concatenate([scales[:, 0::2], scales[:, 1::2]], axis=1)
    groups, exponents = blocks.reshape(-1, MXFP4_GROUP // 2), scales.reshape(-1)
    out = np.empty((groups.shape[0], MXFP4_GROUP), dtype=np.float32)
    for start in range(0, groups.shape[0], MXFP4_AT_ONCE):
        stop = min(groups.shape[0], start + MXFP4_AT_ONCE)
        out[start:stop, 0::2] = MXFP4_VALUES[groups[start:stop] & 0x0F]
        out[start:stop, 1::2] = MXFP4_VALUES[groups[start:stop] >> 4]
        np.ldexp(out[start:stop], exponents[start:stop, None].astype(np.int32) - 127, out=out[start:stop])
    *outer, rows, _ = scales.shape
    dequantized = out.reshape(*outer, rows, -1)  # [..., rows, columns]
    return dequantized if row_steps is not None else dequantized.swapaxes(-1, -2)  # transformers': [..., columns, rows]


FP8_AT_ONCE = 1 << 18  # weights dequantized at a time: the float32 scratch beside the result (1 MB)


def _read_fp8(info: TensorInfo) -> np.ndarray:
    """An FP8 weight times its scale, block by block: each byte looked up among the type's 256 values (torch's),
    multiplied by its block's scale in float32, as transformers dequantizes. Memory: the float32 result, the FP8
    bytes (a quarter of it) and the scale."""
    import torch

    values = torch.arange(256, dtype=torch.uint8).view(getattr(torch, FP8_WEIGHT_DTYPES[info.dtype])).float().numpy()
    raw = read_tensor(replace(info, scale=None))
    scale = read_tensor(info.scale).astype(np.float32)
    scale = scale.reshape(_scale_grid(scale.shape))
    block_rows, block_cols = info.scale_block
    rows, cols = info.shape
    out = np.empty((rows, cols), dtype=np.float32)
    step = max(block_rows, FP8_AT_ONCE // max(cols, 1) // block_rows * block_rows)  # whole blocks of rows
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        scales = np.repeat(np.repeat(scale[start // block_rows:-(-stop // block_rows)], block_rows, axis=0),
                           block_cols, axis=1)[: stop - start, :cols]
        np.multiply(values[raw[start:stop]], scales, out=out[start:stop])
    return out


def _read_stack(info: TensorInfo) -> np.ndarray:
    """A stack of per-expert parts, filled part by part: memory holds the stack and one part."""
    stack = None
    position = 0
    for part in info.parts:
        array = read_tensor(part)
        if stack is None:
            stack = np.empty(math.prod(info.shape), dtype=array.dtype)
        stack[position:position + array.size] = array.reshape(-1)
        position += array.size
        del array
    return stack.reshape(info.shape)


def _read_bfloat16(info: TensorInfo) -> np.ndarray:
    """bfloat16 is the top half of a float32: read block by block into the high halves of the result, so
    memory holds the float32 tensor and one block, not a bfloat16 copy of the whole tensor as well."""
    wide = np.zeros(info.nbytes // 2, dtype=np.uint32)
    halves = wide.view(np.uint16)[1::2] if sys.byteorder == "little" else wide.view(np.uint16)[::2]
    block = np.empty(READ_BLOCK // 2, dtype=np.uint16)
    with info.shard.open("rb") as f:
        f.seek(info.offset)
        for start in range(0, wide.size, block.size):
            chunk = block[: min(block.size, wide.size - start)]
            if f.readinto(memoryview(chunk).cast("B")) != chunk.nbytes:
                raise CheckpointError(f"truncated while reading tensor {info.name!r}", info.shard)
            halves[start:start + chunk.size] = chunk
    return wide.view(np.float32).reshape(info.shape)


def value_range(array: np.ndarray) -> tuple[float, float]:
    """(min, max) of a float array. Both carry any NaN through and meet any ±Inf, so checking them checks every
    value with no per-element temporary; torch's aminmax does it in one vectorized pass, numpy's in two."""
    import torch  # here, not at the top: `siliconvert inspect` reads no values and should start fast

    with warnings.catch_warnings():  # a read-only array (a pickle's) warns; aminmax only reads it
        warnings.simplefilter("ignore", UserWarning)
        low, high = torch.aminmax(torch.from_numpy(array))
    return float(low), float(high)


class Checkpoint:
    """A local Hugging Face checkpoint folder (see `open` for hub ids)."""

    def __init__(self, path: Path, name: str, config: dict[str, Any], family: Family, spec: ModelSpec,
                 tensors: dict[str, TensorInfo], quantization: SourceQuantization | None = None):
        self.path = path
        self.quantization = quantization  # how the files arrive quantized, where they are dequantized as they stream
        self.name = name  # the model's name: folder name, or the hub repo's name
        self.config = config
        self.family = family
        self.spec = spec
        self.tensor_infos = tensors

    @classmethod
    def open(cls, source: str | Path, *, allow_pickle: bool = False) -> Checkpoint:
        """Open a folder, or a hub id `org/name[@revision]` through huggingface_hub's cache."""
        path, name = resolve_source(str(source))
        config = _read_config(path)
        quantization = source_quantization(config, path / "config.json")
        tensors = pair_fp8_scales(_index_tensors(path, allow_pickle), quantization, path / "config.json")
        tensors, quantization = pair_mxfp4_blocks(tensors, quantization, path / "config.json")
        if quantization is not None:  # the weights read are floats: every target and the reference see a float model
            config = {key: value for key, value in config.items() if key != "quantization_config"}
        refuse_quantized_tensors(tensors.values())
        # Before anything is sized by config.json's numbers: each is checked against the weights' own shapes.
        check_config(config, tensors.values(), path / "config.json")
        family = registry.for_config(config, where=path / "config.json")
        decoder_config, tensors = family.decoder(config, tensors, path / "config.json")
        if decoder_config is not config:  # a multimodal checkpoint's language model: its numbers checked too
            config = decoder_config
            check_config(config, tensors.values(), path / "config.json")
        tensors = family.model_names(tensors, stacked, path)
        if not config.get("architectures"):  # found from model_type: artifacts' configs name it, as transformers' do
            config = {**config, "architectures": [family.hf_architectures[0]]}
        spec = family.spec(config, where=str(path / "config.json"))
        checkpoint = cls(path, name, config, family, spec, _model_tensors(family, spec, tensors), quantization)
        checkpoint._check_tensors()
        # every target ships the tokenizer: refuse a checkpoint without one, or with a damaged JSON file, now
        tokenizer: dict[str, dict] = {}  # file name → its JSON
        for file in checkpoint.tokenizer_files():
            if file.suffix == ".json":
                tokenizer[file.name] = load_json(file.read_bytes(), "the file", file)
                if not isinstance(tokenizer[file.name], dict):
                    raise CheckpointError("not a JSON object", file)
        check_tokenizer(path, tokenizer, config, spec.vocab_size)
        return checkpoint

    def transformers_config(self) -> Any:
        """transformers' config object for the decoder converted here (a multimodal checkpoint's language model)."""
        return transformers_config(self.config, self.family.model_type, self.path / "config.json")

    def tokenizer_files(self) -> list[Path]:
        present = [self.path / n for n in TOKENIZER_FILES if (self.path / n).exists()]
        files = [file for file in present if regular_file(file)]
        if not any(f.name in ("tokenizer.json", "tokenizer.model") for f in files):
            raise CheckpointError("no tokenizer (neither tokenizer.json nor tokenizer.model)", self.path)
        return files

    def stream_order(self) -> list[TensorInfo]:
        """The order tensors stream in: the model's own (embeddings, layer 0, layer 1, ..., final norm and
        head), so every writer completes its layers and packages in turn whatever order the shards store
        (safetensors sorts names: layer 10 comes before layer 2). Within a layer, file order."""

        def position(info: TensorInfo) -> tuple:
            if info.role.layer is not None:
                group, layer = 1, info.role.layer
            else:
                group, layer = (0 if info.role.role == "token_embd" else 2), 0
            return group, layer, info.shard.name, info.offset

        return sorted(self.tensor_infos.values(), key=position)

    def tensors(self) -> Iterator[tuple[TensorInfo, np.ndarray]]:
        """Yield (info, array) one at a time, in `stream_order`: the info names the tensor and carries its role."""
        for info in self.stream_order():
            array = read_tensor(info)
            if array.dtype.kind == "f" and array.size and not np.isfinite(value_range(array)).all():
                raise CheckpointError(f"tensor {info.name!r} holds NaN or Inf values", info.shard)
            yield info, array
            del array  # so the next tensor is read with this one already gone

    def fingerprint(self) -> str:
        """A cache key for this source: config, tokenizer files, and every shard's header, size and
        modification time. Not a content hash of the weights (that would read gigabytes up front)."""
        digest = hashlib.sha256()
        for file in sorted([self.path / "config.json", *self.tokenizer_files()]):
            digest.update(file.name.encode() + file.read_bytes())
        for shard in sorted(set().union(*(info.files() for info in self.tensor_infos.values()))):
            stat = shard.stat()
            digest.update(f"{shard.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
            if shard.suffix == ".safetensors":
                with shard.open("rb") as f:
                    (header_len,) = struct.unpack("<Q", f.read(8))
                    digest.update(f.read(header_len))
        return digest.hexdigest()[:16]

    def _check_tensors(self) -> None:
        expected = self.family.expected_tensors(self.spec)
        where = self.path
        for name in self.tensor_infos:
            if name not in expected:
                raise CheckpointError(f"unexpected tensor {short(name)} for {self.spec.family}", where)
        for name, shape in expected.items():
            info = self.tensor_infos.get(name)
            if info is None:
                raise CheckpointError(f"missing tensor {name!r}", where)
            if info.shape != shape:
                raise CheckpointError(
                    f"tensor {name!r} has shape {list(info.shape)}, config.json implies {list(shape)}",
                    info.shard,
                )
            fp8 = info.scale is not None or any(part.scale is not None for part in info.parts)
            if info.dtype not in ("F32", "F16", "BF16", "MXFP4") and not fp8:
                raise CheckpointError(f"tensor {name!r} has dtype {info.dtype}, expected a float", info.shard)


def _model_tensors(family: Family, spec: ModelSpec, tensors: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
    """The tensors the model is made of, each with its role. Left out here, once, so that no writer or runner sees
    them: what the family drops (rotary caches, which every target rebuilds from the spec), and the stored copy of
    a tied head (some tied checkpoints keep one, identical to the embedding, which is the head)."""
    model: dict[str, TensorInfo] = {}
    for name, info in tensors.items():
        if family.is_droppable(name):
            continue
        role = family.role_of(name)
        if role is not None and (role.role, role.kind) == ("output", "weight") and spec.tie_word_embeddings:
            continue
        model[name] = replace(info, role=role)
    return model


def resolve_source(source: str) -> tuple[Path, str]:
    """(folder, model name): a local folder as is; `org/name[@revision]` through huggingface_hub's
    cache first, then the network."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError("source must be a checkpoint folder, not a file", path)
        return path.resolve(), path.resolve().name
    repo_id, _, revision = source.partition("@")
    if repo_id.count("/") != 1 or source.startswith((".", "/", "~")):
        raise CheckpointError("source not found (neither a folder nor a hub id org/name)", source)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    patterns = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja", "README.md"]
    name = repo_id.split("/")[1]
    try:
        try:
            folder = snapshot_download(repo_id, revision=revision or None, allow_patterns=patterns,
                                       local_files_only=True)
        except Exception:
            folder = snapshot_download(repo_id, revision=revision or None, allow_patterns=patterns)
        return Path(folder), name
    except HFValidationError as e:
        raise CheckpointError(f"not a valid hub id ({e})", source) from None
    except Exception as e:
        raise CheckpointError(
            f"cannot fetch from the Hugging Face Hub and it is not in the local cache "
            f"(offline?): {type(e).__name__}", source
        ) from None


def _read_config(path: Path) -> dict[str, Any]:
    file = path / "config.json"
    if not file.exists():
        raise CheckpointError("config.json is missing", path)
    regular_file(file)
    config = load_json(file.read_bytes(), "the file", file)
    if not isinstance(config, dict):
        raise CheckpointError("not a JSON object", file)
    return config


def _index_tensors(path: Path, allow_pickle: bool) -> dict[str, TensorInfo]:
    index_file = path / "model.safetensors.index.json"
    if index_file.exists():
        return _index_shards(path, index_file)
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles and not allow_pickle:
            raise CheckpointError(
                f"only pickle weights ({', '.join(pickles)}); pickles can run code when loaded, so they "
                "are refused (convert to safetensors, or pass --allow-pickle to load them weights-only)",
                path,
            )
        if pickles:
            return _index_pickles([path / name for name in pickles])
        raise CheckpointError("no weights (no *.safetensors files)", path)
    tensors: dict[str, TensorInfo] = {}
    for shard in shards:
        for name, info in read_safetensors_header(shard).items():
            if name in tensors:
                raise CheckpointError(f"tensor {short(name)} appears in two shards", shard)
            tensors[name] = info
    return tensors


def _index_shards(path: Path, index_file: Path) -> dict[str, TensorInfo]:
    """The tensors of a sharded checkpoint. Shards are plain file names inside the checkpoint folder (an index
    must not point the reader at any other file on the machine), regular files, holding what the index says."""
    regular_file(index_file)
    index = load_json(index_file.read_bytes(), "the file", index_file)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError("not a valid safetensors index (no weight_map of tensor → shard)", index_file)
    listed: dict[str, set[str]] = {}
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or not _is_plain_name(shard):
            raise CheckpointError(f"weight_map puts {short(tensor)} in {short(shard)}: shards must be plain file "
                                  "names inside the checkpoint folder", index_file)
        listed.setdefault(shard, set()).add(tensor)
    tensors: dict[str, TensorInfo] = {}
    for shard, names in sorted(listed.items()):
        file = path / shard
        if not file.exists():
            raise CheckpointError(f"shard {short(shard)} named in the index is missing", index_file)
        if not file.is_file():
            raise CheckpointError(f"shard {short(shard)} named in the index is not a regular file", index_file)
        held = read_safetensors_header(file)
        if missing := sorted(names - held.keys()):
            raise CheckpointError(f"the index puts tensor {short(missing[0])} in {short(shard)}, which does not "
                                  "hold it", index_file)
        if unlisted := sorted(held.keys() - names):
            raise CheckpointError(f"shard {short(shard)} holds tensor {short(unlisted[0])}, which the index "
                                  "does not place there", index_file)
        tensors.update(held)
    return tensors


def _is_plain_name(name: str) -> bool:
    return name not in ("", ".", "..") and not any(c in name for c in "/\\\0") and Path(name).name == name


TORCH_DTYPES = {"torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16"}


@functools.lru_cache(maxsize=2)
def _pickle_tensors(file: Path) -> dict:
    """A pickle checkpoint opened the only safe way: weights_only (no code runs) and memory-mapped
    (nothing is read until a tensor is used). Only reached with --allow-pickle."""
    import pickle

    import torch

    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"cannot load the pickle weights-only ({str(e).splitlines()[0]})", file) from None
    if not isinstance(state, dict):
        raise CheckpointError("the pickle does not hold a dict of tensors", file)
    return state


def _index_pickles(files: list[Path]) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        for name, tensor in _pickle_tensors(file).items():
            if not isinstance(name, str) or not hasattr(tensor, "element_size"):  # a torch.Tensor, by what it has
                raise CheckpointError(f"the pickle holds {short(name)}, which is not a named tensor", file)
            dtype = TORCH_DTYPES.get(str(tensor.dtype), str(tensor.dtype))
            nbytes = tensor.numel() * tensor.element_size()
            tensors[name] = TensorInfo(name, file, dtype, tuple(tensor.shape), -1, nbytes)
    return tensors
