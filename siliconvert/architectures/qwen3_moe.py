"""Qwen3-MoE: Qwen3 with a mixture of experts in place of the MLP in the layers `decoder_sparse_step` picks
(every layer by default) outside `mlp_only_layers`; the chosen experts' weights renormalised per `norm_topk_prob`."""

from typing import Any, ClassVar

from siliconvert.architectures.base import EXPERT_TENSORS, Experts, Family
from siliconvert.architectures.qwen3 import Qwen3

EXPERT = "model.layers.{layer}.mlp.experts.{expert}"


class Qwen3Moe(Qwen3):
    name = "qwen3_moe"
    hf_architectures = ("Qwen3MoeForCausalLM",)
    model_type = "qwen3_moe"
    # no layer_types: with use_sliding_window its attention slides in every layer (the config nulls the window
    # otherwise)
    all_layers_slide = True
    tensor_names = Qwen3.tensor_names | EXPERT_TENSORS
    expert_parts: ClassVar[dict[str, tuple[str, ...]]] = {
        "model.layers.{layer}.mlp.experts.gate_up_proj": (f"{EXPERT}.gate_proj.weight", f"{EXPERT}.up_proj.weight"),
        "model.layers.{layer}.mlp.experts.down_proj": (f"{EXPERT}.down_proj.weight",),
    }
    understood_keys = Family.understood_keys | {
        "num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
        "decoder_sparse_step", "mlp_only_layers",
        "router_aux_loss_coef", "output_router_logits",  # training only
    }

    def traits(self, hf: Any) -> dict[str, Any]:
        experts = None
        if hf.num_experts > 0:
            experts = Experts(count=int(hf.num_experts), used=int(hf.num_experts_per_tok),
                              intermediate_size=int(hf.moe_intermediate_size), normalize_topk=bool(hf.norm_topk_prob))
        return super().traits(hf) | {"experts": experts}

    def _sparse(self, hf: Any, layer: int) -> bool:
        # as Qwen3MoeDecoderLayer chooses its MLP
        return (layer not in (hf.mlp_only_layers or []) and hf.num_experts > 0
                and (layer + 1) % hf.decoder_sparse_step == 0)
