"""Synthetic Mistral-shaped checkpoints (or Mixtral-shaped: the same with a mixture of experts in every layer; or
LFM2-shaped: a hybrid of gated short convolutions and attention): random bf16 weights, a real config and real
tokenizer files.

The files look like what transformers' `save_pretrained` leaves and the hub serves (HF tensor names and
layout, `model-0000N-of-0000M.safetensors` shards plus `model.safetensors.index.json`), so every converter
takes the path it takes for a downloaded model. Weights are generated and written block by block: memory
stays at a few tens of MB whatever the size.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np

# Bump whenever the bytes written for a given shape change: it is part of the cache key.
GENERATOR_VERSION = 1
SEED = 7
SHARDS = 4
VOCAB_SIZE = 32000
INIT_STD = 0.02  # transformers' initializer_range: the scale of a freshly initialized model
BLOCK_ELEMENTS = 8 << 20  # 16 MiB of bf16 generated and written at a time
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")
BF16_BYTES = 2


LFM2_CONV_KERNEL = 3  # conv_L_cache of every LFM2 size


@dataclass(frozen=True)
class Shape:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int = VOCAB_SIZE
    family: str = "mistral"  # the config and tensor layout: a key of CONFIGS and LAYOUTS
    experts: int = 0  # mixtral: the experts in every layer (intermediate_size is each expert's)
    experts_used: int = 2
    attention_layers: tuple[int, ...] = ()  # lfm2: the layers with attention, the others short convolutions

    def __post_init__(self) -> None:
        if (self.family == "mixtral") != (self.experts > 0):
            raise ValueError(f"{self.family}: experts {self.experts} (only mixtral has them, always)")
        if (self.family == "lfm2") != bool(self.attention_layers):
            raise ValueError(f"{self.family}: attention layers {self.attention_layers} (only lfm2 lists them)")
        if any(not 0 <= layer < self.num_layers for layer in self.attention_layers):
            raise ValueError(f"attention layers {self.attention_layers} outside {self.num_layers} layers")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


SIZES = {
    "small": Shape(hidden_size=1024, intermediate_size=3584, num_layers=8, num_heads=8, num_kv_heads=2),
    "1b": Shape(hidden_size=2048, intermediate_size=7168, num_layers=16, num_heads=16, num_kv_heads=4),
    # Mistral-7B-v0.1/v0.2 exactly
    "7b": Shape(hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8),
    # 8.7 GB: Mixtral's layout (8 experts, 2 per token) at a fifth of its widths; each layer's experts are 403 MB
    # in bf16, the most any converter needs to hold at once
    "moe": Shape(hidden_size=2048, intermediate_size=4096, num_layers=20, num_heads=16, num_kv_heads=4,
                 family="mixtral", experts=8),
    # 5.0 GB: LFM2-2.6B's layers (22 short convolutions, 8 attention layers where its layer_types puts them, MLP
    # 10752 wide as given) with the other sizes' vocabulary; a convolution layer is its largest (331 MB in float32)
    "hybrid": Shape(hidden_size=2048, intermediate_size=10752, num_layers=30, num_heads=32, num_kv_heads=8,
                    family="lfm2", attention_layers=(2, 5, 9, 13, 17, 21, 24, 27)),
}


def mistral_config(shape: Shape, transformers_version: str) -> dict:
    """config.json as the hub's Mistral-7B (or Mixtral) checkpoints have it (rope θ at the top level,
    `torch_dtype`)."""
    experts = {"num_local_experts": shape.experts, "num_experts_per_tok": shape.experts_used,
               "output_router_logits": False, "router_aux_loss_coef": 0.02} if shape.experts else {}
    return experts | {
        "architectures": ["MixtralForCausalLM" if shape.experts else "MistralForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 1,  # the demo SentencePiece tokenizer's <s> and </s>, as in Mistral's
        "eos_token_id": 2,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "hidden_size": shape.hidden_size,
        "initializer_range": INIT_STD,
        "intermediate_size": shape.intermediate_size,
        "max_position_embeddings": 32768,
        "model_type": shape.family,
        "num_attention_heads": shape.num_heads,
        "num_hidden_layers": shape.num_layers,
        "num_key_value_heads": shape.num_kv_heads,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": transformers_version,
        "use_cache": True,
        "vocab_size": shape.vocab_size,
    }


def lfm2_config(shape: Shape, transformers_version: str) -> dict:
    """config.json as transformers 5.25 saves an Lfm2Config (`dtype`, `rope_parameters`, `layer_types`, keys
    sorted), with LFM2-2.6B's settings: the MLP width used as given, no conv bias, the head tied."""
    return {
        "architectures": ["Lfm2ForCausalLM"],
        "block_auto_adjust_ff_dim": False,
        "block_ffn_dim_multiplier": 1.0,
        "block_multiple_of": 256,
        "bos_token_id": 1,  # the demo SentencePiece tokenizer's <s> and </s>
        "conv_L_cache": LFM2_CONV_KERNEL,
        "conv_bias": False,
        "dtype": "bfloat16",
        "eos_token_id": 2,
        "full_attn_idxs": None,
        "hidden_size": shape.hidden_size,
        "initializer_range": INIT_STD,
        "intermediate_size": shape.intermediate_size,
        "layer_types": ["full_attention" if layer in shape.attention_layers else "conv"
                        for layer in range(shape.num_layers)],
        "max_position_embeddings": 128000,
        "model_type": "lfm2",
        "norm_eps": 1e-05,
        "num_attention_heads": shape.num_heads,
        "num_hidden_layers": shape.num_layers,
        "num_key_value_heads": shape.num_kv_heads,
        "pad_token_id": 0,
        "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
        "tie_word_embeddings": True,
        "transformers_version": transformers_version,
        "use_cache": True,
        "vocab_size": shape.vocab_size,
    }


