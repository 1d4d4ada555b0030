"""siliconvert's gpt_oss.py (`model_file: faithful`): mlx-lm's gpt_oss with YaRN's correction range as the config
says it (gpt-oss's `truncate: false`), shipped in the folder and run by mlx_lm.load(trust_remote_code=True). On the
gpt_oss case of tests/families.py (head 32, θ 150000, factor 16, original context 64: a ramp over dimensions 0 to
3.12, which mlx-lm rounds out to 0 to 4) scored on 96-token windows, it computes transformers' function, where
mlx-lm's own gpt_oss on the very same folder rotates dimensions 1 to 3 at other frequencies (float16, mean KLD:
2.1e-4, one near-tie of the routers, against 0.0028)."""

import importlib.util
import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import build_mlx, reference_choices_for, reference_logits_for
from families import FAMILY_CASES, GPT_OSS_20B_ROPE, gpt_oss_mxfp4
from test_mlx import held_out_windows
from test_mlx_models_gemma2 import faithful_and_mlx_lms, mean_kld

from siliconvert.checkpoint import Checkpoint
from siliconvert.convert.mlx_arch import model_file_path
from siliconvert.errors import CheckpointError
from siliconvert.validate.metrics import compare
from siliconvert.validate.router import router_agreement
from siliconvert.validate.runners.mlx import MLXRunner

GPT_OSS = FAMILY_CASES["gpt_oss"][1]


