"""Core ML target, piece by piece (no checkpoint needed): chunk and blob plans, the fp16 cast, packages
written around streamed weights (against what ct.convert makes of the same graph, and byte for byte
reproducible), RoPE frequencies against transformers', the overflow-proof RMSNorm, and the interpreter's
refusals."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest

from siliconvert.architectures import registry
from siliconvert.convert.coreml.chunks import blobs_of, model_bytes, plan_chunks
from siliconvert.convert.coreml.graph import (
    build_function,
    build_program,
    required_tensors,
    rms_norm,
    rope_frequencies,
    tensor_shape,
)
from siliconvert.convert.coreml.package import BlobWrites, PackageWriter, cast_float16
from siliconvert.convert.coreml.weights import PlaceholderWeights, WeightConsts
from siliconvert.convert.coreml.writer import active_seconds, prefill_block
from siliconvert.errors import ArtifactError, CheckpointError
from siliconvert.validate.runners.mil import MILProgram


def spec_of(**config):
    config = {"architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 256,
              "intermediate_size": 512, "num_hidden_layers": 7, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 32768, **config}
    return registry.for_config(config).spec(config)


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


def test_prefill_blocks_tile_the_context():
    assert [prefill_block(c) for c in (512, 128, 96, 100)] == [64, 64, 32, 4]


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


def test_cast_float16_is_numpys_cast_and_refuses_what_overflows():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.standard_normal(5000) * scale for scale in (1e-7, 1e-3, 1, 1e3, 3e4)])
    # subnormals, the largest halves, rounding ties, and the largest values that still round to a finite half
    values = np.concatenate([np.clip(values, -65504, 65504), [65519.99, -65519.99, 2.0**-25, 3 * 2.0**-25]])
    out = np.empty(values.size, np.float16)
    for dtype in (np.float32, np.float64, np.float16):
        cast_float16("t", values.astype(dtype), out)
        assert np.array_equal(out.view(np.uint16), values.astype(dtype).astype(np.float16).view(np.uint16)), dtype
    for beyond in (65520.0, -70000.0, np.nan):
        for dtype in (np.float32, np.float64):
            with pytest.raises(CheckpointError, match=r"'big'.*float16 range"):
                cast_float16("big", np.array([1.0, beyond], dtype), np.empty(2, np.float16))


def test_weight_files_are_what_coremltools_blob_writer_writes(tmp_path, monkeypatch):
    """The blobs laid out here and written by BlobWrites' thread (a workaround: coremltools' writer holds the
    GIL while it writes) make the same file, byte for byte, as coremltools' own writer; what the exporter
    appends afterwards through coremltools' writer lands where it would."""
    from coremltools.libmilstoragepython import _BlobStorageWriter

    from siliconvert.convert.coreml import package

    monkeypatch.setattr(package, "WRITE_BLOCK_VALUES", 1000)  # blobs of several blocks, and blocks in flight
    monkeypatch.setattr(package, "WRITE_BUFFERS", 2)
    rng = np.random.default_rng(0)
    blobs = [rng.standard_normal(n).astype(np.float32) for n in (1, 31, 32, 1000, 2500, 0, 7)]
    small = np.arange(5, dtype=np.float32)  # a small const the exporter appends: RoPE tables are float32

    writes = BlobWrites()
    ours = PackageWriter(tmp_path / "ours.mlpackage", writes)
    for i, values in enumerate(blobs):
        ours.write(f"w{i}", "t", values)
    writes.drain(ours.fd)
    os.pwrite(ours.fd, package.STORAGE_HEADER.pack(len(blobs), package.STORAGE_VERSION).ljust(64, b"\0"), 0)
    ours.close()
    writes.close()
    appended = _BlobStorageWriter(str(ours.weight_file), truncate_file=False)
    small_at = appended.write_float_data(small)
    del appended

    theirs = _BlobStorageWriter(str(tmp_path / "theirs.bin"))
    offsets = [theirs.write_fp16_data(values.astype(np.float16).view(np.uint16)) for values in blobs]
    their_small_at = theirs.write_float_data(small)
    del theirs
    assert [ours.blobs[f"w{i}"][0] for i in range(len(blobs))] == offsets and small_at == their_small_at
    assert ours.weight_file.read_bytes() == (tmp_path / "theirs.bin").read_bytes()
    assert writes.write_s > 0 and writes.intervals


def test_blob_write_errors_reach_the_caller(tmp_path):
    writes = BlobWrites()
    fd = os.open(tmp_path / "f", os.O_RDONLY | os.O_CREAT)  # a write to it fails, as on a full disk
    try:
        writes.write(fd, 0, b"data")
        with pytest.raises(OSError):
            writes.drain(fd)
        with pytest.raises(OSError):
            writes.buffer()
    finally:
        os.close(fd)
        writes.close()


def test_active_seconds_is_the_union_of_intervals():
    assert active_seconds([]) == 0
    assert active_seconds([(0, 2), (1, 3), (5, 6), (5.5, 5.8)]) == pytest.approx(4)


# ---- packages around streamed weights ----------------------------------------------------------------------


def random_weights(spec, chunk, seed=0) -> dict:
    """fp16 values for every tensor the chunk reads (norm weights away from 1: a 1 would let passes drop a mul)."""
    rng = np.random.default_rng(seed)
    return {key: (rng.standard_normal(tensor_shape(spec, key)) * 0.1 + (1.0 if "norm" in key[0] else 0.0)
                  ).astype(np.float16) for key in sorted(required_tensors(spec, chunk), key=str)}


