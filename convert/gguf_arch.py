"""What llama.cpp's graph for each architecture computes, and how a ModelSpec's traits are written for it.

llama.cpp hard-codes part of each architecture in C++ (Gemma's √hidden embedding scale and attention scale,
SmolLM3's NoPE step of 4, Gemma 3's sliding pattern) and reads the rest from keys. For every trait the spec
has, `GGUFArch` does one of three things:
- writes it as the keys and tensors llama.cpp reads (soft-caps, windows and their per-layer pattern, the
  sliding layers' θ, Granite's multipliers, LongRoPE's factor tensors);
- folds an exact correction into the weights, where llama.cpp computes something else that a weight can
  absorb: norm weights are stored as (offset + w); an attention scale other than llama.cpp's lives in the
  q rows (or, after a q norm, in the q norm's weights: the norm would undo a scale on q);
- refuses, naming the trait, when neither is possible: never a file that computes another function.

Mixtures of experts: llama.cpp's `llama` (Mixtral), `qwen3moe`, `qwen2moe` and `olmoe` graphs route every
layer through `build_moe_ffn` with a softmax over all experts and the top `expert_used_count`; llama and
qwen3moe always renormalise the chosen weights, qwen2moe and olmoe never (none reads expert_weights_norm).
qwen2moe adds its shared expert (ffn_*_shexp) weighted by sigmoid(ffn_gate_inp_shexp · x). The expert stacks
are ffn_gate_exps / ffn_up_exps / ffn_down_exps ({n_embd, n_ff, n_expert} in ggml's order: the stacks as
transformers holds them) and the router ffn_gate_inp. What a graph cannot say (dense layers between sparse
ones, the other weight rule, a shared expert it lacks or needs) is refused. llama.cpp's gemma4 runs Gemma 4's expert
block beside the dense MLP (its ffn_*): the router over rms_norm(residual) × n_embd^-½ × ffn_gate_inp.scale, each
chosen expert's output × ffn_down_exps.scale (transformers' per_expert_scale, which multiplies the same weight), gate
and up as one ffn_gate_up_exps stack, the branches' norms post_ffw_norm_1, pre_ffw_norm_2 and post_ffw_norm_2.

llama.cpp's olmoe sizes q, k and v and their norms as the hidden state ({n_embd}): grouped k/v heads are
written repeated, one per q head, which is the attention GQA computes; the RMS over a k projection whose
heads each appear n times is the RMS over the original, so the norm over the whole projection is unchanged.

Hybrids: a layer's mixer (ModelSpec's Layer.mixer) is read here, in `_check_mixers`, and nowhere else. llama.cpp's
lfm2 graph tells its gated short-convolution layers from its attention layers by a per-layer head_count_kv of 0,
sizes their state by shortconv.l_cache (the kernel), and takes the kernel as [channels, kernel] (torch's Conv1d
[channels, 1, kernel] squeezed) in F32; it has no biases there. A mixer a layout's graph does not run is refused.

llama.cpp's qwen35, qwen35moe and qwen3next graphs run the gated delta rule in the layers
{arch}.attention.recurrent_layers marks (head_count_kv stays the attention layers'), sized by the ssm.* keys:
conv_kernel, state_size (the key head dim, which they take as the value head dim too: other sizes are refused),
group_count (key heads), time_step_rank (value heads), inner_size (value heads × their dim). They read A as
ssm_a = −exp(A_log) (no suffix) and dt_bias as ssm_dt.bias, the conv kernel squeezed in F32; ssm_norm keeps its
weights as they are while the other norms take Qwen3.5's 1 + w. transformers repeats each key head to the value
heads it serves (grouped: k0, k0, k1, k1); qwen35's graph repeats them tiled (k0, k1, k0, k1), so the value heads
are reordered to match, in every tensor indexed by them (the v rows and v conv channels, z, b, a, A, dt_bias,
ssm_out's columns), as llama.cpp's converter does; qwen3next repeats them grouped and takes them as they are. Its
fused in_proj_qkvz (per key head: q, k, then its value heads' v and z) is written as attn_qkv (all q, all k, all v)
and attn_gate (all z); in_proj_ba as ssm_ba, as it is. The attention layers' q_proj holds each head's query then
its gate rows, which these graphs read as they are; qwen35's rope is multimodal (ggml_rope_multi), and a text
token has one position in its t/h/w sections, so any split of the rotary pairs over the three sections is a
plain rope: the balanced one transformers' Qwen3.5 uses ([11, 11, 10] of 32 pairs) is written.

llama.cpp's granitehybrid runs Mamba2 in the layers whose head_count_kv is 0, sized by ssm.conv_kernel, inner_size
(heads × head_dim, which it asserts is 2 × hidden), state_size, group_count and time_step_rank (the heads). Its
in-projection is transformers' in_proj as it is (z, then x, B and C, then dt); it always adds the conv bias, loads
no projection biases and never clamps the time step. A is ssm_a = −exp(A_log) and D ssm_d, both as {1, heads}
(numpy [heads, 1]) with no suffix; the gated norm's weights as {inner / groups, groups}. A layer's shared MLP is its
ffn_*_shexp where there are experts (added to theirs, unweighted) and its ffn_* where there are none, gate and up
apart in either. Rope is on every attention layer or on none (Granite 4.0-H's NoPE), by rope.scaling.finetuned.

llama.cpp's mistral3 graph (Ministral 3) multiplies q after rope by Llama 4's attention temperature,
1 + attention.temperature_scale·ln(1 + ⌊position / n_ctx_orig_yarn⌋): the trait position_attention_scale, its floor
the rope's original context. Its yarn, as every llama.cpp graph's, scales cos/sin by 1 + 0.1·ln(factor) and then by
rope.scaling.attn_factor, which carries the ratio to transformers' own attention factor.

HF q/k rows are "rotate half"; archs with NORM rope in llama.cpp rotate adjacent pairs, so their q and k rows
are reordered per head (llama.cpp's LlamaModel.permute). NEOX archs take the rows as they are.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import gguf
import numpy as np

from siliconvert.architectures import ModelSpec
from siliconvert.architectures.base import (
    MIXERS,
    MLP_ROLES,
    GatedDelta,
    yarn_attention_factor,
    yarn_mscale,
    yarn_truncation,
)
from siliconvert.errors import CheckpointError

A = gguf.MODEL_ARCH


@dataclass(frozen=True)
class LlamaCppExperts:
    """How an architecture's graph in llama.cpp runs a mixture of experts (its `build_moe_ffn` call)."""

    normalize_topk: bool  # the chosen experts' weights renormalised to sum 1 (the `norm_w` argument)
    # the key llama.cpp sizes the expert stacks by: its own expert_feed_forward_length, or (llama) the dense
    # feed_forward_length, which then cannot size a dense MLP of another width
    expert_length_key: bool
    # a shared expert every token goes through, weighted by a sigmoid of its own gate (ffn_*_shexp,
    # ffn_gate_inp_shexp): the graph runs one in every layer when True, and has none when False
    shared_expert: bool = False
    # the layer's dense MLP runs beside the experts and adds to them, unweighted, as ffn_*_shexp sized by
    # expert_shared_feed_forward_length (Experts.beside_dense); False: the experts replace it
    dense_beside: bool = False
    # without expert_count the graph runs a dense MLP in every layer (False: the experts are all it runs)
    dense_without_experts: bool = False
    # biases on the router and on each expert's gate, up and down (ffn_*_exps.bias, ffn_gate_inp.bias)
    biases: bool = False
    # the clamped SwiGLU the graph computes with (alpha, limit) hard-coded (openai-moe's 1.702, 7); None: SwiGLU
    clamped_swiglu: tuple[float, float] | None = None
    # gemma4's expert block: the router over the RMS-normed residual × ffn_gate_inp.scale × n_embd^-½, each expert's
    # output × ffn_down_exps.scale, and each branch in norms of its own (post_ffw_norm_1, pre_ffw_norm_2,
    # post_ffw_norm_2), the dense MLP as the layer's ffn_* (not ffn_*_shexp); the experts' gate and up loaded as one
    # stack, ffn_gate_up_exps (gate rows, then up rows)
    router_norm: bool = False
    expert_scales: bool = False
    branch_norms: bool = False
    fused_gate_up: bool = False


