"""gpt-oss: Llama's pre-norm decoder with q/k/v/o biases, attention sinks (a learned logit per head in each softmax),
sliding-window and full layers alternating (`layer_types`), YaRN on every layer (its correction range not truncated
in the released configs), and a mixture of experts in every layer: a router with a bias picks the top k logits
(softmax over the chosen: Mixtral's rule), each expert a clamped SwiGLU with biases.

transformers holds each layer's experts transposed against every other family's stacks, gate and up interleaved by
column: gate_up_proj [experts, hidden, 2·ff] (gate at the even columns, up at the odd) and down_proj [experts, ff,
hidden]. They stream here as the other families' (`ModelSpec.experts`: gate_up [experts, 2·ff, hidden], each
expert's gate rows then its up rows; down [experts, hidden, ff]), the reorder declared on the tensor
(`TensorInfo.layout`), which transformers' own forward reads without. The hub's checkpoints hold the two stacks as
MXFP4 blocks (checkpoint.py pairs and dequantizes them as transformers does, into its layout).
"""

from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

from siliconvert.architectures.base import LLAMA_TENSORS, Experts, Family
from siliconvert.errors import CheckpointError

T = TypeVar("T")
EXPERTS = "model.layers.{layer}.mlp.experts"


class GptOss(Family):
    name = "gpt_oss"
    hf_architectures = ("GptOssForCausalLM",)
    model_type = "gpt_oss"
    tensor_names = LLAMA_TENSORS | {
        "model.layers.{layer}.self_attn.sinks": "attn_sinks",
        "model.layers.{layer}.mlp.router": "ffn_gate_inp",
        f"{EXPERTS}.gate_up_proj": "ffn_gate_up_exps",
        f"{EXPERTS}.down_proj": "ffn_down_exps",
    }
    understood_keys = Family.understood_keys | {
        "num_local_experts", "num_experts", "num_experts_per_tok", "swiglu_alpha", "swiglu_limit",
        "router_aux_loss_coef", "output_router_logits",  # training only
    }

    def traits(self, hf: Any) -> dict[str, Any]:
        return {"attention_sinks": True,
                "experts": Experts(count=int(hf.num_local_experts), used=int(hf.num_experts_per_tok),
                                   intermediate_size=int(hf.intermediate_size), normalize_topk=True, biases=True,
                                   clamped_swiglu=(float(hf.swiglu_alpha), float(hf.swiglu_limit)))}

    def _sparse(self, hf: Any, layer: int) -> bool:
        return True

    def model_names(self, tensors: dict[str, T], stack: Callable[[str, list[list[T]]], T], where: Any) -> dict[str, T]:
        """The expert stacks and their biases declared in the streamed layout (`TensorInfo.layout`: what turns
        transformers' parameter into it): the stacks transposed, gate_up's interleaved gate and up taken apart."""
        streamed: dict[str, T] = {}
        for name, info in super().model_names(tensors, stack, where).items():
            if name.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")):
                if len(info.shape) != 3:
                    raise CheckpointError(f"tensor {name!r} has shape {list(info.shape)}, not [experts, inputs, "
                                          "outputs]", where)
                experts, inputs, outputs = info.shape
                interleaved = ("interleaved",) if name.endswith("gate_up_proj") else ()
                info = replace(info, shape=(experts, outputs, inputs), layout=("transposed", *interleaved))
            elif name.endswith(".mlp.experts.gate_up_proj_bias"):
                info = replace(info, layout=("interleaved",))
            streamed[name] = info
        return streamed
