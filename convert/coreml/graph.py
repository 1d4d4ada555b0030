"""The MIL program of one chunk: how the model description (ModelSpec) becomes ops.

Activations are channels-first (1, C, 1, S), the layout the Neural Engine works in natively; linears are
1×1 convolutions over it (the ANE's fastest op, and no transposes between layers). Attention works per
KV-head group in (1, kv_heads, group × S, head_dim) without repeating K and V for grouped-query heads.

Read from build_function down: its inputs, what every layer shares (positions, RoPE angles, the mask, the KV
caches and conv states), embed, decoder_layer (attention or short_conv, then mlp) per layer, lm_head.
WeightedOps is where each linear and norm takes its weight; required_tensors says which weights the graph reads
(folds.py: in what shape).

Where each trait of the spec becomes ops, one place each (ops appear only where a trait departs from Llama's):
    layers[i].mixer           decoder_layer: attention, short_conv over the conv state, gated_delta or mamba2 over
                              their conv and recurrent states (grouped by mixer once, in chunks.layers_by_mixer)
    attn_output_gate          attention: q_proj's gate rows, sigmoid(gate) × the heads' output before o_proj
    layers[i].window          causal_masks: one mask per window size, shared by the layers with that window
    layers[i].rope            rope_angles / rope_frequencies: one cos/sin table pair per distinct rope (θ,
                              scaling, partial rotary: rope rotates the first `dim` dimensions); None: NoPE
    position_attention_scale  attention_temperature: a table over the context gathered at the block's positions, as
                              rope's are; q × it after rope (no op where the context never reaches its onset)
    norm_placement            residual, with folds.BLOCK_NORMS: pre, post or sandwich norms around each branch
    qk_norm                   attention: per head (over head_dim) or over the whole projection
    activation                mlp: SwiGLU or GeGLU (tanh-approximated GELU)
    experts, layers[i].sparse experts: the router (softmax, top-k, renormalised where normalize_topk) and every
                              expert's mlp weighted by it, plus a shared expert behind its sigmoid gate where
                              the spec has one; the chosen ids are the EXPERT_IDS output; beside_dense: the
                              layer's dense MLP added to them (decoder_layer); biases: the router's and every
                              expert's (ops.linear); clamped_swiglu: mlp's clamped gate and up; router_norm: the
                              router reads the residual stream RMS-normed by its scale (experts); expert_scales:
                              the routing map × each expert's scale; branch_norms: expert_block (decoder_layer)
    embedding_scale           embed (times the fp16 range scale, siliconvert/calibration.py)
    attention_scale, attn_softcap    attention
    attention_sinks                  sink_softmax: each head's sink logit, one more column of the softmax, dropped
    layers[i].head_dim, kv_heads     attention, with a KV cache state pair per distinct shape (chunks.cache_slots)
    layers[i].values_from_keys       attention: k_proj's output is also the values (before k's norm and rope)
    value_norm                       attention: values RMS-normed per head, without a weight
    layers[i].kv_source              attention: the source layer's cache row, no k/v of its own (same chunk)
    layers[i].intermediate_size      mlp, through the weights' shapes (folds.tensor_shape)
    per_layer_input                  per_layer_inputs (first chunk; the others take them), per_layer_branch
    layer_output_scale               decoder_layer: the stream × the layer's scalar
    rope kind "proportional"         rope_frequencies: the pairs past the rotary fraction at frequency 0
    logits_scale, final_softcap      lm_head
    norm_offset, residual_scale, fused_qkv / fused_gate_up: in the weights, not ops (folds.py)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import coremltools as ct
import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Function, Program, types
from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY

from siliconvert.architectures import ModelSpec
from siliconvert.architectures.base import OWN_KV_ROLES, Rope
from siliconvert.convert.coreml.chunks import (
    PER_LAYER_INPUTS,
    VALID_TOKENS,
    Chunk,
    Key,
    blobs_of,
    cache_slots,
    head_pieces,
    head_role,
    weight_id,
)
from siliconvert.convert.coreml.folds import BLOCK_NORMS, EXPERT_STACKS, expert_key, tensor_shape
from siliconvert.convert.coreml.weights import WeightConsts
from siliconvert.errors import CheckpointError

MASK_VALUE = -30000.0  # additive mask: exp() of it is 0, yet adding it to any score stays finite in fp16
SHARED_EXPERT = ("ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp")  # its gate, up and down, as mlp's roles
SHORT_CONV_ROLES = ("shortconv.in_proj", "shortconv.conv", "shortconv.out_proj")
# the gated delta rule's weights, unfused (folds.py permutes Qwen3-Next's fused ones into them)
GATED_DELTA_ROLES = ("delta_qkv", "delta_gate", "ssm_beta", "ssm_alpha", "ssm_conv1d", "ssm_dt", "ssm_a", "ssm_norm",
                     "ssm_out")
# Gemma 4's per-layer inputs: each layer's gate, projection and norm; the first chunk's table, projection and norm
PER_LAYER_ROLES = ("per_layer_inp_gate", "per_layer_proj", "per_layer_post_norm")
PER_LAYER_EMBEDDING_ROLES = ("per_layer_token_embd", "per_layer_model_proj", "per_layer_proj_norm")
MAMBA2_ROLES = ("ssm_in", "ssm_conv1d", "ssm_dt", "ssm_a", "ssm_d", "ssm_norm", "ssm_out")
EXPERT_IDS = "expert_ids"  # the output of a chunk with sparse layers: their routers' choices (1, S, layers, k)
NORM_FLOOR = 2.0**-6  # RMSNorm divides by max(|x|, floor): an all-zero token must not divide by zero
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


def required_tensors(spec: ModelSpec, chunk: Chunk) -> set[Key]:
    """Every tensor the chunk's graph reads (fused checkpoint tensors arrive split: folds.py)."""
    per_layer = [(role, "weight") for norms in BLOCK_NORMS[spec.norm_placement] for role in norms if role]
    attention = []
    if spec.qk_norm:
        attention += [("attn_q_norm", "weight"), ("attn_k_norm", "weight")]
    attention += [(role, "weight") for role in ("attn_q", "attn_k", "attn_v", "attn_output")]
    if spec.qkv_bias:
        attention += [("attn_q", "bias"), ("attn_k", "bias"), ("attn_v", "bias")]
    if spec.attn_output_bias:
        attention.append(("attn_output", "bias"))
    if spec.attention_sinks:
        attention.append(("attn_sinks", "weight"))
    conv_biased = spec.short_conv is not None and spec.short_conv.bias
    conv = [(role, kind) for role in SHORT_CONV_ROLES for kind in ("weight", "bias") if kind == "weight" or conv_biased]
    dense_mlp = [(role, "weight") for role in ("ffn_gate", "ffn_up", "ffn_down")]
    if spec.mlp_bias:
        dense_mlp += [("ffn_gate", "bias"), ("ffn_up", "bias"), ("ffn_down", "bias")]
    keys = {(role, layer, kind) for layer in chunk.layers for role, kind in per_layer}
    for layer in chunk.mixer_layers("attention"):  # less the keys and values a layer takes from another (Gemma 4)
        spec_layer = spec.layers[layer]
        unused = (OWN_KV_ROLES if spec_layer.kv_source is not None
                  else ("attn_v",) if spec_layer.values_from_keys else ())
        keys.update((role, layer, kind) for role, kind in attention if role not in unused)
    if spec.per_layer_input:
        keys.update((role, layer, "weight") for layer in chunk.layers for role in PER_LAYER_ROLES)
    if spec.layer_output_scale:
        keys.update(("layer_output_scale", layer, "weight") for layer in chunk.layers)
    keys.update((role, layer, kind) for layer in chunk.mixer_layers("short_conv") for role, kind in conv)
    keys.update((role, layer, "weight") for layer in chunk.mixer_layers("gated_delta") for role in GATED_DELTA_ROLES)
    if (mamba := spec.mamba2) is not None:
        biases = [role for role, biased in (("ssm_in", mamba.proj_bias), ("ssm_out", mamba.proj_bias),
                                            ("ssm_conv1d", mamba.conv_bias)) if biased]
        keys.update((role, layer, kind) for layer in chunk.mixer_layers("mamba2")
                    for role, kind in [(role, "weight") for role in MAMBA2_ROLES] + [(role, "bias") for role in biases])
    for layer in chunk.layers:
        if spec.layers[layer].sparse:  # the router and every expert's gate, up and down; the shared expert's
            keys.add(("ffn_gate_inp", layer, "weight"))
            kinds = ("weight", "bias") if spec.experts.biases else ("weight",)
            keys.update(expert_key(part, layer, expert, kind) for expert in range(spec.experts.count)
                        for parts in EXPERT_STACKS.values() for part in parts for kind in kinds)
            if spec.experts.biases:
                keys.add(("ffn_gate_inp", layer, "bias"))
            if spec.experts.shared_intermediate_size:
                keys.update((role, layer, "weight") for role in (*SHARED_EXPERT, "ffn_gate_inp_shexp"))
            if spec.experts.beside_dense:
                keys.update((role, layer, kind) for role, kind in dense_mlp)
            if spec.experts.router_norm:
                keys.add(("ffn_gate_inp_scale", layer, "weight"))
            if spec.experts.expert_scales:
                keys.add(("ffn_exps_scale", layer, "weight"))
            if spec.experts.branch_norms:
                keys.update((role, layer, "weight") for role in BRANCH_NORMS)
        else:
            keys.update((role, layer, kind) for role, kind in dense_mlp)
    if chunk.first:
        keys.add(("token_embd", None, "weight"))
        if spec.per_layer_input:
            keys.update((role, None, "weight") for role in PER_LAYER_EMBEDDING_ROLES)
    if chunk.last:
        keys.add(("output_norm", None, "weight"))
        keys.add((head_role(spec), None, "weight"))
    return keys


