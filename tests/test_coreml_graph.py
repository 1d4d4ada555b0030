"""The MIL graph of a chunk against what ct.convert makes of the same graph, RoPE frequencies against
transformers', and the overflow-proof RMSNorm."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from coreml_programs import ValueWeights, random_weights, run, saved_program, spec_of, streamed_package

from siliconvert.convert.coreml.chunks import plan_chunks
from siliconvert.convert.coreml.graph import (
    build_function,
    rms_norm,
    rope_frequencies,
)
from siliconvert.validate.runners.mil import MILProgram

STREAMED_CASES = {  # id → (config overrides, chunks, which chunk)
    "whole": ({}, 1, 0),
    "one-layer-middle": ({}, 3, 1),
    "tied-split-head-mha": ({"tie_word_embeddings": True, "vocab_size": 16500, "num_key_value_heads": 4}, 3, 2),
    "tied-split-head-one-chunk": ({"tie_word_embeddings": True, "vocab_size": 16500}, 1, 0),
    "biases-tied": ({"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True}, 1, 0),
    "sliding-window": ({"architectures": ["MistralForCausalLM"], "sliding_window": 12}, 1, 0),
    # mixtures of experts: a dense layer between sparse ones, weights not renormalised; Mixtral's renormalised;
    # a shared expert behind its sigmoid gate
    "experts-dense-between": ({"architectures": ["Qwen3MoeForCausalLM"], "num_experts": 4, "num_experts_per_tok": 2,
                               "moe_intermediate_size": 32, "mlp_only_layers": [1], "norm_topk_prob": False}, 1, 0),
    "experts-middle-chunk": ({"architectures": ["MixtralForCausalLM"], "num_local_experts": 3,
                              "num_experts_per_tok": 2}, 3, 1),
    "experts-shared": ({"architectures": ["Qwen2MoeForCausalLM"], "num_experts": 4, "num_experts_per_tok": 2,
                        "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48}, 1, 0),
}


@pytest.mark.parametrize("case", list(STREAMED_CASES))
def test_streamed_package_is_what_ct_convert_makes(tmp_path, case):
    """Placeholders and the short pass list give, op for op and bit for bit, what ct.convert's default pipeline
    makes of the same graph with the weights in it."""
    import coremltools as ct

    overrides, chunks, index = STREAMED_CASES[case]
    spec = spec_of(**{"vocab_size": 300, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
                      **overrides})
    chunk = plan_chunks(spec, chunks)[index]
    weights = random_weights(spec, chunk)
    streamed = streamed_package(tmp_path / "streamed.mlpackage", spec, chunk, weights)
    for function, tokens in (("decode", 1), ("prefill", 8)):
        from coremltools.converters.mil.mil import Program

        program = Program()
        program.add_function("main", build_function(spec, chunk, tokens, 32, ValueWeights(spec, chunk, weights)))
        model = ct.convert(program, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                           compute_precision=ct.precision.FLOAT16, skip_model_load=True)
        model.save(str(tmp_path / f"{function}.mlpackage"))
        reference = MILProgram(tmp_path / f"{function}.mlpackage")
        assert ([s.op_type for s in streamed.functions[function].steps]
                == [s.op_type for s in reference.functions["main"].steps])
        ours, theirs = run(streamed, function, spec, chunk, tokens), run(reference, "main", spec, chunk, tokens)
        assert ours.keys() == theirs.keys()
        for name in ours:
            assert np.array_equal(ours[name], theirs[name]), name


ROPE_SCALINGS = [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096, "beta_fast": 16,
     "truncate": False},
    # Phi-3's LongRoPE on half the head (partial rotary): a context within the original length takes short_factor
    {"rope_type": "longrope", "factor": 8.0, "original_max_position_embeddings": 4096, "partial_rotary_factor": 0.5,
     "short_factor": [1.0 + 0.05 * i for i in range(16)], "long_factor": [2.0 + 0.5 * i for i in range(16)]},
]


@pytest.mark.parametrize("scaling", ROPE_SCALINGS, ids=lambda s: s["rope_type"])
def test_rope_frequencies_are_transformers(scaling):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_theta": 500000.0, **scaling}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=32768,
                             rope_parameters=rope)
        theirs, their_factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config, "cpu")
    spec = spec_of(rope_parameters=rope)
    ours, our_factor = rope_frequencies(spec, spec.rope, 512)
    np.testing.assert_allclose(ours, theirs.double().numpy(), rtol=1e-6)
    assert our_factor == pytest.approx(their_factor)


def test_gpt_oss_20b_yarn_is_transformers_untruncated():
    """gpt-oss-20b's rope as its config ships it (×32 from 4096 positions, truncate: false): the table is transformers'
    own, not the one with the correction range rounded out to whole dimensions that GGUF and mlx-lm compute."""
    from dataclasses import replace

    from transformers import GptOssConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
            "original_max_position_embeddings": 4096, "truncate": False}
    sizes = {"hidden_size": 2880, "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64,
             "max_position_embeddings": 131072}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs, their_factor = ROPE_INIT_FUNCTIONS["yarn"](GptOssConfig(**sizes, rope_parameters=rope), "cpu")
    spec = spec_of(architectures=["GptOssForCausalLM"], model_type="gpt_oss", num_local_experts=4,
                   num_experts_per_tok=2, **sizes, rope_parameters=rope)
    ours, our_factor = rope_frequencies(spec, spec.rope, 512)
    np.testing.assert_allclose(ours, theirs.double().numpy(), rtol=1e-6)
    assert our_factor == pytest.approx(their_factor)
    rounded, _ = rope_frequencies(spec, replace(spec.rope, scaling=spec.rope.scaling | {"truncate": True}), 512)
    assert np.abs(rounded / ours - 1).max() > 0.05  # the middle dimensions turn at other frequencies


def test_proportional_rope_frequencies_are_transformers():
    """Gemma 4's global layers: a quarter of the pairs turn at θ^(-2i/head_dim), the rest not at all. (The small
    trained case hardly depends on its global layers' rope: this holds the frequencies to transformers'.)"""
    from families import FAMILY_CASES
    from transformers import Gemma4TextConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = FAMILY_CASES["gemma4_text"][1] | {"hidden_size": 256, "num_attention_heads": 4}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs, their_factor = ROPE_INIT_FUNCTIONS["proportional"](Gemma4TextConfig(**config), "cpu",
                                                                    layer_type="full_attention")
    spec = spec_of(**config | {"architectures": ["Gemma4ForCausalLM"], "model_type": "gemma4_text"})
    (rope,) = {repr(layer.rope): layer.rope for layer in spec.layers if layer.window is None}.values()
    ours, our_factor = rope_frequencies(spec, rope, 512)
    assert np.count_nonzero(ours) == len(ours) // 4
    np.testing.assert_allclose(ours, theirs.double().numpy(), rtol=1e-6)
    assert our_factor == their_factor == 1.0


def test_rms_norm_does_not_overflow_fp16(tmp_path):
    """Activations of a few hundred square past fp16's 65504; the norm must still be right."""
    channels = 512
    weight = np.linspace(0.5, 1.5, channels).astype(np.float16)
    program = saved_program(tmp_path, lambda x: rms_norm(x, weight[None, :, None, None], 1e-6, "norm"),
                            (1, channels, 1, 3))
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((1, channels, 1, 3)) * [300.0, 1.0, 1e-3]).astype(np.float16)
    (out,) = program.run("main", {"x": x}, {}).values()
    wide = x.astype(np.float64)
    expected = wide / np.sqrt((wide**2).mean(axis=1, keepdims=True) + 1e-6) * weight[None, :, None, None]
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, expected, rtol=0.01, atol=0.01)


