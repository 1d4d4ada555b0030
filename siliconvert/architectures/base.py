"""What every architecture description provides: normalised hyper-parameters, traits and tensor roles.

A family reads config.json once, here, and every target (MLX, GGUF, Core ML) and the reference read the
resulting `ModelSpec`. The spec describes features, not families: a writer asks "are there q/k norms?",
never "is this Qwen3?". Defaults are Llama's; a family module states only how it departs from them.

Keys a family does not understand are reported, never silently dropped: a converter that ignores a key it
does not know is how rope θ went missing when transformers 5 moved it under `rope_parameters`. Defaults a
config leaves out (layer types, per-layer-type rope, a family's default θ) are filled by transformers' own
config class for the family, so the spec means what transformers' forward computes.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal, TypeVar

from siliconvert.errors import CheckpointError, UnsupportedArchitectureError

T = TypeVar("T")


class ConfigWarning(UserWarning):
    """A config.json key siliconvert does not understand (shown once per key)."""


@dataclass(frozen=True)
class Rope:
    """Rotary position embedding of one layer, as transformers computes it."""

    theta: float
    dim: int  # leading dimensions of each head that rotate (partial rotary); the rest pass through
    # Non-default scaling as transformers' rope_parameters spell it ("rope_type", "factor", "short_factor", ...)
    scaling: dict[str, Any] | None = None

    @property
    def kind(self) -> str:
        return self.scaling["rope_type"] if self.scaling else "default"


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 1 + 0.1·mscale·ln(factor) (1 where nothing is interpolated)."""
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


def yarn_truncation(scaling: dict[str, Any] | None) -> bool | None:
    """Whether YaRN rounds its correction range out to whole dimensions (transformers' `truncate`, true unless the
    file says false: gpt-oss's is false); None where the rope is not YaRN."""
    if not scaling or scaling.get("rope_type") != "yarn":
        return None
    return bool(scaling.get("truncate", True))


def yarn_attention_factor(scaling: dict[str, Any]) -> float:
    """YaRN's cos/sin scale as transformers computes it: the file's attention_factor, else mscale over
    mscale_all_dim where both are set, else from the factor alone."""
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor, mscale, mscale_all_dim = scaling["factor"], scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    return yarn_mscale(factor)


# What mixes a token with the ones before it, per layer: attention over a KV cache, or a recurrence carrying a
# fixed-size state (`ModelSpec.short_conv`: LFM2's gated short convolution; `ModelSpec.gated_delta`: the gated
# delta rule of Qwen3.5 and Qwen3-Next; `ModelSpec.mamba2`: Mamba2's selective state space of Granite 4.0-H)
Mixer = Literal["attention", "short_conv", "gated_delta", "mamba2"]
MIXERS: tuple[Mixer, ...] = ("attention", "short_conv", "gated_delta", "mamba2")


@dataclass(frozen=True)
class Layer:
    """What differs from one decoder layer to the next."""

    window: int | None  # sliding-window attention: keys at most window-1 positions back; None: full attention
    rope: Rope | None  # None: no positional encoding (NoPE), and always None where the mixer is not attention
    sparse: bool = False  # the MLP is the model's mixture of experts (`ModelSpec.experts`), not a dense MLP
    mixer: Mixer = "attention"
    # Gemma 4's layers apart: their own head size and k/v head count (0: the model's), keys that are also the values
    # (no v_proj: k_eq_v), the earlier layer whose keys and values they attend to (None: their own; kv-shared layers
    # have no k/v projections) and their MLP's width (0: intermediate_size; double-wide in the kv-shared layers)
    head_dim: int = 0
    kv_heads: int = 0
    values_from_keys: bool = False
    kv_source: int | None = None
    intermediate_size: int = 0


@dataclass(frozen=True)
class ShortConv:
    """LFM2's gated short convolution, the mixer of its `short_conv` layers: in_proj maps a token to three rows of
    the hidden size, B, C and x; B·x goes through a depthwise causal convolution of `kernel` taps (one filter per
    channel, over this token and the kernel − 1 before it); C times its output goes through out_proj.

    Its state per sequence is the last kernel − 1 values of B·x: hidden × (kernel − 1) numbers, whatever the length."""

    kernel: int
    bias: bool  # biases on in_proj, the convolution and out_proj

    def state_shape(self, hidden_size: int) -> tuple[int, ...]:
        return (hidden_size, self.kernel - 1)


@dataclass(frozen=True)
class GatedDelta:
    """The gated delta rule (Gated DeltaNet) of Qwen3.5 / Qwen3-Next, the mixer of their `gated_delta` layers.

    Per token: in_proj_qkv gives q, k (key_heads × key_head_dim each) and v (value_heads × value_head_dim), which go
    through a depthwise causal convolution of `conv_kernel` taps and SiLU; q and k are L2-normalised per head (q
    then × key_head_dim^-½) and repeated to value_heads; β = sigmoid(in_proj_b x), one per value head; the decay
    g = −exp(A_log) · softplus(in_proj_a x + dt_bias). Each value head's state S (key_head_dim × value_head_dim)
    decays by exp(g), is corrected toward v along k with rate β (the delta rule: S += k ⊗ β(v − Sᵀk)), and is read
    by q. The heads' outputs go through an RMSNorm (its own weight, never offset) gated by SiLU(in_proj_z x), then
    out_proj.

    State per sequence: the convolution's last conv_kernel − 1 inputs, and S per value head."""

    key_heads: int
    value_heads: int
    key_head_dim: int
    value_head_dim: int
    conv_kernel: int
    # Qwen3-Next stores in_proj_qkvz (per key head: its q, its k, then the v and z rows of the value heads it
    # serves) and in_proj_ba (per key head: the b rows, then the a rows of its value heads): roles delta_qkvz and
    # ssm_ba in place of delta_qkv, delta_gate, ssm_beta and ssm_alpha
    fused: bool = False

    @property
    def key_size(self) -> int:
        return self.key_heads * self.key_head_dim

    @property
    def value_size(self) -> int:
        return self.value_heads * self.value_head_dim

    @property
    def conv_channels(self) -> int:
        return 2 * self.key_size + self.value_size

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"conv": (self.conv_channels, self.conv_kernel - 1),
                "recurrent": (self.value_heads, self.key_head_dim, self.value_head_dim)}


