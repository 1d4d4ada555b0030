"""Gemma 3 (text): Gemma 2 plus RMSNorm (1 + w) of q and k per head, and a rope per layer type
(local layers θ 10 000, global layers θ 1 000 000 with their own scaling); soft-caps off by default."""

from typing import Any

from siliconvert.architectures.gemma2 import SANDWICH_TENSORS, Gemma2
from siliconvert.errors import CheckpointError


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
