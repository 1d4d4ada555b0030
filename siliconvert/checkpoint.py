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
import struct
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from siliconvert.architectures import Family, ModelSpec, registry
from siliconvert.errors import CheckpointError

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
}
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


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check one safetensors header: sizes, dtypes and offsets must fit the file."""
    size = path.stat().st_size
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
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"safetensors header is not JSON ({e})", path) from None
    if not isinstance(header, dict):
        raise CheckpointError("safetensors header is not a JSON object", path)
    data_start = 8 + header_len
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"safetensors header entry for {name!r} is malformed", path) from None
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"tensor {name!r} has unknown dtype {dtype!r}", path)
        itemsize = 2 if dtype == "BF16" else np.dtype(SAFETENSORS_DTYPES[dtype]).itemsize
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise CheckpointError(f"tensor {name!r} has an invalid shape {list(shape)}", path)
        expected = int(np.prod(shape, dtype=np.int64)) * itemsize
        if not (isinstance(begin, int) and isinstance(end, int)) or end - begin != expected or begin < 0:
            raise CheckpointError(f"tensor {name!r} has data offsets that do not match its shape", path)
        if data_start + end > size:
            raise CheckpointError(
                f"truncated: tensor {name!r} ends at byte {data_start + end} but the file has {size}", path
            )
        infos[name] = TensorInfo(name, path, dtype, shape, data_start + begin, expected)
    return infos


READ_BLOCK = 32 << 20  # bytes read at a time when widening bfloat16: the only copy beside the result


def read_tensor(info: TensorInfo) -> np.ndarray:
    """Read one tensor from disk; bfloat16 widens to float32 exactly."""
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
                 tensors: dict[str, TensorInfo]):
        self.path = path
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
        family = registry.for_config(config, where=path / "config.json")
        spec = family.spec(config, where=str(path / "config.json"))
        tensors = _index_tensors(path, allow_pickle)
        checkpoint = cls(path, name, config, family, spec, tensors)
        checkpoint._check_tensors()
        checkpoint.tokenizer_files()  # every target ships the tokenizer: refuse a checkpoint without one now
        return checkpoint

    def tokenizer_files(self) -> list[Path]:
        files = [self.path / n for n in TOKENIZER_FILES if (self.path / n).is_file()]
        if not any(f.name in ("tokenizer.json", "tokenizer.model") for f in files):
            raise CheckpointError("no tokenizer (neither tokenizer.json nor tokenizer.model)", self.path)
        return files

    def stream_order(self) -> list[TensorInfo]:
        """The order tensors stream in: the model's own (embeddings, layer 0, layer 1, ..., final norm and
        head), so every writer completes its layers and packages in turn whatever order the shards store
        (safetensors sorts names: layer 10 comes before layer 2). Within a layer, file order."""

        def position(info: TensorInfo) -> tuple:
            role = self.family.role_of(info.name)
            if role is not None and role.layer is not None:
                group, layer = 1, role.layer
            else:
                group, layer = (0 if role is not None and role.role == "token_embd" else 2), 0
            return group, layer, info.shard.name, info.offset

        return sorted(self.tensor_infos.values(), key=position)

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yield (HF name, array) one at a time, in `stream_order`."""
        for info in self.stream_order():
            array = read_tensor(info)
            if array.dtype.kind == "f" and array.size and not np.isfinite(value_range(array)).all():
                raise CheckpointError(f"tensor {info.name!r} holds NaN or Inf values", info.shard)
            yield info.name, array
            del array  # so the next tensor is read with this one already gone

    def fingerprint(self) -> str:
        """A cache key for this source: config, tokenizer files, and every shard's header, size and
        modification time. Not a content hash of the weights (that would read gigabytes up front)."""
        digest = hashlib.sha256()
        for file in sorted([self.path / "config.json", *self.tokenizer_files()]):
            digest.update(file.name.encode() + file.read_bytes())
        for shard in sorted({i.shard for i in self.tensor_infos.values()}):
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
            if name not in expected and not self.family.is_droppable(name):
                if name == "lm_head.weight" and self.spec.tie_word_embeddings:
                    continue  # some tied checkpoints still store the (identical) head
                raise CheckpointError(f"unexpected tensor {name!r} for {self.spec.family}", where)
        for name, shape in expected.items():
            info = self.tensor_infos.get(name)
            if info is None:
                raise CheckpointError(f"missing tensor {name!r}", where)
            if info.shape != shape:
                raise CheckpointError(
                    f"tensor {name!r} has shape {list(info.shape)}, config.json implies {list(shape)}",
                    info.shard,
                )
            if info.dtype not in ("F32", "F16", "BF16"):
                raise CheckpointError(f"tensor {name!r} has dtype {info.dtype}, expected a float", info.shard)


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
    if not file.is_file():
        raise CheckpointError("config.json is missing", path)
    try:
        config = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"not valid JSON ({e})", file) from None
    if not isinstance(config, dict):
        raise CheckpointError("not a JSON object", file)
    return config


def _index_tensors(path: Path, allow_pickle: bool) -> dict[str, TensorInfo]:
    index_file = path / "model.safetensors.index.json"
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError("not a valid safetensors index (no weight_map)", index_file) from None
        shards = sorted({path / shard for shard in weight_map.values()})
        for shard in shards:
            if not shard.is_file():
                raise CheckpointError(f"shard {shard.name} named in the index is missing", index_file)
    else:
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
                raise CheckpointError(f"tensor {name!r} appears in two shards", shard)
            tensors[name] = info
    return tensors


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
            dtype = TORCH_DTYPES.get(str(tensor.dtype), str(tensor.dtype))
            nbytes = tensor.numel() * tensor.element_size()
            tensors[name] = TensorInfo(name, file, dtype, tuple(tensor.shape), -1, nbytes)
    return tensors