@dataclass(frozen=True)
class Mamba2:
    """Mamba2's selective state space (SSD), the mixer of `mamba2` layers (Granite 4.0-H).

    in_proj maps a token to z (heads × head_dim), xBC (x: heads × head_dim, then B and C: groups × state_size each)
    and dt (one per head). xBC goes through a depthwise causal convolution of `conv_kernel` taps (with bias when
    `conv_bias`) and SiLU. Each head's state h (head_dim × state_size) decays by exp(Δ·A), A = −exp(A_log),
    Δ = softplus(dt + dt_bias) clamped to `time_step_limit`, and takes Δ · x ⊗ B of its group; the output is h·C
    plus D · x. It goes through an RMSNorm over each of the `groups` slices (its own weight, never offset) of
    y · SiLU(z), then out_proj (biases on in_proj and out_proj when `proj_bias`).

    State per sequence: the convolution's last conv_kernel − 1 inputs, and h per head."""

    heads: int
    head_dim: int
    groups: int
    state_size: int
    conv_kernel: int
    conv_bias: bool
    proj_bias: bool
    time_step_limit: tuple[float, float] = (0.0, math.inf)

    @property
    def inner_size(self) -> int:
        return self.heads * self.head_dim

    @property
    def conv_channels(self) -> int:
        return self.inner_size + 2 * self.groups * self.state_size

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"conv": (self.conv_channels, self.conv_kernel - 1),
                "recurrent": (self.heads, self.head_dim, self.state_size)}


@dataclass(frozen=True)
class Experts:
    """A mixture-of-experts MLP: a router picks `used` of `count` gated MLPs per token and mixes their outputs.

    The router is a linear map to one logit per expert; the chosen are the top `used` of softmax(logits), weighted
    by their probabilities, renormalised to sum to one when `normalize_topk` (Mixtral always: the top-k of the
    logits then a softmax over the chosen is exactly that; Qwen3-MoE when `norm_topk_prob`)."""

    count: int
    used: int  # experts per token (top-k)
    intermediate_size: int  # of each expert's gated MLP
    normalize_topk: bool
    # A shared expert every token goes through besides the routed ones (Qwen2-MoE): a gated MLP of this size whose
    # output is weighted by sigmoid(a linear map of the token to one number); 0: none
    shared_intermediate_size: int = 0
    # The sparse layers keep their dense MLP too and add its output to the experts' (Granite 4.0-H's shared_mlp: an
    # ungated shared expert); False: the experts replace it
    beside_dense: bool = False
    # Biases on each expert's gate_up and down stacks ([count, 2·ff] and [count, hidden]) and on the router
    # (gpt-oss): its logits are router·x + bias
    biases: bool = False
    # gpt-oss's clamped SwiGLU, (alpha, limit): gate clamped to ≤ limit, up to ±limit, the expert's inner activation
    # (up + 1) · gate · sigmoid(alpha · gate); None: SiLU(gate) · up
    clamped_swiglu: tuple[float, float] | None = None
    # Gemma 4's router: it reads the layer's residual (not the MLP's normed input), RMS-normed without a weight,
    # × a learned scale per input (ffn_gate_inp_scale [hidden]) × hidden^-½, then its linear map
    router_norm: bool = False
    # each chosen expert's weight × a learned scale of that expert (ffn_exps_scale [count]), after renormalising
    expert_scales: bool = False
    # beside_dense with each branch in norms of its own (Gemma 4): the dense MLP's output × post_ffw_norm_1, the
    # experts' input pre_ffw_norm_2 of the residual and their output × post_ffw_norm_2; the layer's post-feedforward
    # norm then takes their sum
    branch_norms: bool = False