def mistral_layout(shape: Shape) -> list[tuple[str, tuple[int, ...]]]:
    """Mistral's or Mixtral's state_dict. Mixtral's experts are stored one by one, under the original names (w1
    gate, w2 down, w3 up)."""
    h, kv, ff = shape.hidden_size, shape.num_kv_heads * shape.head_dim, shape.intermediate_size
    mlp = [("mlp.gate_proj.weight", (ff, h)), ("mlp.up_proj.weight", (ff, h)), ("mlp.down_proj.weight", (h, ff))]
    if shape.experts:
        mlp = [("block_sparse_moe.gate.weight", (shape.experts, h))]
        for expert in range(shape.experts):
            mlp += [(f"block_sparse_moe.experts.{expert}.w1.weight", (ff, h)),
                    (f"block_sparse_moe.experts.{expert}.w2.weight", (h, ff)),
                    (f"block_sparse_moe.experts.{expert}.w3.weight", (ff, h))]
    layout: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (shape.vocab_size, h))]
    for layer in range(shape.num_layers):
        prefix = f"model.layers.{layer}."
        layout += [
            (prefix + "self_attn.q_proj.weight", (shape.num_heads * shape.head_dim, h)),
            (prefix + "self_attn.k_proj.weight", (kv, h)),
            (prefix + "self_attn.v_proj.weight", (kv, h)),
            (prefix + "self_attn.o_proj.weight", (h, shape.num_heads * shape.head_dim)),
            *[(prefix + name, dims) for name, dims in mlp],
            (prefix + "input_layernorm.weight", (h,)),
            (prefix + "post_attention_layernorm.weight", (h,)),
        ]
    return [*layout, ("model.norm.weight", (h,)), ("lm_head.weight", (shape.vocab_size, h))]


