"""The MLX layout from the spec alone: the config.json keys mlx-lm's model file reads, and families or traits it
cannot express refused by name."""

from __future__ import annotations

import dataclasses

import pytest

from siliconvert.architectures import registry
from siliconvert.convert.mlx_arch import MLXArch
from siliconvert.errors import CheckpointError

CONFIG = {"architectures": ["LlamaForCausalLM"], "vocab_size": 96, "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "max_position_embeddings": 256, "rope_parameters": {"rope_type": "default", "rope_theta": 20000.0}}


def spec_of(**changes):
    config = CONFIG | changes
    return registry.for_config(config).spec(config)


def test_a_llama_config_is_what_mlx_lms_llama_reads():
    """The keys written over the source's config: θ wherever the source kept it, every layer's attention."""
    assert MLXArch(spec_of(), "config.json").config() == {
        "model_type": "llama", "rope_theta": 20000.0, "attention_bias": False,
        "layer_types": ["full_attention", "full_attention"], "sliding_window": None}


def test_a_family_without_an_mlx_layout_is_refused_by_name():
    with pytest.raises(CheckpointError, match="no MLX layout for the nope family"):
        MLXArch(dataclasses.replace(spec_of(), family="nope"), "config.json")


def test_faithful_is_refused_where_siliconvert_ships_no_model_file():
    with pytest.raises(CheckpointError, match="siliconvert ships no MLX model file for the llama family"):
        MLXArch(spec_of(), "config.json", "faithful")


GEMMA2 = CONFIG | {"architectures": ["Gemma2ForCausalLM"], "head_dim": 16, "query_pre_attn_scalar": 16,
                   "sliding_window": 32, "layer_types": ["sliding_attention", "full_attention"]}


def test_faithful_gemma2_names_its_model_file_and_each_layers_window():
    """siliconvert's gemma2.py reads the windows per layer (mlx-lm's gemma2 reads none, and is refused naming the
    opt-in)."""
    spec = registry.for_config(GEMMA2).spec(GEMMA2)
    config = MLXArch(spec, "config.json", "faithful").config()
    assert (config["model_file"], config["layer_types"], config["sliding_window"]) == (
        "gemma2.py", ["sliding_attention", "full_attention"], 32)
    with pytest.raises(CheckpointError, match=r"MLX \(mlx-lm's gemma2\) cannot honour the trait sliding_window: "
                                              r".*`model_file: faithful`"):
        MLXArch(spec, "config.json")
    # two window sizes: neither file runs them, and mlx-lm's refusal names no opt-in
    two = GEMMA2 | {"num_hidden_layers": 3, "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}
    spec = registry.for_config(two).spec(two)
    layers = (dataclasses.replace(spec.layers[0], window=16), *spec.layers[1:])
    with pytest.raises(CheckpointError, match=r"MLX \(siliconvert's gemma2.py\) cannot honour the trait "
                                              r"sliding_window: mlx-lm has one window size"):
        MLXArch(dataclasses.replace(spec, layers=layers), "config.json", "faithful")
    with pytest.raises(CheckpointError, match=r"the source slides a 16-token window$"):
        MLXArch(dataclasses.replace(spec, layers=layers), "config.json")


def test_a_rope_mlx_lm_cannot_compute_names_the_trait():
    dynamic = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}
    with pytest.raises(CheckpointError, match="cannot honour the trait rope_scaling") as raised:
        MLXArch(spec_of(rope_parameters=dynamic), "config.json")
    assert raised.value.where == "config.json"


LFM2 = {"architectures": ["Lfm2ForCausalLM"], "vocab_size": 96, "hidden_size": 64, "intermediate_size": 384,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
        "layer_types": ["conv", "full_attention", "conv", "conv"], "block_multiple_of": 96, "conv_L_cache": 3,
        "tie_word_embeddings": True, "norm_eps": 1e-5, "rope_parameters": {"rope_type": "default",
                                                                          "rope_theta": 1e6}}


def lfm2_spec(**changes):
    config = LFM2 | changes
    return registry.for_config(config).spec(config)


def test_an_lfm2_config_is_what_mlx_lms_lfm2_reads():
    """mlx-lm's lfm2 needs block_dim, which transformers does not save, and rounds block_ff_dim up to
    block_multiple_of even without a multiplier (transformers does not): the width goes whole, the auto-adjust off
    (transformers reads block_ff_dim as intermediate_size, so both read 288 rows: ⅔ of 384, rounded up to 96)."""
    config = MLXArch(lfm2_spec(), "config.json").config()
    assert config == {
        "model_type": "lfm2", "rope_theta": 1e6, "block_dim": 64, "block_ff_dim": 288,
        "block_auto_adjust_ff_dim": False, "block_multiple_of": 1, "block_ffn_dim_multiplier": 1.0, "norm_eps": 1e-5,
        "conv_L_cache": 3, "conv_bias": False, "full_attn_idxs": [1], "layer_types": ["conv", "full_attention", "conv",
                                                                                       "conv"]}
    from mlx_lm.models.lfm2 import MLP, ModelArgs

    args = ModelArgs.from_dict(config | {"vocab_size": 96, "hidden_size": 64, "num_hidden_layers": 4,
                                         "num_attention_heads": 4, "num_key_value_heads": 2,
                                         "max_position_embeddings": 256})
    mlp = MLP(args.block_dim, args.block_ff_dim, args.block_multiple_of, args.block_auto_adjust_ff_dim,
              args.block_ffn_dim_multiplier)
    assert mlp.w1.weight.shape == (288, 64) and args.full_attn_idxs == [1]


def test_a_mixer_a_layout_cannot_run_is_refused_by_name():
    """Llama's model file runs attention only; mlx-lm's lfm2 indexes one layer of each mixer."""
    short_conv_in_llama = dataclasses.replace(lfm2_spec(), family="llama", qk_norm=None)
    with pytest.raises(CheckpointError, match=r"cannot honour the trait short_conv: .* layers \[0, 2, 3\] are "
                                              "short_conv"):
        MLXArch(short_conv_in_llama, "config.json")
    with pytest.raises(CheckpointError, match=r"cannot honour the trait short_conv: .* no short_conv layer"):
        MLXArch(lfm2_spec(layer_types=["full_attention"] * 4), "config.json")
    with pytest.raises(CheckpointError, match=r"cannot honour the trait attention: .* no attention layer"):
        MLXArch(lfm2_spec(layer_types=["conv"] * 4), "config.json")


@pytest.mark.parametrize(("changes", "trait"), [
    ({"tie_word_embeddings": False}, "tie_word_embeddings"),  # mlx-lm's lfm2 has no separate head
    ({"head_dim": 32}, "head_dim"),  # mlx-lm's lfm2 sizes heads as hidden / heads
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}}, "rope_scaling"),
])
def test_what_mlx_lms_lfm2_cannot_run_is_refused_by_name(changes, trait):
    with pytest.raises(CheckpointError, match=f"cannot honour the trait {trait}"):
        MLXArch(lfm2_spec(**changes), "config.json")


