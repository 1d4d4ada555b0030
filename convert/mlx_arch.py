"""What mlx-lm's model file for each family computes, and the config.json keys that make it the source's function.

mlx-lm hard-codes part of each architecture (Gemma's 1 + w norms and √hidden embedding scale, Gemma 2's tied
head and soft-caps, Phi-3's head_dim = hidden / heads) and reads the rest from config.json, each model file in
its own way: rope θ only at the top level, `rope_scaling` in the old style, Gemma 3's sliding layers as a
period, SmolLM3's NoPE layers as `no_rope_layers`. For every trait the spec has, `MLXArch` either writes it
as the keys that model file reads (KEYS, named per family in LAYOUTS), or refuses naming the trait: never
a folder that mlx-lm opens and runs as another function. A window at least as long as the context is full
attention, and is written as such. A mixture of experts is written in the model file's own layout (`ExpertLayout`:
its module, its config keys, the routing and dense layers it can run).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from siliconvert.architectures import LLAMA_TRAITS, ModelSpec
from siliconvert.architectures.base import Layer, Mixer, Rope, yarn_attention_factor, yarn_mscale
from siliconvert.errors import CheckpointError
from siliconvert.recipe import MLXModelFile

# How a model file runs sliding windows: not at all; per layer from `layer_types` with one `sliding_window`
# (mlx-lm's llama); or every layer but each `sliding_window_pattern`-th (mlx-lm's gemma3_text)
Windows = Literal["none", "layer_types", "pattern"]
# How a model file builds attention biases: one `attention_bias` for q, k, v and o; q, k, v always; all four always;
# none
Biases = Literal["flag", "qkv", "all", "none"]
FLOAT32_MAX = 3.4028234663852886e38


@dataclass(frozen=True)
class ExpertLayout:
    """How a model file holds a mixture of experts: a sparse layer's `module` has the router `gate` (a Linear
    to one logit per expert) and `switch_mlp`, a SwitchGLU of stacked experts ([experts, out, in] per projection)."""

    module: str  # under each decoder layer: "mlp" (Qwen3-MoE), "block_sparse_moe" (Mixtral), "" (the layer: Gemma 4)
    count_key: str  # config.json's key for the number of experts
    size_key: str  # config.json's key for each expert's intermediate size
    normalize_key: str | None  # config.json's key for normalize_topk; None: the file does as `normalizes` says
    dense_layers: bool  # whether dense MLP layers may sit between sparse ones (as `mlp_only_layers`)
    normalizes: bool = True  # where no key is read: whether the file renormalises the chosen experts' weights
    # config.json's key for the size of the shared expert every sparse layer has (`shared_expert`, gated by
    # `shared_expert_gate`, as transformers names them); None: the file has none
    shared_key: str | None = None
    router: str = "gate"  # the router's module path under `module` (a Linear to one logit per expert)
    # config.json's key for the size of the dense MLP every sparse layer keeps beside its experts (the source's
    # `Experts.beside_dense`: mlx-lm's granitemoehybrid's shared_mlp, gate and up fused); None: the experts replace it
    beside_dense_key: str | None = None
    # Where the source has no experts, the module under each layer holding the dense MLP the file runs instead
    # (gate_proj, up_proj, down_proj: mlx-lm's granitemoehybrid with num_local_experts 0); None: it needs experts
    dense_module: str | None = None
    stacks: str = "switch_mlp"  # the SwitchGLU's name under `module` (mlx-lm's gpt_oss: "experts")
    biases: bool = False  # biases on the router and the experts' projections (the trait expert_biases)
    # the clamped SwiGLU its experts compute, (alpha, limit) hard-coded (gpt_oss's SwigluOAI); None: SwiGLU
    clamped_swiglu: tuple[float, float] | None = None
    used_key: str = "num_experts_per_tok"  # config.json's key for the experts per token
    # the router's own parameters beside its Linear (paths under `module`): a scale per input of the RMS-normed
    # residual it reads and a scale per expert (Gemma 4's router.scale and router.per_expert_scale: the traits
    # router_norm and expert_scales); None: a plain router
    router_scales: tuple[str, str] | None = None
    # the dense MLP and the experts each in norms of their own (the trait branch_norms: mlx-lm's gemma4_text)
    branch_norms: bool = False
    # the file runs without experts too, by its own switch (gemma4_text's enable_moe_block): a source without any
    # writes no expert keys
    optional: bool = False


@dataclass(frozen=True)
class Layout:
    """One mlx-lm model file, as siliconvert writes for it."""

    model_type: str  # mlx-lm's model file (config.json's model_type)
    keys: tuple[str, ...] = ()  # the KEYS this model file reads
    # Traits the model file computes whatever config.json says (trait → value, or a function of the spec)
    fixed: dict[str, Any] = field(default_factory=dict)
    windows: Windows = "none"
    biases: Biases = "flag"
    rope_kinds: tuple[str, ...] = ("default", "linear", "llama3", "yarn")  # scalings its rope reads as transformers
    # Whether mlx-lm's `sanitize` can take the tensors one at a time (gemma3_text's decides the tied head from
    # the whole set): where not, the writer drops a tied head itself
    sanitize_per_tensor: bool = True
    experts: ExpertLayout | None = None  # None: the model file has no mixture of experts
    # The sliding layers rotate with `rope_theta` and no scaling, whatever the full layers' rope (mlx-lm's olmo3);
    # False: as the layout's windows say (one rope for all, or Gemma 3's local θ)
    plain_sliding_rope: bool = False
    # The model file indexes a sliding and a full layer (mlx-lm's olmo3): a model without both cannot load
    needs_both_layer_kinds: bool = False
    # The mixers the model file runs, each with its name in the `layer_types` it reads (written only where there is
    # more than one); the file indexes a layer of each (mlx-lm's lfm2 finds its first attention and conv layers)
    mixers: dict[Mixer, str] = field(default_factory=lambda: {"attention": "full_attention"})
    # The model file multiplies by each norm's stored weight where the source's norms are offset (1 + w): its
    # sanitize folds the offset in only when it sees the whole set of tensors (mlx-lm's qwen3_5, qwen3_next), so
    # the writer folds it, norm by norm (`ModelSpec.norm_offset_of`)
    folds_norm_offset: bool = False
    # The file indexes a layer of each of its mixers (mlx-lm's lfm2); False: it runs any mix, one mixer alone too
    indexes_each_mixer: bool = True
    # The model file scales q by Llama 4's attention temperature (the trait position_attention_scale) and reads it,
    # with the whole rope, from rope_parameters (mlx-lm's ministral3): β 0 where the source has none
    temperature: bool = False
    # LongRoPE as transformers applies it: the short factors while a forward's last position is within the original
    # context, the long ones past it, the attention factor from the config; False: mlx-lm's SuScaledRoPE (the long
    # factors at every length, the attention factor from max / original positions)
    longrope_by_length: bool = False
    # YaRN as transformers computes it: its correction range truncated only where the config does not say
    # `truncate: false`, the attention factor from the config; False: mlx-lm's YarnRoPE (always truncated, the
    # attention factor from mscale and mscale_all_dim alone)
    yarn_by_config: bool = False
    # siliconvert's own model file for the family (in convert/mlx_models/), copied into the folder and named by
    # config.json's `model_file`, which mlx_lm.load(..., trust_remote_code=True) runs; None: mlx-lm's own
    model_file: str | None = None
    # The model file reads a rope per attention kind from rope_parameters keyed by layer type, and sizes its layers
    # apart from Gemma 4's keys (global_head_dim, kv-shared layers, ...: `_check_layers_apart`)
    layers_apart: bool = False


_GEMMA = {"norm_offset": 1.0, "norm_placement": "sandwich", "activation": "gelu_tanh",
          "embedding_scale": lambda spec: math.sqrt(spec.hidden_size)}
# mlx-lm's gemma4_text: norms of w itself, values normed, q·k unscaled, each layer's scalar; its layers apart from
# these keys (and rope_parameters per layer type, layers_apart)
_GEMMA4_KEYS = ("global_head_dim", "num_global_key_value_heads", "attention_k_eq_v", "num_kv_shared_layers",
                "use_double_wide_mlp", "hidden_size_per_layer_input", "vocab_size_per_layer_input",
                "final_logit_softcapping", "enable_moe_block")
_GATED_DELTA_KEYS = ("full_attention_interval", "linear_num_key_heads", "linear_num_value_heads",
                     "linear_key_head_dim", "linear_value_head_dim", "linear_conv_kernel_dim")
_MAMBA2_KEYS = ("mamba_n_heads", "mamba_d_head", "mamba_n_groups", "mamba_d_state", "mamba_d_conv", "mamba_conv_bias",
                "mamba_proj_bias", "time_step_limit")
_QWEN3_5 = {"qk_norm": "head", "attn_output_gate": True}
_QWEN3_5_MIXERS: dict[Mixer, str] = {"attention": "full_attention", "gated_delta": "linear_attention"}
LAYOUTS: dict[str, Layout] = {
    "llama": Layout("llama", windows="layer_types"),
    "mistral": Layout("mistral", windows="layer_types"),  # mlx-lm runs Mistral as llama
    "ministral3": Layout("ministral3", windows="layer_types", biases="none", temperature=True),
    "qwen2": Layout("qwen2", biases="qkv"),
    "qwen3": Layout("qwen3", fixed={"qk_norm": "head"}, biases="none"),
    "gemma2": Layout("gemma2", keys=("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"),
                     fixed=_GEMMA | {"tie_word_embeddings": True}, biases="none", rope_kinds=("default",)),
    "gemma3": Layout("gemma3_text", keys=("query_pre_attn_scalar", "rope_local_base_freq"),
                     fixed=_GEMMA | {"qk_norm": "head"}, windows="pattern", biases="none", sanitize_per_tensor=False),
    "gemma4": Layout("gemma4_text", keys=_GEMMA4_KEYS,
                     fixed=_GEMMA | {"norm_offset": 0.0, "qk_norm": "head", "attention_scale": 1.0, "value_norm": True,
                                     "layer_output_scale": True},
                     windows="layer_types", biases="none", rope_kinds=("default", "proportional"), layers_apart=True,
                     # 26B-A4B's expert block beside every layer's dense MLP: the router (router.proj, its scales) and
                     # experts.switch_glu under the layer itself, the router at 8 bits as its predicate says
                     experts=ExpertLayout("", "num_experts", "moe_intermediate_size", None, dense_layers=False,
                                          router="router.proj", stacks="experts.switch_glu",
                                          beside_dense_key="intermediate_size", used_key="top_k_experts",
                                          router_scales=("router.scale", "router.per_expert_scale"),
                                          branch_norms=True, optional=True)),
    "olmo2": Layout("olmo2", fixed={"norm_placement": "post", "qk_norm": "projection"}),
    "olmo3": Layout("olmo3", fixed={"norm_placement": "post", "qk_norm": "projection"}, windows="layer_types",
                    plain_sliding_rope=True, needs_both_layer_kinds=True),
    "granite": Layout("granite", keys=("embedding_multiplier", "attention_multiplier", "residual_multiplier",
                                       "logits_scaling")),
    "phi3": Layout("phi3", keys=("partial_rotary_factor", "original_max_position_embeddings"),
                   fixed={"fused_qkv": True, "fused_gate_up": True,
                          "head_dim": lambda spec: spec.hidden_size // spec.num_heads},
                   biases="none", rope_kinds=("default", "longrope")),
    "smollm3": Layout("smollm3", keys=("no_rope_layers",), windows="layer_types"),
    # mlx-lm's MoE files build their rope from θ alone (no scaling) and have no windows
    "qwen3_moe": Layout("qwen3_moe", fixed={"qk_norm": "head"}, biases="none", rope_kinds=("default",),
                        experts=ExpertLayout("mlp", "num_experts", "moe_intermediate_size", "norm_topk_prob",
                                             dense_layers=True)),
    "mixtral": Layout("mixtral", fixed={"head_dim": lambda spec: spec.hidden_size // spec.num_heads}, biases="none",
                      rope_kinds=("default",),
                      experts=ExpertLayout("block_sparse_moe", "num_local_experts", "intermediate_size", None,
                                           dense_layers=False)),
    "olmoe": Layout("olmoe", fixed={"qk_norm": "projection"},
                    experts=ExpertLayout("mlp", "num_experts", "intermediate_size", "norm_topk_prob",
                                         dense_layers=False)),
    # mlx-lm's Qwen2-MoE file always has a separate head, never renormalises the chosen experts' weights
    "qwen2_moe": Layout("qwen2_moe", fixed={"head_dim": lambda spec: spec.hidden_size // spec.num_heads,
                                            "tie_word_embeddings": False}, biases="qkv", rope_kinds=("default",),
                        experts=ExpertLayout("mlp", "num_experts", "moe_intermediate_size", None, dense_layers=False,
                                             normalizes=False, shared_key="shared_expert_intermediate_size")),
    # mlx-lm's lfm2 always ties the head, sizes heads as hidden / heads, rotates with θ alone, and reads the MLP's
    # width and the model's as block_* keys
    "lfm2": Layout("lfm2", keys=("block_dim", "block_ff_dim", "block_auto_adjust_ff_dim", "block_multiple_of",
                                 "block_ffn_dim_multiplier", "norm_eps", "conv_L_cache", "conv_bias", "full_attn_idxs"),
                   fixed={"qk_norm": "head", "tie_word_embeddings": True,
                          "head_dim": lambda spec: spec.hidden_size // spec.num_heads},
                   biases="none", rope_kinds=("default",),
                   mixers={"attention": "full_attention", "short_conv": "conv"}),
    # mlx-lm's qwen3_5 (its text-only checkpoints too: there is no qwen3_5_text file) reads the rope from
    # rope_parameters only, puts attention in every full_attention_interval-th layer, always gates attention's output,
    # and has experts with a shared expert in every layer or in none
    "qwen3_5": Layout("qwen3_5", keys=(*_GATED_DELTA_KEYS, "rope_parameters"), fixed=_QWEN3_5,
                      rope_kinds=("default",), mixers=_QWEN3_5_MIXERS, folds_norm_offset=True),
    "qwen3_5_moe": Layout("qwen3_5_moe", keys=(*_GATED_DELTA_KEYS, "rope_parameters"), fixed=_QWEN3_5,
                          rope_kinds=("default",), mixers=_QWEN3_5_MIXERS, folds_norm_offset=True,
                          experts=ExpertLayout("mlp", "num_experts", "moe_intermediate_size", "norm_topk_prob",
                                               dense_layers=False, shared_key="shared_expert_intermediate_size")),
    # mlx-lm's qwen3_next: the same layers with the gated delta rule's projections fused as transformers' are, rope
    # from the top-level keys, experts in the layers decoder_sparse_step and mlp_only_layers say
    "qwen3_next": Layout("qwen3_next", keys=(*_GATED_DELTA_KEYS, "partial_rotary_factor"), fixed=_QWEN3_5,
                         rope_kinds=("default",), mixers=_QWEN3_5_MIXERS, folds_norm_offset=True,
                         experts=ExpertLayout("mlp", "num_experts", "moe_intermediate_size", "norm_topk_prob",
                                              dense_layers=True, shared_key="shared_expert_intermediate_size")),
    # mlx-lm's gpt_oss: q/k/v/o biases and sinks always, one rope (rope_theta, rope_scaling) for both layer kinds,
    # which it indexes; experts with biases and its SwigluOAI at gpt-oss's constants, under mlp.experts, the router
    # mlp.router
    "gpt_oss": Layout("gpt_oss", fixed={"attention_sinks": True}, windows="layer_types", biases="all",
                      needs_both_layer_kinds=True,
                      experts=ExpertLayout("mlp", "num_local_experts", "intermediate_size", None, dense_layers=False,
                                           router="router", stacks="experts", biases=True,
                                           clamped_swiglu=(1.702, 7.0))),
    # mlx-lm's granitemoehybrid: heads sized hidden / heads, rope from θ alone and only where position_embedding_type
    # is not "nope", Mamba2 from the mamba_* keys, the shared MLP beside the experts (or alone, as `mlp`, without any)
    "granite_hybrid": Layout("granitemoehybrid", keys=(
        "embedding_multiplier", "attention_multiplier", "residual_multiplier", "logits_scaling",
        "position_embedding_type", *_MAMBA2_KEYS),
        fixed={"fused_gate_up": True, "head_dim": lambda spec: spec.hidden_size // spec.num_heads},
        rope_kinds=("default",), mixers={"attention": "attention", "mamba2": "mamba"}, indexes_each_mixer=False,
        experts=ExpertLayout("block_sparse_moe", "num_local_experts", "intermediate_size", None, dense_layers=False,
                             router="router.layer", beside_dense_key="shared_intermediate_size", dense_module="mlp")),
}


# siliconvert's model files where mlx-lm's compute another function: Gemma 2 with its sliding window, Phi-3 with
# LongRoPE's factors chosen by length, gpt-oss with YaRN's correction range untruncated. Each is mlx-lm's file,
# subclassed, with only that fixed.
FAITHFUL: dict[str, Layout] = {
    "gemma2": replace(LAYOUTS["gemma2"], windows="layer_types", model_file="gemma2.py"),
    "phi3": replace(LAYOUTS["phi3"], longrope_by_length=True, model_file="phi3.py"),
    "gpt_oss": replace(LAYOUTS["gpt_oss"], yarn_by_config=True, model_file="gpt_oss.py"),
}
# What each of those files fixes, as a release's card says it
FAITHFUL_FIXES = {
    "gemma2.py": "it has no sliding window: its sliding layers attend over the whole context",
    "phi3.py": "it rotates with LongRoPE's long factors at every length, where the model takes the short ones within "
               "its original context",
    "gpt_oss.py": "it rounds YaRN's correction range out to whole dimensions, where the model's config says "
                  "`truncate: false`: the rotary dimensions at the ramp's ends turn at other frequencies",
}
MODEL_FILES = Path(__file__).parent / "mlx_models"  # package data: FAITHFUL's files, shipped into folders byte for byte


def model_file_path(name: str) -> Path:
    """siliconvert's own mlx-lm model file `name`."""
    return MODEL_FILES / name


