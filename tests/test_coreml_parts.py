"""Core ML target, piece by piece (no checkpoint needed): chunk plans, the spilling buffer, RoPE
frequencies against transformers', the overflow-proof RMSNorm, and the interpreter's refusals."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from siliconvert.architectures import registry
from siliconvert.convert.coreml import TensorBuffer, plan_chunks, prefill_block, rms_norm, rope_frequencies
from siliconvert.errors import ArtifactError
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


def test_prefill_blocks_tile_the_context():
    assert [prefill_block(c) for c in (512, 128, 96, 100)] == [64, 64, 32, 4]


def test_buffer_spills_past_its_budget_and_forgets_after_the_last_use(tmp_path):
    buffer = TensorBuffer(tmp_path / "spill", budget=100)
    small, large = np.arange(40, dtype=np.float16), np.arange(60, dtype=np.float16)
    buffer.put(("a", 0, "weight"), small, uses=1)
    buffer.put(("b", 0, "weight"), large, uses=2)  # 80 + 120 bytes > 100: to disk
    assert buffer.spilled == 1 and buffer.resident == small.nbytes
    assert np.array_equal(buffer.take(("b", 0, "weight")), large) and ("b", 0, "weight") in buffer
    assert np.array_equal(buffer.take(("b", 0, "weight")), large) and ("b", 0, "weight") not in buffer
    assert list((tmp_path / "spill").iterdir()) == []
    buffer.take(("a", 0, "weight"))
    assert buffer.resident == 0


ROPE_SCALINGS = [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096, "beta_fast": 16,
     "truncate": False},
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
    ours, our_factor = rope_frequencies(spec_of(rope_parameters=rope), 512)
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
    program = saved_program(tmp_path, lambda x: rms_norm(x, weight, 1e-6, "norm"), (1, channels, 1, 3))
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((1, channels, 1, 3)) * [300.0, 1.0, 1e-3]).astype(np.float16)
    (out,) = program.run("main", {"x": x}, {}).values()
    wide = x.astype(np.float64)
    expected = wide / np.sqrt((wide**2).mean(axis=1, keepdims=True) + 1e-6) * weight[None, :, None, None]
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, expected, rtol=0.01, atol=0.01)


def test_interpreter_refuses_ops_it_does_not_know(tmp_path):
    from coremltools.converters.mil import Builder as mb

    with pytest.raises(ArtifactError, match=r"'sin'.*not implemented"):
        saved_program(tmp_path, lambda x: mb.sin(x=x), (4,))
