"""Checkpoint tensors → the tensors the graph reads, as they stream in: what the Core ML writer does to a weight
before it becomes a blob.

- Fused projections (`attn_qkv`, `ffn_gate_up`: Phi-3) are split into their parts' rows: the graph has one
  convolution per projection whatever the checkpoint stores, so every family shares one graph (and the Llama
  graph that a test holds to ct.convert's stays as it is); the rows are views, so splitting costs no copy.
- A mixture of experts' stacks (one per layer: gate_up [E, 2·ff, hidden], down [E, hidden, ff]) are split the
  same way into each expert's gate, up and down (`expert_key`), which the graph applies as a dense MLP's.
- The norm offset (Gemma's 1 + w) is folded into every norm weight, as the GGUF writer does.
- The residual branch scale is folded into the weights that write into the residual stream: the last weight
  of each block's branch (the post-norm where there is one, else o_proj and down_proj). It is Granite's
  residual multiplier times the stream's scale, a power of two that keeps it inside fp16 (FP16Range,
  siliconvert/calibration.py).
- Qwen3-Next's gated delta rule projections, grouped per key head (in_proj_qkvz: each key head's q, k, then the
  v and z rows of its value heads; in_proj_ba: its b rows, then its a rows), are permuted into Qwen3.5's unfused
  ones (all q, all k, all v in value-head order; z; b; a): one graph for both, as transformers'
  fix_query_key_value_ordering orders them.
- The gated delta rule's decay rate −exp(A_log) is computed once, here (in float32, as transformers does).
- Gemma 4's router scale is folded with hidden^-½ into one weight: the graph applies it as the weight of the
  router's RMSNorm.
- A short convolution's state scale (the same kind of power of two, for what enters its state: B·x) is folded
  into B's rows of in_proj and the kernel's bias, and taken out again in out_proj's weight. The gated delta
  rule's conv state scale (for its conv's input, q, k and v) folds into in_proj_qkv and is taken out again in the
  kernel (no bias, and SiLU follows the convolution); Mamba2's (for x, B and C) into in_proj's xBC rows (and their
  bias) and out of the kernel, whose bias applies after it.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from siliconvert.architectures import ModelSpec
from siliconvert.architectures.base import role_shape
from siliconvert.convert.coreml.chunks import Key

FUSED = {"attn_qkv": ("attn_q", "attn_k", "attn_v"), "ffn_gate_up": ("ffn_gate", "ffn_up")}
# fused by key head (Qwen3-Next): permuted into the unfused roles' rows (delta_parts)
GROUPED = {"delta_qkvz": ("delta_qkv", "delta_gate"), "ssm_ba": ("ssm_beta", "ssm_alpha")}
# The experts' down projections write into the residual stream as the dense MLP's does: the branch scale too
WRITES_LIKE = {"ffn_down_exps": "ffn_down", "ffn_down_shexp": "ffn_down",
               "shortconv.out_proj": "attn_output",  # the short convolution's branch, as attention's
               "ssm_out": "attn_output"}  # the gated delta rule's and Mamba2's
# The norms around each block, per norm placement: (before the block, after it) for attention and for the MLP
# A sparse layer's expert stacks → the parts each expert's rows hold, in row order
EXPERT_STACKS = {"ffn_gate_up_exps": ("ffn_gate_exp", "ffn_up_exp"), "ffn_down_exps": ("ffn_down_exp",)}
BLOCK_NORMS = {
    "pre": (("attn_norm", None), ("ffn_norm", None)),
    "post": ((None, "post_attention_norm"), (None, "post_ffw_norm")),
    "sandwich": (("attn_norm", "post_attention_norm"), ("ffn_norm", "post_ffw_norm")),
}


def expert_key(part: str, layer: int, expert: int, kind: str = "weight") -> Key:
    """One expert's gate, up or down weight or bias (`part` of EXPERT_STACKS), as the graph reads it."""
    return (f"{part}[{expert}]", layer, kind)


def tensor_shape(spec: ModelSpec, key: Key) -> tuple[int, ...]:
    """A tensor's shape in the checkpoint (HF layout: linear weights are (out, in)), or one expert's part of a
    stack; a bias is its first axis (a stack's bias its first two: [experts, outputs], gpt-oss)."""
    role, layer, kind = key
    if role.endswith("]"):  # an expert's part (expert_key)
        h, ff = spec.hidden_size, spec.experts.intermediate_size
        shape = (h, ff) if role.startswith("ffn_down_exp[") else (ff, h)
        return shape if kind == "weight" else shape[:1]
    shape = role_shape(spec, role, layer)  # a layer's own attention and MLP sizes (Gemma 4)
    return shape if kind == "weight" else shape[:2] if role in EXPERT_STACKS else shape[:1]


def graph_keys(spec: ModelSpec, key: Key) -> list[Key]:
    """The tensors the graph reads that come from one checkpoint tensor."""
    role, layer, kind = key
    if role in EXPERT_STACKS:
        return [expert_key(part, layer, expert, kind) for expert in range(spec.experts.count)
                for part in EXPERT_STACKS[role]]
    return [(part, layer, kind) for part in FUSED.get(role) or GROUPED.get(role) or (role,)]


def branch_outputs(spec: ModelSpec) -> tuple[str, ...]:
    """The roles whose weights write last into the residual stream: the branch scale folds into them."""
    posts = tuple(after for _, after in BLOCK_NORMS[spec.norm_placement] if after)
    return posts or ("attn_output", "ffn_down")


