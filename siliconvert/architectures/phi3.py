"""Phi-3 / Phi-4-mini: q, k, v fused in one qkv_proj and gate, up in one gate_up_proj; partial rotary
(`partial_rotary_factor`) and LongRoPE (`short_factor` / `long_factor`) come through the rope description."""

from typing import Any

from siliconvert.architectures.base import LLAMA_TENSORS, Family

_FUSED = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
_PHI3_TENSORS = {k: v for k, v in LLAMA_TENSORS.items() if k.rsplit(".", 1)[-1] not in _FUSED} | {
    "model.layers.{layer}.self_attn.qkv_proj": "attn_qkv",
    "model.layers.{layer}.mlp.gate_up_proj": "ffn_gate_up",
}


class Phi3(Family):
    name = "phi3"
    hf_architectures = ("Phi3ForCausalLM",)
    model_type = "phi3"
    tensor_names = _PHI3_TENSORS
    understood_keys = Family.understood_keys | {"partial_rotary_factor", "original_max_position_embeddings"}

    def traits(self, hf: Any) -> dict[str, Any]:
        return {"fused_qkv": True, "fused_gate_up": True}
