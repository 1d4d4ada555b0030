"""Granite 4.0-H (GraniteMoeHybrid): Mamba2 layers around a few attention layers (`layer_types`; configs name them
"mamba" / "attention", transformers ≥ 5.25 "linear_attention" / "full_attention"), Granite's μP multipliers,
attention without positions unless `position_embedding_type` is "rope" (NoPE in the released models). Every layer
runs `shared_mlp` (a SwiGLU whose gate and up rows are one input_linear); with `num_local_experts` > 0 the experts
(top-k of the router's logits, softmax over the chosen) add their output to it.

The hub's files name the experts as IBM trained them (input_linear / output_linear, router.layer); they are read
under transformers' names. Nemotron-H and Falcon-H1 arrange Mamba2 otherwise and are refused naming the trait."""

from typing import Any, ClassVar

from siliconvert.architectures.base import EXPERT_TENSORS, LLAMA_TENSORS, MAMBA2_TENSORS, Experts, Mamba2, Mixer
from siliconvert.architectures.granite import Granite
from siliconvert.errors import CheckpointError


class GraniteHybrid(Granite):
    name = "granite_hybrid"
    hf_architectures = ("GraniteMoeHybridForCausalLM",)
    model_type = "granitemoehybrid"
    tensor_names: ClassVar[dict[str, str]] = (
        {template: role for template, role in LLAMA_TENSORS.items() if not template.endswith(
            ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))}
        | MAMBA2_TENSORS
        | {"model.layers.{layer}.shared_mlp.input_linear": "ffn_gate_up",
           "model.layers.{layer}.shared_mlp.output_linear": "ffn_down",
           "model.layers.{layer}.block_sparse_moe.router": "ffn_gate_inp",
           "model.layers.{layer}.block_sparse_moe.experts.gate_up_proj": EXPERT_TENSORS[
               "model.layers.{layer}.mlp.experts.gate_up_proj"],
           "model.layers.{layer}.block_sparse_moe.experts.down_proj": EXPERT_TENSORS[
               "model.layers.{layer}.mlp.experts.down_proj"]})
    renamed = ((r"\.block_sparse_moe\.input_linear\.weight$", ".block_sparse_moe.experts.gate_up_proj"),
               (r"\.block_sparse_moe\.output_linear\.weight$", ".block_sparse_moe.experts.down_proj"),
               (r"\.block_sparse_moe\.router\.layer\.weight$", ".block_sparse_moe.router.weight"))
    understood_keys = Granite.understood_keys | {
        "mamba_n_heads", "mamba_n_groups", "mamba_d_state", "mamba_d_head", "mamba_d_conv", "mamba_expand",
        "mamba_conv_bias", "mamba_proj_bias", "time_step_limit", "position_embedding_type", "num_local_experts",
        "num_experts_per_tok", "shared_intermediate_size", "layers_block_type",
        "mamba_chunk_size", "output_router_logits", "router_aux_loss_coef",  # kernels' chunking; training only
    }
    mixer_layer_types: ClassVar[dict[str, Mixer]] = {"linear_attention": "mamba2"}

    def _intermediate_size(self, hf: Any) -> int:
        return int(hf.shared_intermediate_size)

    def _uses_rope(self, hf: Any) -> list[bool]:
        return [hf.position_embedding_type == "rope"] * hf.num_hidden_layers

    def _sparse(self, hf: Any, layer: int) -> bool:
        return int(hf.num_local_experts or 0) > 0

    def traits(self, hf: Any) -> dict[str, Any]:
        if hf.position_embedding_type not in (None, "nope", "rope"):
            raise CheckpointError(f"position_embedding_type {hf.position_embedding_type!r} is not supported "
                                  "(rope, nope)")
        low, high = hf.time_step_limit or (0.0, float("inf"))
        mamba = Mamba2(heads=int(hf.mamba_n_heads), head_dim=int(hf.mamba_d_head), groups=int(hf.mamba_n_groups),
                       state_size=int(hf.mamba_d_state), conv_kernel=int(hf.mamba_d_conv),
                       conv_bias=bool(hf.mamba_conv_bias), proj_bias=bool(hf.mamba_proj_bias),
                       time_step_limit=(float(low), float(high)))
        experts = None
        if int(hf.num_local_experts or 0) > 0:
            experts = Experts(count=int(hf.num_local_experts), used=int(hf.num_experts_per_tok),
                              intermediate_size=int(hf.intermediate_size), normalize_topk=True, beside_dense=True)
        return super().traits(hf) | {"mamba2": mamba, "experts": experts, "fused_gate_up": True}


class UnsupportedHybrid(GraniteHybrid):
    """Mamba2 hybrids whose layer structure no writer runs: refused at once, naming the trait."""

    trait: ClassVar[str]
    why: ClassVar[str]

    def spec(self, config: dict[str, Any], where: str = "config.json") -> Any:
        raise CheckpointError(f"no target honours the trait {self.trait}: {self.why}", where)


class NemotronH(UnsupportedHybrid):
    name = "nemotron_h"
    hf_architectures = ("NemotronHForCausalLM",)
    model_type = "nemotron_h"
    trait = "single_block_layers"
    why = ("Nemotron-H's layers are each one block (Mamba2, attention, a relu² MLP or experts, after "
           "`hybrid_override_pattern`), not a mixer followed by an MLP")


class FalconH1(UnsupportedHybrid):
    name = "falcon_h1"
    hf_architectures = ("FalconH1ForCausalLM",)
    model_type = "falcon_h1"
    trait = "parallel_mixers"
    why = "Falcon-H1 runs attention and Mamba2 side by side in every layer and adds their outputs (with μP multipliers)"
