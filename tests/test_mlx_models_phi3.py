"""siliconvert's phi3.py (`model_file: faithful`): mlx-lm's phi3 with LongRoPE as transformers applies it (the short
factors while a forward stays within the original context, the long ones past it; the config's attention factor).
The phi3 case of tests/families.py (original context 256, long factors 1.5 to 3.25) scored on 96-token windows runs
the short factors, where mlx-lm's own phi3 on the same folder runs the long ones (float16, mean KLD: 2.4e-7 against
0.019); with the original context edited to 64, the windows reach past it and both run the long ones."""

import json
import math
import shutil

import pytest
from families import FAMILY_CASES
from test_mlx_families import SIZES
from test_mlx_models_gemma2 import faithful_and_mlx_lms

from siliconvert.architectures import registry
from siliconvert.convert.mlx import build_model
from siliconvert.convert.mlx_arch import MLXArch
from siliconvert.errors import CheckpointError

pytestmark = pytest.mark.slow
PHI3 = FAMILY_CASES["phi3"][1]


@pytest.fixture(scope="module")
def phi3(small_model):
    return small_model("phi3", FAMILY_CASES["phi3"][0], config=PHI3)


@pytest.fixture(scope="module")
def phi3_past_original(phi3, tmp_path_factory):
    """The same weights with the original context at 64: 96-token windows take the long factors (and an attention
    factor from 1024 / 64), in transformers as in the folder."""
    edited = tmp_path_factory.mktemp("phi3") / "model"
    shutil.copytree(phi3, edited)
    config = json.loads((edited / "config.json").read_text())
    config["original_max_position_embeddings"] = config["rope_parameters"]["original_max_position_embeddings"] = 64
    (edited / "config.json").write_text(json.dumps(config))
    return edited


def test_float16_within_the_original_context_takes_the_short_factors(phi3, tmp_path):
    faithful, mlx_lms = faithful_and_mlx_lms(phi3, tmp_path, bits=16)
    assert faithful < 0.001
    assert mlx_lms > 0.005  # measured 0.019: mlx-lm's own file, same weights and config


@pytest.mark.parametrize(("bits", "limit"), [(16, 0.001), (4, 0.06)])  # measured 2.4e-7, 0.0025
def test_past_the_original_context_takes_the_long_factors(bits, limit, phi3_past_original, tmp_path):
    faithful, _ = faithful_and_mlx_lms(phi3_past_original, tmp_path, bits=bits, group_size=64)
    assert faithful <= limit


def test_four_bit_passes_the_mlx_limit(phi3, tmp_path):
    faithful, mlx_lms = faithful_and_mlx_lms(phi3, tmp_path, bits=4, group_size=64)
    assert faithful <= 0.06  # measured 0.0025 (mlx-lm's file: 0.020)
    assert faithful < mlx_lms / 5


def spec_of(**rope):
    config = SIZES | {"architectures": ["Phi3ForCausalLM"], "original_max_position_embeddings": 256,
                      "rope_parameters": PHI3["rope_parameters"] | rope}
    return registry.for_config(config).spec(config)


@pytest.mark.parametrize(("rope", "factor"), [({"attention_factor": 2.0}, 2.0),
                                              ({}, math.sqrt(1 + math.log(4) / math.log(256)))])
def test_the_attention_factor_is_the_configs(rope, factor):
    """transformers' attention factor: the config's, else from max / original positions (here 1024 / 256). mlx-lm's
    SuScaledRoPE ignores an attention_factor: refused without the opt-in, naming it."""
    spec = spec_of(**rope)
    model = build_model(MLXArch(spec, "config.json", "faithful").config() | {
        "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "vocab_size": 1024, "max_position_embeddings": 1024})
    assert math.isclose(model.layers[0].self_attn.rope.attention_factor, factor)
    with pytest.raises(CheckpointError, match=r"trait rope_scaling: .*`model_file: faithful`"):
        MLXArch(spec, "config.json")


def test_without_the_opt_in_the_refusal_names_it(phi3, tmp_path):
    from conftest import build_mlx

    with pytest.raises(CheckpointError, match=r"trait rope_scaling: .*`model_file: faithful`"):
        build_mlx(phi3, tmp_path, bits=4)


def test_decoding_across_the_original_context_rotates_the_cached_keys_again(phi3_past_original, tmp_path):
    """A prompt of 57 tokens (short factors), then a token at a time past position 64: from there every position,
    the cached ones too, takes the long factors, as a forward over the whole sequence does (without rotating the
    cached keys again, as transformers' own generation: mean KLD 0.023 there)."""
    from conftest import build_mlx
    from test_mlx import held_out_windows

    from siliconvert.validate.metrics import compare
    from siliconvert.validate.runners.mlx import MLXRunner

    runner = MLXRunner(build_mlx(phi3_past_original, tmp_path, bits=16, model_file="faithful").path, {})
    window = held_out_windows(phi3_past_original)[0]
    whole = runner.logits(window)
    decoded = runner.cached_logits(window[:57], window[57:95])  # positions 56 to 94
    scores, _ = compare(whole[64:95], decoded[8:], window[65:96])
    assert scores.mean_kld < 1e-4  # measured 2.2e-6


def test_torch_stand_in_reads_longrope_from_the_model_files_arguments(phi3_past_original, tmp_path):
    faithful, _ = faithful_and_mlx_lms(phi3_past_original, tmp_path, engine="torch", bits=16)
    assert faithful < 0.001
