"""config.json's numbers and types, checked against the weights before anything is sized by them.

A count or dimension in config.json is only a claim: `num_hidden_layers: 1000000000` beside the weights of a
4-layer model once built a billion-layer table of expected tensors. Here every count is an integer in a sane
range and no larger than the weights can hold (no config dimension exceeds the largest tensor dimension, no
more layers than the headers hold), so whatever is derived from them later is bounded by the files
themselves. The exact shapes are then checked tensor by tensor against the family's description.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from siliconvert.errors import CheckpointError, short

# Counts and dimensions that size tensors: each must be found among the weights' own dimensions.
TENSOR_DIMENSIONS = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "moe_intermediate_size", "num_experts", "num_local_experts")
# Mixture-of-experts counts that size no tensor themselves (experts per token, the sparse-layer step)
EXPERT_COUNTS = ("num_experts_per_tok", "decoder_sparse_step")
# Positions no tensor holds (RoPE is computed): bounded by what a GGUF context length (uint32) and any real
# model (10M positions at most today) allow.
MAX_POSITIONS = 1 << 28
POSITION_KEYS = ("max_position_embeddings", "sliding_window")
FLAGS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window")
TEXT_KEYS = ("model_type", "hidden_act")
# Names transformers turns into a torch dtype (config.json's `dtype`, or `torch_dtype` before transformers 5).
TORCH_DTYPE_NAMES = frozenset({"auto", "float32", "float", "float16", "half", "bfloat16", "float64", "double",
                               "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "int8",
                               "uint8", "int16", "int32", "int64", "bool"})
ROPE_KEYS = ("rope_parameters", "rope_scaling")
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
# What each RoPE scaling needs, as transformers' own validation of rope parameters requires it.
ROPE_NEEDS = {"linear": ("factor",), "dynamic": ("factor",), "yarn": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
# Digits capped: a layer index is a short number, and int() of thousands of digits is refused by Python.
LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d{1,9})\.")


class Shaped(Protocol):
    name: str
    shape: tuple[int, ...]


def check_config(config: dict[str, Any], tensors: Iterable[Shaped], where: Path) -> None:
    """Refuse a config.json whose values have the wrong type or range, or whose counts exceed the weights."""
    _check_types(config, where)
    tensors = list(tensors)
    largest = max((d for t in tensors for d in t.shape), default=0)
    for key in TENSOR_DIMENSIONS:
        value = config.get(key)
        if key == "intermediate_size" and config.get("moe_intermediate_size") is not None:
            continue  # the dense MLP's size: a model with experts in every layer holds no tensor of it
        if value is not None and value > largest:
            raise CheckpointError(f"{key} is {short(value)}, larger than any tensor dimension in the weights "
                                  f"(largest {largest})", where)
    heads, head_dim = config.get("num_attention_heads"), config.get("head_dim")
    if heads is not None and head_dim is not None and heads * head_dim > largest:
        raise CheckpointError(f"num_attention_heads × head_dim is {heads * head_dim}, larger than any tensor "
                              f"dimension in the weights (largest {largest})", where)
    layers = config.get("num_hidden_layers")
    held = len({int(m.group(1)) for t in tensors if (m := LAYER_INDEX.search(t.name))})
    if layers is not None and layers > held:
        raise CheckpointError(f"num_hidden_layers is {layers}, but the weights hold {held} layers", where)


def _check_types(config: dict[str, Any], where: Path) -> None:
    for key in (*TENSOR_DIMENSIONS, "num_hidden_layers"):
        # Qwen3-MoE: 0 experts is all dense; Granite 4.0-H: the shared MLP alone
        _count(config, key, 0 if key in ("num_experts", "num_local_experts") else 1, None, where)
    for key in EXPERT_COUNTS:
        _count(config, key, 1, None, where)
    only_dense = config.get("mlp_only_layers")
    if only_dense is not None and not (isinstance(only_dense, list) and all(_is_int(i) for i in only_dense)):
        raise CheckpointError(f"mlp_only_layers must be a list of layer indices (got {short(only_dense)})", where)
    for key in POSITION_KEYS:
        _count(config, key, 0 if key == "sliding_window" else 1, MAX_POSITIONS, where)
    for key in ("rms_norm_eps", "rope_theta"):
        _positive_number(config.get(key), key, where)
    for key in FLAGS:
        if config.get(key) is not None and not isinstance(config[key], bool):
            raise CheckpointError(f"{key} must be true or false (got {short(config[key])})", where)
    for key in TEXT_KEYS:
        if config.get(key) is not None and not isinstance(config[key], str):
            raise CheckpointError(f"{key} must be a string (got {short(config[key])})", where)
    for key in ("dtype", "torch_dtype"):
        if config.get(key) is not None and config[key] not in TORCH_DTYPE_NAMES:
            raise CheckpointError(f"{key} {short(config[key])} names no torch dtype", where)
    layer_types = config.get("layer_types")
    if layer_types is not None:
        if not isinstance(layer_types, list) or not all(isinstance(t, str) for t in layer_types):
            raise CheckpointError(f"layer_types must be a list of strings (got {short(layer_types)})", where)
        if config.get("num_hidden_layers") is not None and len(layer_types) != config["num_hidden_layers"]:
            raise CheckpointError(f"layer_types lists {len(layer_types)} layers, num_hidden_layers is "
                                  f"{config['num_hidden_layers']}", where)
    architectures = config.get("architectures")
    if architectures is not None and not (isinstance(architectures, list)
                                          and all(isinstance(a, str) for a in architectures)):
        raise CheckpointError(f"architectures must be a list of class names (got {short(architectures)})", where)
    for key in TOKEN_ID_KEYS:
        ids = config.get(key)
        if ids is not None and not all(_is_int(i) for i in (ids if isinstance(ids, list) else [ids])):
            raise CheckpointError(f"{key} must be a token id or a list of them (got {short(ids)})", where)
    for key in ROPE_KEYS:
        _check_rope(config.get(key), key, where)


def _check_rope(rope: Any, key: str, where: Path) -> None:
    if rope is None:
        return
    if not isinstance(rope, dict):
        raise CheckpointError(f"{key} must be a JSON object (got {short(rope)})", where)
    for kind in ("rope_type", "type"):
        if rope.get(kind) is not None and not isinstance(rope[kind], str):
            raise CheckpointError(f"{key}.{kind} must be a string (got {short(rope[kind])})", where)
    kind = rope.get("rope_type") or rope.get("type")
    for needed in ROPE_NEEDS.get(kind, ()):
        if rope.get(needed) is None:
            raise CheckpointError(f"{key}.{needed} is required for rope_type {kind!r}", where)
    for number in ("factor", "rope_theta", "low_freq_factor", "high_freq_factor"):
        _positive_number(rope.get(number), f"{key}.{number}", where)
    for number in ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim"):
        value = rope.get(number)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                  or not math.isfinite(value)):
            raise CheckpointError(f"{key}.{number} must be a finite number (got {short(value)})", where)
    _count(rope, "original_max_position_embeddings", 1, MAX_POSITIONS, where, prefix=f"{key}.")


def _count(config: dict[str, Any], key: str, low: int, high: int | None, where: Path, prefix: str = "") -> None:
    value = config.get(key)
    if value is None:
        return
    if not _is_int(value):
        raise CheckpointError(f"{prefix}{key} must be an integer (got {short(value)})", where)
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise CheckpointError(f"{prefix}{key} must be {bound} (got {value})", where)


def _positive_number(value: Any, key: str, where: Path) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise CheckpointError(f"{key} must be a positive finite number (got {short(value)})", where)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