@dataclass(frozen=True)
class Layout:
    """A llama.cpp architecture as siliconvert writes for it."""

    arch: gguf.MODEL_ARCH
    permute_qk: bool  # NORM rope (adjacent pairs) in llama.cpp: q/k rows reordered from HF's rotate-half
    # Traits llama.cpp's graph computes whatever the file says (trait → value); the spec must agree
    fixed: dict[str, Any] = field(default_factory=dict)
    # Traits llama.cpp reads from keys or tensors of this arch
    keyed: frozenset[str] = frozenset()
    experts: LlamaCppExperts | None = None  # None: this arch has no mixture of experts
    # the graph sizes q, k and v as the hidden state (olmoe): grouped k/v heads are repeated, one per q head
    kv_heads_as_q: bool = False
    # the graph requires output.weight (no fallback to token_embd): a tied head is written as a copy of it
    output_required: bool = False
    # the sliding layers rotate with rope.freq_base_swa (gemma2/3); False: with the main rope.freq_base, which the
    # olmo2 graph passes to every layer (it loads the swa key and never uses it)
    swa_theta_keyed: bool = True
    # the mixers the graph runs (Layer.mixer); a layer of any other is refused, naming its mixer
    mixers: frozenset[str] = frozenset({"attention"})
    # roles this architecture writes under another GGUF base name (lfm2's final norm is token_embd_norm)
    renamed: dict[str, str] = field(default_factory=dict)
    # the graph tells its recurrent layers by {arch}.attention.recurrent_layers (False: by a head_count_kv of 0)
    recurrent_layers_key: bool = False
    # multimodal rope (ggml_rope_multi): rope.dimension_sections is a required key
    rope_sections: bool = False
    # the gated delta rule's key heads are repeated tiled to the value heads: value heads reordered to match
    tiled_value_heads: bool = False
    # the gated delta rule's projections as the graph loads them: fused qkvz and ba (qwen3next) or apart (qwen35)
    fused_gated_delta: bool = False
    # the graph loads the MLP's gate and up apart: a fused gate_up (rows gate, then up) is split in halves
    split_gate_up: bool = False
    # the q·k scale the graph fixes (gemma4: 1, its q norm sets the scale); None: head_dim^-½ (Gemma's rule by size)
    attention_scale: float | None = None
    # the sliding layers rotate with the main rope, its scaling included (openai-moe): they must have the same one
    swa_rope_is_main: bool = False


_PRE = {"norm_placement": "pre", "qk_norm": None, "activation": "silu", "final_softcap": None, "attn_softcap": None,
        "fused_qkv": False, "fused_gate_up": False, "attn_output_gate": False, "value_norm": False,
        "per_layer_input": 0, "layer_output_scale": False, "attention_sinks": False}
