"""The GGUF layout's own arithmetic: RoPE row orders as llama.cpp permutes them, and the rope factors and
scales llama.cpp reads from the file instead of computing."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from families import LLAMA_CPP_SHAPES
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


def _qwen3_5_spec(model_type: str = "qwen3_5_text", **changes):
    from families import FAMILY_CASES
    from transformers import AutoConfig

    architecture = {"qwen3_5_text": "Qwen3_5ForCausalLM", "qwen3_5_moe_text": "Qwen3_5MoeForCausalLM",
                    "qwen3_next": "Qwen3NextForCausalLM"}[model_type]
    settings = {"vocab_size": 1024, "hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
                "intermediate_size": 384} | FAMILY_CASES[model_type][1] | changes
    config = AutoConfig.for_model(model_type, **settings).to_dict() | {"architectures": [architecture]}
    return registry.for_config(config).spec(config)




@pytest.mark.parametrize(("model_type", "changes", "trait"), [
    ("qwen3_5_text", {}, "gated_delta"),  # value heads 24 wide, key heads 32: llama.cpp sizes both by state_size
    ("qwen3_5_text", LLAMA_CPP_SHAPES["qwen3_5_text"] | {"linear_num_value_heads": 3}, "gated_delta"),
    ("qwen3_next", LLAMA_CPP_SHAPES["qwen3_next"] | {"decoder_sparse_step": 2}, "dense_layers"),
    ("qwen3_next", LLAMA_CPP_SHAPES["qwen3_next"] | {"norm_topk_prob": False}, "normalize_topk"),
])
def test_what_the_gated_delta_graphs_cannot_run_is_refused_naming_the_trait(model_type: str, changes: dict,
                                                                             trait: str) -> None:
    from siliconvert.errors import CheckpointError

    with pytest.raises(CheckpointError, match=f"trait {trait}"):
        gguf_arch.GGUFArch(_qwen3_5_spec(model_type, **changes), "config.json")


@pytest.mark.parametrize("model_type", list(LLAMA_CPP_SHAPES))
def test_a_layer_of_attention_among_gated_delta_layers_keeps_its_kv_heads(model_type: str) -> None:
    """llama.cpp's Qwen3.5 graphs read the recurrent layers from their own key: head_count_kv is the attention
    layers' in every layer, and the quantizer's layer 0 has them."""
    arch = gguf_arch.GGUFArch(_qwen3_5_spec(model_type, **LLAMA_CPP_SHAPES[model_type]), "config.json")
    assert arch.layer_head_count_kv == [2, 2, 2, 2]


def test_value_heads_are_tiled_where_llama_cpp_repeats_key_heads_tiled():
    """transformers serves value heads 0, 1 from key head 0 and 2, 3 from key head 1; llama.cpp's qwen35 repeats
    the key heads tiled (0, 1, 0, 1): value heads go in the order 0, 2, 1, 3 in every tensor they index, the q and k
    channels of in_proj_qkv and the conv left as they are; qwen3next repeats them grouped and keeps the order."""
    spec = _qwen3_5_spec(**LLAMA_CPP_SHAPES["qwen3_5_text"])
    delta = spec.gated_delta
    arch = gguf_arch.GGUFArch(spec, "config.json")
    heads = np.arange(4, dtype=np.float32)
    np.testing.assert_array_equal(arch.to_llama_cpp("ssm_dt", "weight", heads), [0, 2, 1, 3])
    np.testing.assert_allclose(arch.to_llama_cpp("ssm_a", "weight", heads), -np.exp([0, 2, 1, 3]), rtol=1e-6)
    channels = np.arange(delta.conv_channels, dtype=np.float32)
    conv = arch.to_llama_cpp("ssm_conv1d", "weight", np.repeat(channels[:, None, None], 4, axis=2))
    v = conv[2 * delta.key_size:, 0].reshape(4, 32) - 2 * delta.key_size
    np.testing.assert_array_equal(conv[:2 * delta.key_size, 0], channels[:2 * delta.key_size])
    assert v[:, 0].tolist() == [0, 64, 32, 96]
    columns = np.tile(np.arange(delta.value_size, dtype=np.float32), (spec.hidden_size, 1))
    assert arch.to_llama_cpp("ssm_out", "weight", columns)[0, ::32].tolist() == [0, 64, 32, 96]
    assert arch.importance_columns("ssm_out", columns[0])[::32].tolist() == [0, 64, 32, 96]
    grouped = gguf_arch.GGUFArch(_qwen3_5_spec("qwen3_next", **LLAMA_CPP_SHAPES["qwen3_next"]), "config.json")
    np.testing.assert_array_equal(grouped.to_llama_cpp("ssm_dt", "weight", heads), heads)


def test_qwen3_next_qkvz_is_ungrouped_into_qkv_and_z():
    """in_proj_qkvz holds, per key head, its q, its k, then its value heads' v and z rows; llama.cpp's attn_qkv is
    every q, every k, every v, and attn_gate every z."""
    spec = _qwen3_5_spec("qwen3_next", **LLAMA_CPP_SHAPES["qwen3_next"])
    delta, arch = spec.gated_delta, gguf_arch.GGUFArch(spec, "config.json")
    d, v = delta.key_head_dim, delta.value_size // delta.key_heads  # each key head's v rows (and z rows)
    labels = np.concatenate([np.full(n, 10 * head + part) for head in range(delta.key_heads)
                             for part, n in enumerate([d, d, v, v])]).astype(np.float32)
    rows = np.repeat(labels[:, None], spec.hidden_size, axis=1)
    qkv, z = arch.split("delta_qkvz", arch.to_llama_cpp("delta_qkvz", "weight", rows))
    assert [qkv.shape, z.shape] == arch.shapes("delta_qkvz", rows.shape) == [(delta.conv_channels, 128),
                                                                             (delta.value_size, 128)]
    assert qkv[::d, 0].tolist() == [0, 10, 1, 11, 2, 2, 12, 12]
    assert z[::d, 0].tolist() == [3, 3, 13, 13]


@pytest.mark.parametrize(("rotary_pairs", "sections"), [(32, [11, 11, 10, 0]), (4, [2, 1, 1, 0]), (5, [2, 2, 1, 0])])
def test_rope_sections_give_every_rotary_pair_a_text_position(rotary_pairs: int, sections: list[int]):
    """ggml's interleaved multimodal rope gives pair i the position of section t, h or w by i mod 3 (within 3 × that
    section's size), else the fourth's, which is 0 for a text token: every pair must land in t, h or w."""
    assert gguf_arch.rope_sections(rotary_pairs) == sections
    t, h, w, _ = sections
    for pair in range(rotary_pairs):
        assert (pair % 3 == 0 and pair < 3 * t) or (pair % 3 == 1 and pair < 3 * h) or (pair % 3 == 2 and pair < 3 * w)