def build_program(spec: ModelSpec, chunk: Chunk, block: int, context: int, weights: WeightConsts,
                  stream_scale: float = 1.0, recurrent_scale: float = 1.0) -> Program:
    """The chunk's two functions, "decode" (1 token, the default) and "prefill" (`block` tokens), after PASSES."""
    program = Program()
    for name, tokens in (("decode", 1), ("prefill", block)):
        # Passes run on each function alone, as ct.convert runs them: some keep state from one function to the
        # next (add_int16_cast's target dtype), which would make prefill depend on decode. They are called
        # directly: PassPipelineManager validates the whole program after every pass (the exporters do once).
        alone = Program()
        alone.add_function("main", build_function(spec, chunk, tokens, context, weights, stream_scale,
                                                  recurrent_scale))
        for graph_pass in PASSES:
            PASS_REGISTRY[graph_pass](alone)
        program.add_function(name, alone.functions["main"])
    program.default_function_name = "decode"
    program.export_as_multifunction = True
    return program


def build_function(spec: ModelSpec, chunk: Chunk, tokens: int, context: int, weights: WeightConsts,
                   stream_scale: float = 1.0, recurrent_scale: float = 1.0) -> Function:
    """`tokens` tokens through the chunk's layers; `stream_scale` scales the residual stream, `recurrent_scale` the
    gated delta rule's and Mamba2's recurrent states (FP16Range)."""
    # The builder names ops from a process-wide counter that ct.convert clears after each conversion; from
    # zero in every function, the names (and so model.mlmodel) are the same in every run.
    mb.name_count.clear()
    ops = WeightedOps(spec, weights, required_tensors(spec, chunk))
    with Function(function_inputs(spec, chunk, tokens, context), opset_version=ct.target.iOS18) as function:
        shared = shared_values(spec, chunk, context, tokens, function.inputs, recurrent_scale)
        x = (embed(ops, chunk, function.inputs["input_ids"], tokens, spec.embedding_scale * stream_scale) if chunk.first
             else function.inputs["hidden_states"])
        if spec.per_layer_input:  # made by the first chunk, an input of the others
            per_layer = (per_layer_inputs(ops, function.inputs["input_ids"], x, tokens, stream_scale) if chunk.first
                         else function.inputs[PER_LAYER_INPUTS])
            shared = dataclasses.replace(shared, per_layer=per_layer, stream_scale=stream_scale)
        expert_ids: list = []  # each sparse layer's chosen experts (S, k), in layer order
        rows = {layer: (mixer, row) for mixer, layers in chunk.mixers for row, layer in enumerate(layers)}
        for layer in chunk.layers:
            x = decoder_layer(ops, x, layer, *rows[layer], shared, expert_ids)
        out = lm_head(ops, x) if chunk.last else mb.identity(x=x, name="hidden_states_out")
        if PER_LAYER_INPUTS in chunk.output_names():
            out = [out, mb.identity(x=shared.per_layer, name=PER_LAYER_INPUTS)]
        else:
            out = [out]
        if not expert_ids:
            function.set_outputs(out)
        else:  # (1, S, sparse layers, k): what a runner compares with the reference's choices
            shape = [1, tokens, 1, spec.experts.used]
            if len(expert_ids) == 1:
                ids = mb.reshape(x=expert_ids[0], shape=shape, name=EXPERT_IDS)
            else:
                ids = mb.concat(values=[mb.reshape(x=layer_ids, shape=shape) for layer_ids in expert_ids], axis=2,
                                name=EXPERT_IDS)
            function.set_outputs([*out, ids])
    return function


def function_inputs(spec: ModelSpec, chunk: Chunk, tokens: int, context: int) -> dict:
    """Token ids (1, S) into the first chunk, hidden states (1, C, 1, S) into the others; the block's position;
    with recurrent states, how many of the S tokens are real; per-layer inputs (1, layers, size, S) into the chunks
    after the first; the states of the chunk's mixers (state_shapes)."""
    h = spec.hidden_size
    first_input = (mb.TensorSpec((1, tokens), dtype=types.int32) if chunk.first
                   else mb.TensorSpec((1, h, 1, tokens), dtype=types.fp16))
    inputs = {chunk.input_names()[0]: first_input, "position": mb.TensorSpec((1,), dtype=types.int32)}
    if chunk.recurrent:
        inputs[VALID_TOKENS] = mb.TensorSpec((1,), dtype=types.int32)
    if PER_LAYER_INPUTS in chunk.input_names():
        inputs[PER_LAYER_INPUTS] = mb.TensorSpec((1, spec.num_layers, spec.per_layer_input, tokens), dtype=types.fp16)
    for name, shape in state_shapes(spec, chunk, context).items():
        inputs[name] = mb.StateTensorSpec(shape, dtype=types.fp16)
    return inputs


def state_shapes(spec: ModelSpec, chunk: Chunk, context: int) -> dict[str, tuple[int, ...]]:
    """The chunk's states, fp16, one row per layer of their mixer: the KV cache of its attention layers as two
    states (layers, KVH, context, D), a pair per distinct KVH and D (cache_slots); the last kernel − 1 values of
    B·x of its short-conv layers (layers, C, 1, kernel − 1), laid out as the activations are; of its
    gated-delta-rule layers, the conv's last kernel − 1 inputs (layers, q + k + v channels, 1, kernel − 1) and the
    recurrent state (layers, value heads, key head dim, value head dim); of its Mamba2 layers, the conv's last
    kernel − 1 inputs (layers, x + B + C channels, 1, kernel − 1) and the SSM state (layers, heads, head dim, state
    size)."""
    shapes: dict[str, tuple[int, ...]] = {}
    caches: dict[str, list[int]] = {}  # suffix → the layers with a row in it (cache_slots)
    for layer, (suffix, _) in cache_slots(spec, chunk).items():
        if spec.layers[layer].kv_source is None:
            caches.setdefault(suffix, []).append(layer)
    for suffix, layers in caches.items():
        shape = (len(layers), spec.layer_kv_heads(layers[0]), context, spec.layer_head_dim(layers[0]))
        shapes |= {f"{name}{suffix}": shape for name in ("key_cache", "value_cache")}
    if short_conv := chunk.mixer_layers("short_conv"):
        if spec.short_conv.kernel < 2:
            raise CheckpointError(f"a short convolution of {spec.short_conv.kernel} tap carries no state: the "
                                  "Core ML writer needs a kernel of 2 taps or more")
        shapes["conv_state"] = (len(short_conv), spec.hidden_size, 1, spec.short_conv.kernel - 1)
    if gated_delta := chunk.mixer_layers("gated_delta"):
        delta = spec.gated_delta
        if delta.conv_kernel < 2:
            raise CheckpointError(f"a gated delta rule's convolution of {delta.conv_kernel} tap carries no state: "
                                  "the Core ML writer needs a kernel of 2 taps or more")
        shapes["delta_conv_state"] = (len(gated_delta), delta.conv_channels, 1, delta.conv_kernel - 1)
        shapes["recurrent_state"] = (len(gated_delta), *delta.state_shapes()["recurrent"])
    if mamba2 := chunk.mixer_layers("mamba2"):
        mamba = spec.mamba2
        if mamba.conv_kernel < 2:
            raise CheckpointError(f"a Mamba2 convolution of {mamba.conv_kernel} tap carries no state: the Core ML "
                                  "writer needs a kernel of 2 taps or more")
        shapes["ssm_conv_state"] = (len(mamba2), mamba.conv_channels, 1, mamba.conv_kernel - 1)
        shapes["ssm_state"] = (len(mamba2), *mamba.state_shapes()["recurrent"])
    return shapes


@dataclass(frozen=True)
class WeightedOps:
    """The ops that apply a checkpoint weight, each weight's const made through `weights`: every linear and norm
    of the graph goes through here."""

    spec: ModelSpec
    weights: WeightConsts
    needed: set[Key]  # the chunk's required_tensors: which biases it has

    def linear(self, x, role: str, layer: int, name: str):
        """HF's (out, in) weight as a 1×1 convolution's (out, in, 1, 1), over (1, C_in, 1, S)."""
        out, inp = tensor_shape(self.spec, (role, layer, "weight"))
        weight = self.weights.const(weight_id((role, layer, "weight")), (out, inp, 1, 1), f"{name}_weight")
        bias = None
        if (role, layer, "bias") in self.needed:
            bias = self.weights.const(weight_id((role, layer, "bias")), (out,), f"{name}_bias")
        x = self.weights.input(x, weight_id((role, layer, "weight")), name)  # int8 and back in a W8A8 package
        return mb.conv(x=x, weight=weight, bias=bias, name=name)

    def norm(self, x, role: str, layer: int | None, name: str, axis: int = 1):
        """RMSNorm over `axis` (channels, or a head's dimensions) with the norm weight of `role` (its offset
        folded in: folds.py)."""
        (size,) = tensor_shape(self.spec, (role, layer, "weight"))
        shape = tuple(size if i == axis else 1 for i in range(4))
        weight = self.weights.const(weight_id((role, layer, "weight")), shape, f"{name}_weight")
        return rms_norm(x, weight, self.spec.rms_norm_eps, name, axis)


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
        updated = mb.slice_update(x=self.value, update=update, begin=begin, end=end)
        self.value = mb.coreml_update_state(state=self.state, value=updated)
        return self.row(local)

    def row(self, local: int):
        """The layer's whole cache as written so far (a kv-shared layer reads its source layer's)."""
        layers, kvh, context, d = self.value.shape
        if layers == 1:  # a one-layer state: the layer's cache is the whole state (no no-op slice)
            return self.value
        return mb.slice_by_index(x=self.value, begin=[local, 0, 0, 0], end=[local + 1, kvh, context, d])