def lfm2_layout(shape: Shape) -> list[tuple[str, tuple[int, ...]]]:
    """Lfm2ForCausalLM's state_dict as save_pretrained writes it: each layer's mixer (the short convolution's
    depthwise kernel and projections, or attention with per-head q/k norms), MLP and norms; the final norm
    `embedding_norm`; no lm_head (tied to the embeddings)."""
    h, ff, head = shape.hidden_size, shape.intermediate_size, shape.head_dim
    layout: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (shape.vocab_size, h))]
    for layer in range(shape.num_layers):
        prefix = f"model.layers.{layer}."
        if layer in shape.attention_layers:
            mixer = [("self_attn.q_proj.weight", (shape.num_heads * head, h)),
                     ("self_attn.k_proj.weight", (shape.num_kv_heads * head, h)),
                     ("self_attn.v_proj.weight", (shape.num_kv_heads * head, h)),
                     ("self_attn.out_proj.weight", (h, shape.num_heads * head)),
                     ("self_attn.q_layernorm.weight", (head,)),
                     ("self_attn.k_layernorm.weight", (head,))]
        else:
            mixer = [("conv.conv.weight", (h, 1, LFM2_CONV_KERNEL)),
                     ("conv.in_proj.weight", (3 * h, h)),  # the B and C gates and the convolution's input
                     ("conv.out_proj.weight", (h, h))]
        layout += [(prefix + name, dims) for name, dims in [
            *mixer,
            ("feed_forward.w1.weight", (ff, h)),
            ("feed_forward.w3.weight", (ff, h)),
            ("feed_forward.w2.weight", (h, ff)),
            ("operator_norm.weight", (h,)),
            ("ffn_norm.weight", (h,)),
        ]]
    return [*layout, ("model.embedding_norm.weight", (h,))]


CONFIGS: dict[str, Callable[[Shape, str], dict]] = {
    "mistral": mistral_config, "mixtral": mistral_config, "lfm2": lfm2_config}
LAYOUTS: dict[str, Callable[[Shape], list[tuple[str, tuple[int, ...]]]]] = {
    "mistral": mistral_layout, "mixtral": mistral_layout, "lfm2": lfm2_layout}


def config(shape: Shape, transformers_version: str) -> dict:
    """The checkpoint's config.json, as its family's hub checkpoints have it."""
    return CONFIGS[shape.family](shape, transformers_version)