def streamed_package(path: Path, spec, chunk, weights: dict, block: int = 8, context: int = 32) -> MILProgram:
    """A package written as CoreMLWriter writes one: blobs first, then the program around them."""
    writes = BlobWrites()
    package = PackageWriter(path, writes)
    for key, values in weights.items():
        for blob, rows in blobs_of(spec, chunk, key):
            package.write(blob, str(key), values[rows])
    package.finish(build_program(spec, chunk, block, context, PlaceholderWeights(package.blobs)))
    writes.close()
    return MILProgram(path)


class ValueWeights(WeightConsts):
    """Consts holding the values themselves, as a plain ct.convert of the graph would have them."""

    def __init__(self, spec, chunk, weights: dict):
        self.values = {blob: values[rows] for key, values in weights.items()
                       for blob, rows in blobs_of(spec, chunk, key)}

    def const(self, weight, shape, name):
        from coremltools.converters.mil import Builder as mb

        return mb.const(val=self.values[weight].reshape(shape), name=name)


def run(program: MILProgram, function: str, spec, chunk, tokens: int, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    first = (rng.integers(0, spec.vocab_size, (1, tokens)).astype(np.int32) if chunk.first
             else rng.standard_normal((1, spec.hidden_size, 1, tokens)).astype(np.float16))
    states = program.make_states(function)
    for state in states.values():
        state[:] = rng.standard_normal(state.shape) * 0.5  # a cache already holding earlier tokens
    outputs = program.run(function, {chunk.input_names()[0]: first, "position": np.array([5], np.int32)}, states)
    return outputs | states


STREAMED_CASES = {  # id → (config overrides, chunks, which chunk)
    "whole": ({}, 1, 0),
    "one-layer-middle": ({}, 3, 1),
    "tied-split-head-mha": ({"tie_word_embeddings": True, "vocab_size": 16500, "num_key_value_heads": 4}, 3, 2),
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


def test_packages_are_reproducible_and_loadable(tmp_path):
    from coremltools.libmodelpackage import ModelPackage

    spec = spec_of(num_hidden_layers=2)
    (chunk,) = plan_chunks(spec, 1)
    weights = random_weights(spec, chunk)
    for name in ("a", "b"):
        streamed_package(tmp_path / f"{name}.mlpackage", spec, chunk, weights)
    a, b, c = (tmp_path / f"{name}.mlpackage" for name in "abc")
    files = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    assert files == ["Data/com.apple.CoreML/model.mlmodel", "Data/com.apple.CoreML/weights/weight.bin", "Manifest.json"]
    for file in files:  # coremltools draws random identifiers for Manifest.json; here they derive from the spec
        assert (a / file).read_bytes() == (b / file).read_bytes(), file
    package = ModelPackage(str(a))
    assert package.getRootModel().path().endswith("Data/com.apple.CoreML/model.mlmodel")
    assert package.findItemByNameAuthor("weights", "com.apple.CoreML").path().endswith("Data/com.apple.CoreML/weights")
    # other weights of the same shapes: the spec names blobs, not values, so only weight.bin differs
    streamed_package(c, spec, chunk, random_weights(spec, chunk, seed=1))
    assert [(a / f).read_bytes() == (c / f).read_bytes() for f in files] == [True, False, True]


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


def saved_program(tmp_path, body, shape):
    """A one-function fp16 package made from `body(x)`, saved and loaded back in the interpreter."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    @mb.program(input_specs=[mb.TensorSpec(shape, dtype=types.fp16)], opset_version=ct.target.iOS18)
    def program(x):
        return body(x)

    model = ct.convert(program, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                       compute_precision=ct.precision.FLOAT16, skip_model_load=True)
    model.save(str(tmp_path / "p.mlpackage"))
    return MILProgram(tmp_path / "p.mlpackage")


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


def test_interpreter_routes_as_the_experts_graph_needs(tmp_path):
    """topk (after coremltools' int16 cast of its indices), lower index first among equal values, and one_hot
    on any axis."""
    from coremltools.converters.mil import Builder as mb

    def body(x):
        values, ids = mb.topk(x=x, k=2, axis=-1)
        hot = mb.one_hot(indices=ids, one_hot_vector_size=4, axis=1, on_value=np.float16(0.5), off_value=np.float16(0))
        return values, mb.reduce_sum(x=hot, axes=[2])

    program = saved_program(tmp_path, body, (3, 4))
    x = np.array([[0.1, 0.7, 0.7, 0.2], [0.25, 0.25, 0.25, 0.25], [0.4, 0.1, 0.3, 0.2]], np.float16)
    values, weights = program.run("main", {"x": x}, {}).values()
    np.testing.assert_array_equal(values, np.array([[0.7, 0.7], [0.25, 0.25], [0.4, 0.3]], np.float16))
    np.testing.assert_array_equal(weights, np.array([[0, 1, 1, 0], [1, 1, 0, 0], [1, 0, 1, 0]]) * np.float16(0.5))


def test_interpreter_refuses_ops_it_does_not_know(tmp_path):
    from coremltools.converters.mil import Builder as mb

    with pytest.raises(ArtifactError, match=r"'sin'.*not implemented"):
        saved_program(tmp_path, lambda x: mb.sin(x=x), (4,))
