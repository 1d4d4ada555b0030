"""Gemma 3 (text): Gemma 2 plus RMSNorm (1 + w) of q and k per head, and a rope per layer type
(local layers θ 10 000, global layers θ 1 000 000 with their own scaling); soft-caps off by default.

Gemma3ForConditionalGeneration checkpoints (4B and up: a vision tower beside the language model) convert
their language model; the vision tower and projector are dropped, with a warning that says so."""

import warnings
from dataclasses import replace
from typing import Any, TypeVar

from siliconvert.architectures.base import ConfigWarning
from siliconvert.architectures.gemma2 import SANDWICH_TENSORS, Gemma2
from siliconvert.errors import CheckpointError

T = TypeVar("T")
# Where the language model's tensors sit in a multimodal checkpoint (transformers ≥ 4.52, then older) →
# the names Gemma3ForCausalLM gives them
LANGUAGE_MODEL_PREFIXES = {"model.language_model.": "model.", "language_model.model.": "model.",
                           "language_model.lm_head.": "lm_head."}
OTHER_TOWERS = ("model.vision_tower.", "vision_tower.", "model.multi_modal_projector.", "multi_modal_projector.")
# Keys of the outer config that belong to the language model when its text_config leaves them out
SHARED_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "dtype", "torch_dtype")
# ... and those the outer config decides: the composite model ties its head by its own flag
OUTER_KEYS = ("tie_word_embeddings",)


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


class Gemma3Multimodal(Gemma3):
    """Gemma3ForConditionalGeneration: its language model, as Gemma3ForCausalLM."""

    hf_architectures = ("Gemma3ForConditionalGeneration",)
    model_type = "gemma3"

    def decoder(self, config: dict[str, Any], tensors: dict[str, T], where: Any) -> tuple[dict[str, Any], dict[str, T]]:
        text = config.get("text_config")
        if not isinstance(text, dict):
            raise CheckpointError("Gemma3ForConditionalGeneration without a text_config object", where)
        shared = {key: config[key] for key in SHARED_KEYS if key in config and key not in text}
        shared |= {key: config[key] for key in OUTER_KEYS if key in config}
        decoder_config = {**text, **shared, "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text"}
        kept: dict[str, T] = {}
        dropped = 0
        for name, info in tensors.items():
            if name.startswith(OTHER_TOWERS):
                dropped += 1
                continue
            prefix = next((p for p in LANGUAGE_MODEL_PREFIXES if name.startswith(p)), None)
            if prefix is None:
                raise CheckpointError(f"tensor {name!r} belongs to neither the language model nor the vision "
                                      "tower", where)
            renamed = LANGUAGE_MODEL_PREFIXES[prefix] + name[len(prefix):]
            kept[renamed] = replace(info, name=renamed)
        warnings.warn(f"{where}: Gemma3ForConditionalGeneration: converting its language model "
                      f"(Gemma3ForCausalLM); the vision tower and projector ({dropped} tensors) are dropped",
                      ConfigWarning, stacklevel=2)
        return decoder_config, kept