class ConvState:
    """A conv state of a function, a row per layer: the short-conv layers' (layers, C, 1, kernel − 1), or the gated
    delta rule's conv inputs; read once, each layer's write chains on the previous one (as CacheState's)."""

    def __init__(self, state):
        self.state = state
        self.value = mb.read_state(input=state)

    def read(self, row: int):
        """The layer's row (1, ...): its last kernel − 1 inputs of the convolution."""
        if self.value.shape[0] == 1:
            return self.value
        return mb.slice_by_index(x=self.value, begin=[row, 0, 0, 0], end=[row + 1, *self.value.shape[1:]])

    def write(self, update, row: int) -> None:
        updated = (update if self.value.shape[0] == 1
                   else mb.slice_update(x=self.value, update=update, begin=[row, 0, 0, 0],
                                        end=[row + 1, *self.value.shape[1:]]))
        self.value = mb.coreml_update_state(state=self.state, value=updated)


class RecurrentState(ConvState):
    """The gated delta rule's recurrent states (layers, value heads, key head dim, value head dim), or Mamba2's
    (layers, heads, head dim, state size), × the recurrent scale: read and written by row as a conv state is."""


@dataclass(frozen=True)
class Shared:
    """What every layer of one function uses: the block's start position, the RoPE angles (cos, sin) of each
    rope and the mask of each attention window the chunk's layers use, and the states of its mixers (None where
    the chunk has no layer of that mixer); with a conv state, how many of the block's tokens are real."""

    position: object  # MIL vars throughout
    angles: dict[str, tuple]  # rope_key(rope) → (cos, sin)
    masks: dict[int | None, object]  # mask_key(window) → additive mask
    keys: dict[str, CacheState]  # cache_slots' suffix → the state
    values: dict[str, CacheState]
    conv: ConvState | None = None
    valid_tokens: object = None
    delta_conv: ConvState | None = None
    recurrent: RecurrentState | None = None
    delta: DeltaConsts | None = None  # the gated delta rule's and Mamba2's
    ssm_conv: ConvState | None = None
    ssm: RecurrentState | None = None
    # (1, 1, 1, S): Llama 4's attention temperature at the block's positions, q's multiplier after rope (None: the
    # spec has none, or the context never reaches it)
    temperature: object = None
    slots: dict[int, tuple[str, int]] | None = None  # attention layer → its KV cache states and row (cache_slots)
    per_layer: object = None  # (1, layers, per-layer input size, S): Gemma 4's per-layer inputs (per_layer_inputs)
    stream_scale: float = 1.0  # the residual stream's (FP16Range), which the per-layer input branch reads


@dataclass(frozen=True)
class DeltaConsts:
    """What the gated-delta-rule and Mamba2 layers of one function share: which of the block's tokens are real (a
    padded prefill block's padding neither decays nor writes the recurrent state), the recurrent state's scale, and
    for a block of S > 1 tokens the constant matrices of the chunked forms (gated_delta_block, mamba2_block)."""

    valid: object  # (1, 1, 1, S) fp16: 1 for the real tokens, 0 for the padding
    scale: float
    running: object = None  # (S, S): [t, i] = 1 where t ≤ i; g @ it sums the log-decays to each token
    between: object = None  # (S, S·S): [t, i·S + j] = 1 where j < t ≤ i; g @ it sums those from token j to i
    causal: object = None  # (S, S): 1 where j ≤ i
    strictly_causal: object = None  # (S, S): −1 where j < i (the sign of (I + A)'s A folded in)
    identity: object = None  # (S, S)


def delta_consts(tokens: int, valid_tokens, scale: float) -> DeltaConsts:
    token_index = shared_const(np.arange(tokens, dtype=np.int32), "delta_token_index")
    valid = mb.reshape(x=mb.cast(x=mb.less(x=token_index, y=valid_tokens), dtype="fp16"), shape=[1, 1, 1, tokens],
                       name="delta_valid")
    if tokens == 1:
        return DeltaConsts(valid, scale)
    t, i, j = np.ogrid[:tokens, :tokens, :tokens]
    between = ((j < t) & (t <= i)).reshape(tokens, tokens * tokens)
    lower = np.tril(np.ones((tokens, tokens)))
    return DeltaConsts(valid, scale, running=shared_const(lower.T.astype(np.float16), "delta_running"),
                       between=shared_const(between.astype(np.float16), "delta_between"),
                       causal=shared_const(lower.astype(np.float16), "delta_causal"),
                       strictly_causal=shared_const(-np.tril(lower, -1).astype(np.float16), "delta_strictly_causal"),
                       identity=shared_const(np.eye(tokens, dtype=np.float16), "delta_identity"))


def rope_key(rope: Rope) -> str:
    return repr(rope)  # a Rope's scaling is a dict: unhashable, but its repr names it


def mask_key(window: int | None, context: int) -> int | None:
    """Layers whose window spans the whole context mask as full-attention layers do: one mask serves both."""
    return window if window is not None and window < context else None


def shared_values(spec: ModelSpec, chunk: Chunk, context: int, tokens: int, inputs: dict,
                  recurrent_scale: float = 1.0) -> Shared:
    """What the function's layers use, made once: the block's positions, RoPE angles, masks and caches."""
    position = inputs["position"]
    # (S,); one token is at `position` itself (adding 0 is what noop_elimination would remove)
    positions = position if tokens == 1 else mb.add(x=position, y=np.arange(tokens, dtype=np.int32),
                                                     name="positions")
    layers = [spec.layers[i] for i in chunk.mixer_layers("attention")]
    ropes = {rope_key(layer.rope): layer.rope for layer in layers if layer.rope is not None}
    angles = {key: rope_angles(spec, rope, context, positions, tokens, "rope" if i == 0 else f"rope{i}")
              for i, (key, rope) in enumerate(ropes.items())}
    windows = list(dict.fromkeys(mask_key(layer.window, context) for layer in layers))
    masks = causal_masks(context, positions, tokens, windows) if windows else {}
    suffixes = dict.fromkeys(suffix for suffix, _ in cache_slots(spec, chunk).values())
    keys = {suffix: CacheState(inputs[f"key_cache{suffix}"]) for suffix in suffixes}
    values = {suffix: CacheState(inputs[f"value_cache{suffix}"]) for suffix in suffixes}
    conv = ConvState(inputs["conv_state"]) if "conv_state" in inputs else None
    delta = {}
    if "recurrent_state" in inputs:
        delta = {"delta_conv": ConvState(inputs["delta_conv_state"]),
                 "recurrent": RecurrentState(inputs["recurrent_state"])}
    if "ssm_state" in inputs:
        delta |= {"ssm_conv": ConvState(inputs["ssm_conv_state"]), "ssm": RecurrentState(inputs["ssm_state"])}
    if delta:
        delta["delta"] = delta_consts(tokens, inputs[VALID_TOKENS], recurrent_scale)
    temperature = attention_temperature(spec, context, positions, tokens) if layers else None
    return Shared(position, angles, masks, keys, values, conv, inputs.get(VALID_TOKENS), **delta,
                  temperature=temperature, slots=cache_slots(spec, chunk))


def embed(ops: WeightedOps, chunk: Chunk, input_ids, tokens: int, scale: float):
    """Token ids (1, S) → embeddings (1, C, 1, S), × `scale` (the embedding scale, and FP16Range's)."""
    h = ops.spec.hidden_size
    # The table as (V, C, 1, 1), the LM head's conv layout, from the blobs the chunk stores it in: a tied head's own,
    # whole or in pieces (chunks.blobs_of). Each piece gathers every token at its id clamped into the piece's rows;
    # a token takes the last piece that starts at or below its id.
    blobs = blobs_of(ops.spec, chunk, ("token_embd", None, "weight"))
    x = None
    for i, (weight, rows) in enumerate(blobs):
        span = range(ops.spec.vocab_size)[rows]
        table = ops.weights.const(weight, (len(span), h, 1, 1), f"embed_tokens_{i}" if i else "embed_tokens")
        if len(blobs) == 1:
            x = mb.gather(x=table, indices=input_ids, axis=0)  # (1, S, C, 1, 1)
            break
        # no shift or floor for the first piece, no cap for the last: PASSES leave no-ops in the graph
        local = (mb.maximum(x=mb.sub(x=input_ids, y=np.int32(span.start)), y=np.int32(0)) if span.start
                 else input_ids)
        local = mb.minimum(x=local, y=np.int32(len(span) - 1)) if span.stop < ops.spec.vocab_size else local
        gathered = mb.gather(x=table, indices=local, axis=0)
        inside = mb.reshape(x=mb.greater_equal(x=input_ids, y=np.int32(span.start)), shape=[1, tokens, 1, 1, 1])
        x = gathered if x is None else mb.select(cond=inside, a=gathered, b=x)
    x = mb.transpose(x=mb.reshape(x=x, shape=[1, tokens, h]), perm=[0, 2, 1])
    if scale != 1.0:
        x = mb.mul(x=x, y=np.float16(scale))
    return mb.reshape(x=x, shape=[1, h, 1, tokens], name="embeddings")


def decoder_layer(ops: WeightedOps, x, layer: int, mixer: str, row: int, shared: Shared, expert_ids: list):
    """The mixer (attention or the short convolution), then the MLP (or the experts, whose chosen ids are appended
    to `expert_ids`), each a residual branch with its norms placed as the spec says (BLOCK_NORMS); `row` = the
    layer's row in its mixer's states."""
    attention_norms, mlp_norms = BLOCK_NORMS[ops.spec.norm_placement]
    mix = MIXERS[mixer]
    x = residual(ops, x, layer, "attn", attention_norms, lambda h: mix(ops, h, layer, row, shared))
    if ops.spec.layers[layer].sparse and ops.spec.experts.branch_norms:  # both branches read the stream itself
        x = residual(ops, x, layer, "ffn", (None, mlp_norms[1]), lambda h: expert_block(ops, h, layer, expert_ids))
    elif ops.spec.layers[layer].sparse and ops.spec.experts.beside_dense:
        x = residual(ops, x, layer, "ffn", mlp_norms, lambda h: mb.add(
            x=mlp(ops, h, layer), y=experts(ops, h, layer, expert_ids), name=f"l{layer}_ffn_and_experts"))
    elif ops.spec.layers[layer].sparse:
        x = residual(ops, x, layer, "ffn", mlp_norms, lambda h: experts(ops, h, layer, expert_ids))
    else:
        x = residual(ops, x, layer, "ffn", mlp_norms, lambda h: mlp(ops, h, layer))
    if shared.per_layer is not None:
        x = mb.add(x=x, y=per_layer_branch(ops, x, layer, shared), name=f"l{layer}_per_layer_residual")
    if ops.spec.layer_output_scale:  # the whole stream × the layer's scalar (Gemma 4's layer_scalar)
        scalar = ops.weights.const(weight_id(("layer_output_scale", layer, "weight")), (1, 1, 1, 1),
                                   f"l{layer}_output_scale")
        x = mb.mul(x=x, y=scalar, name=f"l{layer}_scaled")
    return x