FAITHFUL_HINT = ("; `model_file: faithful` on the MLX target ships siliconvert's own model file, which honours it "
                 "(loading the folder then needs trust_remote_code=True)")


@dataclass(frozen=True)
class Key:
    """A config.json key some model file reads: the traits it expresses and its value for a checkpoint."""

    traits: tuple[str, ...]
    value: Callable[[MLXArch], Any]


KEYS: dict[str, Key] = {
    "query_pre_attn_scalar": Key(("attention_scale",), lambda arch: _whole(arch.spec.attention_multiplier ** -2)),
    "attn_logit_softcapping": Key(("attn_softcap",), lambda arch: arch.required("attn_softcap")),
    "final_logit_softcapping": Key(("final_softcap",), lambda arch: arch.required("final_softcap")),
    "embedding_multiplier": Key(("embedding_scale",), lambda arch: arch.spec.embedding_scale),
    "attention_multiplier": Key(("attention_scale",), lambda arch: arch.spec.attention_multiplier),
    "residual_multiplier": Key(("residual_scale",), lambda arch: arch.spec.residual_scale),
    "logits_scaling": Key(("logits_scale",), lambda arch: 1.0 / arch.spec.logits_scale),
    "no_rope_layers": Key(("nope_layers",), lambda arch: [int(layer.rope is not None) for layer in arch.layers]),
    "rope_local_base_freq": Key(("per_layer_rope",), lambda arch: arch.sliding_theta()),
    "partial_rotary_factor": Key(("partial_rotary",), lambda arch: arch.rope.dim / arch.spec.head_dim),
    # mlx-lm's lfm2: the MLP's width is written whole with the auto-adjust off (mlx-lm rounds it up to
    # block_multiple_of even without a multiplier, where transformers does not), so the rounding keys say nothing
    "block_dim": Key((), lambda arch: arch.spec.hidden_size),
    "block_ff_dim": Key((), lambda arch: arch.spec.intermediate_size),
    "block_auto_adjust_ff_dim": Key((), lambda arch: False),
    "block_multiple_of": Key((), lambda arch: 1),
    "block_ffn_dim_multiplier": Key((), lambda arch: 1.0),
    "norm_eps": Key((), lambda arch: arch.spec.rms_norm_eps),
    "conv_L_cache": Key(("short_conv",), lambda arch: arch.required("short_conv").kernel),
    "conv_bias": Key(("short_conv",), lambda arch: arch.required("short_conv").bias),
    "full_attn_idxs": Key(("short_conv",), lambda arch: list(arch.attention_layers)),
    # mlx-lm's Qwen3.5 and Qwen3-Next: which layers attend, and the gated delta rule's sizes
    "full_attention_interval": Key(("gated_delta",), lambda arch: arch.attention_interval()),
    "linear_num_key_heads": Key(("gated_delta",), lambda arch: arch.required("gated_delta").key_heads),
    "linear_num_value_heads": Key(("gated_delta",), lambda arch: arch.required("gated_delta").value_heads),
    "linear_key_head_dim": Key(("gated_delta",), lambda arch: arch.required("gated_delta").key_head_dim),
    "linear_value_head_dim": Key(("gated_delta",), lambda arch: arch.required("gated_delta").value_head_dim),
    "linear_conv_kernel_dim": Key(("gated_delta",), lambda arch: arch.required("gated_delta").conv_kernel),
    # mlx-lm's qwen3_5 takes θ and the rotated share of each head from here alone (its defaults otherwise: θ 100000,
    # a quarter), and reads the whole dict as the rope's scaling: one without any
    "rope_parameters": Key(("partial_rotary",), lambda arch: {
        "type": "default", "rope_theta": arch.rope.theta, "partial_rotary_factor": arch.rope.dim / arch.spec.head_dim}),
    # mlx-lm's granitemoehybrid: rope in every attention layer or in none (its default "rope"; transformers' None is
    # none), and Mamba2's sizes
    "position_embedding_type": Key(("nope_layers",), lambda arch: arch.position_embedding_type()),
    "mamba_n_heads": Key(("mamba2",), lambda arch: arch.required("mamba2").heads),
    "mamba_d_head": Key(("mamba2",), lambda arch: arch.required("mamba2").head_dim),
    "mamba_n_groups": Key(("mamba2",), lambda arch: arch.required("mamba2").groups),
    "mamba_d_state": Key(("mamba2",), lambda arch: arch.required("mamba2").state_size),
    "mamba_d_conv": Key(("mamba2",), lambda arch: arch.required("mamba2").conv_kernel),
    "mamba_conv_bias": Key(("mamba2",), lambda arch: arch.required("mamba2").conv_bias),
    "mamba_proj_bias": Key(("mamba2",), lambda arch: arch.required("mamba2").proj_bias),
    # mlx-lm's default is (0.001, 100), transformers' (0, ∞); ∞ is written as float32's largest value, which mlx's
    # float32 clip of Δ makes the same no-op, where JSON has no infinity (transformers writes {"__float__":
    # "Infinity"}, which mlx-lm would take as the bound itself)
    "time_step_limit": Key(("mamba2",), lambda arch: [min(bound, FLOAT32_MAX)
                                                      for bound in arch.required("mamba2").time_step_limit]),
    # mlx-lm's gemma4_text: the global layers' head size and k/v heads, their keys as values, the kv-shared layers'
    # count and their double-wide MLPs, the per-layer inputs (checked against the spec's layers: _check_layers_apart)
    "global_head_dim": Key(("per_layer_head_dim",), lambda arch: arch.full_layers_value(arch.spec.layer_head_dim)),
    "num_global_key_value_heads": Key(("per_layer_kv_heads",), lambda arch: arch.full_layers_value(
        arch.spec.layer_kv_heads) if any(layer.values_from_keys for layer in arch.spec.layers) else None),
    "attention_k_eq_v": Key(("k_eq_v",), lambda arch: any(layer.values_from_keys for layer in arch.spec.layers)),
    "num_kv_shared_layers": Key(("kv_shared_layers",), lambda arch: sum(
        layer.kv_source is not None for layer in arch.spec.layers)),
    "use_double_wide_mlp": Key(("per_layer_mlp_width",), lambda arch: any(
        layer.intermediate_size for layer in arch.spec.layers)),
    "hidden_size_per_layer_input": Key(("per_layer_input",), lambda arch: arch.spec.per_layer_input),
    "vocab_size_per_layer_input": Key(("per_layer_input",), lambda arch: arch.spec.per_layer_input_vocab or
                                      arch.spec.vocab_size),
    "enable_moe_block": Key((), lambda arch: arch.spec.experts is not None),
    "original_max_position_embeddings": Key(
        (), lambda arch: (arch.rope.scaling or {}).get("original_max_position_embeddings",
                                                        arch.spec.max_position_embeddings)),
}