Placement = Literal["pre", "post", "sandwich"]
Activation = Literal["silu", "gelu_tanh"]


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer, normalised from config.json: sizes, then the traits every target reads."""

    family: str
    hf_architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float  # the full-attention layers' rope (layers[i].rope is each layer's own)
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # biases on q, k, v projections
    attn_output_bias: bool = False  # bias on the attention output projection
    mlp_bias: bool = False
    # Non-default RoPE scaling of the full-attention layers, transformers' `rope_parameters` style
    rope_scaling: dict[str, Any] | None = None
    sliding_window: int | None = None  # the window of the layers that slide (None: no layer does)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    source_dtype: str = "float32"
    # ---- traits (Llama's values by default) ----
    layers: tuple[Layer, ...] = ()  # per layer: attention window and rope
    # Norm weights multiply as (norm_offset + w): Gemma stores w around 0 and applies 1 + w
    norm_offset: float = 0.0
    # "pre": norm → block → add (Llama); "post": block → norm → add (OLMo 2);
    # "sandwich": norm → block → norm → add (Gemma 2/3: input, post-attention, pre- and post-feedforward)
    norm_placement: Placement = "pre"
    qk_norm: Literal["head", "projection"] | None = None  # RMSNorm of q and k per head, or over the projection
    activation: Activation = "silu"  # of the gated MLP: SwiGLU, or GeGLU with tanh-approximated GELU
    embedding_scale: float = 1.0  # embeddings × this (Gemma √hidden, Granite embedding_multiplier)
    attention_scale: float = 0.0  # q·k × this; 0 means head_dim^-½ (see `attention_multiplier`)
    residual_scale: float = 1.0  # each block's output × this before the residual add (Granite)
    logits_scale: float = 1.0  # logits × this (Granite: 1 / logits_scaling)
    attn_softcap: float | None = None  # scores → cap·tanh(scores / cap) before the mask (Gemma 2)
    final_softcap: float | None = None  # logits → cap·tanh(logits / cap) (Gemma 2)
    fused_qkv: bool = False  # the checkpoint stores q, k, v as one qkv_proj (rows q, then k, then v)
    fused_gate_up: bool = False  # the checkpoint stores gate and up as one gate_up_proj (rows gate, then up)
    # Attention's output × sigmoid(gate) before o_proj, the gate from q_proj: per head, head_dim query rows then
    # head_dim gate rows (Qwen3.5, Qwen3-Next)
    attn_output_gate: bool = False
    # q × (1 + β·ln(1 + ⌊position / positions⌋)) after rope (Llama 4's attention temperature, Ministral 3): (β,
    # positions); 1 below `positions`, so a context that never reaches it computes Llama's attention
    position_attention_scale: tuple[float, int] | None = None
    # A learned logit per q head that joins each query's softmax over the keys and takes its share of the weight
    # without a value (gpt-oss's sinks: attention may attend to nothing); tensor role attn_sinks [heads]
    attention_sinks: bool = False
    # Mixture of experts in the layers marked `sparse` (the others keep the dense MLP of intermediate_size).
    # Their tensors stream as transformers' own stacks: router [count, hidden], gate_up [count, 2·ff, hidden]
    # (each expert's gate rows, then its up rows) and down [count, hidden, ff], whatever the files hold.
    experts: Experts | None = None
    short_conv: ShortConv | None = None  # the mixer of the layers whose mixer is "short_conv"
    gated_delta: GatedDelta | None = None  # the mixer of the layers whose mixer is "gated_delta"
    mamba2: Mamba2 | None = None  # the mixer of the layers whose mixer is "mamba2"
    # Per-layer inputs (Gemma 4's PLE), this many numbers per layer and token (0: none): a second embedding
    # [per_layer_input_vocab, layers × per_layer_input] × √per_layer_input, plus the scaled embedding projected by
    # per_layer_model_proj × hidden^-½ and RMS-normed per layer (per_layer_proj_norm), summed and × 2^-½. After a
    # layer's MLP: h += post_norm(proj(gelu_tanh(inp_gate · h) × the layer's slice)).
    per_layer_input: int = 0
    per_layer_input_vocab: int = 0
    value_norm: bool = False  # values RMS-normed per head, without a weight, before attention (Gemma 4)
    layer_output_scale: bool = False  # each layer's output × a scalar of its own (Gemma 4's layer_scalar)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    def layer_head_dim(self, index: int) -> int:
        return (self.layers[index].head_dim if self.layers else 0) or self.head_dim

    def layer_kv_heads(self, index: int) -> int:
        return (self.layers[index].kv_heads if self.layers else 0) or self.num_kv_heads

    def layer_intermediate_size(self, index: int) -> int:
        return (self.layers[index].intermediate_size if self.layers else 0) or self.intermediate_size

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def attention_multiplier(self) -> float:
        return self.attention_scale or self.head_dim**-0.5

    @property
    def rope(self) -> Rope | None:
        """The rope of the full-attention layers (of layer 0 if none is full): the model's main rope."""
        full = [layer.rope for layer in self.layers if layer.window is None and layer.rope is not None]
        ropes = full or [layer.rope for layer in self.layers if layer.rope is not None]
        return ropes[0] if ropes else None

    def traits(self) -> dict[str, Any]:
        """The traits that depart from Llama's, by name: what a writer that cannot honour one names."""
        departures: dict[str, Any] = {}
        for name, default in LLAMA_TRAITS.items():
            if getattr(self, name) != default:
                departures[name] = getattr(self, name)
        for mixer in MIXERS[1:]:
            if layers := self.mixer_layers(mixer):
                departures[mixer] = layers
        attention = [layer for layer in self.layers if layer.mixer == "attention"]
        windows = {layer.window for layer in attention}
        if windows - {None}:
            departures["sliding_window"] = sorted(w or 0 for w in windows)
        ropes = [layer.rope for layer in attention]
        if None in ropes:
            departures["nope_layers"] = [i for i, layer in enumerate(self.layers)
                                         if layer.mixer == "attention" and layer.rope is None]
        if len({repr(rope) for rope in ropes if rope is not None}) > 1:
            departures["per_layer_rope"] = True
        if partial := [layer.rope.dim for layer in attention if layer.rope is not None
                       and layer.rope.dim != (layer.head_dim or self.head_dim)]:
            departures["partial_rotary"] = partial[0]
        if heads := {i: layer.head_dim for i, layer in enumerate(self.layers) if layer.head_dim}:
            departures["per_layer_head_dim"] = heads
        if kv_heads := {i: layer.kv_heads for i, layer in enumerate(self.layers) if layer.kv_heads}:
            departures["per_layer_kv_heads"] = kv_heads
        if k_eq_v := [i for i, layer in enumerate(self.layers) if layer.values_from_keys]:
            departures["k_eq_v"] = k_eq_v
        if shared := {i: layer.kv_source for i, layer in enumerate(self.layers) if layer.kv_source is not None}:
            departures["kv_shared_layers"] = shared
        if widths := {i: layer.intermediate_size for i, layer in enumerate(self.layers) if layer.intermediate_size}:
            departures["per_layer_mlp_width"] = widths
        if self.rope is not None and self.rope.scaling is not None:
            departures["rope_scaling"] = self.rope.kind
        if self.experts is not None:
            departures["experts"] = f"{self.experts.used} of {self.experts.count}"
            if dense := [i for i, layer in enumerate(self.layers) if not layer.sparse]:
                departures["dense_layers"] = dense
            if self.experts.biases:
                departures["expert_biases"] = True
            if self.experts.clamped_swiglu is not None:
                departures["clamped_swiglu"] = self.experts.clamped_swiglu
            for trait in ("router_norm", "expert_scales", "branch_norms"):
                if getattr(self.experts, trait):
                    departures[trait] = True
        if self.rope is not None and yarn_truncation(self.rope.scaling) is False:
            departures["yarn_untruncated"] = True
        return departures

    @property
    def sparse_layers(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers) if layer.sparse]

    def mixer_layers(self, mixer: Mixer) -> list[int]:
        """The layers whose mixer is `mixer`."""
        return [i for i, layer in enumerate(self.layers) if layer.mixer == mixer]

    def state_numbers(self) -> dict[Mixer, int]:
        """Numbers of recurrent state per sequence, summed over the layers of each mixer that carries one (the KV
        cache, which grows with the sequence, is not in it)."""
        numbers: dict[Mixer, int] = {}
        if self.short_conv is not None and (layers := self.mixer_layers("short_conv")):
            numbers["short_conv"] = len(layers) * math.prod(self.short_conv.state_shape(self.hidden_size))
        if self.gated_delta is not None and (layers := self.mixer_layers("gated_delta")):
            numbers["gated_delta"] = len(layers) * sum(map(math.prod, self.gated_delta.state_shapes().values()))
        if self.mamba2 is not None and (layers := self.mixer_layers("mamba2")):
            numbers["mamba2"] = len(layers) * sum(map(math.prod, self.mamba2.state_shapes().values()))
        return numbers

    def norm_offset_of(self, role: str) -> float:
        """What a norm role's weights are offset by (`norm_offset`), except the norms that never are."""
        return 0.0 if role in NORMS_WITHOUT_OFFSET else self.norm_offset


# Llama's value of each trait: the defaults of ModelSpec's traits, what `traits()` names departures from, and what
# a writer's model file computes unless it says otherwise (convert/mlx_arch.py)
LLAMA_TRAITS: dict[str, Any] = {
    "norm_offset": 0.0, "norm_placement": "pre", "qk_norm": None, "activation": "silu", "embedding_scale": 1.0,
    "attention_scale": 0.0, "residual_scale": 1.0, "logits_scale": 1.0, "attn_softcap": None,
    "final_softcap": None, "fused_qkv": False, "fused_gate_up": False, "attn_output_gate": False,
    "position_attention_scale": None, "per_layer_input": 0, "value_norm": False, "layer_output_scale": False,
    "attention_sinks": False,
}


@dataclass(frozen=True)
class TensorRole:
    """What one checkpoint tensor is: a role (named like GGUF's, e.g. "attn_q"), its layer, its kind."""

    role: str
    layer: int | None
    kind: str  # "weight" or "bias"


