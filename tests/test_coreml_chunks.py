"""Chunk and blob plans: consecutive, balanced chunks that cover every layer, expert weights counted, blobs that are
whole tensors or head pieces."""

from __future__ import annotations

import dataclasses

import pytest
from coreml_programs import spec_of

from siliconvert.convert.coreml.chunks import PER_LAYER_INPUTS, blobs_of, cache_slots, model_bytes, plan_chunks
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


def test_gemma4_weights_count_at_each_layers_sizes():
    """Per-layer head sizes, k/v heads and MLP widths, no k/v in the kv-shared layers, no v_proj where keys are the
    values, and the per-layer input tables: every weight the graph reads but norms and layer scalars."""
    import math

    from families import FAMILY_CASES

    spec = spec_of(**(FAMILY_CASES["gemma4_text"][1] | {"architectures": ["Gemma4ForCausalLM"],
                                                         "model_type": "gemma4_text"}))
    read = sum(math.prod(tensor_shape(spec, key)) for chunk in plan_chunks(spec, 1)
               for key in required_tensors(spec, chunk)
               if not key[0].endswith("norm") and key[0] != "layer_output_scale")
    assert model_bytes(spec) == 2 * read


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
    # a tied table that embeds and projects in one package: stored once, in the head's pieces, which the gather reads
    assert [name for name, _ in blobs_of(tied, only, embedding)] == ["token_embd.weight#0", "token_embd.weight#1"]
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


def test_a_kv_shared_layer_stays_with_its_source():
    """Gemma 4's kv-shared layers read their source layer's cache row: a chunk bound moves down to the source; a
    count that cannot keep them together is refused, "auto" makes fewer chunks."""
    spec = spec_of()  # 7 layers: 2 chunks are [0, 4) and [4, 7)
    last = spec.num_layers - 1

    def sharing(layer: int, source: int):
        return dataclasses.replace(spec, layers=tuple(dataclasses.replace(spec_layer, kv_source=source)
                                                      if i == layer else spec_layer
                                                      for i, spec_layer in enumerate(spec.layers)))

    assert [list(chunk.layers) for chunk in plan_chunks(sharing(5, 2), 2)] == [[0, 1], [2, 3, 4, 5, 6]]
    shared = sharing(last, 0)
    (only,) = plan_chunks(shared, 1)
    slots = cache_slots(shared, only)
    assert slots[last] == slots[0] == ("", 0) and slots[last - 1] == ("", last - 1)
    with pytest.raises(CheckpointError, match="trait kv_shared_layers across chunks: 2 chunks would part"):
        plan_chunks(shared, 2)
    assert len(plan_chunks(dataclasses.replace(shared, hidden_size=4096, intermediate_size=14336), "auto")) == 1


def test_per_layer_inputs_pass_from_the_first_chunk_to_the_others():
    spec = dataclasses.replace(spec_of(), per_layer_input=16, per_layer_input_vocab=96)
    first, middle, last = plan_chunks(spec, 3)
    assert first.output_names() == ["hidden_states_out", "per_layer_inputs"]
    assert PER_LAYER_INPUTS not in first.input_names()
    assert middle.input_names()[-1] == last.input_names()[-1] == PER_LAYER_INPUTS
    assert middle.output_names() == ["hidden_states_out"] and last.output_names() == ["logits"]


def test_layers_of_their_own_sizes_have_caches_of_their_own():
    """A pair of KV states per distinct (k/v heads, head size), a row per layer of that shape."""
    spec = spec_of()
    wide = dataclasses.replace(spec.layers[0], head_dim=2 * spec.head_dim, kv_heads=1)
    spec = dataclasses.replace(spec, layers=(spec.layers[0], wide, spec.layers[2], wide, *spec.layers[4:]))
    (only,) = plan_chunks(spec, 1)
    slots = cache_slots(spec, only)
    suffix = f"_1x{2 * spec.head_dim}"
    assert [slots[layer] for layer in range(4)] == [("", 0), (suffix, 0), ("", 1), (suffix, 1)]
