"""LFM2 (Liquid AI): gated short convolutions in most layers, attention in the others (`layer_types`, or the older
`full_attn_idxs`); q/k RMSNorm per head; the final norm named `embedding_norm`; a SwiGLU MLP whose width
transformers derives from `intermediate_size` (⅔ of it, × `block_ffn_dim_multiplier`, rounded up to
`block_multiple_of`) when `block_auto_adjust_ff_dim` is set.

Configs written by Liquid's own code (the hub's LFM2-350M…2.6B) repeat sizes under their own names (`block_dim`,
`conv_dim`, `num_heads`, `theta`, ...); transformers reads `block_ff_dim` and `tie_embedding` and ignores the rest,
so those are checked against the sizes transformers uses and otherwise not read."""

from typing import Any, ClassVar

from siliconvert.architectures.base import SHORT_CONV_TENSORS, Family, Mixer, ShortConv
from siliconvert.errors import CheckpointError

# Liquid's names for sizes transformers reads under its own: the name → transformers' attribute it must equal
LIQUID_ALIASES = {"block_dim": "hidden_size", "conv_dim": "hidden_size", "conv_dim_out": "hidden_size",
                  "num_heads": "num_attention_heads", "block_norm_eps": "norm_eps"}
# Liquid's training settings, which the forward does not read
LIQUID_TRAINING_KEYS = frozenset({"block_mlp_init_scale", "block_out_init_scale", "block_use_xavier_init",
                                  "conv_use_xavier_init", "block_use_swiglu", "use_pos_enc", "theta",
                                  "block_ff_dim", "tie_embedding"})


class Lfm2(Family):
    name = "lfm2"
    hf_architectures = ("Lfm2ForCausalLM",)
    model_type = "lfm2"
    tensor_names: ClassVar[dict[str, str]] = {
        "model.embed_tokens": "token_embd",
        "model.embedding_norm": "output_norm",  # applied after the last layer, despite its name
        "lm_head": "output",
        "model.layers.{layer}.operator_norm": "attn_norm",  # before either mixer
        "model.layers.{layer}.self_attn.q_proj": "attn_q",
        "model.layers.{layer}.self_attn.k_proj": "attn_k",
        "model.layers.{layer}.self_attn.v_proj": "attn_v",
        "model.layers.{layer}.self_attn.out_proj": "attn_output",
        "model.layers.{layer}.self_attn.q_layernorm": "attn_q_norm",
        "model.layers.{layer}.self_attn.k_layernorm": "attn_k_norm",
        **SHORT_CONV_TENSORS,
        "model.layers.{layer}.ffn_norm": "ffn_norm",
        "model.layers.{layer}.feed_forward.w1": "ffn_gate",
        "model.layers.{layer}.feed_forward.w3": "ffn_up",
        "model.layers.{layer}.feed_forward.w2": "ffn_down",
    }
    understood_keys = (Family.understood_keys | {"norm_eps", "conv_bias", "conv_L_cache", "block_multiple_of",
                                                 "block_ffn_dim_multiplier", "block_auto_adjust_ff_dim",
                                                 "full_attn_idxs"} | set(LIQUID_ALIASES) | LIQUID_TRAINING_KEYS)
    mixer_layer_types: ClassVar[dict[str, Mixer]] = {"conv": "short_conv"}

    def _intermediate_size(self, hf: Any) -> int:
        size = int(hf.intermediate_size)
        if hf.block_auto_adjust_ff_dim:
            size = int(2 * size / 3)
            if hf.block_ffn_dim_multiplier is not None:
                size = int(hf.block_ffn_dim_multiplier * size)
                multiple = hf.block_multiple_of
                size = multiple * ((size + multiple - 1) // multiple)
        return size

    def traits(self, hf: Any) -> dict[str, Any]:
        for alias, attribute in LIQUID_ALIASES.items():
            value = getattr(hf, alias, None)
            if value is not None and value != getattr(hf, attribute):
                raise CheckpointError(f"{alias} is {value} but {attribute} is {getattr(hf, attribute)}; "
                                      "transformers reads only the latter")
        if int(hf.conv_L_cache) < 1:
            raise CheckpointError(f"conv_L_cache {hf.conv_L_cache}: a convolution needs at least one tap")
        return {"qk_norm": "head", "short_conv": ShortConv(kernel=int(hf.conv_L_cache), bias=bool(hf.conv_bias))}
