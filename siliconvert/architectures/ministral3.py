"""Ministral 3 (and the language model of Mistral3ForConditionalGeneration): Mistral with YaRN and Llama 4's attention
temperature, q × (1 + β·ln(1 + ⌊position / original_max_position_embeddings⌋)) after rope, β from rope_parameters'
`llama_4_scaling_beta` (1 within the original context).

Mistral3ForConditionalGeneration checkpoints (Ministral 3, Mistral Small 3.1+: a Pixtral vision tower beside the
language model) convert their language model; the vision tower and projector are dropped with a warning."""

from typing import Any, TypeVar

from siliconvert.architectures.base import Rope, language_model
from siliconvert.architectures.mistral import Mistral
from siliconvert.errors import CheckpointError

T = TypeVar("T")
LANGUAGE_MODEL_PREFIXES = {"model.language_model.": "model.", "language_model.model.": "model.",
                           "language_model.lm_head.": "lm_head."}
OTHER_TOWERS = ("model.vision_tower.", "vision_tower.", "model.multi_modal_projector.", "multi_modal_projector.")
# The text model's model_type → the causal LM transformers builds for it
TEXT_MODELS = {"ministral3": "Ministral3ForCausalLM", "mistral": "MistralForCausalLM"}


class Ministral3(Mistral):
    name = "ministral3"
    hf_architectures = ("Ministral3ForCausalLM",)
    model_type = "ministral3"

    def traits(self, hf: Any) -> dict[str, Any]:
        params = hf.rope_parameters or {}
        beta = params.get("llama_4_scaling_beta")
        if not beta:
            return {}
        positions = params.get("original_max_position_embeddings")
        if not positions:
            raise CheckpointError("rope_parameters.llama_4_scaling_beta needs original_max_position_embeddings")
        return {"position_attention_scale": (float(beta), int(positions))}

    def _rope(self, hf: Any, layer_type: str, where: str) -> Rope:
        rope = super()._rope(hf, layer_type, where)
        if rope.scaling and "llama_4_scaling_beta" in rope.scaling:  # a trait of its own, not the rope's
            rope = Rope(rope.theta, rope.dim, {k: v for k, v in rope.scaling.items() if k != "llama_4_scaling_beta"})
        return rope


class Mistral3Multimodal(Ministral3):
    """Mistral3ForConditionalGeneration: its language model, as its text_config's causal LM."""

    hf_architectures = ("Mistral3ForConditionalGeneration",)
    model_type = "mistral3"

    def decoder(self, config: dict[str, Any], tensors: dict[str, T], where: Any) -> tuple[dict[str, Any], dict[str, T]]:
        text = config.get("text_config")
        inner_type = text.get("model_type", "mistral") if isinstance(text, dict) else "mistral"
        if inner_type not in TEXT_MODELS:
            raise CheckpointError(f"Mistral3ForConditionalGeneration with a {inner_type!r} text model", where)
        return language_model(config, tensors, where, outer="Mistral3ForConditionalGeneration",
                              inner=TEXT_MODELS[inner_type], inner_type=inner_type, prefixes=LANGUAGE_MODEL_PREFIXES,
                              dropped=OTHER_TOWERS, dropped_parts="the vision tower and projector")