# Keys every family understands without acting on them: bookkeeping, training and generation settings.
_IGNORED_KEYS = frozenset({
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "initializer_range", "_name_or_path", "output_attentions", "output_hidden_states", "return_dict",
    "pretraining_tp", "attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "bos_token_id",
    "eos_token_id", "pad_token_id", "quantization_config", "use_sliding_window", "max_window_layers",
    "layer_types", "tie_word_embeddings", "auto_map", "id2label", "label2id", "problem_type",
    "is_encoder_decoder", "chunk_size_feed_forward", "task_specific_params", "sliding_window_pattern",
    "final_logit_softcapping", "attn_logit_softcapping", "cache_implementation", "use_bidirectional_attention",
    "_sliding_window_pattern",
    # Special tokens' ids: the tokenizer's files, not the function, say what they are.
    "unk_token_id", "sep_token_id", "cls_token_id", "mask_token_id", "decoder_start_token_id",
    "forced_bos_token_id", "forced_eos_token_id",
    # Where the checkpoint came from and how it was trained or exported: the forward does not read them.
    "_model_name_or_path", "_commit_hash", "_attn_implementation", "_attn_implementation_autoset",
    "attn_implementation", "torchscript", "tf_legacy_loss", "use_return_dict", "finetuning_task",
    "tokenizer_class", "prefix", "pruned_heads", "is_decoder", "add_cross_attention", "tie_encoder_decoder",
    "cross_attention_hidden_size", "gradient_checkpointing", "dropout", "classifier_dropout",
    # Generation defaults (sampling, beams, lengths): they choose tokens, never the logits.
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
})
# Activations of the gated MLP, as transformers' ACT2FN names them → the trait.
ACTIVATIONS: dict[str, Activation] = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh",
                                      "gelu_new": "gelu_tanh"}
# Per-layer tensor role → the HF module it comes from, in Llama's naming; a family overrides what differs.
LLAMA_TENSORS = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "model.layers.{layer}.input_layernorm": "attn_norm",
    "model.layers.{layer}.self_attn.q_proj": "attn_q",
    "model.layers.{layer}.self_attn.k_proj": "attn_k",
    "model.layers.{layer}.self_attn.v_proj": "attn_v",
    "model.layers.{layer}.self_attn.o_proj": "attn_output",
    "model.layers.{layer}.post_attention_layernorm": "ffn_norm",
    "model.layers.{layer}.mlp.gate_proj": "ffn_gate",
    "model.layers.{layer}.mlp.up_proj": "ffn_up",
    "model.layers.{layer}.mlp.down_proj": "ffn_down",
}
# A sparse layer's MLP, named as transformers names its parameters (the expert stacks have no .weight suffix).
EXPERT_TENSORS = {
    "model.layers.{layer}.mlp.gate": "ffn_gate_inp",  # the router
    "model.layers.{layer}.mlp.experts.gate_up_proj": "ffn_gate_up_exps",
    "model.layers.{layer}.mlp.experts.down_proj": "ffn_down_exps",
}
SHARED_EXPERT_TENSORS = {
    "model.layers.{layer}.mlp.shared_expert.gate_proj": "ffn_gate_shexp",
    "model.layers.{layer}.mlp.shared_expert.up_proj": "ffn_up_shexp",
    "model.layers.{layer}.mlp.shared_expert.down_proj": "ffn_down_shexp",
    "model.layers.{layer}.mlp.shared_expert_gate": "ffn_gate_inp_shexp",  # its sigmoid weight, one per token
}
# Gemma 4's per-layer inputs (`ModelSpec.per_layer_input`) and each layer's output scale
PER_LAYER_INPUT_TENSORS = {
    "model.embed_tokens_per_layer": "per_layer_token_embd",
    "model.per_layer_model_projection": "per_layer_model_proj",
    "model.per_layer_projection_norm": "per_layer_proj_norm",
    "model.layers.{layer}.per_layer_input_gate": "per_layer_inp_gate",
    "model.layers.{layer}.per_layer_projection": "per_layer_proj",
    "model.layers.{layer}.post_per_layer_input_norm": "per_layer_post_norm",
}
LAYER_OUTPUT_SCALE_TENSORS = {"model.layers.{layer}.layer_scalar": "layer_output_scale"}
# LFM2's gated short convolution, named as llama.cpp names it (blk.N.shortconv.conv, ...)
SHORT_CONV_TENSORS = {
    "model.layers.{layer}.conv.in_proj": "shortconv.in_proj",
    "model.layers.{layer}.conv.conv": "shortconv.conv",
    "model.layers.{layer}.conv.out_proj": "shortconv.out_proj",
}
# The gated delta rule (Qwen3.5's names; GGUF's are attn_qkv, attn_gate, ssm_beta, ssm_alpha, ...)
GATED_DELTA_TENSORS = {
    "model.layers.{layer}.linear_attn.in_proj_qkv": "delta_qkv",
    "model.layers.{layer}.linear_attn.in_proj_z": "delta_gate",
    "model.layers.{layer}.linear_attn.in_proj_b": "ssm_beta",
    "model.layers.{layer}.linear_attn.in_proj_a": "ssm_alpha",
    "model.layers.{layer}.linear_attn.conv1d": "ssm_conv1d",
    "model.layers.{layer}.linear_attn.dt_bias": "ssm_dt",
    "model.layers.{layer}.linear_attn.A_log": "ssm_a",
    "model.layers.{layer}.linear_attn.norm": "ssm_norm",
    "model.layers.{layer}.linear_attn.out_proj": "ssm_out",
}
FUSED_GATED_DELTA_TENSORS = {
    "model.layers.{layer}.linear_attn.in_proj_qkvz": "delta_qkvz",
    "model.layers.{layer}.linear_attn.in_proj_ba": "ssm_ba",
}
# Norms whose weights multiply as they are, whatever the model's `norm_offset` (Qwen3.5's gated norm)
NORMS_WITHOUT_OFFSET = ("ssm_norm",)
# Mamba2 (Granite 4.0-H's names); its conv, dt_bias, A_log and norm share the gated delta rule's roles
MAMBA2_TENSORS = {
    "model.layers.{layer}.mamba.in_proj": "ssm_in",
    "model.layers.{layer}.mamba.conv1d": "ssm_conv1d",
    "model.layers.{layer}.mamba.dt_bias": "ssm_dt",
    "model.layers.{layer}.mamba.A_log": "ssm_a",
    "model.layers.{layer}.mamba.D": "ssm_d",
    "model.layers.{layer}.mamba.norm": "ssm_norm",
    "model.layers.{layer}.mamba.out_proj": "ssm_out",
}
ATTENTION_ROLES = ("attn_q", "attn_k", "attn_v", "attn_qkv")
# every role of an attention mixer: a layer of another mixer has none of them
ATTENTION_MIXER_ROLES = (*ATTENTION_ROLES, "attn_output", "attn_q_norm", "attn_k_norm", "attn_sinks")
MIXER_ROLES: dict[str, tuple[str, ...]] = {"attention": ATTENTION_MIXER_ROLES,
                                           "short_conv": tuple(SHORT_CONV_TENSORS.values()),
                                           "gated_delta": (*GATED_DELTA_TENSORS.values(),
                                                           *FUSED_GATED_DELTA_TENSORS.values()),
                                           "mamba2": tuple(MAMBA2_TENSORS.values())}