def tensor_layout(shape: Shape) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor in the hub files' order (the family's state_dict), which decides the shards."""
    return LAYOUTS[shape.family](shape)


def tensor_bytes(dims: tuple[int, ...]) -> int:
    return math.prod(dims) * BF16_BYTES


def shard_plan(layout: list[tuple[str, tuple[int, ...]]], shards: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Consecutive tensors split into `shards` files of about equal size (a tensor goes where it starts)."""
    total = sum(tensor_bytes(dims) for _, dims in layout)
    largest = max(tensor_bytes(dims) for _, dims in layout)
    if largest * shards > total:
        raise ValueError(f"a {largest}-byte tensor is larger than a 1/{shards} shard of {total} bytes")
    plan: list[list[tuple[str, tuple[int, ...]]]] = [[] for _ in range(shards)]
    start = 0
    for name, dims in layout:
        plan[min(shards - 1, start * shards // total)].append((name, dims))
        start += tensor_bytes(dims)
    return plan


def shard_name(index: int, shards: int) -> str:
    return f"model-{index + 1:05d}-of-{shards:05d}.safetensors"


def normal_bf16_table() -> np.ndarray:
    """65536 bf16 bit patterns: the quantiles of N(0, INIT_STD²). Indexing it with uniform random uint16s
    draws normal weights about ten times faster than numpy's normal sampler (a 7B build is disk-bound)."""
    quantiles = NormalDist(0.0, INIT_STD)
    values = np.array([quantiles.inv_cdf((i + 0.5) / 65536) for i in range(65536)], dtype=np.float32)
    bits = values.view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even


ONE_BF16 = np.uint16(0x3F80)


def tensor_blocks(name: str, dims: tuple[int, ...], table: np.ndarray, seed: int) -> Iterator[np.ndarray]:
    """The tensor's bf16 bits in blocks. Norm weights are ones (as a fresh model has them); the rest are
    normal, from a generator seeded by the tensor's name, so bytes do not depend on shard or order."""
    count = math.prod(dims)
    if len(dims) == 1:
        yield np.full(count, ONE_BF16, dtype=np.uint16)
        return
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    for start in range(0, count, BLOCK_ELEMENTS):
        yield table[rng.integers(0, 65536, min(BLOCK_ELEMENTS, count - start), dtype=np.uint16)]


def safetensors_header(tensors: list[tuple[str, tuple[int, ...]]]) -> bytes:
    """The length-prefixed JSON header, tensors in name order as the safetensors library writes them."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dims in tensors:
        size = tensor_bytes(dims)
        header[name] = {"dtype": "BF16", "shape": list(dims), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the library pads to 8 bytes so the data that follows is aligned
    return len(text).to_bytes(8, "little") + text


def write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], table: np.ndarray, seed: int) -> None:
    tensors = sorted(tensors)
    with path.open("wb", buffering=0) as out:
        out.write(safetensors_header(tensors))
        for name, dims in tensors:
            for block in tensor_blocks(name, dims, table, seed):
                out.write(memoryview(block))
        os.fsync(out.fileno())


def build_checkpoint(
    folder: Path,
    shape: Shape,
    tokenizer_dir: Path,
    transformers_version: str,
    *,
    shards: int = SHARDS,
    seed: int = SEED,
    say: Callable[[str], None] = print,
) -> Path:
    """Write the checkpoint into `folder` (built beside it and renamed at the end, so a killed build
    leaves nothing that looks complete)."""
    work = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / "config.json").write_text(json.dumps(config(shape, transformers_version), indent=2) + "\n")
    for file in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir / file, work / file)
    if (tokenizer_dir / "generation_config.json").is_file():
        shutil.copyfile(tokenizer_dir / "generation_config.json", work / "generation_config.json")
    layout = tensor_layout(shape)
    plan = shard_plan(layout, shards)
    table = normal_bf16_table()
    started = time.perf_counter()
    for index, tensors in enumerate(plan):
        write_shard(work / shard_name(index, shards), tensors, table, seed)
        done = sum(tensor_bytes(dims) for part in plan[: index + 1] for _, dims in part)
        say(f"  shard {index + 1}/{shards} written ({done / 1e9:.2f} GB, {time.perf_counter() - started:.0f} s)")
    index_file = {  # what transformers' save_pretrained writes, keys sorted as it sorts them
        "metadata": {"total_parameters": sum(math.prod(dims) for _, dims in layout),
                     "total_size": sum(tensor_bytes(dims) for _, dims in layout)},
        "weight_map": {name: shard_name(i, shards) for i, tensors in enumerate(plan) for name, _ in tensors},
    }
    (work / "model.safetensors.index.json").write_text(json.dumps(index_file, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    work.rename(folder)
    return folder


def checkpoint_key(shape: Shape, tokenizer_dir: Path, transformers_version: str) -> dict:
    """Everything the checkpoint's bytes depend on; a cached build is reused only when this matches."""
    return {
        "generator": GENERATOR_VERSION,
        "seed": SEED,
        "shards": SHARDS,
        "config": config(shape, transformers_version),
        "tokenizer_sha256": {file: hashlib.sha256((tokenizer_dir / file).read_bytes()).hexdigest()
                             for file in TOKENIZER_FILES},
    }


def cached_checkpoint(
    work_dir: Path, size: str, tokenizer_dir: Path, transformers_version: str, say: Callable[[str], None] = print
) -> Path:
    """work_dir/synthetic-<family>-<size>, built unless an earlier build with the same key is there whole.

    The key goes to work_dir/checkpoint.json (outside the checkpoint, where no converter sees it), written
    only after a complete build.
    """
    shape = SIZES[size]
    folder = work_dir / f"synthetic-{shape.family}-{size}"
    key_file = work_dir / "checkpoint.json"
    key = checkpoint_key(shape, tokenizer_dir, transformers_version)
    shard_files = [folder / shard_name(i, SHARDS) for i in range(SHARDS)]
    try:
        reusable = json.loads(key_file.read_text()) == key and all(f.is_file() for f in shard_files)
    except (OSError, ValueError):
        reusable = False
    if reusable:
        say(f"reusing {folder}")
        return folder
    key_file.unlink(missing_ok=True)
    total = sum(tensor_bytes(dims) for _, dims in tensor_layout(shape))
    say(f"building {folder} ({total / 1e9:.2f} GB of random bf16 weights)")
    build_checkpoint(folder, shape, tokenizer_dir, transformers_version, say=say)
    key_file.write_text(json.dumps(key, indent=2) + "\n")
    return folder
