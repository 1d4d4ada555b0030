"""OLMoE: Llama's pre-norm decoder with RMSNorm of q and k over the whole projection (as OLMo 2) and a mixture of
experts in every layer, the chosen experts' weights not renormalised unless `norm_topk_prob`."""

from typing import Any, ClassVar

from siliconvert.architectures.base import EXPERT_TENSORS, LLAMA_TENSORS, Experts, Family
from siliconvert.errors import CheckpointError

EXPERT = "model.layers.{layer}.mlp.experts.{expert}"


class Olmoe(Family):
    name = "olmoe"
    hf_architectures = ("OlmoeForCausalLM",)
    model_type = "olmoe"
    tensor_names = LLAMA_TENSORS | EXPERT_TENSORS | {
        "model.layers.{layer}.self_attn.q_norm": "attn_q_norm",
        "model.layers.{layer}.self_attn.k_norm": "attn_k_norm",
    }
    expert_parts: ClassVar[dict[str, tuple[str, ...]]] = {
        "model.layers.{layer}.mlp.experts.gate_up_proj": (f"{EXPERT}.gate_proj.weight", f"{EXPERT}.up_proj.weight"),
        "model.layers.{layer}.mlp.experts.down_proj": (f"{EXPERT}.down_proj.weight",),
    }
    understood_keys = Family.understood_keys | {
        "num_experts", "num_local_experts", "num_experts_per_tok", "norm_topk_prob", "clip_qkv",
        "router_aux_loss_coef", "output_router_logits",  # training only
    }

    def traits(self, hf: Any) -> dict[str, Any]:
        if hf.clip_qkv is not None:  # no target clamps q, k and v
            raise CheckpointError(f"clip_qkv ({hf.clip_qkv}) is not supported", "config.json")
        return {"qk_norm": "projection",
                "experts": Experts(count=int(hf.num_experts), used=int(hf.num_experts_per_tok),
                                   intermediate_size=int(hf.intermediate_size), normalize_topk=bool(hf.norm_topk_prob))}

    def _sparse(self, hf: Any, layer: int) -> bool:
        return True