MLP_ROLES = ("ffn_gate", "ffn_up", "ffn_gate_up", "ffn_down")
# Gemma 4's expert block beside the dense MLP: its router (a linear map, a scale per input, a scale per expert), the
# experts' stacks and the norms of the two branches (Experts.router_norm, expert_scales, branch_norms)
EXPERT_BLOCK_TENSORS = {
    "model.layers.{layer}.router.proj": "ffn_gate_inp",
    "model.layers.{layer}.router.scale": "ffn_gate_inp_scale",
    "model.layers.{layer}.router.per_expert_scale": "ffn_exps_scale",
    "model.layers.{layer}.experts.gate_up_proj": "ffn_gate_up_exps",
    "model.layers.{layer}.experts.down_proj": "ffn_down_exps",
    "model.layers.{layer}.post_feedforward_layernorm_1": "post_ffw_norm_1",
    "model.layers.{layer}.pre_feedforward_layernorm_2": "pre_ffw_norm_2",
    "model.layers.{layer}.post_feedforward_layernorm_2": "post_ffw_norm_2",
}
EXPERT_ROLES = (*EXPERT_TENSORS.values(), *SHARED_EXPERT_TENSORS.values(), *EXPERT_BLOCK_TENSORS.values())
EXPERT_STACKS = ("ffn_gate_up_exps", "ffn_down_exps")
# parameters of a module itself, without a .weight suffix: the expert stacks (and their `<stack>_bias`), the gated
# delta rule's dt_bias and A_log, the attention sinks, a layer's output scale, Gemma 4's router scales
BARE_PARAMETERS = (*EXPERT_STACKS, "ssm_dt", "ssm_a", "ssm_d", "layer_output_scale", "attn_sinks",
                   "ffn_gate_inp_scale", "ffn_exps_scale")
# a layer's own keys and values: a kv-shared layer has none of these (a k_eq_v layer no attn_v)
OWN_KV_ROLES = ("attn_k", "attn_v", "attn_k_norm")


def role_shape(spec: ModelSpec, role: str, layer: int | None = None) -> tuple[int, ...]:
    """A weight's shape in the checkpoint (HF layout: linear weights are (out, in)); a bias is its first axis. Sizes
    of attention and MLP are `layer`'s own where its layer differs (Gemma 4)."""
    h = spec.hidden_size
    q, kv, ff, d = spec.q_size, spec.kv_size, spec.intermediate_size, spec.head_dim
    if layer is not None:
        d, ff = spec.layer_head_dim(layer), spec.layer_intermediate_size(layer)
        q, kv = spec.num_heads * d, spec.layer_kv_heads(layer) * d
    shapes = {
        "token_embd": (spec.vocab_size, h), "output": (spec.vocab_size, h),
        "attn_q": (q, h), "attn_k": (kv, h), "attn_v": (kv, h), "attn_qkv": (q + 2 * kv, h), "attn_output": (h, q),
        "attn_q_norm": (d,) if spec.qk_norm == "head" else (q,),
        "attn_k_norm": (d,) if spec.qk_norm == "head" else (kv,),
        "ffn_gate": (ff, h), "ffn_up": (ff, h), "ffn_gate_up": (2 * ff, h), "ffn_down": (h, ff),
    }
    if spec.experts is not None:
        count, ff = spec.experts.count, spec.experts.intermediate_size
        shapes |= {"ffn_gate_inp": (count, h), "ffn_gate_up_exps": (count, 2 * ff, h), "ffn_down_exps": (count, h, ff)}
        shared = spec.experts.shared_intermediate_size
        shapes |= {"ffn_gate_shexp": (shared, h), "ffn_up_shexp": (shared, h), "ffn_down_shexp": (h, shared),
                   "ffn_gate_inp_shexp": (1, h), "ffn_exps_scale": (count,)}
    if spec.attention_sinks:
        shapes["attn_sinks"] = (spec.num_heads,)
    if spec.attn_output_gate:  # each head's query rows, then its gate rows
        shapes["attn_q"] = (2 * q, h)
    if (delta := spec.gated_delta) is not None:
        heads = delta.value_heads
        shapes |= {"delta_qkv": (delta.conv_channels, h), "delta_gate": (delta.value_size, h),
                   "ssm_beta": (heads, h), "ssm_alpha": (heads, h),
                   "ssm_conv1d": (delta.conv_channels, 1, delta.conv_kernel), "ssm_dt": (heads,), "ssm_a": (heads,),
                   "ssm_norm": (delta.value_head_dim,),
                   "ssm_out": (h, delta.value_size), "delta_qkvz": (delta.conv_channels + delta.value_size, h),
                   "ssm_ba": (2 * heads, h)}
    if (mamba := spec.mamba2) is not None:
        heads, inner = mamba.heads, mamba.inner_size
        shapes |= {"ssm_in": (inner + mamba.conv_channels + heads, h),
                   "ssm_conv1d": (mamba.conv_channels, 1, mamba.conv_kernel), "ssm_dt": (heads,), "ssm_a": (heads,),
                   "ssm_d": (heads,), "ssm_norm": (inner,), "ssm_out": (h, inner)}
    if size := spec.per_layer_input:
        packed = spec.num_layers * size
        shapes |= {"per_layer_token_embd": (spec.per_layer_input_vocab, packed), "per_layer_model_proj": (packed, h),
                   "per_layer_proj_norm": (size,), "per_layer_inp_gate": (size, h), "per_layer_proj": (h, size)}
    if spec.layer_output_scale:
        shapes["layer_output_scale"] = (1,)
    if spec.short_conv is not None:  # the convolution as torch's Conv1d holds it: [channels, 1, kernel]
        shapes |= {"shortconv.in_proj": (3 * h, h), "shortconv.conv": (h, 1, spec.short_conv.kernel),
                   "shortconv.out_proj": (h, h)}
    return shapes.get(role, (h,))  # every other role is a norm over the hidden size


