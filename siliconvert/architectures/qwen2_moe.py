"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2's attention (biases on q, k, v) and Qwen3-MoE's sparse layers,
plus a shared expert in each: a gated MLP every token goes through, weighted by a sigmoid of its own router."""

from typing import Any

from siliconvert.architectures.base import EXPERT_TENSORS, LLAMA_TENSORS, SHARED_EXPERT_TENSORS, Experts
from siliconvert.architectures.qwen3_moe import Qwen3Moe


class Qwen2Moe(Qwen3Moe):
    name = "qwen2_moe"
    hf_architectures = ("Qwen2MoeForCausalLM",)
    model_type = "qwen2_moe"
    all_layers_slide = False  # its config's layer_types say which layers slide (as Qwen2's)
    tensor_names = LLAMA_TENSORS | EXPERT_TENSORS | SHARED_EXPERT_TENSORS  # no q/k norms
    understood_keys = Qwen3Moe.understood_keys | {"shared_expert_intermediate_size", "qkv_bias"}

    def traits(self, hf: Any) -> dict[str, Any]:
        if hf.num_experts == 0:
            return {}
        return {"experts": Experts(count=int(hf.num_experts), used=int(hf.num_experts_per_tok),
                                   intermediate_size=int(hf.moe_intermediate_size),
                                   normalize_topk=bool(hf.norm_topk_prob),
                                   shared_intermediate_size=int(hf.shared_expert_intermediate_size))}

    def _attention_biases(self, hf: Any) -> tuple[bool, bool]:
        return bool(hf.qkv_bias), False
