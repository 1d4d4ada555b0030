"""Chunk and blob plans: consecutive, balanced chunks that cover every layer, expert weights counted, blobs that are
whole tensors or head pieces."""

from __future__ import annotations

import dataclasses

import pytest
from coreml_programs import spec_of

from siliconvert.convert.coreml.chunks import blobs_of, model_bytes, plan_chunks
from siliconvert.convert.coreml.graph import (
    required_tensors,
    tensor_shape,
)
from siliconvert.errors import CheckpointError


def test_chunks_are_consecutive_balanced_and_cover_every_layer():
    chunks = plan_chunks(spec_of(), 3)
    assert [list(c.layers) for c in chunks] == [[0, 1], [2, 3, 4], [5, 6]]
    assert [(c.first, c.last) for c in chunks] == [(True, False), (False, False), (False, True)]
    assert len(plan_chunks(spec_of(), "auto")) == 1  # a few MB: one package
    assert len(plan_chunks(spec_of(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32), "auto")) == 14


def test_expert_weights_count_toward_a_chunk():
    """Qwen3-30B-A3B's shape: 128 experts of 768 in 47 of its 48 layers (and with a shared expert, as Qwen2-MoE's);
    every weight the graph reads but norms (and biases)."""
    import math

    moe = {"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 151936, "hidden_size": 2048,
           "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
           "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768, "intermediate_size": 6144,
           "mlp_only_layers": [0]}
    spec = spec_of(**moe)
    shared = spec_of(**(moe | {"architectures": ["Qwen2MoeForCausalLM"], "shared_expert_intermediate_size": 5632}))
    for each in (spec, shared):
        read = sum(math.prod(tensor_shape(each, key)) for chunk in plan_chunks(each, 1)
                   for key in required_tensors(each, chunk) if not key[0].endswith("norm") and key[2] == "weight")
        assert model_bytes(each) == 2 * read
    dense = spec_of(**(moe | {"architectures": ["Qwen3ForCausalLM"]}))  # its 6144-wide MLP in every layer
    assert len(plan_chunks(dense, "auto")) == 7
    assert len(plan_chunks(spec, "auto")) == 48  # 128 experts: 1.2 GB a layer, one layer a package


def test_blobs_are_whole_tensors_or_head_pieces():
    embedding, head, norm = ("token_embd", None, "weight"), ("output", None, "weight"), ("attn_norm", 0, "weight")
    untied = spec_of(vocab_size=40000)
    first, last = plan_chunks(untied, 2)
    assert blobs_of(untied, first, embedding) == [("token_embd.weight", slice(None))]
    assert blobs_of(untied, first, norm) == [("attn_norm.0.weight", slice(None))]
    assert blobs_of(untied, last, head) == [("output.weight#0", slice(0, 16384)),
                                            ("output.weight#1", slice(16384, 32768)),
                                            ("output.weight#2", slice(32768, 40000))]
    tied = spec_of(vocab_size=20000, tie_word_embeddings=True)
    (only,) = plan_chunks(tied, 1)
    # a tied table that embeds and projects in one package: whole for the gather, in pieces for the head
    assert [name for name, _ in blobs_of(tied, only, embedding)] == [
        "token_embd.weight", "token_embd.weight#0", "token_embd.weight#1"]
    first, last = plan_chunks(tied, 2)
    assert [name for name, _ in blobs_of(tied, last, embedding)] == ["token_embd.weight#0", "token_embd.weight#1"]
    small = spec_of(tie_word_embeddings=True)  # one head piece: the head and the table are one blob
    assert blobs_of(small, plan_chunks(small, 1)[0], embedding) == [("token_embd.weight", slice(None))]


def test_a_mixer_no_package_can_run_is_refused_naming_the_trait():
    """Every mixer a family maps today runs in Core ML; one the graph has no ops for (RWKV-7's, say) is refused."""
    spec = spec_of()
    layers = (dataclasses.replace(spec.layers[0], mixer="rwkv7"), *spec.layers[1:])
    with pytest.raises(CheckpointError, match=r"mixer='rwkv7' \(layer 0\)"):
        plan_chunks(dataclasses.replace(spec, layers=layers), 1)


@pytest.mark.parametrize(("change", "trait"), [
    ({"per_layer_input": 16, "per_layer_input_vocab": 96}, "per_layer_input"),
    ({"value_norm": True}, "value_norm"),
    ({"layer_output_scale": True}, "layer_output_scale"),
])
def test_gemma4_traits_no_graph_builds_are_refused_by_name(change: dict, trait: str):
    with pytest.raises(CheckpointError, match=f"Core ML cannot honour the trait {trait}"):
        plan_chunks(dataclasses.replace(spec_of(), **change), 1)


def test_layers_apart_are_refused_by_name():
    spec = spec_of()
    layers = (dataclasses.replace(spec.layers[0], kv_source=None, head_dim=2 * spec.head_dim), *spec.layers[1:])
    with pytest.raises(CheckpointError, match="trait per_layer_head_dim"):
        plan_chunks(dataclasses.replace(spec, layers=layers), 1)
