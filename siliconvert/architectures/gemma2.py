"""Gemma 2: norms as (1 + w), sandwich norms, embeddings × √hidden, GeGLU, attention scaled by
query_pre_attn_scalar^-½, soft-capped attention scores and logits, sliding and full layers alternating."""

import math
from typing import Any, ClassVar

from siliconvert.architectures.base import LLAMA_TENSORS, Family

SANDWICH_TENSORS = LLAMA_TENSORS | {
    "model.layers.{layer}.post_attention_layernorm": "post_attention_norm",
    "model.layers.{layer}.pre_feedforward_layernorm": "ffn_norm",
    "model.layers.{layer}.post_feedforward_layernorm": "post_ffw_norm",
}


class Gemma2(Family):
    name = "gemma2"
    hf_architectures = ("Gemma2ForCausalLM",)
    model_type = "gemma2"
    tensor_names: ClassVar[dict[str, str]] = SANDWICH_TENSORS
    understood_keys = Family.understood_keys | {"hidden_activation", "query_pre_attn_scalar"}

    def traits(self, hf: Any) -> dict[str, Any]:
        return {
            "norm_offset": 1.0,
            "norm_placement": "sandwich",
            # transformers multiplies by √hidden as a tensor of the activations' dtype (float32 here)
            "embedding_scale": math.sqrt(hf.hidden_size),
            "attention_scale": hf.query_pre_attn_scalar**-0.5,
            "attn_softcap": hf.attn_logit_softcapping,
            "final_softcap": hf.final_logit_softcapping,
        }
