"""MLX on every family: mlx_lm.load opens the folder and computes the source's function, or the writer refuses
naming the trait mlx-lm gets wrong. Float16 (bits 16) isolates layout errors from quantization's. A mixture of
experts' routers choose the reference's experts."""

import json
import shutil

import pytest
from conftest import build_mlx, reference_choices_for, reference_logits_for
from families import FAMILY_CASES
from test_mlx import held_out_windows, mlx_logits
from test_mlx_moe import ATTENTION_MOE_FAMILIES, MOE_FAMILIES

from siliconvert.architectures import registry
from siliconvert.checkpoint import Checkpoint
from siliconvert.convert.mlx_arch import MLXArch
from siliconvert.errors import CheckpointError
from siliconvert.validate.metrics import compare
from siliconvert.validate.router import router_agreement
from siliconvert.validate.runners.mlx import MLXRunner

pytestmark = pytest.mark.slow

# family → the trait named when mlx-lm cannot run the FAMILY_CASES checkpoint as transformers does (siliconvert's own
# model files run them: tests/test_mlx_models_gemma2.py, tests/test_mlx_models_phi3.py)
REFUSED = {"gemma2": "sliding_window", "phi3": "rope_scaling", "gpt_oss": "rope_scaling"}
# The same weights under a config.json edited so that mlx-lm can honour it; transformers reads the edit too,
# so the reference changes with it. Each reaches traits the refusal above would hide, or a rope scaling.
EDITED = {
    "gemma2: window as long as the context": ("gemma2", {"sliding_window": 1024}),
    "phi3: LongRoPE short = long factors": ("phi3", {"rope_parameters": {
        **FAMILY_CASES["phi3"][1]["rope_parameters"], "long_factor": [1.0 + 0.05 * i for i in range(8)]}}),
    "llama: llama3 rope": ("llama", {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}),
    "llama: yarn rope": ("llama", {"rope_parameters": {
        "rope_type": "yarn", "rope_theta": 50000.0, "factor": 4.0, "original_max_position_embeddings": 64}}),
}


@pytest.fixture(scope="module")
def family_source(small_model, tmp_path_factory):
    """family_source(name) → the FAMILY_CASES checkpoint of a family ("llama": the plain small Llama), or a copy
    of one under an EDITED case's config."""
    edited = {}

    def source(name):
        if name in EDITED:
            if name not in edited:
                family, edit = EDITED[name]
                edited[name] = tmp_path_factory.mktemp("edited") / "model"
                shutil.copytree(source(family), edited[name])
                config = json.loads((edited[name] / "config.json").read_text())
                (edited[name] / "config.json").write_text(json.dumps(config | edit))
            return edited[name]
        if name == "llama":
            return small_model("llama", "sentencepiece", rope_theta=50000.0)
        tokenizer, config = FAMILY_CASES[name]
        return small_model(name, tokenizer, config=config)
    return source


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """scored(source, engine="auto", **target) → mean KLD of the MLX artifact, run by the MLX runner (mlx-lm, its
    quantized layers dequantized by mlx on its CPU, or the torch stand-in for large models, engine="torch"), against
    transformers' FP32 logits. The runner is kept
    as `scored.runner`, for its experts' choices."""
    references = {}

    def score(source, engine="auto", **target):
        if source not in references:
            windows = held_out_windows(source)
            references[source] = windows, reference_logits_for(source, windows)
        windows, reference = references[source]
        artifact = build_mlx(source, tmp_path_factory.mktemp("mlx"), **target)
        score.runner = MLXRunner(artifact.path, {"engine": engine})
        logits = score.runner.logits_many(windows)
        vocab = reference.shape[-1]
        scores, _ = compare(reference[:, :-1].reshape(-1, vocab), logits[:, :-1].reshape(-1, vocab),
                            windows[:, 1:].reshape(-1))
        return scores.mean_kld
    return score


@pytest.mark.parametrize("family", list(FAMILY_CASES))
def test_four_bit_computes_the_source_function_or_is_refused(family, family_source, scored, tmp_path):
    source = family_source(family)
    if family in REFUSED:
        with pytest.raises(CheckpointError, match=f"cannot honour the trait {REFUSED[family]}"):
            build_mlx(source, tmp_path, bits=4)
        return
    assert scored(source, bits=4, group_size=64) <= 0.06


@pytest.mark.parametrize("family", [family for family in FAMILY_CASES if family not in REFUSED])
def test_float16_layout_is_exact(family, family_source, scored):
    assert scored(family_source(family), bits=16) < 0.001


@pytest.mark.parametrize("case", list(EDITED))
def test_float16_layout_is_exact_on_edited_configs(case, family_source, scored):
    assert scored(family_source(case), bits=16) < 0.001


# the stand-in runs attention and LFM2's convolutions, and refuses the recurrent mixers (test_validate_runners_mlx.py)
@pytest.mark.parametrize("name", ["gemma3_text", "smollm3", "granite", *list(EDITED)[:2], *ATTENTION_MOE_FAMILIES,
                                  "lfm2"])
def test_torch_stand_in_runs_the_folder_as_mlx_lm_reads_it(name, family_source, scored):
    """The stand-in for large models rebuilds transformers' config from mlx-lm's reading: Gemma 3's sliding
    period and local θ, SmolLM3's NoPE layers, Granite's multipliers, Gemma 2 without sliding layers, Phi-3's
    LongRoPE, the experts of Qwen3-MoE and Mixtral (from mlx-lm's switch_mlp), LFM2's mixers and its conv kernels
    (in mlx's axis order in the folder); float32 over the float16 weights."""
    assert scored(family_source(name), engine="torch", bits=16) < 0.001