def per_layer_inputs(ops: WeightedOps, input_ids, embeddings, tokens: int, stream_scale: float):
    """Gemma 4's per-layer inputs (1, layers, P, S), as transformers' get_per_layer_inputs and
    project_per_layer_inputs: the token's row of the per-layer table × √P, plus the embeddings projected (×
    hidden^-½, the stream scale taken out) and RMS-normed per layer, summed and × 2^-½."""
    spec = ops.spec
    layers, size, h = spec.num_layers, spec.per_layer_input, spec.hidden_size
    table = ops.weights.const(weight_id(("per_layer_token_embd", None, "weight")),
                              (spec.per_layer_input_vocab, layers * size), "per_layer_embed_tokens")
    rows = mb.gather(x=table, indices=mb.reshape(x=input_ids, shape=[tokens]), axis=0)  # (S, L·P)
    token_part = mb.reshape(x=mb.transpose(x=rows, perm=[1, 0]), shape=[1, layers, size, tokens])
    token_part = mb.mul(x=token_part, y=np.float16(math.sqrt(size)), name="per_layer_token_inputs")
    projected = ops.linear(embeddings, "per_layer_model_proj", None, "per_layer_model_proj")  # (1, L·P, 1, S)
    projected = mb.mul(x=mb.reshape(x=projected, shape=[1, layers, size, tokens]),
                       y=np.float16(h**-0.5 / stream_scale))
    projected = ops.norm(projected, "per_layer_proj_norm", None, "per_layer_proj_norm", axis=2)
    return mb.mul(x=mb.add(x=projected, y=token_part), y=np.float16(2**-0.5), name="per_layer_inputs")


def per_layer_branch(ops: WeightedOps, x, layer: int, shared: Shared):
    """What Gemma 4's per-layer input adds to the stream after the MLP: post_norm(proj(act(gate(x)) × the layer's
    input)). The gate reads the stream as it is, scaled (FP16Range): unscaled, it can pass fp16's range where the
    stream does. Everything up to the post-norm is linear in the gate's output but the activation, which is
    taken at the scale (scaled_activation); the post-norm takes the scale out (its ε × scale²), and its weight,
    × the scale (folds.py), puts it back."""
    spec, s, scale = ops.spec, x.shape[-1], shared.stream_scale
    gate = ops.linear(x, "per_layer_inp_gate", layer, f"l{layer}_per_layer_gate")
    gate = activate(spec, gate) if scale == 1.0 else scaled_activation(spec, gate, scale)
    size = spec.per_layer_input
    own = mb.slice_by_index(x=shared.per_layer, begin=[0, layer, 0, 0], end=[1, layer + 1, size, s])
    gated = mb.mul(x=gate, y=mb.reshape(x=own, shape=[1, size, 1, s]), name=f"l{layer}_per_layer_gated")
    out = ops.linear(gated, "per_layer_proj", layer, f"l{layer}_per_layer_proj")
    (hidden,) = tensor_shape(spec, ("per_layer_post_norm", layer, "weight"))
    weight = ops.weights.const(weight_id(("per_layer_post_norm", layer, "weight")), (1, hidden, 1, 1),
                               f"l{layer}_per_layer_post_norm_weight")
    return rms_norm(out, weight, spec.rms_norm_eps * scale**2, f"l{layer}_per_layer_post_norm")


ACTIVATION_SATURATES = 10.0  # past ±this, SiLU's sigmoid and GELU's Φ are 0 or 1 to fp16's precision


def scaled_activation(spec: ModelSpec, scaled, scale: float):
    """scale × act(z) from scaled = scale × z, where z itself may pass fp16's range: act(z) = z · f(z) (f the
    sigmoid for SiLU, tanh-approximated Φ for GELU), with f taken at z clipped to where it saturates."""
    bound = np.float16(ACTIVATION_SATURATES * scale)
    z = mb.real_div(x=mb.minimum(x=mb.maximum(x=scaled, y=-bound), y=bound), y=np.float16(scale))
    if spec.activation == "silu":
        fraction = mb.sigmoid(x=z)
    else:  # ½ (1 + tanh(√(2/π) (z + 0.044715 z³))), as transformers' gelu_pytorch_tanh
        cubic = mb.add(x=z, y=mb.mul(x=mb.mul(x=mb.mul(x=z, y=z), y=z), y=np.float16(0.044715)))
        tanh = mb.tanh(x=mb.mul(x=cubic, y=np.float16(math.sqrt(2 / math.pi))))
        fraction = mb.mul(x=mb.add(x=tanh, y=np.float16(1)), y=np.float16(0.5))
    return mb.mul(x=scaled, y=fraction)


def residual(ops: WeightedOps, x, layer: int, name: str, norms: tuple[str | None, str | None], branch):
    """x + post_norm(branch(pre_norm(x))), either norm left out where the placement has none. The residual
    scale is folded into the branch's last weight (folds.py)."""
    before, after = norms
    y = branch(ops.norm(x, before, layer, f"l{layer}_{name}_norm") if before else x)
    if after:
        y = ops.norm(y, after, layer, f"l{layer}_{name}_post_norm")
    return mb.add(x=x, y=y, name=f"l{layer}_{name}_residual")


def mlp(ops: WeightedOps, x, layer: int, roles: tuple[str, str, str] = ("ffn_gate", "ffn_up", "ffn_down"),
        name: str = "ffn", clamped: tuple[float, float] | None = None):
    """Gated MLP: down(act(gate(x)) × up(x)), act SiLU (SwiGLU) or tanh-approximated GELU (GeGLU); `roles` are
    its gate, up and down weights and their biases where the chunk has them (an expert's: experts). `clamped`:
    gpt-oss's clamped SwiGLU (alpha, limit) instead, as transformers' GptOssExperts._apply_gate: gate ≤ limit,
    −limit ≤ up ≤ limit, (up + 1) · gate · sigmoid(alpha · gate)."""
    gate_role, up_role, down_role = roles
    gate = ops.linear(x, gate_role, layer, f"l{layer}_{name}_gate")
    up = ops.linear(x, up_role, layer, f"l{layer}_{name}_up")
    if clamped is None:
        hidden = mb.mul(x=activate(ops.spec, gate), y=up, name=f"l{layer}_{name}_act")
    else:
        alpha, limit = clamped
        gate = mb.minimum(x=gate, y=np.float16(limit))
        up = mb.minimum(x=mb.maximum(x=up, y=np.float16(-limit)), y=np.float16(limit))
        glu = mb.mul(x=gate, y=mb.sigmoid(x=mb.mul(x=gate, y=np.float16(alpha))))
        hidden = mb.mul(x=mb.add(x=up, y=np.float16(1)), y=glu, name=f"l{layer}_{name}_act")
    return ops.linear(hidden, down_role, layer, f"l{layer}_{name}_down")


def activate(spec: ModelSpec, x):
    """The spec's activation: SiLU, or tanh-approximated GELU."""
    return mb.silu(x=x) if spec.activation == "silu" else mb.gelu(x=x, mode="TANH_APPROXIMATION")


# Gemma 4's branch norms (Experts.branch_norms): after the dense MLP; before and after the experts
BRANCH_NORMS = ("post_ffw_norm_1", "pre_ffw_norm_2", "post_ffw_norm_2")


def expert_block(ops: WeightedOps, x, layer: int, expert_ids: list):
    """Gemma 4's expert block beside the dense MLP, on the stream `x` itself: post_ffw_norm_1 of the dense MLP (on
    ffn_norm of x) plus post_ffw_norm_2 of the experts (on pre_ffw_norm_2 of x, routed by x); the layer's
    post-feedforward norm then takes the sum (decoder_layer). The two branch norms carry no stream scale (folds.py:
    the post-feedforward norm after them does)."""
    dense = mlp(ops, ops.norm(x, "ffn_norm", layer, f"l{layer}_ffn_norm"), layer)
    dense = ops.norm(dense, "post_ffw_norm_1", layer, f"l{layer}_ffn_post_norm_1")
    routed = experts(ops, ops.norm(x, "pre_ffw_norm_2", layer, f"l{layer}_experts_norm"), layer, expert_ids,
                     router_input=x)
    routed = ops.norm(routed, "post_ffw_norm_2", layer, f"l{layer}_experts_post_norm")
    return mb.add(x=dense, y=routed, name=f"l{layer}_ffn_and_experts")