_GEMMA = _PRE | {"norm_placement": "sandwich", "activation": "gelu_tanh"}
# Qwen3.5 and Qwen3-Next: the attention layers' output gate and q/k norms per head, always; the post-attention norm
# is llama.cpp's post_attention_norm, the gated delta rule's qkv and z projections its attn_qkv and attn_gate
_QWEN3_5 = _PRE | {"qk_norm": "head", "attn_output_gate": True}
_QWEN3_5_NAMES = {"ffn_norm": "post_attention_norm", "delta_qkv": "attn_qkv", "delta_gate": "attn_gate"}
_QWEN3_5_EXPERTS = LlamaCppExperts(normalize_topk=True, expert_length_key=True, shared_expert=True)
_GATED_DELTA = frozenset({"attention", "gated_delta"})
_GRANITE_KEYED = frozenset({"embedding_scale", "attention_scale", "residual_scale", "logits_scale"})
LAYOUTS: dict[str, Layout] = {
    "llama": Layout(A.LLAMA, permute_qk=True, fixed=_PRE),
    "mistral": Layout(A.LLAMA, permute_qk=True, fixed=_PRE),  # llama.cpp converts Mistral as llama
    # Ministral 3: llama.cpp's mistral3 graph multiplies q after rope by Llama 4's temperature, flooring the position
    # by the yarn context (n_ctx_orig_yarn)
    "ministral3": Layout(A.MISTRAL3, permute_qk=True, fixed=_PRE, keyed=frozenset({"position_attention_scale"})),
    "qwen2": Layout(A.QWEN2, permute_qk=False, fixed=_PRE),
    "qwen3": Layout(A.QWEN3, permute_qk=False, fixed=_PRE | {"qk_norm": "head"}),
    "gemma2": Layout(A.GEMMA2, permute_qk=False, fixed=_GEMMA,
                     keyed=frozenset({"attn_softcap", "final_softcap", "sliding_window"})),
    "gemma3": Layout(A.GEMMA3, permute_qk=False, fixed=_GEMMA | {"qk_norm": "head"},
                     keyed=frozenset({"final_softcap", "sliding_window"})),
    # Gemma 4: sliding and global layers sized apart (key_length and key_length_swa, head_count_kv per layer, rope
    # dimensions of each kind), values RMS-normed, a v_proj-less layer's keys as its values, the last layers reusing
    # the keys of the last sliding and the last global layer before them, per-layer inputs, the layer scalar; the
    # global layers' proportional rope as rope_freqs (the pairs that do not turn divided by 1e30, as llama.cpp's
    # converter writes it)
    "gemma4": Layout(A.GEMMA4, permute_qk=False,
                     fixed=_GEMMA | {"qk_norm": "head", "value_norm": True, "layer_output_scale": True},
                     keyed=frozenset({"final_softcap", "sliding_window", "per_layer_sizes", "k_eq_v",
                                      "kv_shared_layers", "per_layer_input", "layer_output_scale",
                                      "proportional_rope"}),
                     experts=LlamaCppExperts(normalize_topk=True, expert_length_key=True, dense_beside=True,
                                             dense_without_experts=True, router_norm=True, expert_scales=True,
                                             branch_norms=True, fused_gate_up=True),
                     renamed={"per_layer_inp_gate": "inp_gate", "per_layer_proj": "proj",
                              "per_layer_post_norm": "post_norm"}, attention_scale=1.0),
    "olmo2": Layout(A.OLMO2, permute_qk=False, fixed=_PRE | {"norm_placement": "post", "qk_norm": "projection"},
                    keyed=frozenset({"sliding_window"}), output_required=True),
    # llama.cpp converts OLMo 3 as olmo2 with the window keys; its sliding layers rotate with the main θ
    "olmo3": Layout(A.OLMO2, permute_qk=False, fixed=_PRE | {"norm_placement": "post", "qk_norm": "projection"},
                    keyed=frozenset({"sliding_window"}), output_required=True, swa_theta_keyed=False),
    "granite": Layout(A.GRANITE, permute_qk=True, fixed=_PRE, keyed=_GRANITE_KEYED),
    "phi3": Layout(A.PHI3, permute_qk=False, fixed=_PRE | {"fused_qkv": True, "fused_gate_up": True},
                   keyed=frozenset({"longrope"})),
    "smollm3": Layout(A.SMOLLM3, permute_qk=True, fixed=_PRE, keyed=frozenset({"nope_every_4th"})),
    # llama.cpp converts Mixtral as llama: experts in every layer once expert_count is set
    "mixtral": Layout(A.LLAMA, permute_qk=True, fixed=_PRE,
                      experts=LlamaCppExperts(normalize_topk=True, expert_length_key=False,
                                              dense_without_experts=True)),
    "qwen3_moe": Layout(A.QWEN3MOE, permute_qk=False, fixed=_PRE | {"qk_norm": "head"},
                        experts=LlamaCppExperts(normalize_topk=True, expert_length_key=True)),
    # qwen2moe and olmoe load no attn_output bias
    "qwen2_moe": Layout(A.QWEN2MOE, permute_qk=False, fixed=_PRE | {"attn_output_bias": False},
                        experts=LlamaCppExperts(normalize_topk=False, expert_length_key=True, shared_expert=True),
                        output_required=True),
    # olmoe sizes its experts by feed_forward_length (it reads no expert key)
    "olmoe": Layout(A.OLMOE, permute_qk=False, fixed=_PRE | {"qk_norm": "projection", "attn_output_bias": False},
                    experts=LlamaCppExperts(normalize_topk=False, expert_length_key=False), kv_heads_as_q=True,
                    output_required=True),
    # llama.cpp's lfm2 loads the final norm as token_embd_norm, and a missing output.weight as token_embd
    "lfm2": Layout(A.LFM2, permute_qk=False, fixed=_PRE | {"qk_norm": "head"},
                   mixers=frozenset({"attention", "short_conv"}), renamed={"output_norm": "token_embd_norm"}),
    "qwen3_5": Layout(A.QWEN35, permute_qk=False, fixed=_QWEN3_5, mixers=_GATED_DELTA, renamed=_QWEN3_5_NAMES,
                      recurrent_layers_key=True, rope_sections=True, tiled_value_heads=True),
    "qwen3_5_moe": Layout(A.QWEN35MOE, permute_qk=False, fixed=_QWEN3_5, experts=_QWEN3_5_EXPERTS, mixers=_GATED_DELTA,
                          renamed=_QWEN3_5_NAMES, recurrent_layers_key=True, rope_sections=True,
                          tiled_value_heads=True),
    "qwen3_next": Layout(A.QWEN3NEXT, permute_qk=False, fixed=_QWEN3_5, experts=_QWEN3_5_EXPERTS, mixers=_GATED_DELTA,
                         renamed=_QWEN3_5_NAMES, recurrent_layers_key=True, fused_gated_delta=True),
    # Granite 4.0-H: the shared MLP is granitehybrid's ffn_*_shexp beside the experts (its ffn_* without them); rope
    # on every attention layer or on none (rope.scaling.finetuned, which Granite uses as the switch)
    "granite_hybrid": Layout(A.GRANITE_HYBRID, permute_qk=True,
                             fixed={k: v for k, v in _PRE.items() if k != "fused_gate_up"},
                             keyed=_GRANITE_KEYED | {"nope_layers"},
                             experts=LlamaCppExperts(normalize_topk=True, expert_length_key=False, dense_beside=True,
                                                     dense_without_experts=True),
                             mixers=frozenset({"attention", "mamba2"}), split_gate_up=True),
    # gpt-oss: attention sinks, the post-attention norm under its own name, the sliding layers on the main (YaRN)
    # rope, experts with biases and the clamped SwiGLU at gpt-oss's constants
    "gpt_oss": Layout(A.GPT_OSS, permute_qk=False, fixed=_PRE | {"attention_sinks": True},
                      keyed=frozenset({"sliding_window"}),
                      experts=LlamaCppExperts(normalize_topk=True, expert_length_key=True, biases=True,
                                              clamped_swiglu=(1.702, 7.0)),
                      renamed={"ffn_norm": "post_attention_norm"}, swa_rope_is_main=True),
}
# Traits of layers apart (ModelSpec.traits' names) → the Layout.keyed entry of a graph that reads them
LAYER_TRAITS = {"per_layer_head_dim": "per_layer_sizes", "per_layer_kv_heads": "per_layer_sizes",
                "per_layer_mlp_width": "per_layer_sizes", "k_eq_v": "k_eq_v", "kv_shared_layers": "kv_shared_layers"}
# Roles whose rows are the k/v heads' (a bias or a norm over the projection too): repeated for kv_heads_as_q
KV_ROLES = ("attn_k", "attn_v", "attn_k_norm")
# Roles whose GGUF tensor has another base name: llama.cpp's phi3 keeps gate and up fused in ffn_up
GGUF_ROLES = {"ffn_gate_up": "ffn_up"}
# Roles llama.cpp keeps as several tensors, split in equal parts along the rows (axis -2): transformers'
# stack of each expert's gate rows then up rows
SPLIT_ROLES = {"ffn_gate_up_exps": ("ffn_gate_exps", "ffn_up_exps")}
# Roles llama.cpp loads as the ".scale" of another tensor: gemma4's router scale per input and scale per expert
SCALE_ROLES = {"ffn_gate_inp_scale": "ffn_gate_inp", "ffn_exps_scale": "ffn_down_exps"}
# Depthwise convolutions, held as torch's Conv1d [channels, 1, kernel]: llama.cpp's ssm_conv takes [channels, kernel]
CONV_ROLES = ("shortconv.conv", "ssm_conv1d")
# The suffix llama.cpp loads a GGUF base name under where it is not the checkpoint's kind ("": none)
GGUF_SUFFIXES = {"ssm_dt": "bias", "ssm_a": "", "ssm_d": ""}
# The gated delta rule's tensors indexed by value head, and the axis that is: reordered where heads are tiled
VALUE_HEAD_AXES = {"delta_qkv": 0, "delta_gate": 0, "ssm_beta": 0, "ssm_alpha": 0, "ssm_a": 0, "ssm_dt": 0,
                   "ssm_conv1d": 0, "ssm_out": 1}