def test_a_tied_table_split_for_the_head_is_stored_once_and_embeds_every_id(tmp_path, monkeypatch):
    """A package that embeds and projects through a tied table taller than one head convolution stores the table
    once, in the head's pieces, and the embedding gathers from them what the whole table gives: the same logits as
    the table in one piece, for ids either side of a piece's edge."""
    from siliconvert.convert.coreml import chunks

    spec = spec_of(vocab_size=16500, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                   tie_word_embeddings=True)
    (chunk,) = plan_chunks(spec, 1)
    weights = random_weights(spec, chunk)
    table_bytes = weights[("token_embd", None, "weight")].nbytes
    split = streamed_package(tmp_path / "split.mlpackage", spec, chunk, weights)
    assert len(chunks.head_pieces(spec)) == 2
    stored = sum(f.stat().st_size for f in (tmp_path / "split.mlpackage").rglob("weight.bin"))
    assert table_bytes < stored < 1.2 * table_bytes
    monkeypatch.setattr(chunks, "HEAD_SPLIT", spec.vocab_size)
    whole = streamed_package(tmp_path / "whole.mlpackage", spec, chunk, weights)
    ids = np.array([[0, 16383, 16384, 16499, 7, 16400, 16383, 16385]], np.int32)
    logits = [program.run("prefill", {"input_ids": ids, "position": np.array([0], np.int32)},
                          program.make_states("prefill"))["logits"] for program in (split, whole)]
    assert np.array_equal(*logits)