QWEN3_5 = {"architectures": ["Qwen3_5ForCausalLM"], "model_type": "qwen3_5_text", "vocab_size": 96,
           "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
           "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256, "linear_num_key_heads": 2,
           "linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 8,
           "linear_conv_kernel_dim": 4, "layer_types": ["linear_attention"] * 3 + ["full_attention"],
           "rope_parameters": {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                               "mrope_section": [1, 1, 0], "mrope_interleaved": True}}


def qwen3_5_spec(**changes):
    config = QWEN3_5 | changes
    return registry.for_config(config).spec(config)


def test_a_text_only_qwen3_5_config_is_what_mlx_lms_qwen3_5_reads():
    """mlx-lm has no qwen3_5_text file: its qwen3_5 reads the flat config as its text model's. It takes θ and the
    rotated share from rope_parameters alone (read as the rope's scaling too, so none there), the attention layers as
    a period, the gated delta rule's sizes as transformers names them."""
    config = MLXArch(qwen3_5_spec(), "config.json").config()
    assert config == {
        "model_type": "qwen3_5", "rope_theta": 1e7, "attention_bias": False, "full_attention_interval": 4,
        "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
        "linear_value_head_dim": 8, "linear_conv_kernel_dim": 4,
        "rope_parameters": {"type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25},
        "layer_types": ["linear_attention"] * 3 + ["full_attention"]}


@pytest.mark.parametrize(("changes", "trait"), [
    # attention in layers 1 and 4: mlx-lm's qwen3_5 puts it in every n-th layer
    ({"num_hidden_layers": 5, "layer_types": ["linear_attention", "full_attention", "linear_attention",
                                              "linear_attention", "full_attention"]}, "gated_delta"),
    # a rope scaling: mlx-lm's qwen3_5 reads rope_parameters as its scaling, and would not apply transformers' YaRN
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 128,
                          "rope_theta": 1e7, "partial_rotary_factor": 0.25}}, "rope_scaling"),
])
def test_what_mlx_lms_qwen3_5_cannot_run_is_refused_by_name(changes, trait):
    with pytest.raises(CheckpointError, match=f"cannot honour the trait {trait}"):
        MLXArch(qwen3_5_spec(**changes), "config.json")


def gemma4_spec(**changes):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from families import FAMILY_CASES
    from transformers import AutoConfig

    config = AutoConfig.for_model("gemma4_text", **({"vocab_size": 1024, "hidden_size": 128, "intermediate_size": 384,
                                                     "num_attention_heads": 4, "num_key_value_heads": 2}
                                                    | FAMILY_CASES["gemma4_text"][1] | changes)).to_dict()
    config["architectures"] = ["Gemma4ForCausalLM"]
    return registry.for_config(config).spec(config)


def test_a_gemma4_config_is_what_mlx_lms_gemma4_text_reads():
    """mlx-lm's gemma4_text defaults global_head_dim to 512 (transformers 5.25 saves per_layer_config in its place):
    the global layers' sizes, the kv-shared layers and each kind's rope are written out."""
    config = MLXArch(gemma4_spec(), "config.json").config()
    assert config == {
        "model_type": "gemma4_text", "rope_theta": 1_000_000.0, "global_head_dim": 64, "num_global_key_value_heads": 1,
        "attention_k_eq_v": True, "num_kv_shared_layers": 2, "use_double_wide_mlp": True,
        "hidden_size_per_layer_input": 16, "vocab_size_per_layer_input": 1024, "final_logit_softcapping": 30.0,
        "enable_moe_block": False,
        "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                               "rope_theta": 1_000_000.0}},
        "layer_types": ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention",
                        "full_attention"], "sliding_window": 24}


def test_layers_apart_mlx_lm_would_build_otherwise_are_refused_by_name():
    spec = gemma4_spec()
    # a sliding layer with the global layers' one k/v head: mlx-lm gives those to k_eq_v layers only
    layers = (dataclasses.replace(spec.layers[0], kv_heads=1), *spec.layers[1:])
    with pytest.raises(CheckpointError, match="trait per_layer_kv_heads"):
        MLXArch(dataclasses.replace(spec, layers=layers), "config.json")
    # and a model file without Gemma 4's keys refuses them all
    llama = spec_of()
    with pytest.raises(CheckpointError, match="trait kv_shared_layers"):
        MLXArch(dataclasses.replace(llama, layers=(llama.layers[0], dataclasses.replace(llama.layers[1], kv_source=0))),
                "config.json")
