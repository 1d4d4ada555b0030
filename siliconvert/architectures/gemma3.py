"""Gemma 3 (text): Gemma 2 plus RMSNorm (1 + w) of q and k per head, and a rope per layer type
(local layers θ 10 000, global layers θ 1 000 000 with their own scaling); soft-caps off by default.

Gemma3ForConditionalGeneration checkpoints (4B and up: a vision tower beside the language model) convert
their language model; the vision tower and projector are dropped, with a warning that says so."""

from typing import Any, TypeVar

from siliconvert.architectures.base import language_model
from siliconvert.architectures.gemma2 import SANDWICH_TENSORS, Gemma2
from siliconvert.errors import CheckpointError

T = TypeVar("T")
# Where the language model's tensors sit in a multimodal checkpoint (transformers ≥ 4.52, then older) →
# the names Gemma3ForCausalLM gives them
LANGUAGE_MODEL_PREFIXES = {"model.language_model.": "model.", "language_model.model.": "model.",
                           "language_model.lm_head.": "lm_head."}
OTHER_TOWERS = ("model.vision_tower.", "vision_tower.", "model.multi_modal_projector.", "multi_modal_projector.")


class Gemma3(Gemma2):
    name = "gemma3"
    hf_architectures = ("Gemma3ForCausalLM",)
    model_type = "gemma3_text"
    tensor_names = SANDWICH_TENSORS | {
        "model.layers.{layer}.self_attn.q_norm": "attn_q_norm",
        "model.layers.{layer}.self_attn.k_norm": "attn_k_norm",
    }
    understood_keys = Gemma2.understood_keys | {"rope_local_base_freq", "use_bidirectional_attention"}

    def traits(self, hf: Any) -> dict[str, Any]:
        if getattr(hf, "use_bidirectional_attention", False):
            raise CheckpointError("use_bidirectional_attention: an encoder, not a causal decoder")
        return super().traits(hf) | {"qk_norm": "head"}


class Gemma3Multimodal(Gemma3):
    """Gemma3ForConditionalGeneration: its language model, as Gemma3ForCausalLM."""

    hf_architectures = ("Gemma3ForConditionalGeneration",)
    model_type = "gemma3"

    def decoder(self, config: dict[str, Any], tensors: dict[str, T], where: Any) -> tuple[dict[str, Any], dict[str, T]]:
        return language_model(config, tensors, where, outer="Gemma3ForConditionalGeneration",
                              inner="Gemma3ForCausalLM", inner_type="gemma3_text", prefixes=LANGUAGE_MODEL_PREFIXES,
                              dropped=OTHER_TOWERS, dropped_parts="the vision tower and projector")
