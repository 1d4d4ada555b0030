"""Qwen3: Llama plus RMSNorm of q and k per head; head_dim from the config (heads × head_dim ≠ hidden)."""

from typing import Any

from siliconvert.architectures.base import LLAMA_TENSORS, Family


class Qwen3(Family):
    name = "qwen3"
    hf_architectures = ("Qwen3ForCausalLM",)
    model_type = "qwen3"
    tensor_names = LLAMA_TENSORS | {
        "model.layers.{layer}.self_attn.q_norm": "attn_q_norm",
        "model.layers.{layer}.self_attn.k_norm": "attn_k_norm",
    }

    def traits(self, hf: Any) -> dict[str, Any]:
        return {"qk_norm": "head"}
