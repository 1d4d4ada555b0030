"""GGUF on every family: llama.cpp, reading our file, computes what transformers computes.

The checkpoints (tests/families.py) switch each family's traits on, so a trait llama.cpp would compute
otherwise (Gemma's attention scalar, Gemma 3's per-layer-type rope, a sliding window shorter than the
window scored, LongRoPE with partial rotary, NoPE layers, Granite's multipliers) shows up as KLD here. On a
mixture of experts llama.cpp's routers must also choose the experts transformers' routers choose.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import reference_choices_for, reference_logits_for, run_recipe
from families import FAMILY_CASES, LLAMA_CPP_SHAPES, TRUNCATED_YARN
from transformers import AutoTokenizer

from siliconvert.checkpoint import Checkpoint
from siliconvert.convert.gguf import GGUFWriter
from siliconvert.demo import small_checkpoint
from siliconvert.recipe import GGUFTarget
from siliconvert.textdata import heldout_text
from siliconvert.validate.metrics import compare
from siliconvert.validate.router import router_agreement
from siliconvert.validate.runners.gguf import LlamaCppRunner

pytestmark = pytest.mark.slow

WINDOW, WINDOWS = 96, 2  # longer than the test cases' 24-token sliding window
QUANTS = ["F16", "Q4_K_M"]
LIMITS = {"F16": 0.001, "Q4_K_M": 0.1}  # mean KLD to the float32 reference (hidden 128: legacy quant fallbacks)
MIN_ROUTER_AGREEMENT = {"F16": 0.95, "Q4_K_M": 0.85}  # tokens whose chosen experts are the reference's, every layer


@pytest.fixture(scope="module", params=list(FAMILY_CASES))
def family(request: pytest.FixtureRequest) -> Path:
    """The family's case, in the shapes llama.cpp's graph runs where the case's own are refused naming the trait
    (tests/test_families.py checks those refusals) or warned (untruncated YaRN: tests/test_gguf_moe.py)."""
    tokenizer, config = FAMILY_CASES[request.param]
    shapes = LLAMA_CPP_SHAPES.get(request.param, {}) | TRUNCATED_YARN.get(request.param, {})
    return small_checkpoint(None, request.param, tokenizer, config=config | shapes)


@pytest.fixture(scope="module")
def scored(family: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    checkpoint = Checkpoint.open(family)
    writer = GGUFWriter(checkpoint, GGUFTarget(format="gguf", quants=QUANTS), tmp_path_factory.mktemp("gguf"), "m")
    for info, array in checkpoint.tensors():
        writer.add(info, array)
    ids = AutoTokenizer.from_pretrained(family)(heldout_text()[:20_000], add_special_tokens=False)["input_ids"]
    windows = np.array(ids[:WINDOW * WINDOWS]).reshape(WINDOWS, WINDOW)
    targets = np.array(ids[1:WINDOW * WINDOWS + 1]).reshape(WINDOWS, WINDOW)
    spec = checkpoint.spec
    reference = reference_logits_for(family, windows)
    reference_choices = reference_choices_for(family, windows) if spec.experts is not None else None
    results = {}
    for artifact in writer.finish():
        runner = LlamaCppRunner(artifact.path, {"context": WINDOW})
        try:
            logits = runner.logits_many(windows)
            choices = runner.expert_choices()
            unmeasured = runner.unmeasured().get("router")
        finally:
            runner.close()
        result = compare(reference.reshape(-1, reference.shape[-1]), logits.reshape(-1, logits.shape[-1]),
                         targets.reshape(-1))[0]
        router = None if reference_choices is None else router_agreement(reference_choices, choices,
                                                                          spec.sparse_layers, unmeasured)
        results[artifact.quant] = (result, router)
    return results


@pytest.mark.parametrize("quant", QUANTS)
def test_llama_cpp_computes_the_source_function(scored: dict, quant: str) -> None:
    result, _ = scored[quant]
    assert result.mean_kld < LIMITS[quant]
    if quant == "F16":
        assert result.same_top1 >= 0.98


@pytest.mark.parametrize("quant", QUANTS)
def test_llama_cpp_routes_tokens_to_the_sources_experts(family: Path, scored: dict, quant: str) -> None:
    _, router = scored[quant]
    if router is None:
        pytest.skip(f"{family.name} has no experts")
    assert router["measured"], router["reason"]
    assert router["same_experts"] >= MIN_ROUTER_AGREEMENT[quant], router


def test_gemma3_multimodal_converts_its_language_model(tmp_path: Path) -> None:
    """Gemma3ForConditionalGeneration: the vision tower is dropped (said so), the language model converts, and
    llama.cpp computes what the multimodal model computes on text."""
    from families import gemma3_multimodal
    from transformers import Gemma3ForConditionalGeneration

    from siliconvert.architectures import ConfigWarning

    source = gemma3_multimodal(tmp_path / "gemma3-multimodal")
    with pytest.warns(ConfigWarning, match=r"vision tower and projector \(\d+ tensors\) are dropped"):
        checkpoint = Checkpoint.open(source)
    assert checkpoint.spec.family == "gemma3" and checkpoint.config["architectures"] == ["Gemma3ForCausalLM"]
    assert text_kld_of_f16(checkpoint, source, Gemma3ForConditionalGeneration, tmp_path) < LIMITS["F16"]


def test_gemma4_multimodal_converts_its_language_model(tmp_path: Path) -> None:
    """Gemma4ForConditionalGeneration (E2B and E4B: vision and audio towers): both towers and their embedders are
    dropped (said so), the language model converts, and llama.cpp computes what the multimodal model computes on
    text."""
    from families import gemma4_multimodal
    from transformers import Gemma4ForConditionalGeneration

    from siliconvert.architectures import ConfigWarning

    source = gemma4_multimodal(tmp_path / "gemma4-multimodal")
    with pytest.warns(ConfigWarning, match=r"vision and audio towers and their embedders \(\d+ tensors\) are dropped"):
        checkpoint = Checkpoint.open(source)
    assert checkpoint.spec.family == "gemma4" and checkpoint.config["architectures"] == ["Gemma4ForCausalLM"]
    assert text_kld_of_f16(checkpoint, source, Gemma4ForConditionalGeneration, tmp_path) < LIMITS["F16"]


def test_gemma4_expert_block_is_llama_cpps_gemma4_moe(tmp_path: Path) -> None:
    """26B-A4B's expert block beside the dense MLP: the experts' gate and up as one ffn_gate_up_exps stack, the
    router's scale per input as ffn_gate_inp.scale and per expert as ffn_down_exps.scale, the branches' norms; F16
    computes transformers' function and its routers choose transformers' experts."""
    from families import gemma4_experts
    from gguf import GGUFReader

    source = gemma4_experts(tmp_path / "gemma4-experts")
    report = run_recipe(source, tmp_path, "gemma4-moe", targets=[{"format": "gguf", "quants": QUANTS}],
                        validate={"tokens": 2 * WINDOW, "context": WINDOW})
    rows = {row["quant"]: row for row in report["artifacts"]}
    assert rows["F16"]["metrics"]["mean_kld"] < LIMITS["F16"]
    for quant, row in rows.items():
        assert row["router_agreement"]["same_experts"] >= MIN_ROUTER_AGREEMENT[quant], quant
    reader = GGUFReader(rows["F16"]["path"])
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    stream = {info.name: array for info, array in Checkpoint.open(source).tensors()
              if info.name.startswith("model.layers.3.")}
    assert tensors["blk.3.ffn_gate_up_exps.weight"].data.shape == (4, 128, 128)  # gate rows, then up rows
    assert "blk.3.ffn_gate_exps.weight" not in tensors
    np.testing.assert_array_equal(tensors["blk.3.ffn_down_exps.scale"].data,
                                  stream["model.layers.3.router.per_expert_scale"].astype(np.float32))
    np.testing.assert_array_equal(tensors["blk.3.ffn_gate_inp.scale"].data,
                                  stream["model.layers.3.router.scale"].astype(np.float32))
    for norm in ("post_ffw_norm_1", "pre_ffw_norm_2", "post_ffw_norm_2"):
        assert tensors[f"blk.3.{norm}.weight"].data.shape == (128,)
    keys = {field.name: field.contents() for field in reader.fields.values()}
    assert (keys["gemma4.expert_count"], keys["gemma4.expert_used_count"]) == (4, 2)
    assert keys["gemma4.expert_feed_forward_length"] == 64


def test_a_phi3_name_without_the_tokens_llama_cpp_looks_up_is_refused(tmp_path: Path) -> None:
    """llama.cpp keys token attributes on general.name: a model named phi3 whose vocabulary lacks <|endoftext|>
    would not load. The writer says so before writing, instead of leaving a file llama.cpp refuses."""
    from siliconvert.errors import CheckpointError

    tokenizer, config = FAMILY_CASES["phi3"]
    checkpoint = Checkpoint.open(small_checkpoint(None, "phi3", tokenizer, config=config))
    with pytest.raises(CheckpointError, match=r"named 'phi3-mini'.*<\|endoftext\|>"):
        GGUFWriter(checkpoint, GGUFTarget(format="gguf", quants=["F16"]), tmp_path, "phi3-mini")


def test_llama_cpp_scales_ministral3_queries_past_the_original_context(tmp_path: Path) -> None:
    """Llama 4's attention temperature is 1 before position 64 and 1 + 0.1·ln 2 after: the mistral3 graph reads β and
    its floor from the file, so the positions past 64 score as the first ones (without the key: KLD 0.0004 there)."""
    from gguf import GGUFReader

    tokenizer, config = FAMILY_CASES["ministral3"]
    source = small_checkpoint(None, "ministral3", tokenizer, config=config)
    checkpoint = Checkpoint.open(source)
    writer = GGUFWriter(checkpoint, GGUFTarget(format="gguf", quants=["F16"]), tmp_path, "m")
    for info, array in checkpoint.tensors():
        writer.add(info, array)
    [artifact] = writer.finish()
    fields = GGUFReader(artifact.path).fields
    assert fields["mistral3.attention.temperature_scale"].contents() == pytest.approx(0.1)
    assert fields["mistral3.rope.scaling.original_context_length"].contents() == 64
    ids = AutoTokenizer.from_pretrained(source)(heldout_text()[:20_000], add_special_tokens=False)["input_ids"]
    windows = np.array(ids[:WINDOW * WINDOWS]).reshape(WINDOWS, WINDOW)
    targets = np.array(ids[1:WINDOW * WINDOWS + 1]).reshape(WINDOWS, WINDOW)
    reference = reference_logits_for(source, windows)[:, 64:]
    runner = LlamaCppRunner(artifact.path, {"context": WINDOW})
    try:
        logits = runner.logits_many(windows)[:, 64:]
    finally:
        runner.close()
    vocab = reference.shape[-1]
    late = compare(reference.reshape(-1, vocab), logits.reshape(-1, vocab), targets[:, 64:].reshape(-1))[0]
    assert late.mean_kld < 5e-5


def text_kld_of_f16(checkpoint: Checkpoint, source: Path, model_class, tmp_path: Path) -> float:
    """Mean KLD of the F16 GGUF of `checkpoint` (a multimodal source's language model) against `model_class`'s
    own forward of the whole multimodal checkpoint on one held-out text window."""
    import torch

    writer = GGUFWriter(checkpoint, GGUFTarget(format="gguf", quants=["F16"]), tmp_path, "m")
    for info, array in checkpoint.tensors():
        writer.add(info, array)
    [artifact] = writer.finish()
    ids = AutoTokenizer.from_pretrained(source)(heldout_text()[:5000], add_special_tokens=False)["input_ids"]
    window = np.array(ids[:WINDOW])
    model = model_class.from_pretrained(source, dtype=torch.float32).eval()
    with torch.inference_mode():
        reference = model(input_ids=torch.as_tensor(window[None])).logits[0].numpy()
    runner = LlamaCppRunner(artifact.path, {"context": WINDOW})
    try:
        logits = runner.logits(window)
    finally:
        runner.close()
    return compare(reference[:-1], logits[:-1], window[1:])[0].mean_kld
