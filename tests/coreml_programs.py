"""Core ML programs built piece by piece around streamed weights, for the tests of the Core ML writer's parts and
of the MIL interpreter: a model spec from a few config keys, random weights, a package and its interpreter run."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from siliconvert.architectures import registry
from siliconvert.convert.coreml.chunks import blobs_of
from siliconvert.convert.coreml.graph import (
    build_program,
    required_tensors,
    tensor_shape,
)
from siliconvert.convert.coreml.package import BlobWrites, PackageWriter
from siliconvert.convert.coreml.weights import PlaceholderWeights, WeightConsts
from siliconvert.validate.runners.mil import MILProgram


def spec_of(**config):
    config = {"architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 256,
              "intermediate_size": 512, "num_hidden_layers": 7, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 32768, **config}
    return registry.for_config(config).spec(config)


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