def experts(ops: WeightedOps, x, layer: int, expert_ids: list, router_input=None):
    """A mixture of experts, exactly: every expert's gated MLP evaluated on every token (E/k times the compute of
    the k chosen, as convolutions over constant weights, the Neural Engine's fast path; gathering each token's
    experts would make the weights of every product dynamic) and weighted by the router's dense weight map, zero
    for the experts not chosen.

    The router as transformers' is (its bias added to the logits where the spec has one): softmax over all experts'
    logits, the top k (their ids appended to
    `expert_ids`: the function's EXPERT_IDS output, so that a runner can compare its choices), their
    probabilities renormalised to sum to one where the spec says so, scattered into a [tokens, experts] map by a
    one-hot of the chosen ids. A shared expert (Qwen2-MoE) adds its MLP, times sigmoid(its gate), for every token.
    gpt-oss's experts carry biases (ops.linear applies them) and compute the clamped SwiGLU (mlp). Gemma 4's router
    reads `router_input` (the stream) RMS-normed with its scale as the norm's weight (× hidden^-½: folds.py), and
    each expert's weight in the map is × its own scale."""
    spec = ops.spec
    count, used, s = spec.experts.count, spec.experts.used, x.shape[-1]
    if spec.experts.router_norm:
        router_input = ops.norm(router_input, "ffn_gate_inp_scale", layer, f"l{layer}_router_norm")
    logits = ops.linear(x if router_input is None else router_input, "ffn_gate_inp", layer,
                        f"l{layer}_router")  # (1, E, 1, S)
    probs = mb.softmax(x=mb.transpose(x=mb.reshape(x=logits, shape=[count, s]), perm=[1, 0]), axis=-1)  # (S, E)
    chosen, ids = mb.topk(x=probs, k=used, axis=-1, name=f"l{layer}_router_topk")  # (S, k) each
    expert_ids.append(ids)
    if spec.experts.normalize_topk:
        chosen = mb.real_div(x=chosen, y=mb.reduce_sum(x=chosen, axes=[-1], keep_dims=True))
    one_hot = mb.one_hot(indices=ids, one_hot_vector_size=count, axis=-1, on_value=np.float16(1),
                         off_value=np.float16(0))  # (S, k, E)
    weights = mb.reduce_sum(x=mb.mul(x=one_hot, y=mb.expand_dims(x=chosen, axes=[-1])), axes=[1])  # (S, E)
    weights = mb.reshape(x=mb.transpose(x=weights, perm=[1, 0]), shape=[1, count, 1, s], name=f"l{layer}_routing")
    if spec.experts.expert_scales:
        scales = ops.weights.const(weight_id(("ffn_exps_scale", layer, "weight")), (1, count, 1, 1),
                                   f"l{layer}_expert_scales")
        weights = mb.mul(x=weights, y=scales, name=f"l{layer}_routing_scaled")
    total = None
    for expert in range(count):
        roles = tuple(expert_key(part, layer, expert)[0] for part in ("ffn_gate_exp", "ffn_up_exp", "ffn_down_exp"))
        out = mlp(ops, x, layer, roles, f"expert{expert}", spec.experts.clamped_swiglu)
        weight = mb.slice_by_index(x=weights, begin=[0, expert, 0, 0], end=[1, expert + 1, 1, s])
        out = mb.mul(x=out, y=weight, name=f"l{layer}_expert{expert}_weighted")
        total = out if total is None else mb.add(x=total, y=out, name=f"l{layer}_experts_{expert}")
    if spec.experts.shared_intermediate_size:  # every token's, weighted by a sigmoid of its own gate (1, 1, 1, S)
        shared = mlp(ops, x, layer, SHARED_EXPERT, "shared_expert")
        gate = mb.sigmoid(x=ops.linear(x, "ffn_gate_inp_shexp", layer, f"l{layer}_shared_expert_router"))
        total = mb.add(x=total, y=mb.mul(x=shared, y=gate), name=f"l{layer}_experts_shared")
    return total



def lm_head(ops: WeightedOps, x):
    """The final norm and the LM head, (1, C, 1, S) → logits (1, S, V), one convolution per head piece; then
    the logits scale and soft-cap."""
    spec, h = ops.spec, ops.spec.hidden_size
    x = ops.norm(x, "output_norm", None, "output_norm")
    head, pieces = (head_role(spec), None, "weight"), head_pieces(spec)
    piece_ids = [weight_id(head, i if len(pieces) > 1 else None) for i in range(len(pieces))]
    parts = [mb.conv(x=ops.weights.input(x, piece, f"lm_head_{i}"),
                     weight=ops.weights.const(piece, (len(rows), h, 1, 1), f"lm_head_{i}_weight"), name=f"lm_head_{i}")
             for i, (piece, rows) in enumerate(zip(piece_ids, pieces, strict=True))]
    x = mb.concat(values=parts, axis=1) if len(parts) > 1 else parts[0]  # (1, V, 1, S)
    if spec.logits_scale != 1.0:
        x = mb.mul(x=x, y=np.float16(spec.logits_scale))
    if spec.final_softcap:
        x = soft_cap(x, spec.final_softcap)
    return mb.transpose(x=mb.squeeze(x=x, axes=[2]), perm=[0, 2, 1], name="logits")  # (1, S, V)


def soft_cap(x, cap: float):
    """cap · tanh(x / cap): Gemma 2's bound on attention scores and logits."""
    return mb.mul(x=mb.tanh(x=mb.mul(x=x, y=np.float16(1 / cap))), y=np.float16(cap))


def shared_const(value: np.ndarray, name: str):
    """A const that depends on the spec and context alone: one blob serves both functions."""
    var = mb.const(val=value, name=name)
    var.op.weight_id = name
    return var


def rms_norm(x, weight, eps: float, name: str, axis: int = 1):
    """RMSNorm over `axis`, with a weight of x's rank (its size on `axis`) or none, that cannot overflow fp16.

    Squaring an fp16 activation overflows past |x| = 256, and summing C squares long before that. Dividing
    each token by its max |x| first keeps every square ≤ 1 and their mean in [1/C, 1]; the factor cancels
    out of x / rms(x) except in eps, which is divided by the same factor squared.
    """
    peak = mb.maximum(x=mb.reduce_max(x=mb.abs(x=x), axes=[axis], keep_dims=True), y=np.float16(NORM_FLOOR))
    scaled = mb.real_div(x=x, y=peak)
    mean_square = mb.reduce_mean(x=mb.mul(x=scaled, y=scaled), axes=[axis], keep_dims=True)
    # eps / peak² as (√eps / peak)²: √eps (1e-3 for eps = 1e-6) is a normal fp16 number, eps itself is not
    root_eps = mb.real_div(x=np.float16(math.sqrt(eps)), y=peak)
    rms_inverse = mb.rsqrt(x=mb.add(x=mean_square, y=mb.mul(x=root_eps, y=root_eps)))
    if weight is None:  # a norm without a weight (Gemma 4's value norm)
        return mb.mul(x=scaled, y=rms_inverse, name=name)
    normed = mb.mul(x=scaled, y=rms_inverse)
    return mb.mul(x=normed, y=weight, name=name)


def attention(ops: WeightedOps, x, layer: int, row: int, shared: Shared):
    """Grouped-query attention over the whole cache, through the chunk's states, with the layer's rope and
    window, q/k norms, the attention scale and soft-cap as the spec says; the layer's own head size and k/v heads,
    its keys as its values (k_eq_v, the value norm after) or another layer's keys and values (a kv-shared layer:
    no k/v of its own) where the spec says so (Gemma 4). `row`, the layer's index among the chunk's attention
    layers, is not its cache row where the layers differ: cache_slots gives that."""
    spec = ops.spec
    heads, kvh, d = spec.num_heads, spec.layer_kv_heads(layer), spec.layer_head_dim(layer)
    suffix, local = shared.slots[layer]
    key_cache, value_cache = shared.keys[suffix], shared.values[suffix]
    group, s, context = heads // kvh, x.shape[-1], key_cache.value.shape[2]
    own_kv = spec.layers[layer].kv_source is None
    q = ops.linear(x, "attn_q", layer, f"l{layer}_q")  # (1, H·D, 1, S)
    if spec.attn_output_gate:  # q_proj's rows per head: its query, then its gate (1, H, D, S) each
        both = mb.reshape(x=q, shape=[1, heads, 2 * d, s])
        gate = mb.slice_by_index(x=both, begin=[0, 0, d, 0], end=[1, heads, 2 * d, s], name=f"l{layer}_gate")
        q = mb.slice_by_index(x=both, begin=[0, 0, 0, 0], end=[1, heads, d, s])
        if spec.qk_norm == "projection":
            q = mb.reshape(x=q, shape=[1, heads * d, 1, s])
    if own_kv:
        k = ops.linear(x, "attn_k", layer, f"l{layer}_k")
        v = k if spec.layers[layer].values_from_keys else ops.linear(x, "attn_v", layer, f"l{layer}_v")
    if spec.qk_norm == "projection":  # over the whole projection (OLMo 2)
        q = ops.norm(q, "attn_q_norm", layer, f"l{layer}_q_norm")
        if own_kv:
            k = ops.norm(k, "attn_k_norm", layer, f"l{layer}_k_norm")
    q = reshape(q, [1, heads, d, s])  # (1, H, D, S)
    if spec.qk_norm == "head":  # over each head's dimensions (Qwen3, Gemma 3)
        q = ops.norm(q, "attn_q_norm", layer, f"l{layer}_q_norm", axis=2)
    rope_of_layer = spec.layers[layer].rope
    if rope_of_layer is not None:  # else a NoPE layer
        cos, sin = shared.angles[rope_key(rope_of_layer)]
        q = rope(q, cos, sin)
    if shared.temperature is not None:
        q = mb.mul(x=q, y=shared.temperature)
    if own_kv:
        k = mb.reshape(x=k, shape=[1, kvh, d, s])
        if spec.qk_norm == "head":
            k = ops.norm(k, "attn_k_norm", layer, f"l{layer}_k_norm", axis=2)
        if rope_of_layer is not None:
            k = rope(k, cos, sin)
        k = mb.transpose(x=k, perm=[0, 1, 3, 2])  # (1, KVH, S, D)
        # Where this block goes in the layer's cache; keys and values share it (the graph states once what
        # coremltools' remove_redundant_ops would otherwise merge).
        begin = mb.concat(values=[np.array([local, 0], np.int32), shared.position, np.array([0], np.int32)], axis=0)
        end = mb.add(x=begin, y=np.array([1, kvh, s, d], np.int32))
        keys = key_cache.write(k, local, begin, end)  # (1, KVH, context, D)
        v = mb.reshape(x=v, shape=[1, kvh, d, s])
        if spec.value_norm:  # per head, without a weight (Gemma 4)
            v = rms_norm(v, None, spec.rms_norm_eps, f"l{layer}_v_norm", axis=2)
        values = value_cache.write(mb.transpose(x=v, perm=[0, 1, 3, 2]), local, begin, end)
    else:  # the source layer's cache, as it wrote it in this call (it comes earlier in the chunk)
        keys, values = key_cache.row(local), value_cache.row(local)
    multiplier = spec.attention_scale or d**-0.5  # spec.attention_multiplier, at the layer's head size
    q = mb.mul(x=mb.transpose(x=q, perm=[0, 1, 3, 2]), y=np.float16(multiplier))  # (1, H, S, D)
    # Query heads h = kv·group + g share KV head kv: grouping rows as (kv, g·S) needs no repeated K/V.
    q = reshape(q, [1, kvh, group * s, d])
    scores = mb.matmul(x=q, y=keys, transpose_y=True)  # (1, KVH, G·S, context)
    if spec.attn_softcap:
        scores = soft_cap(scores, spec.attn_softcap)
    mask = shared.masks[mask_key(spec.layers[layer].window, context)]
    scores = mb.add(x=reshape(scores, [1, heads, s, context]), y=mask)
    probs = sink_softmax(ops, scores, layer) if spec.attention_sinks else mb.softmax(x=scores, axis=-1)
    probs = reshape(probs, [1, kvh, group * s, context])
    out = reshape(mb.matmul(x=probs, y=values), [1, heads, s, d])
    out = mb.reshape(x=mb.transpose(x=out, perm=[0, 1, 3, 2]), shape=[1, heads * d, 1, s])
    if spec.attn_output_gate:
        out = mb.mul(x=out, y=mb.sigmoid(x=mb.reshape(x=gate, shape=[1, heads * d, 1, s])), name=f"l{layer}_gated")
    return ops.linear(out, "attn_output", layer, f"l{layer}_o")


