"""Qwen3.5 (dense): three gated-delta-rule layers to one gated attention layer (`layer_types`), Gemma-style norms
(RMSNorm × (1 + w)) except the gated delta rule's own output norm, q/k RMSNorm per head, an attention output gate
that q_proj emits beside the query, partial rotary (a quarter of each head).

Its rope is multimodal (`mrope_section`: time, height and width take interleaved frequencies); text has one position
for all three, so the tables are exactly a plain rope's, and a text-only spec has a plain partial rope.

Checkpoints ship as Qwen3_5ForConditionalGeneration (a vision tower beside the language model, and a
multi-token-prediction head, `mtp.*`, that transformers never runs): the language model converts as
Qwen3_5ForCausalLM; the rest is dropped, with a warning that says so."""

from dataclasses import replace
from typing import Any, ClassVar, TypeVar

from siliconvert.architectures.base import (
    EXPERT_TENSORS,
    FUSED_GATED_DELTA_TENSORS,
    GATED_DELTA_TENSORS,
    LLAMA_TENSORS,
    SHARED_EXPERT_TENSORS,
    Experts,
    Family,
    GatedDelta,
    Mixer,
    language_model,
)
from siliconvert.architectures.qwen3_moe import Qwen3Moe

T = TypeVar("T")
# Where the language model's tensors sit in the multimodal checkpoint → the names Qwen3_5ForCausalLM gives them
LANGUAGE_MODEL_PREFIXES = {"model.language_model.": "model.", "lm_head.": "lm_head."}
OTHER_PARTS = ("model.visual.", "mtp.")


class Qwen3_5(Family):
    name = "qwen3_5"
    hf_architectures = ("Qwen3_5ForCausalLM",)
    model_type = "qwen3_5_text"
    tensor_names: ClassVar[dict[str, str]] = LLAMA_TENSORS | GATED_DELTA_TENSORS | {
        "model.layers.{layer}.self_attn.q_norm": "attn_q_norm",
        "model.layers.{layer}.self_attn.k_norm": "attn_k_norm",
    }
    understood_keys = Family.understood_keys | {
        "linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim", "linear_num_key_heads",
        "linear_num_value_heads",
        # transformers' Qwen3.5 always gates attention's output and never runs the multi-token-prediction head;
        # the state dtype is a kernel setting (the reference computes the rule in float32 whatever it says)
        "attn_output_gate", "mtp_num_hidden_layers", "mtp_use_dedicated_embeddings", "mamba_ssm_dtype",
        "full_attention_interval",
    }
    mixer_layer_types: ClassVar[dict[str, Mixer]] = {"linear_attention": "gated_delta"}
    droppable = (*Family.droppable, r"^mtp\.")

    def traits(self, hf: Any) -> dict[str, Any]:
        delta = GatedDelta(key_heads=int(hf.linear_num_key_heads), value_heads=int(hf.linear_num_value_heads),
                           key_head_dim=int(hf.linear_key_head_dim), value_head_dim=int(hf.linear_value_head_dim),
                           conv_kernel=int(hf.linear_conv_kernel_dim))
        return {"norm_offset": 1.0, "qk_norm": "head", "attn_output_gate": True, "gated_delta": delta}


class Qwen3_5Multimodal(Qwen3_5):
    """Qwen3_5ForConditionalGeneration: its language model, as Qwen3_5ForCausalLM."""

    hf_architectures = ("Qwen3_5ForConditionalGeneration",)
    model_type = "qwen3_5"

    def decoder(self, config: dict[str, Any], tensors: dict[str, T], where: Any) -> tuple[dict[str, Any], dict[str, T]]:
        return language_model(config, tensors, where, outer="Qwen3_5ForConditionalGeneration",
                              inner="Qwen3_5ForCausalLM", inner_type="qwen3_5_text", prefixes=LANGUAGE_MODEL_PREFIXES,
                              dropped=OTHER_PARTS, dropped_parts="the vision tower and the multi-token-prediction head")