def graph_tensors(spec: ModelSpec, key: Key, array: np.ndarray, branch_scale: float, state_scale: float = 1.0
                  ) -> Iterator[tuple[Key, np.ndarray]]:
    """The graph's tensors made from one checkpoint tensor (of the right shape), with the folds above."""
    role, _, kind = key
    if role in FUSED:
        sizes = [tensor_shape(spec, part)[0] for part in graph_keys(spec, key)]
        yield from zip(graph_keys(spec, key), np.split(array, np.cumsum(sizes)[:-1]), strict=True)
        return
    if role in GROUPED:
        for part_key, part in delta_parts(spec, key, array):
            yield from graph_tensors(spec, part_key, part, branch_scale, state_scale)
        return
    if role in EXPERT_STACKS:  # each expert's rows (or bias), one part after another (views, until a scale is folded)
        scale = branch_scale if WRITES_LIKE.get(role) in branch_outputs(spec) else 1.0
        parts = [np.split(rows, len(EXPERT_STACKS[role])) for rows in array]
        for part_key, values in zip(graph_keys(spec, key), (part for rows in parts for part in rows), strict=True):
            yield part_key, values if scale == 1.0 else values.astype(np.float32) * np.float32(scale)
        return
    if state_scale != 1.0 and role in ("shortconv.in_proj", "shortconv.conv", "shortconv.out_proj"):
        array = array.astype(np.float32)
        if role == "shortconv.in_proj":  # B's rows (the first third), whose product with x enters the state
            array[: spec.hidden_size] *= np.float32(state_scale)
        elif role == "shortconv.conv" and kind == "bias":
            array *= np.float32(state_scale)
        elif role == "shortconv.out_proj" and kind == "weight":
            array /= np.float32(state_scale)
    if state_scale != 1.0 and role in ("delta_qkv", "ssm_conv1d") and spec.gated_delta is not None:
        array = array.astype(np.float32) * np.float32(state_scale if role == "delta_qkv" else 1 / state_scale)
    if state_scale != 1.0 and role in ("ssm_in", "ssm_conv1d") and spec.mamba2 is not None:
        array = array.astype(np.float32)
        if role == "ssm_in":  # the xBC rows, after z's
            mamba = spec.mamba2
            array[mamba.inner_size: mamba.inner_size + mamba.conv_channels] *= np.float32(state_scale)
        elif kind == "weight":
            array /= np.float32(state_scale)
    if role == "ssm_a":
        array = -np.exp(array.astype(np.float32))
    if role == "ffn_gate_inp_scale":  # Gemma 4's router: its input × the scale × hidden^-½, the norm's weight here
        array = array.astype(np.float32) * np.float32(spec.hidden_size**-0.5)
    if role.endswith("_norm") and spec.norm_offset_of(role):
        array = array.astype(np.float32) + np.float32(spec.norm_offset_of(role))
    if role == "per_layer_post_norm" and branch_scale != 1.0:  # the stream's scale alone: no residual multiplier
        array = array.astype(np.float32) * np.float32(branch_scale / spec.residual_scale)
    # a post-norm's bias-free weight, or o_proj/down_proj's weight and bias: the branch output is linear in them
    if WRITES_LIKE.get(role, role) in branch_outputs(spec) and branch_scale != 1.0:
        array = array.astype(np.float32) * np.float32(branch_scale)
    yield key, array


# Linear layers whose input the graph holds at a scale of the source's, by the folds above: Gemma 4's per-layer
# gate and projection read the stream as it is (scaled), its per-layer model projection the scaled embeddings
STREAM_SCALED_INPUTS = ("per_layer_inp_gate", "per_layer_proj", "per_layer_model_proj")


def input_scale(role: str, stream_scale: float, state_scale: float) -> float:
    """How much larger the input of `role`'s linear layer is in the graph than in the source: the stream's scale
    for STREAM_SCALED_INPUTS, the state scale for a short convolution's out_proj (its output is B·x's scale, taken
    out in out_proj's weight), else 1 (a norm's output, or a product the folds leave as it is)."""
    if role in STREAM_SCALED_INPUTS:
        return stream_scale
    return state_scale if role == "shortconv.out_proj" else 1.0


def delta_parts(spec: ModelSpec, key: Key, array: np.ndarray) -> Iterator[tuple[Key, np.ndarray]]:
    """Qwen3-Next's in_proj_qkvz or in_proj_ba (rows grouped per key head) as the unfused roles' rows (GROUPED)."""
    role = key[0]
    delta = spec.gated_delta
    per_key_head = delta.value_heads // delta.key_heads
    groups = array.reshape(delta.key_heads, -1, *array.shape[1:])  # (key heads, rows of each, hidden)
    if role == "delta_qkvz":
        values = per_key_head * delta.value_head_dim
        q, k, v, z = np.split(groups, np.cumsum([delta.key_head_dim, delta.key_head_dim, values]), axis=1)
        parts = [np.concatenate([part.reshape(-1, *array.shape[1:]) for part in (q, k, v)]), z]
    else:
        parts = np.split(groups, 2, axis=1)  # b, a
    for part_key, part in zip(graph_keys(spec, key), parts, strict=True):
        yield part_key, np.ascontiguousarray(part.reshape(-1, *array.shape[1:]))
