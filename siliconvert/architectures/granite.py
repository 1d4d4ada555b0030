"""Granite (3.x): Llama with embedding, attention and residual multipliers, and logits ÷ logits_scaling."""

from typing import Any

from siliconvert.architectures.base import Family


class Granite(Family):
    name = "granite"
    hf_architectures = ("GraniteForCausalLM",)
    model_type = "granite"
    understood_keys = Family.understood_keys | {
        "embedding_multiplier", "attention_multiplier", "residual_multiplier", "logits_scaling"}

    def traits(self, hf: Any) -> dict[str, Any]:
        return {
            "embedding_scale": float(hf.embedding_multiplier),
            "attention_scale": float(hf.attention_multiplier),
            "residual_scale": float(hf.residual_multiplier),
            "logits_scale": 1.0 / float(hf.logits_scaling),
        }