class MLXArch:
    """One checkpoint's spec against one mlx-lm model file: checks, then the config.json keys it needs."""

    def __init__(self, spec: ModelSpec, where: Any, model_file: MLXModelFile = "mlx-lm"):
        layouts = FAITHFUL if model_file == "faithful" else LAYOUTS
        if spec.family not in layouts:
            if spec.family in LAYOUTS:  # mlx-lm's file is right wherever it is not refused: no file of our own
                raise CheckpointError(f"model_file: faithful: siliconvert ships no MLX model file for the "
                                      f"{spec.family} family (mlx-lm's own runs it, or is refused by trait)", where)
            raise CheckpointError(f"no MLX layout for the {spec.family} family", where)
        self.spec, self.where, self.layout = spec, where, layouts[spec.family]
        # a window as long as the context never slides: full attention
        self.layers = tuple(Layer(layer.window if layer.window and layer.window < spec.max_position_embeddings
                                  else None, layer.rope) for layer in spec.layers)
        self.rope: Rope = spec.rope or Rope(spec.rope_theta, spec.head_dim)
        # each layer's mixer and the layers whose mixer is attention, as `_check_mixers` reads them
        self.mixers: tuple[Mixer, ...] = ()
        self.attention_layers: tuple[int, ...] = ()
        try:
            self._check()
        except CheckpointError as refusal:
            if model_file == "faithful" or spec.family not in FAITHFUL:
                raise
            try:
                MLXArch(spec, where, "faithful")
            except CheckpointError:
                raise refusal from None
            raise CheckpointError(refusal.message + FAITHFUL_HINT, where) from None

    def refuse(self, trait: str, why: str) -> CheckpointError:
        runs = (f"siliconvert's {self.layout.model_file}" if self.layout.model_file
                else f"mlx-lm's {self.layout.model_type}")
        return CheckpointError(f"MLX ({runs}) cannot honour the trait {trait}: {why}", self.where)

    def required(self, trait: str) -> Any:
        value = getattr(self.spec, trait)
        if value is None:
            raise self.refuse(trait, "mlx-lm applies it always; the source has none")
        return value

    def sliding_theta(self) -> float:
        """The θ of the sliding layers' rope (the main θ where none slides): all mlx-lm reads of that rope."""
        ropes = _distinct(layer.rope for layer in self.layers if layer.window is not None)
        if not ropes:
            return self.rope.theta
        rope = ropes[0]
        if len(ropes) > 1 or rope is None or rope.scaling is not None or rope.dim != self.spec.head_dim:
            raise self.refuse("per_layer_rope", "the sliding layers' rope is one plain θ in mlx-lm")
        return rope.theta

    # ---- checks ----------------------------------------------------------------------------------------
    def _check(self) -> None:
        spec, layout = self.spec, self.layout
        keyed = {trait for key in layout.keys for trait in KEYS[key].traits}
        self._check_mixers()
        # a model file computes Llama's traits unless its layout's `fixed` says otherwise (where `fixed` may also
        # name a size the file derives, or the tied head)
        for trait, expected in (LLAMA_TRAITS | layout.fixed).items():
            if trait in keyed or (trait == "norm_offset" and layout.folds_norm_offset) or (
                    trait == "position_attention_scale" and layout.temperature):
                continue
            expected = expected(spec) if callable(expected) else expected
            actual = getattr(spec, trait)
            if trait == "attention_scale":  # 0 means head_dim^-½, in the spec and in mlx-lm's files alike
                expected, actual = expected or spec.head_dim**-0.5, spec.attention_multiplier
            if not (actual == expected or (isinstance(actual, float) and math.isclose(actual, expected))):
                raise self.refuse(trait, f"mlx-lm computes {expected!r}, the source {actual!r}")
        self._check_biases()
        self._check_ropes(keyed)
        self._check_windows()
        self._check_experts()
        self._check_layers_apart()

    def _check_mixers(self) -> None:
        """The one reading of each layer's mixer: a mixer the model file does not run is refused by name, as is a
        model without a layer of each mixer the file indexes."""
        self.mixers = mixers = tuple(layer.mixer for layer in self.spec.layers)
        for mixer in dict.fromkeys(mixers):
            if mixer not in self.layout.mixers:
                layers = [i for i, each in enumerate(mixers) if each == mixer]
                raise self.refuse(mixer, f"mlx-lm's model file runs {', '.join(self.layout.mixers)} only; the "
                                         f"source's layers {layers} are {mixer}")
        if len(self.layout.mixers) > 1 and self.layout.indexes_each_mixer:
            for mixer in self.layout.mixers:
                if mixer not in mixers:
                    raise self.refuse(mixer, f"mlx-lm's model file needs a layer of each of "
                                             f"{', '.join(self.layout.mixers)}; the source has no {mixer} layer")
        self.attention_layers = tuple(i for i, mixer in enumerate(mixers) if mixer == "attention")
        if "full_attention_interval" in self.layout.keys:
            self.attention_interval()
        if "mamba2" in mixers:
            self._check_mamba2()

    def full_layers_value(self, size: Callable[[int], int]) -> int:
        """A size of the full-attention layers (of the sliding ones where none is full)."""
        full = [i for i, layer in enumerate(self.layers) if layer.window is None] or [0]
        return size(full[0])

    def _check_layers_apart(self) -> None:
        """Layers sized and fed apart (Gemma 4) as mlx-lm's gemma4_text builds them from its keys, against the
        source's: refused naming the first trait that differs; a model file without such keys refuses them all."""
        spec, traits = self.spec, self.spec.traits()
        apart = ("per_layer_head_dim", "per_layer_kv_heads", "k_eq_v", "kv_shared_layers", "per_layer_mlp_width")
        if not self.layout.layers_apart:
            if found := [trait for trait in apart if trait in traits]:
                raise self.refuse(found[0], f"mlx-lm sizes and feeds every layer alike; the source's layers differ "
                                            f"({traits[found[0]]})")
            return
        config = {key: KEYS[key].value(self) for key in _GEMMA4_KEYS[:5]}
        layers, shared = spec.num_layers, config["num_kv_shared_layers"]
        first_shared = layers - shared
        last_of_kind: dict[bool, int] = {}
        for i in range(first_shared):
            last_of_kind[self.layers[i].window is None] = i
        for i, layer in enumerate(spec.layers):
            full = self.layers[i].window is None
            k_eq_v = config["attention_k_eq_v"] and full
            built = {
                "per_layer_head_dim": config["global_head_dim"] if full else spec.head_dim,
                "per_layer_kv_heads": config["num_global_key_value_heads"] if k_eq_v and config[
                    "num_global_key_value_heads"] is not None else spec.num_kv_heads,
                "k_eq_v": k_eq_v,
                "kv_shared_layers": last_of_kind.get(full) if i >= first_shared else None,
                "per_layer_mlp_width": spec.intermediate_size * (
                    2 if config["use_double_wide_mlp"] and i >= first_shared > 0 else 1),
            }
            source = {"per_layer_head_dim": spec.layer_head_dim(i), "per_layer_kv_heads": spec.layer_kv_heads(i),
                      "k_eq_v": layer.values_from_keys, "kv_shared_layers": layer.kv_source,
                      "per_layer_mlp_width": spec.layer_intermediate_size(i)}
            for trait, value in built.items():
                if source[trait] != value:
                    raise self.refuse(trait, f"mlx-lm's layer {i} has {value!r}, the source's {source[trait]!r}")

    def _check_mamba2(self) -> None:
        """mlx-lm's Mamba2 mixer is the spec's (`Mamba2`) but for its gated norm, which normalises the whole inner
        width at once where transformers normalises each group's slice."""
        mamba = self.spec.mamba2
        if mamba.groups != 1:
            raise self.refuse("mamba2", f"mlx-lm's gated norm normalises all {mamba.inner_size} channels at once; "
                                        f"the source's normalises each of its {mamba.groups} groups' own")

    def position_embedding_type(self) -> str:
        """mlx-lm's granitemoehybrid rotates in every attention layer unless this is "nope", then in none."""
        ropes = {self.layers[i].rope is None for i in self.attention_layers}
        if len(ropes) > 1:
            raise self.refuse("nope_layers", "mlx-lm rotates in every attention layer or in none; the source's "
                                             f"attention layers without rope are {self.spec.traits()['nope_layers']}")
        return "nope" if ropes == {True} else "rope"

    def mixers_config(self) -> dict[str, Any]:
        """Each layer's mixer, under the names the model file reads, where it runs more than one."""
        if len(self.layout.mixers) == 1:
            return {}
        return {"layer_types": [self.layout.mixers[mixer] for mixer in self.mixers]}

    def _check_biases(self) -> None:
        spec, biases = self.spec, self.layout.biases
        wanted = {"flag": (spec.qkv_bias, spec.qkv_bias), "qkv": (True, False), "all": (True, True),
                  "none": (False, False)}[biases]
        if (spec.qkv_bias, spec.attn_output_bias) != wanted:
            raise self.refuse("attention_bias", f"mlx-lm's biases are q/k/v {wanted[0]}, output {wanted[1]}; "
                                                f"the source's {spec.qkv_bias}, {spec.attn_output_bias}")
        if spec.mlp_bias and biases != "flag":
            raise self.refuse("mlp_bias", "mlx-lm's MLP has no biases")

    def _check_ropes(self, keyed: set[str]) -> None:
        spec, layout = self.spec, self.layout
        ropes = [self.layers[i].rope for i in self.attention_layers]
        if None in ropes and "nope_layers" not in keyed:
            raise self.refuse("nope_layers", "every layer has rope in mlx-lm")
        own_sliding_rope = layout.windows == "pattern" or layout.plain_sliding_rope or layout.layers_apart
        main = _distinct(layer.rope for layer in self.layers if layer.rope is not None
                         and (layer.window is None or not own_sliding_rope))
        if len(main) > 1:
            raise self.refuse("per_layer_rope", "one rope for all layers (Gemma 3: one per attention kind)")
        if layout.plain_sliding_rope:
            plain = Rope(self.rope.theta, spec.head_dim)
            for rope in _distinct(layer.rope for layer in self.layers if layer.window is not None):
                if rope != plain:
                    raise self.refuse("per_layer_rope", f"mlx-lm's sliding layers rotate with θ {plain.theta:g} "
                                                        f"and no scaling; the source's rope there is {rope}")
        if layout.layers_apart and len(_distinct(layer.rope for layer in self.layers if layer.window is not None)) > 1:
            raise self.refuse("per_layer_rope", "one rope per attention kind")
        for i in self.attention_layers:
            rope = self.layers[i].rope
            if rope is None:
                continue
            if rope.kind not in layout.rope_kinds:
                raise self.refuse("rope_scaling", f"mlx-lm's rope here reads {', '.join(layout.rope_kinds)} scaling "
                                                  f"as transformers does; the source's is {rope.kind!r}")
            if rope.dim != spec.layer_head_dim(i) and "partial_rotary" not in keyed:
                raise self.refuse("partial_rotary", "mlx-lm rotates the whole head")
        if self.rope.kind == "longrope" and not layout.longrope_by_length:
            self._check_longrope()
        if self.rope.kind == "yarn" and not layout.yarn_by_config:
            self._check_yarn()

    def _check_longrope(self) -> None:
        """mlx-lm's SuScaledRoPE applies the long factors at every length, with an attention factor from
        max/original context; transformers applies the short ones up to the original context."""
        scaling, spec = self.rope.scaling, self.spec
        original = self.rope_scaling()["original_max_position_embeddings"]
        if scaling["short_factor"] != scaling["long_factor"] and spec.max_position_embeddings > original:
            raise self.refuse("rope_scaling", f"mlx-lm applies LongRoPE's long factors at every length; "
                                              f"transformers applies the short ones up to {original} tokens")
        mlx_ratio = spec.max_position_embeddings / original
        mlx_factor = 1.0 if mlx_ratio <= 1 else math.sqrt(1 + math.log(mlx_ratio) / math.log(original))
        factor = scaling.get("factor", mlx_ratio)
        source_factor = scaling.get("attention_factor") or (
            1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original)))
        if not math.isclose(mlx_factor, source_factor):
            raise self.refuse("rope_scaling", f"mlx-lm's LongRoPE attention factor is {mlx_factor:.6g}, the "
                                              f"source's {source_factor:.6g}")

    def _check_yarn(self) -> None:
        """mlx-lm's YarnRoPE scales q and k by mscale(factor, mscale) / mscale(factor, mscale_all_dim), its defaults 1
        and 0, and ignores attention_factor; transformers takes attention_factor, else that ratio only where both
        are set, else mscale(factor). Its correction range is always truncated."""
        scaling = self.rope.scaling
        mlx_factor = yarn_mscale(scaling["factor"], scaling.get("mscale", 1)) / yarn_mscale(
            scaling["factor"], scaling.get("mscale_all_dim", 0))
        if not math.isclose(mlx_factor, yarn_attention_factor(scaling)):
            raise self.refuse("rope_scaling", f"mlx-lm's yarn attention factor is {mlx_factor:.6g}, the source's "
                                              f"{yarn_attention_factor(scaling):.6g}")
        if scaling.get("truncate") is False:
            raise self.refuse("rope_scaling", "mlx-lm always truncates yarn's correction range; the source does not")

    def _check_windows(self) -> None:
        windows = {layer.window for layer in self.layers} - {None}
        if self.layout.needs_both_layer_kinds and not windows:
            raise self.refuse("sliding_window", "mlx-lm's model file needs a sliding layer; no source layer slides "
                                                "within the context")
        if not windows:
            return
        context = self.spec.max_position_embeddings
        if self.layout.windows == "none":
            raise self.refuse("sliding_window", f"mlx-lm attends over the whole context ({context}); the source "
                                                f"slides a {min(windows)}-token window")
        if len(windows) > 1:
            raise self.refuse("sliding_window", f"mlx-lm has one window size; the source has {sorted(windows)}")
        if all(layer.window is not None for layer in self.layers):
            raise self.refuse("sliding_window", "mlx-lm needs a full-attention layer; every source layer slides")
        if self.layout.windows == "pattern":
            self.sliding_window_pattern()

    def _check_experts(self) -> None:
        experts, layout = self.spec.experts, self.layout.experts
        if experts is None and layout is None:
            return
        if layout is None:
            raise self.refuse("experts", "mlx-lm's model file has a dense MLP in every layer")
        if experts is None:
            if layout.dense_module is None and not layout.optional:
                raise self.refuse("experts", "mlx-lm's model file has a mixture of experts in every layer; the "
                                             "source has none")
            return
        if experts.beside_dense != (layout.beside_dense_key is not None):
            raise self.refuse("beside_dense", "mlx-lm's sparse layers run a dense MLP beside their experts"
                              if layout.beside_dense_key else "mlx-lm's experts replace the dense MLP")
        if layout.normalize_key is None and experts.normalize_topk != layout.normalizes:
            raise self.refuse("normalize_topk", "mlx-lm renormalises the chosen experts' weights to sum to one"
                              if layout.normalizes else "mlx-lm never renormalises the chosen experts' weights")
        if experts.shared_intermediate_size and layout.shared_key is None:
            raise self.refuse("shared_expert", f"mlx-lm's model file has no shared expert; the source's has "
                                               f"{experts.shared_intermediate_size} rows")
        if experts.biases != layout.biases:
            raise self.refuse("expert_biases", f"mlx-lm's router and experts {'have' if layout.biases else 'have no'} "
                                               f"biases; the source's {'have' if experts.biases else 'have none'}")
        if experts.clamped_swiglu != layout.clamped_swiglu:
            raise self.refuse("clamped_swiglu", f"mlx-lm's experts compute {layout.clamped_swiglu or 'SiLU(gate)·up'} "
                                                f"(alpha, limit); the source's {experts.clamped_swiglu}")
        for trait, present in (("router_norm", layout.router_scales), ("expert_scales", layout.router_scales),
                               ("branch_norms", layout.branch_norms)):
            if bool(getattr(experts, trait)) != bool(present):
                raise self.refuse(trait, f"mlx-lm's model file {'has' if present else 'has no'} it; the source "
                                         f"{'has' if getattr(experts, trait) else 'has not'}")
        dense = [i for i, layer in enumerate(self.spec.layers) if not layer.sparse]
        if dense and not layout.dense_layers:
            raise self.refuse("dense_layers", f"every layer's MLP is the experts in mlx-lm; the source's layers "
                                              f"{dense} are dense")

    def attention_interval(self) -> int:
        """mlx-lm's Qwen3.5 / Qwen3-Next period: layer i attends when (i + 1) % period == 0, the others run the gated
        delta rule."""
        period = self.attention_layers[0] + 1
        if [i for i in range(len(self.mixers)) if (i + 1) % period == 0] != list(self.attention_layers):
            raise self.refuse("gated_delta", f"mlx-lm's attention layers come every n-th, the gated delta rule in the "
                                             f"others; the source's attention layers are {list(self.attention_layers)}")
        return period

    def sliding_window_pattern(self) -> int:
        """Gemma 3's period: layer i is full attention when (i + 1) % period == 0."""
        full = [i for i, layer in enumerate(self.layers) if layer.window is None]
        period = full[0] + 1
        if [i for i in range(len(self.layers)) if (i + 1) % period == 0] != full:
            raise self.refuse("sliding_window", f"mlx-lm's full-attention layers come every n-th; the source's "
                                                f"are {full}")
        return period

    # ---- config.json ------------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The keys that carry the traits, as this model file reads them."""
        config: dict[str, Any] = {"model_type": self.layout.model_type, "rope_theta": self.rope.theta}
        if self.layout.model_file:
            config["model_file"] = self.layout.model_file
        config |= {key: KEYS[key].value(self) for key in self.layout.keys}
        if self.layout.biases == "flag":
            config["attention_bias"] = self.spec.qkv_bias
        if self.layout.layers_apart:
            config["rope_parameters"] = self.rope_per_kind()
        elif self.rope.scaling is not None:
            config["rope_scaling"] = self.rope_scaling()
        if self.layout.temperature:
            config["rope_parameters"] = self.temperature_rope_parameters()
        windows = {layer.window for layer in self.layers} - {None}
        if self.layout.windows == "layer_types":
            config["layer_types"] = ["sliding_attention" if layer.window else "full_attention" for layer in self.layers]
            config["sliding_window"] = windows.pop() if windows else None
        elif self.layout.windows == "pattern":
            config["sliding_window_pattern"] = self.sliding_window_pattern() if windows else 1
            config["sliding_window"] = windows.pop() if windows else self.spec.max_position_embeddings
        return config | self.mixers_config() | self.experts_config()

    def experts_config(self) -> dict[str, Any]:
        """The mixture of experts as the model file reads it. Its sparse layers are every `decoder_sparse_step`-th
        outside `mlp_only_layers`: a step of one and the dense layers listed say exactly which."""
        experts, layout = self.spec.experts, self.layout.experts
        if layout is None:
            return {}
        if experts is None:  # the dense MLP alone (`dense_module`), or no expert keys where the file's switch is off
            return {layout.count_key: 0} if layout.dense_module else {}
        config = {layout.count_key: experts.count, layout.used_key: experts.used,
                  layout.size_key: experts.intermediate_size}
        if layout.normalize_key is not None:
            config[layout.normalize_key] = experts.normalize_topk
        if layout.shared_key is not None:
            config[layout.shared_key] = experts.shared_intermediate_size
        if layout.beside_dense_key is not None:
            config[layout.beside_dense_key] = self.spec.intermediate_size
        if layout.dense_layers:
            config |= {"decoder_sparse_step": 1,
                       "mlp_only_layers": [i for i, layer in enumerate(self.spec.layers) if not layer.sparse]}
        return config

    def rope_per_kind(self) -> dict[str, Any]:
        """rope_parameters keyed by layer type, as mlx-lm's gemma4_text builds each kind's rope from them."""
        ropes: dict[str, Any] = {}
        for layer in self.layers:
            kind = "sliding_attention" if layer.window is not None else "full_attention"
            if layer.rope is not None and kind not in ropes:
                ropes[kind] = (layer.rope.scaling or {"rope_type": "default"}) | {"rope_theta": layer.rope.theta}
        return ropes

    def rope_scaling(self) -> dict[str, Any]:
        """The main rope's scaling in the old style mlx-lm reads: `type` as well as `rope_type`; LongRoPE, for
        mlx-lm's SuScaledRoPE, with the short factors as the long ones where only the short ones ever apply."""
        scaling = {k: v for k, v in (self.rope.scaling or {}).items() if k != "rope_theta"}
        scaling["type"] = scaling["rope_type"]
        if scaling["rope_type"] == "longrope":
            scaling.setdefault("original_max_position_embeddings", self.spec.max_position_embeddings)
        if scaling["rope_type"] == "longrope" and not self.layout.longrope_by_length:
            scaling["long_factor"] = scaling["short_factor"] if (
                self.spec.max_position_embeddings <= scaling["original_max_position_embeddings"]) else (
                scaling["long_factor"])
        return scaling

    def temperature_rope_parameters(self) -> dict[str, Any]:
        """rope_parameters as mlx-lm's ministral3 reads them: the rope (θ, its scaling) and Llama 4's temperature,
        whose floor is the rope's original context (transformers reads both from the one dict as well)."""
        scaling = self.rope_scaling() if self.rope.scaling is not None else {"type": "default", "rope_type": "default"}
        beta, positions = self.spec.position_attention_scale or (
            0.0, scaling.get("original_max_position_embeddings", self.spec.max_position_embeddings))
        return scaling | {"rope_theta": self.rope.theta, "llama_4_scaling_beta": beta,
                          "original_max_position_embeddings": positions}


def _distinct(ropes: Iterable[Rope | None]) -> list[Rope | None]:
    """The different ropes among `ropes` (a Rope with scaling holds a dict: not hashable)."""
    return list({repr(rope): rope for rope in ropes}.values())


def _whole(value: float) -> float | int:
    """An int where the float is one up to rounding: transformers' config classes (which load the folder's
    config.json for its tokenizer) type some of these keys int."""
    return round(value) if math.isclose(value, round(value)) else value
