"""config.json's values checked against their types, their ranges and the weights, before anything is sized by
them."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from siliconvert.config_check import MAX_POSITIONS, check_config
from siliconvert.errors import CheckpointError

CONFIG = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128, "rope_theta": 1e4,
          "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "model_type": "llama", "dtype": "bfloat16",
          "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": [2, 3]}
WHERE = Path("config.json")


def tensors(layers: int = 2) -> list[SimpleNamespace]:
    """The shapes of a 2-layer Llama of CONFIG's sizes."""
    shaped = [SimpleNamespace(name="model.embed_tokens.weight", shape=(96, 32)),
              SimpleNamespace(name="lm_head.weight", shape=(96, 32))]
    for layer in range(layers):
        shaped += [SimpleNamespace(name=f"model.layers.{layer}.self_attn.q_proj.weight", shape=(32, 32)),
                   SimpleNamespace(name=f"model.layers.{layer}.mlp.up_proj.weight", shape=(64, 32))]
    return shaped


def test_a_consistent_config_passes():
    check_config(CONFIG, tensors(), WHERE)
    check_config(CONFIG | {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
                 tensors(), WHERE)


@pytest.mark.parametrize(("changes", "message"), [
    ({"hidden_size": "32"}, "hidden_size must be an integer"),
    ({"num_hidden_layers": True}, "num_hidden_layers must be an integer"),
    ({"num_attention_heads": 0}, "num_attention_heads must be at least 1"),
    ({"max_position_embeddings": MAX_POSITIONS + 1}, f"max_position_embeddings must be between 1 and {MAX_POSITIONS}"),
    ({"rms_norm_eps": -1e-5}, "rms_norm_eps must be a positive finite number"),
    ({"rope_theta": float("inf")}, "rope_theta must be a positive finite number"),
    ({"tie_word_embeddings": "no"}, "tie_word_embeddings must be true or false"),
    ({"model_type": 7}, "model_type must be a string"),
    ({"dtype": "float13"}, "dtype 'float13' names no torch dtype"),
    ({"layer_types": ["full_attention"]}, "layer_types lists 1 layers, num_hidden_layers is 2"),
    ({"architectures": "LlamaForCausalLM"}, "architectures must be a list of class names"),
    ({"eos_token_id": [2, "3"]}, "eos_token_id must be a token id or a list of them"),
    ({"mlp_only_layers": [0, 1.5]}, "mlp_only_layers must be a list of layer indices"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling.low_freq_factor is required"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "beta_fast": "32"}},
     "rope_parameters.beta_fast must be a finite number"),
])
def test_wrong_types_and_ranges_name_the_key(changes, message):
    with pytest.raises(CheckpointError, match=message) as raised:
        check_config(CONFIG | changes, tensors(), WHERE)
    assert raised.value.where == str(WHERE)


@pytest.mark.parametrize(("changes", "layers", "message"), [
    ({"vocab_size": 1_000_000}, 2, "vocab_size is 1000000, larger than any tensor dimension in the weights "
                                   r"\(largest 96\)"),
    ({"head_dim": 32}, 2, "num_attention_heads × head_dim is 128"),
    ({"num_hidden_layers": 1_000_000_000}, 2, "num_hidden_layers is 1000000000, but the weights hold 2 layers"),
    ({}, 1, "num_hidden_layers is 2, but the weights hold 1 layers"),
])
def test_counts_beyond_what_the_weights_hold_are_refused(changes, layers, message):
    with pytest.raises(CheckpointError, match=message):
        check_config(CONFIG | changes, tensors(layers), WHERE)


def test_a_model_with_experts_everywhere_needs_no_dense_mlp_tensor():
    config = CONFIG | {"intermediate_size": 4096, "moe_intermediate_size": 64, "num_experts": 0}
    check_config(config, tensors(), WHERE)
    with pytest.raises(CheckpointError, match="intermediate_size"):
        check_config(config | {"moe_intermediate_size": None}, tensors(), WHERE)