class Family:
    """One model family. Subclasses fill in data; override a method only where a family truly differs."""

    name: ClassVar[str]
    hf_architectures: ClassVar[tuple[str, ...]]
    model_type: ClassVar[str]  # transformers' config class for the family, where config.json names none
    # HF parameter name (with {layer}) → role. The GGUF role names are reused as the neutral vocabulary.
    tensor_names: ClassVar[dict[str, str]] = LLAMA_TENSORS
    # Keys config.json must hold (an MoE family without a dense MLP may have no intermediate_size)
    required_keys: ClassVar[tuple[str, ...]] = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                                "num_attention_heads")
    # Keys this family reads (beyond _IGNORED_KEYS); anything else in config.json gets a warning.
    understood_keys: ClassVar[frozenset[str]] = frozenset({
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
        "max_position_embeddings", "hidden_act", "attention_bias", "mlp_bias", "sliding_window",
    })
    # Per-expert tensors of the files → the stack transformers' model holds: stack template → the parts of each
    # expert in row order ({layer}, {expert}). transformers 5 saves stacks (read as they are) or, converting back
    # to the hub's layout, per-expert tensors; both are read.
    expert_parts: ClassVar[dict[str, tuple[str, ...]]] = {}
    # Older names of the files → transformers' (regex, replacement), applied before anything else.
    renamed: ClassVar[tuple[tuple[str, str], ...]] = ()
    # Tensors that some checkpoints carry but no target needs (recomputed from the config).
    droppable: ClassVar[tuple[str, ...]] = (r"\.rotary_emb\.inv_freq$",)

    # ---- hyper-parameters -------------------------------------------------------------------
    def spec(self, config: dict[str, Any], where: str = "config.json") -> ModelSpec:
        """Normalise config.json into a ModelSpec, refusing what no target could honour."""
        self._warn_unknown_keys(config, where)
        for key in self.required_keys:
            if config.get(key) is None:
                raise CheckpointError(f"missing required field {key!r}", where)
        hf = transformers_config(config, self.model_type, where)
        self._warn_theta_disagreement(config, where)
        activation = ACTIVATIONS.get(getattr(hf, "hidden_activation", None) or getattr(hf, "hidden_act", "silu"))
        if activation is None:
            named = getattr(hf, "hidden_activation", None) or hf.hidden_act
            raise CheckpointError(f"hidden_act {named!r} is not supported (silu, gelu_pytorch_tanh)", where)
        qkv_bias, attn_output_bias = self._attention_biases(hf)
        layers = self._layers(hf, where)
        main_rope = next((layer.rope for layer in layers if layer.window is None and layer.rope), None)
        main_rope = main_rope or next((layer.rope for layer in layers if layer.rope), None)
        windows = {layer.window for layer in layers} - {None}
        spec = ModelSpec(
            family=self.name,
            hf_architecture=(config.get("architectures") or [self.hf_architectures[0]])[0],
            vocab_size=int(hf.vocab_size),
            hidden_size=int(hf.hidden_size),
            intermediate_size=self._intermediate_size(hf),
            num_layers=int(hf.num_hidden_layers),
            num_heads=int(hf.num_attention_heads),
            num_kv_heads=int(getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads),
            head_dim=head_dim(hf),
            rms_norm_eps=float(getattr(hf, "rms_norm_eps", None) or getattr(hf, "norm_eps", None) or 1e-6),
            rope_theta=main_rope.theta if main_rope else 10000.0,
            rope_scaling=main_rope.scaling if main_rope else None,
            max_position_embeddings=int(getattr(hf, "max_position_embeddings", 2048)),
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            attn_output_bias=attn_output_bias,
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            sliding_window=max(windows) if windows else None,
            bos_token_id=config.get("bos_token_id"),
            eos_token_id=config.get("eos_token_id"),
            pad_token_id=config.get("pad_token_id"),
            source_dtype=str(config.get("dtype") or config.get("torch_dtype") or "float32"),
            layers=layers,
            activation=activation,
            **self.traits(hf),
        )
        if spec.experts is not None and not 1 <= spec.experts.used <= spec.experts.count:
            raise CheckpointError(f"{spec.experts.used} experts per token, but {spec.experts.count} experts", where)
        if spec.num_heads % spec.num_kv_heads:
            raise CheckpointError(
                f"num_attention_heads ({spec.num_heads}) is not a multiple of "
                f"num_key_value_heads ({spec.num_kv_heads})",
                where,
            )
        return spec

    def _intermediate_size(self, hf: Any) -> int:
        """The dense MLP's width, as transformers' MLP module sizes it."""
        return int(hf.intermediate_size)

    def traits(self, hf: Any) -> dict[str, Any]:
        """How the family departs from Llama (ModelSpec's trait fields), read from transformers' config."""
        return {}

    def _layers(self, hf: Any, where: str) -> tuple[Layer, ...]:
        """Each layer's attention window and rope, as transformers' attention modules choose them."""
        layer_types = getattr(hf, "layer_types", None) or ["full_attention"] * hf.num_hidden_layers
        if len(layer_types) != hf.num_hidden_layers:
            raise CheckpointError(f"layer_types names {len(layer_types)} layers, num_hidden_layers "
                                  f"{hf.num_hidden_layers}", where)
        attention_kinds = ("full_attention", "sliding_attention")
        for kind in layer_types:
            if kind not in attention_kinds and kind not in self.mixer_layer_types:
                raise CheckpointError(f"layer type {kind!r} is not supported", where)
        ropes = {kind: self._rope(hf, kind, where) for kind in set(layer_types) & set(attention_kinds)}
        uses_rope = self._uses_rope(hf)
        window = self._sliding_window(hf)
        layers = []
        for index, kind in enumerate(layer_types):
            if kind in self.mixer_layer_types:
                layers.append(Layer(window=None, rope=None, sparse=self._sparse(hf, index),
                                    mixer=self.mixer_layer_types[kind]))
                continue
            slides = window if kind == "sliding_attention" or self.all_layers_slide else None
            layers.append(Layer(window=slides, rope=ropes[kind] if uses_rope[index] else None,
                                sparse=self._sparse(hf, index)))
        return tuple(layers)

    # Layer types (transformers' `layer_types`) whose mixer is not attention → the mixer
    mixer_layer_types: ClassVar[dict[str, Mixer]] = {}

    # Whether config.sliding_window applies to every layer whatever layer_types says (Mistral's reading).
    all_layers_slide: ClassVar[bool] = False

    def _sliding_window(self, hf: Any) -> int | None:
        # Qwen2/3 and SmolLM3 carry a window that applies only when use_sliding_window is true
        window = getattr(hf, "sliding_window", None)
        return int(window) if window and getattr(hf, "use_sliding_window", True) else None

    def _sparse(self, hf: Any, layer: int) -> bool:
        """Whether the layer's MLP is the mixture of experts (a family with experts says which layers are)."""
        return False

    def _uses_rope(self, hf: Any) -> list[bool]:
        return [True] * hf.num_hidden_layers

    def _rope(self, hf: Any, layer_type: str, where: str) -> Rope:
        """One layer type's rope from transformers' normalised `rope_parameters` (flat, or keyed by layer type)."""
        params = dict(hf.rope_parameters or {})
        if layer_type in params or set(params) & {"full_attention", "sliding_attention"}:
            params = dict(params.get(layer_type) or {})
        legacy_type = params.pop("type", None)  # older configs' name for rope_type, which transformers keeps
        params.setdefault("rope_type", legacy_type or "default")
        theta = float(params.pop("rope_theta", None) or getattr(hf, "rope_theta", None) or 10000.0)
        partial = float(params.pop("partial_rotary_factor", None) or getattr(hf, "partial_rotary_factor", None)
                        or 1.0)
        dim = int(head_dim(hf) * partial)
        if params.get("rope_type", "default") == "default":
            return Rope(theta, dim)
        if params["rope_type"] not in ("linear", "llama3", "yarn", "dynamic", "longrope"):
            raise CheckpointError(f"rope scaling type {params['rope_type']!r} is not supported", where)
        if params["rope_type"] == "longrope" and params.get("factor") is None:
            # transformers derives it from the two context lengths when the file leaves it out
            original = params.get("original_max_position_embeddings") or hf.max_position_embeddings
            params["factor"] = hf.max_position_embeddings / original
        return Rope(theta, dim, params)

    def _attention_biases(self, hf: Any) -> tuple[bool, bool]:
        """(q/k/v bias, output bias). Llama's `attention_bias` switches on all four."""
        bias = bool(getattr(hf, "attention_bias", False))
        return bias, bias

    def _warn_theta_disagreement(self, config: dict[str, Any], where: str) -> None:
        flat = config.get("rope_parameters") or {}
        theta, top_theta = flat.get("rope_theta"), config.get("rope_theta")
        if theta is not None and top_theta is not None and float(theta) != float(top_theta):
            warnings.warn(
                f"{where}: rope_theta {top_theta} at top level disagrees with rope_parameters "
                f"({theta}); using rope_parameters, as transformers ≥ 5 does",
                ConfigWarning,
                stacklevel=3,
            )

    def _warn_unknown_keys(self, config: dict[str, Any], where: str) -> None:
        for key in sorted(set(config) - _IGNORED_KEYS - self.understood_keys):
            warnings.warn(
                f"{where}: key {key!r} is not understood by the {self.name} description; ignored",
                ConfigWarning,
                stacklevel=3,
            )

    # ---- a decoder inside a larger checkpoint -------------------------------------------------
    def decoder(self, config: dict[str, Any], tensors: dict[str, T], where: Any) -> tuple[dict[str, Any], dict[str, T]]:
        """The decoder's config and tensors (renamed as the decoder's own model names them). A plain decoder
        checkpoint is all decoder; a multimodal family keeps its language model and says what it drops."""
        return config, tensors

    # ---- tensors ----------------------------------------------------------------------------
    def model_names(self, tensors: dict[str, T], stack: Callable[[str, list[list[T]]], T], where: Any) -> dict[str, T]:
        """The files' tensors named as transformers' model names its parameters: old names renamed, per-expert
        tensors grouped by `stack(name, parts of each expert)` into one per layer (nothing is read)."""
        renamed: dict[str, T] = {}
        for name, tensor in tensors.items():
            new_name = name
            for pattern, replacement in self.renamed:
                new_name = re.sub(pattern, replacement, new_name)
            if new_name in renamed:
                raise CheckpointError(f"tensor {new_name!r} is stored under two names", where)
            renamed[new_name] = tensor if new_name == name else replace(tensor, name=new_name)
        if not self.expert_parts:
            return renamed
        parts: dict[str, dict[int, dict[int, T]]] = {}  # stack name → expert → part index → tensor
        part_patterns = [(stack_template, index, _template_pattern(part))
                         for stack_template, part_templates in self.expert_parts.items()
                         for index, part in enumerate(part_templates)]
        canonical: dict[str, T] = {}
        for name, tensor in renamed.items():
            for stack_template, index, pattern in part_patterns:
                if match := pattern.match(name):
                    stack_name = stack_template.format(layer=int(match["layer"]))
                    parts.setdefault(stack_name, {}).setdefault(int(match["expert"]), {})[index] = tensor
                    break
            else:
                canonical[name] = tensor
        for stack_name, experts in parts.items():
            if stack_name in canonical:
                raise CheckpointError(f"tensor {stack_name!r} is stored both stacked and per expert", where)
            templates = self.expert_parts[_layer_pattern.sub("model.layers.{layer}", stack_name, count=1)]
            ordered = []
            for expert in range(max(experts) + 1):
                for index, template in enumerate(templates):
                    if index not in experts.get(expert, {}):
                        layer = int(_layer_pattern.match(stack_name).group(1))
                        raise CheckpointError(f"missing tensor {template.format(layer=layer, expert=expert)!r}",
                                              where)
                ordered.append([experts[expert][index] for index in range(len(templates))])
            canonical[stack_name] = stack(stack_name, ordered)
        return canonical

    def role_of(self, name: str) -> TensorRole | None:
        """The role of an HF tensor name, or None when the family does not know it."""
        stem, _, kind = name.rpartition(".")
        bare = kind not in ("weight", "bias")
        if bare:  # a parameter of the module itself (an expert stack, dt_bias), or a stack's `_bias` (gpt-oss's)
            stem, kind = name, "weight"
            if name.endswith("_bias") and self.tensor_names.get(_template(name.removesuffix("_bias"))) in EXPERT_STACKS:
                stem, kind = name.removesuffix("_bias"), "bias"
        match = _layer_pattern.match(stem)
        role = self.tensor_names.get(_template(stem))
        if role is None or (role in BARE_PARAMETERS) != bare:
            return None
        return TensorRole(role, int(match.group(1)) if match else None, kind)

    def is_droppable(self, name: str) -> bool:
        return any(re.search(pattern, name) for pattern in self.droppable)

    def expected_tensors(self, spec: ModelSpec) -> dict[str, tuple[int, ...]]:
        """Every tensor the checkpoint must hold, with its shape (HF layout: out × in)."""
        biased = set(MLP_ROLES if spec.mlp_bias else ()) | set(ATTENTION_ROLES if spec.qkv_bias else ())
        if spec.attn_output_bias:
            biased.add("attn_output")
        if spec.short_conv is not None and spec.short_conv.bias:
            biased |= set(SHORT_CONV_TENSORS.values())
        if spec.mamba2 is not None:
            biased |= ({"ssm_conv1d"} if spec.mamba2.conv_bias else set()) | (
                {"ssm_in", "ssm_out"} if spec.mamba2.proj_bias else set())
        if spec.experts is not None and spec.experts.biases:
            biased |= {"ffn_gate_inp", *EXPERT_STACKS}
        shapes: dict[str, tuple[int, ...]] = {}
        for template, role in self.tensor_names.items():
            if role == "output" and spec.tie_word_embeddings:
                continue
            name = template if role in BARE_PARAMETERS else f"{template}.weight"
            layers = range(spec.num_layers) if "{layer}" in template else [None]
            if role in EXPERT_ROLES:  # a layer has the experts, the dense MLP, or (beside_dense) both
                layers = [i for i in layers if spec.layers[i].sparse]
            elif role in MLP_ROLES and not (spec.experts is not None and spec.experts.beside_dense):
                layers = [i for i in layers if not spec.layers[i].sparse]
            if mixers := {mixer for mixer, roles in MIXER_ROLES.items() if role in roles}:
                layers = [i for i in layers if spec.layers[i].mixer in mixers]  # and its own mixer's tensors only
            if role in OWN_KV_ROLES:  # a kv-shared layer has no k/v projections, a k_eq_v layer no v_proj
                layers = [i for i in layers if spec.layers[i].kv_source is None
                          and not (role == "attn_v" and spec.layers[i].values_from_keys)]
            for layer in layers:
                shape = role_shape(spec, role, layer)
                shapes[name.format(layer=layer)] = shape
                if role in biased and role in BARE_PARAMETERS:  # a stack's bias: one per expert and output row
                    shapes[f"{template}_bias".format(layer=layer)] = shape[:-1]
                elif role in biased:
                    shapes[f"{template}.bias".format(layer=layer)] = shape[:1]
        return shapes