# llama.cpp's LLM_KV_ATTENTION_RECURRENT_LAYERS (gguf-py's Keys.Attention.RECURRENT_LAYERS from 0.18 on)
RECURRENT_LAYERS_KEY = "{arch}.attention.recurrent_layers"
# Rope scalings llama.cpp can express, per kind (others are refused)
SCALINGS = ("linear", "yarn", "llama3", "longrope")


class GGUFArch:
    """One checkpoint's spec against one llama.cpp architecture: checks, keys, weight folds, extra tensors."""

    def __init__(self, spec: ModelSpec, where: Any):
        if spec.family not in LAYOUTS:
            raise CheckpointError(f"no GGUF layout for the {spec.family} family", where)
        self.spec, self.where, self.layout = spec, where, LAYOUTS[spec.family]
        self._check()
        # k/v heads as written: one per q head where the graph needs it (each source head repeated this often)
        self.head_count_kv = spec.num_heads if self.layout.kv_heads_as_q else spec.num_kv_heads
        self.kv_repeat = self.head_count_kv // spec.num_kv_heads
        # the shapes llama.cpp loads a mixer's tensors in, by role, where not the checkpoint's (set by _check_mixers)
        self.reshaped: dict[str, tuple[int, ...]] = {}
        # each layer's k/v heads as the file says them: 0 marks a layer of a mixer with a state of its own
        self.layer_head_count_kv = self._check_mixers()
        # the dense MLP written as the graph's shared expert, beside the experts (gemma4 keeps it as its ffn_*)
        self.dense_as_shared = spec.experts is not None and spec.experts.beside_dense and not spec.experts.branch_norms
        # a tied head the graph cannot take from token_embd: the embedding is written twice
        self.head_from_embedding = spec.tie_word_embeddings and self.layout.output_required
        # q·k × spec's scale where llama.cpp multiplies by its own: the ratio goes into q (or q's norm)
        keyed_scale = "attention_scale" in self.layout.keyed
        self.q_scale = 1.0 if keyed_scale else spec.attention_multiplier / self.llama_cpp_attention_scale()

    @property
    def arch(self) -> gguf.MODEL_ARCH:
        return self.layout.arch

    def refuse(self, trait: str, why: str) -> CheckpointError:
        return CheckpointError(f"GGUF ({gguf.MODEL_ARCH_NAMES[self.arch]}) cannot honour the trait {trait}: {why}",
                               self.where)

    # ---- checks ----------------------------------------------------------------------------------------
    def _check(self) -> None:
        spec, layout = self.spec, self.layout
        if any(layer.rope is not None and yarn_truncation(layer.rope.scaling) is False for layer in spec.layers):
            # no key says it, and ggml's rope takes no per-dimension factors in these graphs: the closest file
            warnings.warn(f"{self.where}: yarn_untruncated: llama.cpp rounds YaRN's correction range out to whole "
                          "dimensions (transformers' truncate: true), the source does not (truncate: false); the "
                          "dimensions in between rotate at slightly other frequencies (the report's KLD says what "
                          "it costs)", stacklevel=4)
        for trait, value in layout.fixed.items():
            if getattr(spec, trait) != value and trait not in layout.keyed:
                raise self.refuse(trait, f"llama.cpp computes {value!r}, the source {getattr(spec, trait)!r}")
        if layout.arch in (A.GEMMA2, A.GEMMA3, A.GEMMA4):
            if not math.isclose(spec.embedding_scale, math.sqrt(spec.hidden_size), rel_tol=1e-6):
                raise self.refuse("embedding_scale", "llama.cpp multiplies Gemma embeddings by √hidden")
        else:
            for trait in ("embedding_scale", "residual_scale", "logits_scale"):
                if getattr(spec, trait) != 1.0 and trait not in layout.keyed:
                    raise self.refuse(trait, "this architecture has no such multiplier")
        for trait, key in LAYER_TRAITS.items():
            if trait in spec.traits() and key not in layout.keyed:
                raise self.refuse(trait, f"llama.cpp's {gguf.MODEL_ARCH_NAMES[self.arch]} sizes and feeds every "
                                         f"layer alike; the source's layers differ ({spec.traits()[trait]})")
        for layer in spec.layers:
            rope = layer.rope
            if rope is None:
                continue
            if rope.kind == "proportional" and "proportional_rope" in layout.keyed:
                continue
            if rope.kind not in SCALINGS and rope.kind != "default":
                raise self.refuse("rope_scaling", f"llama.cpp has no {rope.kind!r} rope scaling")
            if rope.kind == "longrope" and "longrope" not in layout.keyed:
                raise self.refuse("rope_scaling", "LongRoPE factors are read by llama.cpp's phi3 only")
            if layout.permute_qk and rope.dim != spec.head_dim:
                raise self.refuse("partial_rotary", "partial rotary with adjacent-pair rope")
        if spec.position_attention_scale is not None and "position_attention_scale" not in layout.keyed:
            raise self.refuse("position_attention_scale", "this graph scales no query by its position")
        self._check_layers()
        self._check_experts()
        if "per_layer_sizes" in layout.keyed:
            self._check_layer_sizes()

    def _check_layer_sizes(self) -> None:
        """llama.cpp's gemma4: one head size per attention kind, and a kv-shared layer reads the last sliding layer
        before the shared ones (a sliding layer) or the very last (a global one)."""
        spec = self.spec
        for kind, slides in (("global", False), ("sliding", True)):
            sizes = {spec.layer_head_dim(i) for i, layer in enumerate(spec.layers)
                     if (layer.window is not None) == slides}
            if len(sizes) > 1:
                raise self.refuse("per_layer_head_dim", f"llama.cpp has one head size per attention kind; the "
                                                        f"source's {kind} layers have {sorted(sizes)}")
        shared = [i for i, layer in enumerate(spec.layers) if layer.kv_source is not None]
        first = spec.num_layers - len(shared)
        if shared != list(range(first, spec.num_layers)):
            raise self.refuse("kv_shared_layers", f"llama.cpp shares the keys of the last layers only; the source's "
                                                  f"kv-shared layers are {shared}")
        for i in shared:
            reused = first - (2 if spec.layers[i].window is not None else 1)
            if spec.layers[i].kv_source != reused:
                raise self.refuse("kv_shared_layers", f"llama.cpp's layer {i} reads layer {reused}'s keys; the "
                                                      f"source's reads layer {spec.layers[i].kv_source}'s")

    def _check_experts(self) -> None:
        experts, supported = self.spec.experts, self.layout.experts
        if experts is None:
            if supported is not None and not supported.dense_without_experts:
                raise self.refuse("experts", "llama.cpp runs a mixture of experts in every layer; the source has "
                                             "none")
            return
        if supported is None:
            raise self.refuse("experts", "this architecture has no mixture of experts in llama.cpp")
        if experts.normalize_topk != supported.normalize_topk:
            done = "always renormalises" if supported.normalize_topk else "never renormalises"
            raise self.refuse("normalize_topk", f"llama.cpp {done} the chosen experts' weights; the source "
                                                f"{'does' if experts.normalize_topk else 'does not'} "
                                                "(norm_topk_prob)")
        if bool(experts.shared_intermediate_size) != supported.shared_expert:
            has = "runs a shared expert in every layer" if supported.shared_expert else "has no shared expert"
            raise self.refuse("shared_expert", f"llama.cpp {has}; the source "
                                               f"{'has one' if experts.shared_intermediate_size else 'has none'}")
        if experts.beside_dense != supported.dense_beside:
            runs = "adds the dense MLP to the experts" if supported.dense_beside else "replaces the dense MLP by them"
            raise self.refuse("beside_dense", f"llama.cpp {runs}; the source "
                                              f"{'keeps' if experts.beside_dense else 'does not keep'} it beside them")
        if experts.biases != supported.biases:
            raise self.refuse("expert_biases", f"llama.cpp's graph {'adds' if supported.biases else 'has no'} biases "
                                               f"on the router and experts; the source "
                                               f"{'has them' if experts.biases else 'has none'}")
        if experts.clamped_swiglu != supported.clamped_swiglu:
            raise self.refuse("clamped_swiglu", f"llama.cpp's experts compute "
                                                f"{_expert_activation(supported.clamped_swiglu)}; the source's "
                                                f"{_expert_activation(experts.clamped_swiglu)}")
        for trait, graph in (("router_norm", "routes the MLP's normed input by ffn_gate_inp alone"),
                             ("expert_scales", "weighs the chosen experts by the router's probabilities alone"),
                             ("branch_norms", "adds the dense MLP and the experts without norms of their own")):
            if getattr(experts, trait) and not getattr(supported, trait):
                raise self.refuse(trait, f"llama.cpp's graph {graph}")
            if getattr(supported, trait) and not getattr(experts, trait):
                raise self.refuse(trait, "llama.cpp's graph runs it in every expert block; the source has none")
        if dense := self.spec.traits().get("dense_layers"):
            raise self.refuse("dense_layers", f"llama.cpp runs the experts in every layer; the source's layers "
                                              f"{dense} have a dense MLP")

    def _check_mixers(self) -> list[int]:
        """Refuse a mixer the graph does not run (or runs otherwise); each layer's head_count_kv, which is how
        llama.cpp's hybrid graphs tell their layers apart (0: recurrent)."""
        spec, layout = self.spec, self.layout
        for mixer in MIXERS:
            if (layers := spec.mixer_layers(mixer)) and mixer not in layout.mixers:
                raise self.refuse(mixer, f"llama.cpp's graph has no {mixer} layers; the source's layers {layers}")
        if spec.mixer_layers("short_conv"):
            if spec.short_conv.bias:
                raise self.refuse("short_conv", "llama.cpp's gated short convolution has no biases (conv_bias)")
            if spec.short_conv.kernel < 2:
                raise self.refuse("short_conv", f"llama.cpp needs a kernel of at least 2 taps; the source's has "
                                                f"{spec.short_conv.kernel}")
        if spec.mixer_layers("gated_delta"):
            self._check_gated_delta()
        if spec.mixer_layers("mamba2"):
            self._check_mamba2()
            mamba = spec.mamba2
            self.reshaped = {"ssm_a": (mamba.heads, 1), "ssm_d": (mamba.heads, 1),
                             "ssm_norm": (mamba.groups, mamba.inner_size // mamba.groups)}
        if layout.recurrent_layers_key:  # the recurrent layers have a key of their own
            return [self.head_count_kv] * spec.num_layers
        return [self.head_count_kv if layer.mixer == "attention" else 0 for layer in spec.layers]

    def _check_gated_delta(self) -> None:
        delta, layout = self.spec.gated_delta, self.layout
        if delta.key_head_dim != delta.value_head_dim:
            raise self.refuse("gated_delta", f"llama.cpp sizes the value heads as the key heads (ssm.state_size); "
                                             f"the source's are {delta.value_head_dim} and {delta.key_head_dim} wide")
        if delta.value_heads % delta.key_heads:
            raise self.refuse("gated_delta", f"llama.cpp repeats each key head to a whole number of value heads; the "
                                             f"source has {delta.key_heads} key and {delta.value_heads} value heads")
        if delta.conv_kernel < 2:
            raise self.refuse("gated_delta", f"llama.cpp needs a kernel of at least 2 taps; the source's has "
                                             f"{delta.conv_kernel}")
        if delta.fused != layout.fused_gated_delta:
            loads = "fused (in_proj_qkvz, in_proj_ba)" if layout.fused_gated_delta else "apart"
            raise self.refuse("gated_delta", f"this graph loads the projections {loads}; the source's are "
                                             f"{'fused' if delta.fused else 'apart'}")

    def _check_mamba2(self) -> None:
        mamba, hidden = self.spec.mamba2, self.spec.hidden_size
        if mamba.inner_size != 2 * hidden:
            raise self.refuse("mamba2", f"llama.cpp runs an inner size of 2 × hidden only ({2 * hidden}); the source's "
                                        f"is {mamba.heads} heads × {mamba.head_dim} = {mamba.inner_size}")
        if not mamba.conv_bias:
            raise self.refuse("mamba2", "llama.cpp's Mamba2 layer always adds a conv bias; the source has none "
                                        "(mamba_conv_bias)")
        if mamba.proj_bias:
            raise self.refuse("mamba2", "llama.cpp loads no in_proj / out_proj biases (mamba_proj_bias)")
        if tuple(mamba.time_step_limit) != (0.0, math.inf):
            raise self.refuse("mamba2", f"llama.cpp never clamps the time step; the source clamps it to "
                                        f"{tuple(mamba.time_step_limit)} (time_step_limit)")
        if mamba.conv_kernel < 2:
            raise self.refuse("mamba2", f"llama.cpp needs a kernel of at least 2 taps; the source's has "
                                        f"{mamba.conv_kernel}")

    def _check_layers(self) -> None:
        spec, layout = self.spec, self.layout
        nope = spec.traits().get("nope_layers", [])  # attention layers without rope (other mixers have none)
        llama_cpp_nope = [i for i in range(spec.num_layers) if (i + 1) % 4 == 0] if (
            "nope_every_4th" in layout.keyed) else []
        if "nope_layers" in layout.keyed:  # rope on every attention layer or on none
            attention = spec.mixer_layers("attention")
            if nope and nope != attention:
                raise self.refuse("nope_layers", f"llama.cpp's rope is on every attention layer or on none; the "
                                                 f"source's NoPE layers are {nope} of {attention}")
            llama_cpp_nope = nope
        if nope != llama_cpp_nope:
            raise self.refuse("nope_layers", f"llama.cpp's NoPE layers are fixed ({llama_cpp_nope}); the source's "
                                             f"are {nope}")
        full = {repr(layer.rope) for layer in spec.layers if layer.window is None and layer.rope is not None}
        sliding = {repr(layer.rope) for layer in spec.layers if layer.window is not None and layer.rope is not None}
        if len(full) > 1 or len(sliding) > 1:
            raise self.refuse("per_layer_rope", "more than one rope per attention kind")
        windows = {layer.window for layer in spec.layers} - {None}
        if not windows:
            return
        if len(windows) > 1:
            raise self.refuse("sliding_window", f"llama.cpp has one window size; the source has {sorted(windows)}")
        if "sliding_window" not in layout.keyed:
            if sliding != full and sliding:
                raise self.refuse("per_layer_rope", "a rope of the sliding layers apart")
            if spec.sliding_window >= spec.max_position_embeddings:
                return  # a window as long as the context is full attention
            warnings.warn(f"{self.where}: llama.cpp runs full attention; its output differs from the source "
                          f"beyond the {spec.sliding_window}-token sliding window", stacklevel=3)
            return
        swa_rope = next(layer.rope for layer in spec.layers if layer.window is not None)
        if layout.swa_rope_is_main:
            if swa_rope != spec.rope:
                raise self.refuse("per_layer_rope", "llama.cpp's sliding layers rotate with the main rope")
            return
        dims_apart = "per_layer_sizes" in layout.keyed  # rope.dimension_count_swa
        if swa_rope is not None and (swa_rope.scaling is not None or (
                swa_rope.dim != (self.spec.rope or swa_rope).dim and not dims_apart)):
            raise self.refuse("per_layer_rope", "llama.cpp's sliding layers take no rope scaling of their own")
        if swa_rope is not None and not layout.swa_theta_keyed and spec.rope is not None and (
                swa_rope.theta != spec.rope.theta):
            raise self.refuse("per_layer_rope", f"llama.cpp's sliding layers rotate with the main θ "
                                                f"({spec.rope.theta:g}); the source's with {swa_rope.theta:g}")

    # ---- what llama.cpp computes -----------------------------------------------------------------------
    def llama_cpp_attention_scale(self) -> float:
        """The q·k multiplier llama.cpp's graph uses for this arch (Gemma: gemma_pytorch's rule by size)."""
        spec = self.spec
        if self.layout.attention_scale is not None:
            return self.layout.attention_scale
        big_gemma = {A.GEMMA2: 46, A.GEMMA3: 62}.get(self.arch) == spec.num_layers
        if big_gemma:  # llama.cpp's 27B rule: n_embd / n_head, not head_dim
            return (spec.hidden_size // spec.num_heads) ** -0.5
        return spec.head_dim**-0.5

    # ---- keys -------------------------------------------------------------------------------------------
    def add_hyperparameters(self, writer: gguf.GGUFWriter) -> None:
        spec = self.spec
        rope = spec.rope
        writer.add_vocab_size(spec.vocab_size)
        writer.add_context_length(spec.max_position_embeddings)
        writer.add_embedding_length(spec.hidden_size)
        experts, supported = spec.experts, self.layout.experts
        sized_by_dense_key = experts is not None and supported is not None and not supported.expert_length_key
        writer.add_block_count(spec.num_layers)
        writer.add_head_count(spec.num_heads)
        if "per_layer_sizes" in self.layout.keyed:
            self._add_layer_sizes(writer)
        else:
            writer.add_feed_forward_length(experts.intermediate_size if sized_by_dense_key else spec.intermediate_size)
            if len(set(self.layer_head_count_kv)) > 1:  # a hybrid: the per-layer list is its pattern of mixers
                writer.add_head_count_kv(self.layer_head_count_kv)
            else:
                writer.add_head_count_kv(self.head_count_kv)
            writer.add_key_length(spec.head_dim)
            writer.add_value_length(spec.head_dim)
            writer.add_rope_dimension_count(rope.dim if rope else spec.head_dim)
        writer.add_rope_freq_base(spec.rope_theta)
        writer.add_layer_norm_rms_eps(spec.rms_norm_eps)
        self._add_rope_scaling(writer)
        if spec.mixer_layers("short_conv"):
            writer.add_shortconv_l_cache(spec.short_conv.kernel)
        if spec.mixer_layers("gated_delta"):
            self._add_gated_delta(writer)
        if spec.mixer_layers("mamba2"):
            mamba = spec.mamba2
            writer.add_ssm_conv_kernel(mamba.conv_kernel)
            writer.add_ssm_inner_size(mamba.inner_size)
            writer.add_ssm_state_size(mamba.state_size)
            writer.add_ssm_group_count(mamba.groups)
            writer.add_ssm_time_step_rank(mamba.heads)
        if self.layout.rope_sections:
            writer.add_rope_dimension_sections(rope_sections((rope.dim if rope else spec.head_dim) // 2))
        if experts is not None:
            writer.add_expert_count(experts.count)
            writer.add_expert_used_count(experts.used)
            if not sized_by_dense_key:
                writer.add_expert_feed_forward_length(experts.intermediate_size)
            if experts.shared_intermediate_size:
                writer.add_expert_shared_feed_forward_length(experts.shared_intermediate_size)
            if self.dense_as_shared:
                writer.add_expert_shared_feed_forward_length(spec.intermediate_size)
        keyed = self.layout.keyed
        if "embedding_scale" in keyed:
            writer.add_embedding_scale(spec.embedding_scale)
        if "residual_scale" in keyed:
            writer.add_residual_scale(spec.residual_scale)
        if "attention_scale" in keyed:
            writer.add_attention_scale(spec.attention_multiplier)
        if "logits_scale" in keyed:
            writer.add_logit_scale(1.0 / spec.logits_scale)  # llama.cpp divides by it, as Granite's config
        if "nope_layers" in keyed:  # granitehybrid's switch for rope in its attention layers (True by default)
            writer.add_rope_scaling_finetuned("nope_layers" not in spec.traits())
        if "attn_softcap" in keyed and spec.attn_softcap:
            writer.add_attn_logit_softcapping(spec.attn_softcap)
        if "final_softcap" in keyed and spec.final_softcap:
            writer.add_final_logit_softcapping(spec.final_softcap)
        if "position_attention_scale" in keyed and spec.position_attention_scale:
            beta, positions = spec.position_attention_scale
            writer.add_attn_temperature_scale(beta)
            if (spec.rope_scaling or {}).get("rope_type") != "yarn":  # the floor's divisor, which yarn writes
                writer.add_rope_scaling_orig_ctx_len(positions)
        if "sliding_window" in keyed and spec.sliding_window:
            writer.add_sliding_window(spec.sliding_window)
            # the per-layer pattern as a list: llama.cpp's default patterns (2 for Gemma 2, 6 for Gemma 3)
            # are what the source says only for the published layer counts
            writer.add_sliding_window_pattern([layer.window is not None for layer in spec.layers])
            swa_rope = next((layer.rope for layer in spec.layers if layer.window is not None), None)
            if swa_rope is not None:
                writer.add_rope_freq_base_swa(swa_rope.theta)

    def _add_layer_sizes(self, writer: gguf.GGUFWriter) -> None:
        """gemma4's sizes: head size and rope dimensions per attention kind, k/v heads and MLP width per layer, the
        kv-shared layers' count and the per-layer inputs' width."""
        spec = self.spec
        full = [i for i, layer in enumerate(spec.layers) if layer.window is None]
        sliding = [i for i, layer in enumerate(spec.layers) if layer.window is not None]
        full_dim = spec.layer_head_dim(full[0]) if full else spec.head_dim
        swa_dim = spec.layer_head_dim(sliding[0]) if sliding else spec.head_dim
        widths = [spec.layer_intermediate_size(i) for i in range(spec.num_layers)]
        writer.add_feed_forward_length(widths if len(set(widths)) > 1 else widths[0])
        kv_heads = [spec.layer_kv_heads(i) for i in range(spec.num_layers)]
        writer.add_head_count_kv(kv_heads if len(set(kv_heads)) > 1 else kv_heads[0])
        writer.add_key_length(full_dim)
        writer.add_value_length(full_dim)
        writer.add_key_length_swa(swa_dim)
        writer.add_value_length_swa(swa_dim)
        full_rope = spec.layers[full[0]].rope if full else None
        swa_rope = spec.layers[sliding[0]].rope if sliding else None
        writer.add_rope_dimension_count(full_rope.dim if full_rope else full_dim)
        writer.add_rope_dimension_count_swa(swa_rope.dim if swa_rope else swa_dim)
        writer.add_shared_kv_layers(sum(layer.kv_source is not None for layer in spec.layers))
        writer.add_embedding_length_per_layer_input(spec.per_layer_input)

    def _add_gated_delta(self, writer: gguf.GGUFWriter) -> None:
        spec, delta = self.spec, self.spec.gated_delta
        writer.add_ssm_conv_kernel(delta.conv_kernel)
        writer.add_ssm_state_size(delta.key_head_dim)
        writer.add_ssm_group_count(delta.key_heads)
        writer.add_ssm_time_step_rank(delta.value_heads)
        writer.add_ssm_inner_size(delta.value_size)
        recurrent = [layer.mixer == "gated_delta" for layer in spec.layers]
        writer.add_array(RECURRENT_LAYERS_KEY.format(arch=writer.arch), recurrent)
        # the interval alone is what a llama.cpp without the per-layer key reads: written where it says the same
        attention = [i for i, is_recurrent in enumerate(recurrent) if not is_recurrent]
        if attention and all((i + 1) % (attention[0] + 1) == 0 for i in attention) and (
                len(attention) == spec.num_layers // (attention[0] + 1)):
            writer.add_full_attention_interval(attention[0] + 1)

    def _add_rope_scaling(self, writer: gguf.GGUFWriter) -> None:
        scaling = self.spec.rope_scaling or {}
        kind = scaling.get("rope_type")
        if kind == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(scaling["factor"])
        elif kind == "yarn":
            writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            writer.add_rope_scaling_factor(scaling["factor"])
            # transformers' default where the file leaves it out: the model's own context
            original = scaling.get("original_max_position_embeddings") or self.spec.max_position_embeddings
            writer.add_rope_scaling_orig_ctx_len(original)
            optional = {"attention_factor": writer.add_rope_scaling_yarn_attn_factor,
                        "beta_fast": writer.add_rope_scaling_yarn_beta_fast,
                        "beta_slow": writer.add_rope_scaling_yarn_beta_slow}
            for key, add in optional.items():
                if scaling.get(key) is not None:
                    add(scaling[key])
            # llama.cpp scales yarn's cos/sin by 1 + 0.1·ln(factor), then by rope.scaling.attn_factor: transformers'
            # factor over its own goes there (Ministral 3's mscale = mscale_all_dim makes transformers' 1)
            if (correction := yarn_attention_factor(scaling) / yarn_mscale(scaling["factor"])) != 1.0:
                writer.add_float32(gguf.Keys.Rope.SCALING_ATTN_FACTOR.format(arch=writer.arch), correction)
        elif kind == "longrope":
            original = scaling["original_max_position_embeddings"]
            writer.add_rope_scaling_orig_ctx_len(original)
            writer.add_rope_scaling_attn_factors(longrope_attention_factor(scaling))

    # ---- tensors -----------------------------------------------------------------------------------------
    def gguf_roles(self, role: str) -> tuple[str, ...]:
        """The GGUF base names a checkpoint role is written as: one, or the parts `split` cuts it into (a tied
        embedding also as the head, where the graph requires one)."""
        if role == "token_embd" and self.head_from_embedding:
            return ("token_embd", "output")
        if role == "delta_qkvz":  # the rows of q, k and v, then those of z
            return ("attn_qkv", "attn_gate")
        if role in SCALE_ROLES:
            return (SCALE_ROLES[role],)
        if self._splits_gate_up(role):
            bases = ("ffn_gate", "ffn_up")
        elif self._splits_experts(role):
            bases = SPLIT_ROLES[role]
        else:
            bases = ((self.layout.renamed | GGUF_ROLES).get(role, role),)
        if self.dense_as_shared and role in MLP_ROLES:
            return tuple(f"{base}_shexp" for base in bases)
        return bases

    def _splits_gate_up(self, role: str) -> bool:
        return self.layout.split_gate_up and role == "ffn_gate_up"

    def _splits_experts(self, role: str) -> bool:
        return role in SPLIT_ROLES and not (self.layout.experts is not None and self.layout.experts.fused_gate_up)

    @staticmethod
    def suffix(base: str, kind: str, role: str) -> str:
        """What llama.cpp appends to a GGUF base name for a tensor of this kind and role ("" for none: blk.N.ssm_a;
        "scale" for a scale it loads beside another tensor: blk.N.ffn_gate_inp.scale)."""
        return "scale" if role in SCALE_ROLES else GGUF_SUFFIXES.get(base, kind)

    def shapes(self, role: str, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        """The shapes of the tensors `gguf_roles` names for a checkpoint tensor of this role and shape."""
        if self.kv_repeat > 1 and role in KV_ROLES:
            return [(shape[0] * self.kv_repeat, *shape[1:])]
        if role in CONV_ROLES and len(shape) == 3:  # the kernel (not its bias)
            return [(shape[0], shape[-1])]
        if role in self.reshaped:
            return [self.reshaped[role]]
        if role == "delta_qkvz":
            channels = self.spec.gated_delta.conv_channels
            return [(channels, *shape[1:]), (shape[0] - channels, *shape[1:])]
        parts = len(self.gguf_roles(role))
        if self._splits_experts(role):  # rows are axis 1 of the stack and of its bias [experts, rows]
            return [(shape[0], shape[1] // parts, *shape[2:])] * parts
        if self._splits_gate_up(role):
            return [(*shape[:-2], shape[-2] // parts, shape[-1])] * parts
        return [shape] * parts

    def split(self, role: str, array: np.ndarray) -> list[np.ndarray]:
        """A tensor in llama.cpp's layout as the parts `gguf_roles` names (views, no copy)."""
        if self._splits_experts(role):
            return np.split(array, len(self.gguf_roles(role)), axis=1)
        if self._splits_gate_up(role):
            return np.split(array, len(self.gguf_roles(role)), axis=-2)
        if role == "delta_qkvz":  # rows already ungrouped by to_llama_cpp
            return np.split(array, [self.spec.gated_delta.conv_channels], axis=0)
        return [array] * len(self.gguf_roles(role))

    def extra_tensors(self) -> dict[str, np.ndarray]:
        """Tensors llama.cpp reads that the checkpoint does not hold (rope factors), by GGUF base name."""
        spec = self.spec
        scaling = spec.rope_scaling or {}
        if scaling.get("rope_type") == "proportional":  # the main rope's pairs past the turning ones stand still
            pairs = spec.rope.dim // 2
            turning = int(scaling["partial_rotary_factor"] * spec.rope.dim // 2)
            return {"rope_freqs": np.array([1.0] * turning + [1e30] * (pairs - turning), dtype=np.float32)}
        if scaling.get("rope_type") == "llama3":
            return {"rope_freqs": llama3_rope_factors(spec)}
        if scaling.get("rope_type") == "longrope":
            return {"rope_factors_long": np.asarray(scaling["long_factor"], dtype=np.float32),
                    "rope_factors_short": np.asarray(scaling["short_factor"], dtype=np.float32)}
        return {}

    def to_llama_cpp(self, role: str, kind: str, array: np.ndarray) -> np.ndarray:
        """A checkpoint tensor as llama.cpp's graph wants it: convolution kernels as [channels, kernel], norms with
        their offset folded in, the attention
        scale correction folded in, k/v heads repeated where the graph wants one per q head, q/k rows in
        llama.cpp's rope order."""
        spec = self.spec
        array = np.ascontiguousarray(array, dtype=np.float32)
        if self.kv_repeat > 1 and role in KV_ROLES:
            heads = array.reshape(spec.num_kv_heads, -1, *array.shape[1:])  # GQA's q head h reads kv head h // n
            [shape] = self.shapes(role, array.shape)
            array = np.repeat(heads, self.kv_repeat, axis=0).reshape(shape)
        if role in CONV_ROLES or role in self.reshaped:
            [shape] = self.shapes(role, array.shape)
            array = array.reshape(shape)
        if role.endswith("_norm") and spec.norm_offset_of(role):
            array = array + np.float32(spec.norm_offset_of(role))
        if role == "ssm_a":  # llama.cpp multiplies by A itself
            array = -np.exp(array)
        if role == "delta_qkvz":
            array = ungroup_qkvz(array, spec.gated_delta)
        if self.layout.tiled_value_heads and role in VALUE_HEAD_AXES:
            array = self.tile_value_heads(role, array)
        if self.q_scale != 1.0 and role == ("attn_q_norm" if spec.qk_norm else "attn_q"):
            array = array * np.float32(self.q_scale)
        if self.layout.permute_qk and role == "attn_q":
            return rope_pairs_adjacent(array, spec.num_heads)
        if self.layout.permute_qk and role == "attn_k":
            return rope_pairs_adjacent(array, self.head_count_kv)
        return array

    def tile_value_heads(self, role: str, array: np.ndarray) -> np.ndarray:
        """A gated delta rule tensor with its value heads in the order llama.cpp's tiled repeat of the key heads
        pairs them with: transformers' (k0: v0 v1, k1: v2 v3) becomes (v0 v2 v1 v3). Where the key heads are as
        many as the value heads, it is the tensor itself."""
        delta = self.spec.gated_delta
        per_key = delta.value_heads // delta.key_heads
        if per_key == 1:
            return array
        axis = VALUE_HEAD_AXES[role]
        if role in ("delta_qkv", "ssm_conv1d"):  # q and k channels first, as they are
            qk, v = np.split(array, [2 * delta.key_size], axis=axis)
            return np.concatenate([qk, self.tile_value_heads("delta_gate", v)], axis=axis)
        moved = np.moveaxis(array, axis, 0)
        heads = moved.reshape(delta.key_heads, per_key, -1, *moved.shape[1:])
        return np.ascontiguousarray(np.moveaxis(heads.swapaxes(0, 1).reshape(moved.shape), 0, axis))

    def importance_columns(self, role: str, values: np.ndarray) -> np.ndarray:
        """An importance matrix row (one value per input column) in the order the GGUF tensor takes its columns."""
        if self.layout.tiled_value_heads and VALUE_HEAD_AXES.get(role) == 1:
            return self.tile_value_heads(role, values[None])[0]
        return values


def _expert_activation(clamped_swiglu: tuple[float, float] | None) -> str:
    if clamped_swiglu is None:
        return "SiLU(gate)·up"
    alpha, limit = clamped_swiglu
    return f"the clamped SwiGLU with alpha {alpha:g}, limit {limit:g}"


def ungroup_qkvz(rows: np.ndarray, delta: GatedDelta) -> np.ndarray:
    """Qwen3-Next's in_proj_qkvz rows, grouped per key head (its q, its k, its value heads' v, their z), as all q, all
    k, all v, then all z: llama.cpp's attn_qkv over attn_gate (what its converter writes)."""
    per_key = delta.value_heads // delta.key_heads * delta.value_head_dim
    grouped = rows.reshape(delta.key_heads, -1, *rows.shape[1:])
    parts = np.split(grouped, np.cumsum([delta.key_head_dim, delta.key_head_dim, per_key]), axis=1)
    return np.concatenate([part.reshape(-1, *rows.shape[1:]) for part in parts], axis=0)


def rope_sections(pairs: int) -> list[int]:
    """The rotary pairs split over the t, h and w sections of a multimodal rope as evenly as can be, the first the
    largest (transformers' Qwen3.5: 32 pairs as [11, 11, 10]), and none for llama.cpp's fourth section. Each of a
    text token's pairs then falls in a section at its one position: the plain rope."""
    t = -(-pairs // 3)
    h = -(-(pairs - t) // 2)
    return [t, h, pairs - t - h, 0]


def rope_pairs_adjacent(rows: np.ndarray, heads: int) -> np.ndarray:
    """Reorder each head's rows (0..d/2-1, d/2..d-1) → (0, d/2, 1, d/2+1, ...): llama.cpp's LlamaModel.permute."""
    shape = rows.shape
    return rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def rope_pairs_split(rows: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of `rope_pairs_adjacent`: llama.cpp's row order back to HF's."""
    shape = rows.shape
    return rows.reshape(heads, shape[0] // heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def longrope_attention_factor(scaling: dict[str, Any]) -> float:
    """cos/sin scale of LongRoPE: the file's attention_factor, else transformers' default from the factor."""
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor, original = float(scaling["factor"]), scaling["original_max_position_embeddings"]
    return math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1.0 else 1.0


def llama3_rope_factors(spec: ModelSpec) -> np.ndarray:
    """Llama 3.1's per-frequency rope divisors, which llama.cpp reads from a `rope_freqs` tensor."""
    scaling = spec.rope_scaling or {}
    factor, low, high = scaling["factor"], scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_context = scaling.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / spec.rope_theta ** (np.arange(0, spec.head_dim, 2, dtype=np.float64) / spec.head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = (old_context / wavelen - low) / (high - low)
    factors = np.where(wavelen < old_context / high, 1.0,
                       np.where(wavelen > old_context / low, factor, 1 / ((1 - smooth) / factor + smooth)))
    return factors.astype(np.float32)
