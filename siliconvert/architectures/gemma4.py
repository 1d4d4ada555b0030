"""Gemma 4 (text): Gemma 3's sandwich norms, GeGLU and q/k norms per head, but norms multiply by w itself (no
1 + w), values are RMS-normed without a weight, q·k is not scaled (the norms set the scale), and:
- per-layer inputs (PLE): a second embedding and a projection feed each layer a slice of their own;
- per-layer attention sizes (`per_layer_config`): the global layers' heads wider (global_head_dim) and, with
  `attention_k_eq_v`, fewer k/v heads whose keys are also the values (no v_proj);
- proportional rope on the global layers: a quarter of each half of the head rotates, at θ^(-2i/head_dim);
- the last `num_kv_shared_layers` layers attend to the keys and values of the last earlier layer of their type,
  and their MLP is twice as wide with `use_double_wide_mlp`;
- each layer's output × a stored scalar (layer_scalar); the final soft-cap;
- with `enable_moe_block` (26B-A4B), an expert block beside every layer's dense MLP: a router over the RMS-normed
  residual (× a learned scale per input, × hidden^-½) picks `top_k_experts` of `num_experts` GeGLU experts, their
  softmax weights renormalised and × a learned scale per expert; the dense MLP's output and the experts' (on
  pre_feedforward_layernorm_2 of the residual) each through a norm of their own, summed, then the
  post-feedforward norm.

Gemma4ForConditionalGeneration checkpoints convert their language model; the vision and audio towers and their
embedders are dropped, with a warning that says so."""

import math
import re
import warnings
from typing import Any, TypeVar

from siliconvert.architectures.base import (
    EXPERT_BLOCK_TENSORS,
    LAYER_OUTPUT_SCALE_TENSORS,
    PER_LAYER_INPUT_TENSORS,
    ConfigWarning,
    Experts,
    Layer,
    Rope,
    head_dim,
    language_model,
)
from siliconvert.architectures.gemma2 import SANDWICH_TENSORS, Gemma2
from siliconvert.errors import CheckpointError

T = TypeVar("T")
LANGUAGE_MODEL_PREFIXES = {"model.language_model.": "model.", "lm_head.": "lm_head."}
OTHER_TOWERS = ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.")