_layer_pattern = re.compile(r"^model\.layers\.(\d+)")
# Keys of a multimodal config's outer level that belong to its language model where text_config leaves them out
SHARED_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "dtype", "torch_dtype")
# ... and those the outer config decides: the composite model ties its head by its own flag
OUTER_KEYS = ("tie_word_embeddings",)


def language_model(config: dict[str, Any], tensors: dict[str, T], where: Any, *, outer: str, inner: str,
                   inner_type: str, prefixes: dict[str, str], dropped: tuple[str, ...], dropped_parts: str
                   ) -> tuple[dict[str, Any], dict[str, T]]:
    """The language model of a multimodal checkpoint (`outer`), as its text-only family (`inner`, `inner_type`)
    names it: the config from `text_config` and the outer keys it shares; the tensors under `prefixes` renamed
    (prefix → the text-only model's), those under `dropped` (`dropped_parts`: towers, projectors, extra heads)
    left out with a warning that counts them; any other tensor is an error."""
    text = config.get("text_config")
    if not isinstance(text, dict):
        raise CheckpointError(f"{outer} without a text_config object", where)
    shared = {key: config[key] for key in SHARED_KEYS if key in config and key not in text}
    shared |= {key: config[key] for key in OUTER_KEYS if key in config}
    decoder_config = {**text, **shared, "architectures": [inner], "model_type": inner_type}
    kept: dict[str, T] = {}
    left_out = 0
    for name, info in tensors.items():
        if name.startswith(dropped):
            left_out += 1
            continue
        prefix = next((p for p in prefixes if name.startswith(p)), None)
        if prefix is None:
            raise CheckpointError(f"tensor {name!r} belongs to neither the language model nor the parts "
                                  "dropped with the vision tower", where)
        renamed = prefixes[prefix] + name[len(prefix):]
        kept[renamed] = replace(info, name=renamed)
    warnings.warn(f"{where}: {outer}: converting its language model ({inner}); {dropped_parts} ({left_out} "
                  "tensors) are dropped", ConfigWarning, stacklevel=3)
    return decoder_config, kept


