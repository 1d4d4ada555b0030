"""The GGUF layout's own arithmetic: RoPE row orders as llama.cpp permutes them, and the rope factors and
scales llama.cpp reads from the file instead of computing."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import siliconvert.convert.gguf_arch as gguf_arch
from siliconvert.architectures import registry


def test_llama3_rope_factors_match_transformers() -> None:
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config = {"architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 256, "intermediate_size": 512,
              "num_hidden_layers": 1, "num_attention_heads": 4, "max_position_embeddings": 131072,
              "rope_parameters": rope}
    spec = registry.for_config(config).spec(config)
    hf_config = LlamaConfig(**{k: v for k, v in config.items() if k != "architectures"})
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config)
    plain = 1.0 / rope["rope_theta"] ** (np.arange(0, spec.head_dim, 2) / spec.head_dim)
    np.testing.assert_allclose(gguf_arch.llama3_rope_factors(spec), plain / inv_freq.numpy(), rtol=1e-5)


def test_rope_row_orders_interleave_each_heads_halves_and_back():
    rows = np.arange(16).reshape(8, 2)  # 2 heads of 4 rows
    adjacent = gguf_arch.rope_pairs_adjacent(rows, heads=2)
    assert adjacent[:, 0].tolist() == [0, 4, 2, 6, 8, 12, 10, 14]
    np.testing.assert_array_equal(gguf_arch.rope_pairs_split(adjacent, heads=2), rows)


def test_longrope_attention_factor_is_the_files_else_transformers_default():
    assert gguf_arch.longrope_attention_factor({"attention_factor": 1.25, "factor": 32.0}) == 1.25
    expected = math.sqrt(1 + math.log(32.0) / math.log(4096))
    assert gguf_arch.longrope_attention_factor({"factor": 32.0, "original_max_position_embeddings": 4096}) == \
        pytest.approx(expected)
    assert gguf_arch.longrope_attention_factor({"factor": 1.0, "original_max_position_embeddings": 4096}) == 1.0


def _lfm2_spec(**changes):
    from families import FAMILY_CASES
    from transformers import AutoConfig

    settings = {"vocab_size": 1024, "hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
                "intermediate_size": 384} | FAMILY_CASES["lfm2"][1] | changes
    config = AutoConfig.for_model("lfm2", **settings).to_dict() | {"architectures": ["Lfm2ForCausalLM"]}
    return registry.for_config(config).spec(config)


def test_a_layout_without_short_conv_layers_refuses_naming_the_mixer():
    """The writer knows mixers, not families: short_conv layers against a graph that runs only attention (qwen3's,
    which has LFM2's per-head q/k norms) are refused naming short_conv and the layers; LFM2 with conv biases, which
    llama.cpp's lfm2 graph has no tensors for, is refused naming the same trait."""
    from siliconvert.errors import CheckpointError

    spec = _lfm2_spec()
    gguf_arch.GGUFArch(spec, "config.json")
    with pytest.raises(CheckpointError, match=r"cannot honour the trait short_conv: .* layers \[0, 2, 3\]"):
        gguf_arch.GGUFArch(dataclasses.replace(spec, family="qwen3"), "config.json")
    with pytest.raises(CheckpointError, match=r"cannot honour the trait short_conv: .*conv_bias"):
        gguf_arch.GGUFArch(_lfm2_spec(conv_bias=True), "config.json")


def test_lfm2_conv_layers_are_not_nope_layers_and_their_kernels_are_squeezed():
    """A conv layer has no rope because it has no attention, not because it is a NoPE attention layer; its kernel,
    torch's Conv1d [channels, 1, kernel], is written as [channels, kernel]."""
    arch = gguf_arch.GGUFArch(_lfm2_spec(), "config.json")
    assert arch.layer_head_count_kv == [0, 2, 0, 0]
    assert arch.gguf_roles("output_norm") == ("token_embd_norm",)
    kernel = np.arange(128 * 3, dtype=np.float32).reshape(128, 1, 3)
    assert arch.shapes("shortconv.conv", kernel.shape) == [(128, 3)]
    np.testing.assert_array_equal(arch.to_llama_cpp("shortconv.conv", "weight", kernel), kernel[:, 0])