class Gemma4(Gemma2):
    name = "gemma4"
    hf_architectures = ("Gemma4ForCausalLM",)
    model_type = "gemma4_text"
    tensor_names = SANDWICH_TENSORS | PER_LAYER_INPUT_TENSORS | LAYER_OUTPUT_SCALE_TENSORS | EXPERT_BLOCK_TENSORS | {
        "model.layers.{layer}.self_attn.q_norm": "attn_q_norm",
        "model.layers.{layer}.self_attn.k_norm": "attn_k_norm",
    }
    understood_keys = (Gemma2.understood_keys - {"query_pre_attn_scalar"}) | {
        "vocab_size_per_layer_input", "hidden_size_per_layer_input", "per_layer_config", "global_head_dim",
        "num_global_key_value_heads", "attention_k_eq_v", "num_kv_shared_layers", "use_double_wide_mlp",
        "enable_moe_block", "num_experts", "top_k_experts", "moe_intermediate_size", "use_bidirectional_attention",
    }

    def decoder(self, config: dict[str, Any], tensors: dict[str, T], where: Any) -> tuple[dict[str, Any], dict[str, T]]:
        return config, _without_unused_kv(config, tensors, where)

    def traits(self, hf: Any) -> dict[str, Any]:
        if hf.use_bidirectional_attention:
            raise CheckpointError(f"use_bidirectional_attention {hf.use_bidirectional_attention!r}: attention that "
                                  "is not causal")
        experts = None
        if hf.enable_moe_block:
            experts = Experts(count=int(hf.num_experts), used=int(hf.top_k_experts),
                              intermediate_size=int(hf.moe_intermediate_size), normalize_topk=True, beside_dense=True,
                              router_norm=True, expert_scales=True, branch_norms=True)
        return {
            "experts": experts,
            "norm_offset": 0.0,
            "norm_placement": "sandwich",
            "qk_norm": "head",
            "value_norm": True,
            # transformers multiplies by √hidden as a tensor of the weights' dtype
            "embedding_scale": math.sqrt(hf.hidden_size),
            "attention_scale": 1.0,
            "final_softcap": hf.final_logit_softcapping,
            "per_layer_input": int(hf.hidden_size_per_layer_input or 0),
            "per_layer_input_vocab": int(hf.vocab_size_per_layer_input) if hf.hidden_size_per_layer_input else 0,
            "layer_output_scale": True,
        }

    def _sparse(self, hf: Any, layer: int) -> bool:
        return bool(hf.enable_moe_block)  # the expert block is in every layer, beside its dense MLP

    def _rope(self, hf: Any, layer_type: str, where: str) -> Rope:
        params = dict(hf.rope_parameters.get(layer_type) or {})
        if params.get("rope_type") != "proportional":
            return super()._rope(hf, layer_type, where)
        if params.get("factor", 1.0) != 1.0:
            raise CheckpointError("proportional rope with a factor is not supported", where)
        # every dimension of the head takes part (pairs i and i + d/2); only the first partial_rotary_factor of
        # the pairs turn, at θ^(-2i/d): the others have frequency 0
        dim = _layer_of_type(hf, layer_type).head_dim
        return Rope(float(params["rope_theta"]), dim,
                    {"rope_type": "proportional", "partial_rotary_factor": float(params["partial_rotary_factor"])})

    def _layers(self, hf: Any, where: str) -> tuple[Layer, ...]:
        layers = super()._layers(hf, where)
        modes = hf.kv_sharing_modes
        producers: dict[str, int] = {}  # layer type → the last layer of that type with keys and values of its own
        out = []
        for index, (layer, kind) in enumerate(zip(layers, hf.layer_types, strict=True)):
            own = hf.per_layer_config[index]
            shared = modes[index] == "reuse"
            if not shared:
                producers[kind] = index
            elif kind not in producers:
                raise CheckpointError(f"layer {index} reuses the keys of an earlier {kind} layer; there is none",
                                      where)
            wide = hf.use_double_wide_mlp and shared
            out.append(Layer(
                window=layer.window, rope=layer.rope, sparse=layer.sparse, mixer=layer.mixer,
                head_dim=own.head_dim if own.head_dim != head_dim(hf) else 0,
                kv_heads=own.num_key_value_heads if own.num_key_value_heads != hf.num_key_value_heads else 0,
                values_from_keys=bool(hf.attention_k_eq_v) and kind != "sliding_attention",
                kv_source=producers[kind] if shared else None,
                intermediate_size=2 * hf.intermediate_size if wide else 0))
        return tuple(out)


# The k/v projections and k norm a kv-shared layer holds in the hub's checkpoints and never runs
_OWN_KV = re.compile(r"^model\.layers\.(\d+)\.self_attn\.(k_proj|v_proj|k_norm)\.weight$")


def _without_unused_kv(config: dict[str, Any], tensors: dict[str, T], where: Any) -> dict[str, T]:
    """The tensors less the kv-shared layers' own k/v weights, which transformers ignores on loading
    (_keys_to_ignore_on_load_unexpected), with a warning that counts them."""
    first_shared = int(config["num_hidden_layers"]) - int(config.get("num_kv_shared_layers") or 0)
    unused = [name for name in tensors if (match := _OWN_KV.match(name)) and int(match.group(1)) >= first_shared]
    if unused:
        warnings.warn(f"{where}: the kv-shared layers' own k_proj, v_proj and k_norm ({len(unused)} tensors) are "
                      "never run (those layers read earlier layers' keys and values): dropped", ConfigWarning,
                      stacklevel=3)
    return {name: tensor for name, tensor in tensors.items() if name not in unused}


def _layer_of_type(hf: Any, layer_type: str) -> Any:
    """transformers' resolved config of the first layer of this type (per_layer_config applied)."""
    return hf.per_layer_config[hf.layer_types.index(layer_type)]


class Gemma4Multimodal(Gemma4):
    """Gemma4ForConditionalGeneration: its language model, as Gemma4ForCausalLM."""

    hf_architectures = ("Gemma4ForConditionalGeneration",)
    model_type = "gemma4"

    def decoder(self, config: dict[str, Any], tensors: dict[str, T], where: Any) -> tuple[dict[str, Any], dict[str, T]]:
        config, tensors = language_model(config, tensors, where, outer="Gemma4ForConditionalGeneration",
                                         inner="Gemma4ForCausalLM", inner_type="gemma4_text",
                                         prefixes=LANGUAGE_MODEL_PREFIXES, dropped=OTHER_TOWERS,
                                         dropped_parts="the vision and audio towers and their embedders")
        return config, _without_unused_kv(config, tensors, where)