@pytest.mark.parametrize(("family", "engine"), [(family, "mlx") for family in MOE_FAMILIES]
                         + [(family, "torch") for family in ATTENTION_MOE_FAMILIES])
def test_float16_routers_choose_the_references_experts(family, engine, family_source, scored):
    """The experts mlx-lm's routers choose (fed to its SwitchGLU), or the stand-in's, against those transformers'
    routers choose in the reference run, on the scored windows."""
    source = family_source(family)
    scored(source, engine=engine, bits=16)
    expected = reference_choices_for(source, held_out_windows(source))
    agreement = router_agreement(expected, scored.runner.expert_choices(), Checkpoint.open(source).spec.sparse_layers)
    assert agreement["same_experts"] >= 0.95, agreement


def test_gemma4_expert_block_in_mlx_lms_gemma4_text(scored, tmp_path_factory):
    """26B-A4B's expert block as mlx-lm's gemma4_text holds it (router.proj with its scale and per_expert_scale,
    experts.switch_glu, the branches' norms; enable_moe_block and top_k_experts in config.json): float16 computes
    transformers' function, its routers choose transformers' experts, and 4-bit stays within the MLX limit."""
    from families import gemma4_experts

    source = gemma4_experts(tmp_path_factory.mktemp("gemma4-experts") / "model")
    assert scored(source, bits=16) < 0.001
    expected = reference_choices_for(source, held_out_windows(source))
    agreement = router_agreement(expected, scored.runner.expert_choices(), Checkpoint.open(source).spec.sparse_layers)
    assert agreement["same_experts"] >= 0.95, agreement
    assert scored(source, bits=4, group_size=64) <= 0.06


SIZES = {"vocab_size": 1024, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024}


@pytest.mark.parametrize(("architecture", "config", "trait"), [
    ("Gemma3ForCausalLM", {"head_dim": 32, "sliding_window": 24, "num_hidden_layers": 4, "layer_types": [
        "full_attention", "sliding_attention", "full_attention", "sliding_attention"]}, "sliding_window"),
    ("Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 64, "max_window_layers": 1},
     "sliding_window"),
    ("Phi3ForCausalLM", {"original_max_position_embeddings": 256, "rope_parameters": {
        **FAMILY_CASES["phi3"][1]["rope_parameters"], "long_factor": [1.0] * 8, "short_factor": [1.0] * 8,
        "attention_factor": 2.0}}, "rope_scaling"),
    ("LlamaForCausalLM", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
     "rope_scaling"),
    # mlx-lm's YarnRoPE ignores attention_factor, and takes mscale alone where transformers needs both
    ("LlamaForCausalLM", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                              "original_max_position_embeddings": 64, "attention_factor": 1.5}},
     "rope_scaling"),
    ("LlamaForCausalLM", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                              "original_max_position_embeddings": 64, "mscale": 0.5}},
     "rope_scaling"),
])
def test_refusals_name_the_trait(architecture, config, trait):
    """Layouts mlx-lm's model files cannot express, refused from the spec alone."""
    config = SIZES | {"architectures": [architecture]} | config
    with pytest.raises(CheckpointError, match=f"cannot honour the trait {trait}"):
        MLXArch(registry.for_config(config).spec(config), "config.json")


def test_multimodal_gemma3_converts_its_language_model(family_source, tmp_path):
    """Gemma3ForConditionalGeneration: mlx-lm's gemma3_text runs the language model, exactly the text case's."""
    from families import gemma3_multimodal

    artifact = build_mlx(gemma3_multimodal(tmp_path / "multimodal"), tmp_path / "mlx", bits=16)
    assert json.loads((artifact.path / "config.json").read_text())["model_type"] == "gemma3_text"
    text = family_source("gemma3_text")
    windows = held_out_windows(text)
    reference = reference_logits_for(text, windows)
    vocab = reference.shape[-1]
    scores, _ = compare(reference[:, :-1].reshape(-1, vocab),
                        mlx_logits(artifact.path, windows)[:, :-1].reshape(-1, vocab), windows[:, 1:].reshape(-1))
    assert scores.mean_kld < 0.001


@pytest.mark.parametrize("engine", ["mlx", "torch"])
def test_ministral3_queries_are_scaled_past_the_original_context(engine, family_source, tmp_path):
    """mlx-lm's ministral3 reads Llama 4's temperature (β, its floor) from rope_parameters with the rope, as the torch
    stand-in does: positions past 64 (scaled by 1 + 0.1·ln 2) score as the first ones (with β 0: KLD 0.0004 there)."""
    source = family_source("ministral3")
    artifact = build_mlx(source, tmp_path, bits=16)
    rope = json.loads((artifact.path / "config.json").read_text())["rope_parameters"]
    assert (rope["llama_4_scaling_beta"], rope["original_max_position_embeddings"], rope["type"]) == (0.1, 64, "yarn")
    windows = held_out_windows(source)
    reference = reference_logits_for(source, windows)[:, 64:-1]
    runner = MLXRunner(artifact.path, {"engine": engine})
    logits = runner.logits_many(windows)[:, 64:-1]
    vocab = reference.shape[-1]
    scores, _ = compare(reference.reshape(-1, vocab), logits.reshape(-1, vocab), windows[:, 65:].reshape(-1))
    assert scores.mean_kld < 5e-5
