"""OLMo 2: norms after attention and MLP only (no pre-norms), and RMSNorm of q and k over the whole projection."""

from typing import Any

from siliconvert.architectures.base import LLAMA_TENSORS, Family

_POST_NORM_TENSORS = {k: v for k, v in LLAMA_TENSORS.items() if not k.endswith("input_layernorm")} | {
    "model.layers.{layer}.post_attention_layernorm": "post_attention_norm",
    "model.layers.{layer}.post_feedforward_layernorm": "post_ffw_norm",
    "model.layers.{layer}.self_attn.q_norm": "attn_q_norm",
    "model.layers.{layer}.self_attn.k_norm": "attn_k_norm",
}


class Olmo2(Family):
    name = "olmo2"
    hf_architectures = ("Olmo2ForCausalLM",)
    model_type = "olmo2"
    tensor_names = _POST_NORM_TENSORS

    def traits(self, hf: Any) -> dict[str, Any]:
        return {"norm_placement": "post", "qk_norm": "projection"}