def short_conv(ops: WeightedOps, x, layer: int, row: int, shared: Shared):
    """LFM2's gated short convolution: B, C and x from in_proj; out_proj(C · conv(B · x)), the convolution
    depthwise and causal over the layer's state (the last kernel − 1 values of B·x) followed by the block's.
    A block of any width is one convolution over [state ; B·x] (no loop over tokens); the state then keeps the
    kernel − 1 values before the first token past the real ones (VALID_TOKENS: a padded prefill block's padding
    never enters it)."""
    spec = ops.spec
    h, kernel, s = spec.hidden_size, spec.short_conv.kernel, x.shape[-1]
    bcx = ops.linear(x, "shortconv.in_proj", layer, f"l{layer}_conv_in")  # (1, 3C, 1, S): B, C, x
    b, c, v = (mb.slice_by_index(x=bcx, begin=[0, i * h, 0, 0], end=[1, (i + 1) * h, 1, s],
                                 name=f"l{layer}_conv_{part}") for i, part in enumerate("bcx"))
    bx = mb.mul(x=b, y=v, name=f"l{layer}_conv_bx")
    window = mb.concat(values=[shared.conv.read(row), bx], axis=3, name=f"l{layer}_conv_window")  # (1, C, 1, K−1+S)
    kernel_key = ("shortconv.conv", layer, "weight")
    weight = ops.weights.const(weight_id(kernel_key), (h, 1, 1, kernel), f"l{layer}_conv_weight")
    bias = None
    if ("shortconv.conv", layer, "bias") in ops.needed:
        bias = ops.weights.const(weight_id(("shortconv.conv", layer, "bias")), (h,), f"l{layer}_conv_bias")
    conv = mb.conv(x=window, weight=weight, bias=bias, groups=h, pad_type="valid", name=f"l{layer}_conv")
    begin = mb.concat(values=[np.zeros(3, np.int32), shared.valid_tokens], axis=0)
    shared.conv.write(mb.slice_by_size(x=window, begin=begin, size=[1, h, 1, kernel - 1]), row)
    y = mb.mul(x=c, y=conv, name=f"l{layer}_conv_gated")
    return ops.linear(y, "shortconv.out_proj", layer, f"l{layer}_conv_out")


