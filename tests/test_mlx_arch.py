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


def test_a_rope_mlx_lm_cannot_compute_names_the_trait():
    dynamic = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}
    with pytest.raises(CheckpointError, match="cannot honour the trait rope_scaling") as raised:
        MLXArch(spec_of(rope_parameters=dynamic), "config.json")
    assert raised.value.where == "config.json"
