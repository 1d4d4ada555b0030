"""Mixtral: Mistral with a mixture of experts in every layer's MLP (the top-k of the router's logits, softmax
over the chosen). The hub's files keep the original names (`block_sparse_moe`, experts' w1 = gate, w3 = up,
w2 = down), read as transformers 5 renames them."""

from typing import Any, ClassVar

from siliconvert.architectures.base import EXPERT_TENSORS, Experts, Family
from siliconvert.architectures.mistral import Mistral

EXPERT = "model.layers.{layer}.mlp.experts.{expert}"


class Mixtral(Mistral):
    name = "mixtral"
    hf_architectures = ("MixtralForCausalLM",)
    model_type = "mixtral"
    tensor_names = Mistral.tensor_names | EXPERT_TENSORS
    renamed = ((r"\.block_sparse_moe\.", ".mlp."),)
    expert_parts: ClassVar[dict[str, tuple[str, ...]]] = {
        "model.layers.{layer}.mlp.experts.gate_up_proj": (f"{EXPERT}.w1.weight", f"{EXPERT}.w3.weight"),
        "model.layers.{layer}.mlp.experts.down_proj": (f"{EXPERT}.w2.weight",),
    }
    understood_keys = Family.understood_keys | {
        "num_local_experts", "num_experts_per_tok",
        "router_aux_loss_coef", "output_router_logits", "router_jitter_noise",  # training only
    }

    def traits(self, hf: Any) -> dict[str, Any]:
        # softmax over the top-k logits is softmax over all of them renormalised over the top k
        return {"experts": Experts(count=int(hf.num_local_experts), used=int(hf.num_experts_per_tok),
                                   intermediate_size=int(hf.intermediate_size), normalize_topk=True)}

    def _sparse(self, hf: Any, layer: int) -> bool:
        return True