def model_file():
    spec = importlib.util.spec_from_file_location("gpt_oss_model_file", model_file_path("gpt_oss.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("truncate", [False, True])
@pytest.mark.parametrize(("head_dim", "rope"), [(32, GPT_OSS["rope_parameters"]),
                                                     (64, GPT_OSS_20B_ROPE["rope_parameters"])])
def test_the_rope_is_transformers_yarn(head_dim, rope, truncate):
    """The file's frequencies and attention factor are transformers' `_compute_yarn_parameters`, truncated or not;
    mlx-lm's YarnRoPE matches them only truncated."""
    from mlx_lm.models.rope_utils import initialize_rope
    from transformers import GptOssConfig
    from transformers.modeling_rope_utils import _compute_yarn_parameters

    scaling = {**rope, "truncate": truncate}
    inv_freq, attention_factor = _compute_yarn_parameters(GptOssConfig(head_dim=head_dim, rope_parameters=scaling))
    ours = model_file().YarnRoPE(head_dim, rope["rope_theta"], scaling, 131072)
    np.testing.assert_allclose(1 / np.array(ours._freqs), inv_freq.numpy(), rtol=1e-6)
    assert ours.attention_factor == pytest.approx(attention_factor)
    theirs = initialize_rope(head_dim, rope["rope_theta"], False, scaling, 131072)
    assert np.allclose(1 / np.array(theirs._freqs), inv_freq.numpy(), rtol=1e-6) == truncate


@pytest.fixture(scope="module")
def gpt_oss(small_model):
    return small_model("gpt_oss", FAMILY_CASES["gpt_oss"][0], config=GPT_OSS)


@pytest.fixture(scope="module")
def gpt_oss_mxfp4_source(gpt_oss, tmp_path_factory):
    """The same trained weights with the experts in MXFP4, as the hub ships gpt-oss."""
    return gpt_oss_mxfp4(tmp_path_factory.mktemp("gpt_oss") / "mxfp4")


@pytest.mark.slow
def test_float16_ramps_over_the_untruncated_range(gpt_oss, tmp_path):
    faithful, mlx_lms = faithful_and_mlx_lms(gpt_oss, tmp_path, bits=16)
    assert faithful < 0.001  # measured 2.1e-4 (float32: 1e-13)
    assert mlx_lms > 0.001  # measured 0.0028: mlx-lm's own file, same weights and config
    assert faithful < mlx_lms / 5


@pytest.mark.slow
@pytest.mark.parametrize(("source", "target"), [
    ("bf16", {"bits": 4, "group_size": 64}),  # measured 0.0042 (mlx-lm's file: 0.0063)
    ("mxfp4", {"bits": 4, "group_size": 64}),  # experts kept in mxfp4 mode: 0.0037 (0.0063)
    ("mxfp4", {"bits": 4, "mode": "mxfp4"}),  # every module in mxfp4: 0.0062 (0.0079)
])
def test_four_bit_passes_the_mlx_limit(source, target, gpt_oss, gpt_oss_mxfp4_source, tmp_path):
    faithful, mlx_lms = faithful_and_mlx_lms({"bf16": gpt_oss, "mxfp4": gpt_oss_mxfp4_source}[source], tmp_path,
                                             **target)
    assert faithful <= 0.06
    assert faithful < mlx_lms


@pytest.mark.slow
def test_mxfp4_experts_stay_exact_and_the_routers_choose_transformers_experts(gpt_oss_mxfp4_source, tmp_path):
    """The 4-bit folder of the MXFP4 source keeps each expert stack in mlx's mxfp4 mode, every value the source's own,
    and its routers (8 bits) choose the experts transformers' do."""
    folder = build_mlx(gpt_oss_mxfp4_source, tmp_path, bits=4, group_size=64, model_file="faithful").path
    quantization = json.loads((folder / "config.json").read_text())["quantization"]
    stream = {info.name: array for info, array in Checkpoint.open(gpt_oss_mxfp4_source).tensors()}
    loaded = mx.load(str(folder / "model.safetensors"))
    experts = "model.layers.1.mlp.experts"
    assert quantization[f"{experts}.down_proj"] == {"group_size": 32, "bits": 4, "mode": "mxfp4"}
    dequantized = mx.dequantize(loaded[f"{experts}.down_proj.weight"], loaded[f"{experts}.down_proj.scales"], None,
                                group_size=32, bits=4, mode="mxfp4", dtype=mx.float32)
    assert np.array_equal(np.array(dequantized), stream[f"{experts}.down_proj"])
    windows = held_out_windows(gpt_oss_mxfp4_source)
    runner = MLXRunner(folder, {})
    assert mean_kld(reference_logits_for(gpt_oss_mxfp4_source, windows), runner.logits_many(windows), windows) < 0.06
    agreement = router_agreement(reference_choices_for(gpt_oss_mxfp4_source, windows), runner.expert_choices(), [0, 1])
    assert agreement["same_experts"] >= 0.9, agreement


@pytest.mark.slow
def test_decoding_past_the_window_through_the_cache(gpt_oss, tmp_path):
    """mlx-lm's cache as generation makes it (a rotating one of 24 for the sliding layers), prefilled past the
    window, then a token at a time: the no-cache pass's distributions, with the file's rope at each offset."""
    runner = MLXRunner(build_mlx(gpt_oss, tmp_path, bits=16, model_file="faithful").path, {})
    window = held_out_windows(gpt_oss)[0]
    whole = runner.logits(window)
    decoded = runner.cached_logits(window[:70], window[70:95])
    scores, _ = compare(whole[69:95], decoded, window[70:96])
    assert scores.mean_kld < 1e-4


@pytest.mark.slow
def test_the_folder_ships_the_model_file_and_the_refusal_names_it(gpt_oss, tmp_path):
    from mlx_lm import load

    folder = build_mlx(gpt_oss, tmp_path / "faithful", bits=16, model_file="faithful").path
    config = json.loads((folder / "config.json").read_text())
    assert config["model_file"] == "gpt_oss.py" and config["rope_scaling"]["truncate"] is False
    assert (folder / "gpt_oss.py").read_bytes() == model_file_path("gpt_oss.py").read_bytes()
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        load(str(folder))
    with pytest.raises(CheckpointError, match=r"trait rope_scaling: mlx-lm always truncates .*`model_file: faithful`"):
        build_mlx(gpt_oss, tmp_path / "mlx-lm", bits=4)


@pytest.mark.slow
def test_a_recipe_validates_and_releases_the_folder_like_any_artifact(gpt_oss_mxfp4_source, tmp_path):
    """`siliconvert recipe` on the MXFP4 source as gpt-oss ships (YaRN untruncated) with the opt-in: every check
    passes (the KV cache among them), the report says the MXFP4 experts were kept and how the routers agree, and the
    release's card says how to load the folder and why."""
    from conftest import run_recipe

    report = run_recipe(gpt_oss_mxfp4_source, tmp_path, "gpt-oss",
                        targets=[{"format": "mlx", "bits": 4, "model_file": "faithful"}],
                        validate={"tokens": 256, "context": 128, "latency": False})
    (artifact,) = report["artifacts"]
    assert artifact["gates"]["passed"] and artifact["kv_cache"]["consistent"]
    assert artifact["metrics"]["mean_kld"] < 0.06
    assert artifact["source_quantization"] == "MXFP4 kept exact in 6 modules (mlx's mxfp4 mode)"
    assert artifact["router_agreement"]["same_experts"] >= 0.9
    (release,) = (tmp_path / "out" / "release").iterdir()
    assert (release / "gpt_oss.py").read_bytes() == model_file_path("gpt_oss.py").read_bytes()
    card = (release / "README.md").read_text()
    assert "trust_remote_code=True" in card and "truncate: false" in card
