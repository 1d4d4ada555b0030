"""Qwen3.5 (dense): three gated-delta-rule layers to one gated attention layer (`layer_types`), Gemma-style norms
(RMSNorm × (1 + w)) except the gated delta rule's own output norm, q/k RMSNorm per head, an attention output gate
that q_proj emits beside the query, partial rotary (a quarter of each head).

Its rope is multimodal (`mrope_section`: time, height and width take interleaved frequencies); text has one position
for all three, so the tables are exactly a plain rope's, and a text-only spec has a plain partial rope.

Checkpoints ship as Qwen3_5ForConditionalGeneration (a vision tower beside the language model, and a
multi-token-prediction head, `mtp.*`, that transformers never runs): the language model converts as
Qwen3_5ForCausalLM; the rest is dropped, with a warning that says so."""

from typing import Any, ClassVar, TypeVar

from siliconvert.architectures.base import GATED_DELTA_TENSORS, LLAMA_TENSORS, Family, GatedDelta, Mixer, language_model

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