class Qwen3_5Moe(Qwen3_5):
    """Qwen3.5-MoE (35B-A3B, 122B-A10B, 397B-A17B): Qwen3.5 with experts in every layer's MLP (the chosen ones'
    weights always renormalised) and a shared expert behind a sigmoid gate; no dense MLP, so no
    intermediate_size (the spec's is 0)."""

    name = "qwen3_5_moe"
    hf_architectures = ("Qwen3_5MoeForCausalLM",)
    model_type = "qwen3_5_moe_text"
    tensor_names: ClassVar[dict[str, str]] = Qwen3_5.tensor_names | EXPERT_TENSORS | SHARED_EXPERT_TENSORS
    expert_parts = Qwen3Moe.expert_parts  # per-expert tensors in the files, or transformers' stacks
    required_keys = tuple(key for key in Family.required_keys if key != "intermediate_size")
    understood_keys = Qwen3_5.understood_keys | {
        "num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
        "router_aux_loss_coef", "output_router_logits",  # training only
    }

    def _intermediate_size(self, hf: Any) -> int:
        return 0

    def _sparse(self, hf: Any, layer: int) -> bool:
        return True

    def traits(self, hf: Any) -> dict[str, Any]:
        return super().traits(hf) | {"experts": Experts(
            count=int(hf.num_experts), used=int(hf.num_experts_per_tok),
            intermediate_size=int(hf.moe_intermediate_size), normalize_topk=True,
            shared_intermediate_size=int(hf.shared_expert_intermediate_size))}


class Qwen3_5MoeMultimodal(Qwen3_5Moe):
    """Qwen3_5MoeForConditionalGeneration: its language model, as Qwen3_5MoeForCausalLM."""

    hf_architectures = ("Qwen3_5MoeForConditionalGeneration",)
    model_type = "qwen3_5_moe"

    def decoder(self, config: dict[str, Any], tensors: dict[str, T], where: Any) -> tuple[dict[str, Any], dict[str, T]]:
        return language_model(config, tensors, where, outer="Qwen3_5MoeForConditionalGeneration",
                              inner="Qwen3_5MoeForCausalLM", inner_type="qwen3_5_moe_text",
                              prefixes=LANGUAGE_MODEL_PREFIXES, dropped=OTHER_PARTS,
                              dropped_parts="the vision tower and the multi-token-prediction head")


class Qwen3Next(Qwen3_5):
    """Qwen3-Next (80B-A3B): Qwen3.5-MoE's layers before Qwen3.5 — the gated delta rule's projections fused
    (in_proj_qkvz, in_proj_ba, grouped by key head), experts in the layers `decoder_sparse_step` picks outside
    `mlp_only_layers` (a dense MLP of intermediate_size in the others), renormalised per `norm_topk_prob`."""

    name = "qwen3_next"
    hf_architectures = ("Qwen3NextForCausalLM",)
    model_type = "qwen3_next"
    tensor_names: ClassVar[dict[str, str]] = (
        {template: role for template, role in Qwen3_5.tensor_names.items()
         if role not in ("delta_qkv", "delta_gate", "ssm_beta", "ssm_alpha")}
        | FUSED_GATED_DELTA_TENSORS | EXPERT_TENSORS | SHARED_EXPERT_TENSORS)
    expert_parts = Qwen3Moe.expert_parts
    understood_keys = Qwen3_5Moe.understood_keys | {"norm_topk_prob", "decoder_sparse_step", "mlp_only_layers"}

    def _sparse(self, hf: Any, layer: int) -> bool:
        # as Qwen3NextDecoderLayer chooses its MLP
        return (layer not in (hf.mlp_only_layers or []) and hf.num_experts > 0
                and (layer + 1) % hf.decoder_sparse_step == 0)

    def traits(self, hf: Any) -> dict[str, Any]:
        traits = super().traits(hf)
        traits["gated_delta"] = replace(traits["gated_delta"], fused=True)
        if hf.num_experts > 0:
            traits["experts"] = Experts(count=int(hf.num_experts), used=int(hf.num_experts_per_tok),
                                        intermediate_size=int(hf.moe_intermediate_size),
                                        normalize_topk=bool(hf.norm_topk_prob),
                                        shared_intermediate_size=int(hf.shared_expert_intermediate_size))
        return traits