def gated_delta(ops: WeightedOps, x, layer: int, row: int, shared: Shared):
    """The gated delta rule (architectures/base.py GatedDelta has the maths): q, k, v through the causal depthwise
    convolution over the layer's conv state (as short_conv's) and SiLU; q, k L2-normalised per head and repeated
    to the value heads; β, the decay g; the rule over the recurrent state, one step for one token
    (gated_delta_step), the chunked form for a block (gated_delta_block); the gated RMSNorm × SiLU(z), out_proj."""
    delta, consts = ops.spec.gated_delta, shared.delta
    s, channels, kernel = x.shape[-1], delta.conv_channels, delta.conv_kernel
    heads, dk, dv = delta.value_heads, delta.key_head_dim, delta.value_head_dim
    qkv = ops.linear(x, "delta_qkv", layer, f"l{layer}_delta_qkv")  # (1, 2K + V, 1, S), × the conv state scale
    window = mb.concat(values=[shared.delta_conv.read(row), qkv], axis=3, name=f"l{layer}_delta_window")
    weight = ops.weights.const(weight_id(("ssm_conv1d", layer, "weight")), (channels, 1, 1, kernel),
                               f"l{layer}_delta_conv_weight")
    conv = mb.conv(x=window, weight=weight, groups=channels, pad_type="valid", name=f"l{layer}_delta_conv")
    begin = mb.concat(values=[np.zeros(3, np.int32), shared.valid_tokens], axis=0)
    shared.delta_conv.write(mb.slice_by_size(x=window, begin=begin, size=[1, channels, 1, kernel - 1]), row)
    qkv = mb.silu(x=conv)
    q, k, v = (mb.slice_by_index(x=qkv, begin=[0, start, 0, 0], end=[1, start + size, 1, s])
               for start, size in ((0, delta.key_size), (delta.key_size, delta.key_size),
                                   (2 * delta.key_size, delta.value_size)))
    q = l2_normalize(mb.reshape(x=q, shape=[delta.key_heads, dk, s]), dk**-0.5)  # (key heads, dk, S)
    k = l2_normalize(mb.reshape(x=k, shape=[delta.key_heads, dk, s]))
    # (value heads, S, dk): value head h reads key head h // (value heads / key heads), as repeat_interleave
    q, k = (mb.transpose(x=repeat_heads(part, heads // delta.key_heads), perm=[0, 2, 1]) for part in (q, k))
    v = mb.transpose(x=mb.reshape(x=v, shape=[heads, dv, s]), perm=[0, 2, 1])  # (value heads, S, dv)
    if consts.scale != 1.0:
        v = mb.mul(x=v, y=np.float16(consts.scale))
    beta = mb.mul(x=mb.sigmoid(x=ops.linear(x, "ssm_beta", layer, f"l{layer}_delta_b")), y=consts.valid)
    dt_bias = ops.weights.const(weight_id(("ssm_dt", layer, "weight")), (1, heads, 1, 1), f"l{layer}_dt_bias")
    rate = ops.weights.const(weight_id(("ssm_a", layer, "weight")), (1, heads, 1, 1), f"l{layer}_decay_rate")
    alpha = ops.linear(x, "ssm_alpha", layer, f"l{layer}_delta_a")
    g = mb.mul(x=mb.mul(x=mb.softplus(x=mb.add(x=alpha, y=dt_bias)), y=rate), y=consts.valid)  # (1, heads, 1, S)
    beta, g = mb.reshape(x=beta, shape=[heads, s, 1]), mb.reshape(x=g, shape=[heads, 1, s])
    state = mb.reshape(x=shared.recurrent.read(row), shape=[heads, dk, dv])
    rule = gated_delta_step if s == 1 else gated_delta_block
    out, state = rule(q, k, v, beta, g, state, consts)  # (heads, S, dv), (heads, dk, dv)
    shared.recurrent.write(mb.reshape(x=state, shape=[1, heads, dk, dv]), row)
    if consts.scale != 1.0:
        out = mb.mul(x=out, y=np.float16(1 / consts.scale))
    out = mb.reshape(x=mb.transpose(x=out, perm=[0, 2, 1]), shape=[1, heads, dv, s])
    out = ops.norm(out, "ssm_norm", layer, f"l{layer}_delta_norm", axis=2)
    z = mb.reshape(x=ops.linear(x, "delta_gate", layer, f"l{layer}_delta_z"), shape=[1, heads, dv, s])
    out = mb.reshape(x=mb.mul(x=out, y=mb.silu(x=z)), shape=[1, heads * dv, 1, s], name=f"l{layer}_delta_gated")
    return ops.linear(out, "ssm_out", layer, f"l{layer}_delta_out")


def gated_delta_step(q, k, v, beta, g, state, consts: DeltaConsts):
    """One token: S ← exp(g) S; S += kᵀ β (v − k S); out = q S. q, k (H, 1, dk), v (H, 1, dv), β and g (H, 1, 1)."""
    state = mb.mul(x=state, y=mb.exp(x=g))
    correction = mb.mul(x=mb.sub(x=v, y=mb.matmul(x=k, y=state)), y=beta)  # (H, 1, dv)
    state = mb.add(x=state, y=mb.matmul(x=k, y=correction, transpose_x=True))
    return mb.matmul(x=q, y=state), state


def gated_delta_block(q, k, v, beta, g, state, consts: DeltaConsts):
    """A block of n tokens at once, in the chunked (WY) form of transformers' torch_chunk_gated_delta_rule, the
    block one chunk: with G the running sum of g and D[i, j] = exp(G_i − G_j) for j ≤ i, the strictly lower
    A = (β k kᵀ) ⊙ D; T = (I + A)⁻¹; v' = T βv − T (βk ⊙ exp G) S; out = (q ⊙ exp G) S + ((q kᵀ) ⊙ D) v';
    S ← exp(G_n) S + (k ⊙ exp(G_n − G))ᵀ v'.

    G_i − G_j is summed from g directly (`between`), never as a difference of two running sums, which fp16 would
    round to nothing where the sums are large and the difference small. T is exact without a loop over tokens:
    −A is nilpotent (strictly lower), so (I + A)⁻¹ = Σ_{m<n} (−A)^m = Π_{k<log2 n} (I + (−A)^(2^k))."""
    heads, n, _ = q.shape
    running = mb.matmul(x=g, y=consts.running)  # (H, 1, n): G
    between = mb.reshape(x=mb.matmul(x=g, y=consts.between), shape=[heads, n, n])  # [i, j]: G_i − G_j (j ≤ i)
    decay = mb.mul(x=mb.exp(x=between), y=consts.causal)
    k_beta = mb.mul(x=k, y=beta)
    lower = mb.mul(x=mb.matmul(x=k_beta, y=k, transpose_y=True), y=mb.mul(x=decay, y=consts.strictly_causal))  # −A
    inverse, power = mb.add(x=lower, y=consts.identity), lower
    for _ in range(1, math.ceil(math.log2(n))):
        power = mb.matmul(x=power, y=power)
        inverse = mb.add(x=inverse, y=mb.matmul(x=inverse, y=power))
    growth = mb.exp(x=mb.reshape(x=running, shape=[heads, n, 1]))  # exp(G_i)
    values = mb.matmul(x=inverse, y=mb.mul(x=v, y=beta))
    keys = mb.matmul(x=inverse, y=mb.mul(x=k_beta, y=growth))
    new_values = mb.sub(x=values, y=mb.matmul(x=keys, y=state))  # (H, n, dv)
    within = mb.mul(x=mb.matmul(x=q, y=k, transpose_y=True), y=decay)
    out = mb.add(x=mb.matmul(x=mb.mul(x=q, y=growth), y=state), y=mb.matmul(x=within, y=new_values))
    to_end = mb.reshape(x=mb.slice_by_index(x=between, begin=[0, n - 1, 0], end=[heads, n, n]),
                        shape=[heads, n, 1])  # G_n − G_i
    total = mb.slice_by_index(x=running, begin=[0, 0, n - 1], end=[heads, 1, n])  # G_n (H, 1, 1)
    state = mb.add(x=mb.mul(x=state, y=mb.exp(x=total)),
                   y=mb.matmul(x=mb.mul(x=k, y=mb.exp(x=to_end)), y=new_values, transpose_x=True))
    return out, state


def l2_normalize(x, scale: float = 1.0):
    """x / ‖x‖ over axis 1 (a head's dimensions) of (heads, D, S), × scale, as transformers' l2norm (eps 1e-6 under
    the square root); each token divided by its max |x| first, as rms_norm, so no square overflows fp16."""
    peak = mb.maximum(x=mb.reduce_max(x=mb.abs(x=x), axes=[1], keep_dims=True), y=np.float16(NORM_FLOOR))
    scaled = mb.real_div(x=x, y=peak)
    root_eps = mb.real_div(x=np.float16(1e-3), y=peak)
    inverse = mb.rsqrt(x=mb.add(x=mb.reduce_sum(x=mb.mul(x=scaled, y=scaled), axes=[1], keep_dims=True),
                                y=mb.mul(x=root_eps, y=root_eps)))
    return mb.mul(x=scaled, y=inverse if scale == 1.0 else mb.mul(x=inverse, y=np.float16(scale)))


def repeat_heads(x, repeats: int):
    """(heads, D, S) → (heads × repeats, D, S), each head `repeats` times in a row (repeat_interleave)."""
    if repeats == 1:
        return x
    heads, d, s = x.shape
    tiled = mb.tile(x=mb.reshape(x=x, shape=[heads, 1, d, s]), reps=[1, repeats, 1, 1])
    return mb.reshape(x=tiled, shape=[heads * repeats, d, s])


def mamba2(ops: WeightedOps, x, layer: int, row: int, shared: Shared):
    """Mamba2's selective state space (architectures/base.py Mamba2 has the maths): z, xBC and dt from in_proj; xBC
    through the causal depthwise convolution over the layer's conv state (as gated_delta's) and SiLU; Δ =
    softplus(dt + dt_bias) within time_step_limit, zero for a padded block's padding; the scan over the SSM state,
    one step for one token (mamba2_step), the chunked SSD form for a block (mamba2_block); + D·x; the RMSNorm of
    each group's slice of y · SiLU(z) (gated first, as transformers' RMSNormGated), out_proj."""
    mamba, consts = ops.spec.mamba2, shared.delta
    s, channels, kernel = x.shape[-1], mamba.conv_channels, mamba.conv_kernel
    heads, dim, size, groups, inner = mamba.heads, mamba.head_dim, mamba.state_size, mamba.groups, mamba.inner_size
    projected = ops.linear(x, "ssm_in", layer, f"l{layer}_ssm_in")  # (1, z + xBC + dt, 1, S), xBC × the state scale
    z, xbc, dt = (mb.slice_by_index(x=projected, begin=[0, start, 0, 0], end=[1, start + rows, 1, s])
                  for start, rows in ((0, inner), (inner, channels), (inner + channels, heads)))
    window = mb.concat(values=[shared.ssm_conv.read(row), xbc], axis=3, name=f"l{layer}_ssm_window")
    weight = ops.weights.const(weight_id(("ssm_conv1d", layer, "weight")), (channels, 1, 1, kernel),
                               f"l{layer}_ssm_conv_weight")
    bias = None
    if ("ssm_conv1d", layer, "bias") in ops.needed:
        bias = ops.weights.const(weight_id(("ssm_conv1d", layer, "bias")), (channels,), f"l{layer}_ssm_conv_bias")
    conv = mb.conv(x=window, weight=weight, bias=bias, groups=channels, pad_type="valid", name=f"l{layer}_ssm_conv")
    begin = mb.concat(values=[np.zeros(3, np.int32), shared.valid_tokens], axis=0)
    shared.ssm_conv.write(mb.slice_by_size(x=window, begin=begin, size=[1, channels, 1, kernel - 1]), row)
    xbc = mb.silu(x=conv)
    xs, b, c = (mb.slice_by_index(x=xbc, begin=[0, start, 0, 0], end=[1, start + rows, 1, s])
                for start, rows in ((0, inner), (inner, groups * size), (inner + groups * size, groups * size)))
    dt_bias = ops.weights.const(weight_id(("ssm_dt", layer, "weight")), (1, heads, 1, 1), f"l{layer}_ssm_dt_bias")
    step = mb.softplus(x=mb.add(x=dt, y=dt_bias))  # Δ (1, heads, 1, S)
    low, high = mamba.time_step_limit
    if low > 0:
        step = mb.maximum(x=step, y=np.float16(low))
    if high < math.inf:
        step = mb.minimum(x=step, y=np.float16(high))
    step = mb.reshape(x=mb.mul(x=step, y=consts.valid), shape=[heads, 1, s], name=f"l{layer}_ssm_step")
    rate = ops.weights.const(weight_id(("ssm_a", layer, "weight")), (heads, 1, 1), f"l{layer}_ssm_decay_rate")
    g = mb.mul(x=step, y=rate)  # Δ·A, the log-decay of each head at each token (heads, 1, S)
    inputs = mb.mul(x=mb.reshape(x=xs, shape=[heads, dim, s]), y=step)  # Δ·x (heads, head dim, S)
    if consts.scale != 1.0:
        inputs = mb.mul(x=inputs, y=np.float16(consts.scale))
    inputs = mb.transpose(x=inputs, perm=[0, 2, 1])  # (heads, S, head dim)
    # (heads, S, state size): head h reads group h // (heads / groups)
    b, c = (mb.transpose(x=repeat_heads(mb.reshape(x=part, shape=[groups, size, s]), heads // groups), perm=[0, 2, 1])
            for part in (b, c))
    state = mb.reshape(x=shared.ssm.read(row), shape=[heads, dim, size])
    scan = mamba2_step if s == 1 else mamba2_block
    y, state = scan(inputs, b, c, g, state, consts)  # (heads, S, head dim), (heads, head dim, state size)
    shared.ssm.write(mb.reshape(x=state, shape=[1, heads, dim, size]), row)
    if consts.scale != 1.0:
        y = mb.mul(x=y, y=np.float16(1 / consts.scale))
    skip = ops.weights.const(weight_id(("ssm_d", layer, "weight")), (1, heads, 1, 1), f"l{layer}_ssm_skip")
    y = mb.add(x=mb.reshape(x=mb.transpose(x=y, perm=[0, 2, 1]), shape=[1, heads, dim, s]),
               y=mb.mul(x=mb.reshape(x=xs, shape=[1, heads, dim, s]), y=skip))
    by_group = [1, groups, inner // groups, s]
    y = mb.mul(x=mb.reshape(x=y, shape=by_group), y=mb.silu(x=mb.reshape(x=z, shape=by_group)))
    norm = ops.weights.const(weight_id(("ssm_norm", layer, "weight")), (1, groups, inner // groups, 1),
                             f"l{layer}_ssm_norm_weight")
    y = rms_norm(y, norm, ops.spec.rms_norm_eps, f"l{layer}_ssm_norm", axis=2)
    return ops.linear(mb.reshape(x=y, shape=[1, inner, 1, s]), "ssm_out", layer, f"l{layer}_ssm_out")


def mamba2_step(inputs, b, c, g, state, consts: DeltaConsts):
    """One token: h ← exp(g) h + (Δx)ᵀ B; y = h C. Δx (H, 1, P), B and C (H, 1, N), g (H, 1, 1), h (H, P, N)."""
    state = mb.add(x=mb.mul(x=state, y=mb.exp(x=g)), y=mb.matmul(x=inputs, y=b, transpose_x=True))
    return mb.matmul(x=c, y=state, transpose_y=True), state


def mamba2_block(inputs, b, c, g, state, consts: DeltaConsts):
    """A block of n tokens at once, in the chunked SSD form of transformers' torch path, the block one chunk: with G
    the running sum of g and L[i, j] = exp(G_i − G_j) for j ≤ i (0 above: a lower-triangular matrix of exp(segment
    sums)), y = ((C Bᵀ) ⊙ L) Δx + (C ⊙ exp G) hᵀ and h ← exp(G_n) h + (Δx ⊙ exp(G_n − G))ᵀ B: matmuls, exact,
    no loop over tokens. G_i − G_j is summed from g directly (`between`), as gated_delta_block's."""
    heads, n, _ = inputs.shape
    running = mb.matmul(x=g, y=consts.running)  # (H, 1, n): G
    between = mb.reshape(x=mb.matmul(x=g, y=consts.between), shape=[heads, n, n])  # [i, j]: G_i − G_j (j ≤ i)
    decay = mb.mul(x=mb.exp(x=between), y=consts.causal)
    within = mb.mul(x=mb.matmul(x=c, y=b, transpose_y=True), y=decay)  # (H, n, n)
    growth = mb.exp(x=mb.reshape(x=running, shape=[heads, n, 1]))  # exp(G_i)
    out = mb.add(x=mb.matmul(x=within, y=inputs), y=mb.matmul(x=mb.mul(x=c, y=growth), y=state, transpose_y=True))
    to_end = mb.reshape(x=mb.slice_by_index(x=between, begin=[0, n - 1, 0], end=[heads, n, n]),
                        shape=[heads, n, 1])  # G_n − G_j
    total = mb.slice_by_index(x=running, begin=[0, 0, n - 1], end=[heads, 1, n])  # G_n (H, 1, 1)
    state = mb.add(x=mb.mul(x=state, y=mb.exp(x=total)),
                   y=mb.matmul(x=mb.mul(x=inputs, y=mb.exp(x=to_end)), y=b, transpose_x=True))
    return out, state


# mixer → its branch, (ops, x, layer, row in its states, shared) → the branch's output
MIXERS = {"attention": attention, "short_conv": short_conv, "gated_delta": gated_delta, "mamba2": mamba2}


def reshape(x, shape: list[int]):
    """mb.reshape, or `x` itself where it has that shape already (one query head per KV head): the graph
    states what coremltools' noop_elimination, which PASSES leave out, would make of it."""
    return x if tuple(x.shape) == tuple(shape) else mb.reshape(x=x, shape=shape)


def rope(x, cos, sin):
    """Rotate-half RoPE (HF's convention) on (1, N, D, S): the first R dimensions rotate (cos and sin are
    (1, 1, R/2, S)), their halves together; the rest pass through (partial rotary)."""
    _, n, d, s = x.shape
    half = cos.shape[2]
    x1 = mb.slice_by_index(x=x, begin=[0, 0, 0, 0], end=[1, n, half, s])
    x2 = mb.slice_by_index(x=x, begin=[0, 0, half, 0], end=[1, n, 2 * half, s])
    first = mb.sub(x=mb.mul(x=x1, y=cos), y=mb.mul(x=x2, y=sin))
    second = mb.add(x=mb.mul(x=x2, y=cos), y=mb.mul(x=x1, y=sin))
    passed = [mb.slice_by_index(x=x, begin=[0, 0, 2 * half, 0], end=[1, n, d, s])] if 2 * half < d else []
    return mb.concat(values=[first, second, *passed], axis=2)


def attention_temperature(spec: ModelSpec, context: int, positions, tokens: int):
    """Llama 4's attention temperature 1 + β·ln(1 + ⌊position / positions⌋) (Ministral 3) at the block's positions,
    (1, 1, 1, S), gathered from a table over the whole context as rope's angles are; None where it is 1 throughout
    (no such trait, or a context that never reaches `positions`)."""
    if (scale := spec.position_attention_scale) is None or context <= scale[1]:
        return None
    beta, floor = scale
    table = (1 + beta * np.log1p(np.arange(context) // floor)).astype(np.float16)  # computed in float64
    return mb.reshape(x=mb.gather(x=shared_const(table, "attention_temperature_table"), indices=positions, axis=0),
                      shape=[1, 1, 1, tokens], name="attention_temperature")


def rope_angles(spec: ModelSpec, rope: Rope, context: int, positions, tokens: int, name: str):
    """cos and sin (1, 1, R/2, S) for the block's positions, gathered from tables over the whole context."""
    inv_freq, attention_factor = rope_frequencies(spec, rope, context)
    angles = inv_freq[:, None] * np.arange(context)[None, :]  # (R/2, context), computed in float64
    tables = [(np.cos(angles) * attention_factor).astype(np.float16),
              (np.sin(angles) * attention_factor).astype(np.float16)]
    return [mb.reshape(x=mb.gather(x=shared_const(table, f"{name}_{kind}_table"), indices=positions, axis=1),
                       shape=[1, 1, rope.dim // 2, tokens], name=f"{name}_{kind}")
            for table, kind in zip(tables, ("cos", "sin"), strict=True)]


def longrope_factors(scaling: dict, context: int) -> str:
    """Which LongRoPE factors a package of `context` tokens uses: transformers picks by the sequence's length
    ("long" past original_max_position_embeddings), a fixed-context package by its context, as llama.cpp does."""
    return "long" if context > scaling["original_max_position_embeddings"] else "short"


def rope_frequencies(spec: ModelSpec, rope: Rope, context: int) -> tuple[np.ndarray, float]:
    """Inverse frequencies of the rotating dimensions and the attention factor (yarn and LongRoPE scale
    cos/sin), as transformers computes them.

    YaRN is transformers' _compute_yarn_parameters, its `truncate` read from the file: gpt-oss ships `truncate:
    false`, and this table is then exact (the ramp between unrounded correction dimensions), where GGUF (llama.cpp)
    and mlx-lm always round the correction range out to whole dimensions and compute another function."""
    d, theta = rope.dim, rope.theta
    inv_freq = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    scaling = rope.scaling
    if scaling is None:
        return inv_freq, 1.0
    kind, factor = scaling["rope_type"], float(scaling.get("factor") or 1.0)
    original = scaling.get("original_max_position_embeddings", spec.max_position_embeddings)
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "proportional":  # Gemma 4's global layers: the first pairs turn, the others not at all (frequency 0)
        turning = int(scaling["partial_rotary_factor"] * d // 2)
        return np.where(np.arange(d // 2) < turning, inv_freq, 0.0) / factor, 1.0
    if kind == "dynamic":
        if context > spec.max_position_embeddings:
            raise CheckpointError("dynamic RoPE scaling beyond max_position_embeddings is not supported "
                                  "by the Core ML target (its frequencies change with the sequence length)")
        return inv_freq, 1.0  # below that length transformers uses the unscaled frequencies
    if kind == "longrope":
        attention_factor = scaling.get("attention_factor")
        if attention_factor is None:
            attention_factor = math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0
        factors = np.asarray(scaling[f"{longrope_factors(scaling, context)}_factor"], dtype=np.float64)
        return inv_freq / factors, float(attention_factor)
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
        return d * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction(scaling.get("beta_fast") or 32), correction(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    ramp = np.clip((np.arange(d // 2) - low) / (high - low if high != low else 1e-3), 0, 1)
    return inv_freq / factor * ramp + inv_freq * (1 - ramp), float(attention_factor)


def sink_softmax(ops: WeightedOps, scores, layer: int):
    """gpt-oss's softmax with a sink, as transformers' eager attention computes it: each head's learned logit joined
    to every query's scores (1, H, S, context) as one more column, the softmax taken over both, the column dropped.
    The sink takes its share of each row's probability without a value: a query may attend to (almost) nothing.

    Written out rather than as softmax(concat(scores, tiled sinks)): an op whose inputs are all consts (tiling the
    sinks) is folded by const_elimination into a new const computed from the placeholder, whose value is never the
    weight's (the streamed writer's placeholders: weights.py). Here every op on the sinks also reads the scores."""
    _, heads, _, _ = scores.shape
    sinks = ops.weights.const(weight_id(("attn_sinks", layer, "weight")), (1, heads, 1, 1), f"l{layer}_sinks")
    peak = mb.maximum(x=mb.reduce_max(x=scores, axes=[3], keep_dims=True), y=sinks)  # (1, H, S, 1)
    exps = mb.exp(x=mb.sub(x=scores, y=peak))
    total = mb.add(x=mb.reduce_sum(x=exps, axes=[3], keep_dims=True), y=mb.exp(x=mb.sub(x=sinks, y=peak)))
    return mb.real_div(x=exps, y=total, name=f"l{layer}_sink_softmax")


def causal_masks(context: int, positions, tokens: int, windows: list[int | None]) -> dict[int | None, object]:
    """Additive masks (1, 1, S, context), one per window: 0 where key ≤ query (and within a sliding window,
    keys at most window − 1 back), else MASK_VALUE. Slots past the sequence hold stale or zero K/V; the mask
    keeps them out."""
    key_index = shared_const(np.arange(context, dtype=np.int32)[None, :], "key_index")
    query = mb.reshape(x=positions, shape=[tokens, 1])
    masks = {}
    for window in windows:
        allowed = mb.less_equal(x=key_index, y=query)
        if window is not None:
            recent = mb.greater(x=key_index, y=mb.sub(x=query, y=np.int32(window)))
            allowed = mb.logical_and(x=allowed, y=recent)
        # (allowed − 1) × |MASK_VALUE| rather than `select`: coremltools 9 infers select's output shape from
        # its two value operands alone, so select(cond (S, context), scalar, scalar) would claim a scalar.
        allowed = mb.cast(x=allowed, dtype="fp16")
        mask = mb.mul(x=mb.sub(x=allowed, y=np.float16(1)), y=np.float16(-MASK_VALUE))
        masks[window] = mb.reshape(x=mask, shape=[1, 1, tokens, context],
                                   name="causal_mask" if window is None else f"window{window}_mask")
    return masks