def _template(name: str) -> str:
    """A tensor name with its layer index as "{layer}": the key of `Family.tensor_names`."""
    return _layer_pattern.sub("model.layers.{layer}", name, count=1)


def _template_pattern(template: str) -> re.Pattern[str]:
    """A name template ("model.layers.{layer}.mlp.experts.{expert}.down_proj.weight") as a regex."""
    return re.compile(re.escape(template).replace(r"\{layer\}", r"(?P<layer>\d{1,9})")
                      .replace(r"\{expert\}", r"(?P<expert>\d{1,9})") + "$")


def head_dim(hf: Any) -> int:
    return int(getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads)


def transformers_config(config: dict[str, Any], model_type: str, where: str) -> Any:
    """transformers' own config object for config.json: its defaults are what its forward computes."""
    from transformers import CONFIG_MAPPING
    from transformers.utils import logging as hf_logging

    model_type = config.get("model_type") or model_type
    if model_type not in CONFIG_MAPPING:
        raise UnsupportedArchitectureError(f"transformers has no model_type {model_type!r}", where)
    from transformers import PretrainedConfig

    values = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version")}
    # transformers writes floats JSON cannot hold (Granite 4.0-H's time_step_limit of [0, ∞]) as {"__float__":
    # "Infinity"} and reads them back so in from_pretrained, not in the constructor: decode them as it does
    values = PretrainedConfig._decode_special_floats(values)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its advice on config style is for model authors, not for this run
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = CONFIG_MAPPING[model_type](**values)
        if getattr(hf, "is_heterogeneous", False):
            # its global sizes are the layers' default; a family reads per_layer_config for the layers apart (and
            # transformers' note on reading them is advice for model code, not for this run's user)
            hf.allow_global_per_layer_attribute_access = True
            hf_logging.get_logger("transformers.integrations.heterogeneity.configuration_utils").setLevel("ERROR")
        return hf
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"transformers rejects this config: {message}", where) from None
    finally:
        hf_logging.set_verbosity(verbosity)


@dataclass
class Registry:
    """HF architecture name → family."""

    families: dict[str, Family] = field(default_factory=dict)

    def register(self, family_class: type[Family]) -> type[Family]:
        family = family_class()
        for arch in family_class.hf_architectures:
            self.families[arch] = family
        return family_class

    def for_config(self, config: dict[str, Any], where: str = "config.json") -> Family:
        architectures = config.get("architectures") or []
        for arch in architectures:
            if arch in self.families:
                return self.families[arch]
        model_type = config.get("model_type")
        by_type = {family.model_type: family for family in self.families.values()}
        if not architectures and isinstance(model_type, str) and model_type in by_type:
            # transformers' Auto classes pick the model by model_type; the architectures field is optional there
            family = by_type[model_type]
            warnings.warn(f"{where}: no 'architectures' field; read as {family.hf_architectures[0]} from "
                          f"model_type {model_type!r}, as transformers does", ConfigWarning, stacklevel=2)
            return family
        named = ", ".join(architectures) if architectures else f"no 'architectures' field, model_type {model_type!r}"
        supported = ", ".join(sorted(self.families))
        raise UnsupportedArchitectureError(f"unsupported architecture ({named}); supported: {supported}", where)
