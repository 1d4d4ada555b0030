"""Core ML FP16 honours every family's traits: each family of tests/families.py (sliding windows shorter than the
scored window, per-layer rope, partial rotary LongRoPE, NoPE layers, q/k norms, norm offset and placement,
GeGLU, embedding/attention/residual/logit scales, soft-caps, fused tensors, mixtures of experts, gpt-oss's sinks,
expert biases and clamped SwiGLU, from bfloat16 and MXFP4 sources), converted and run back through the MIL
interpreter, against transformers' float32 forward (and its routers' choices)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import reference_choices_for, reference_logits_for, run_recipe
from families import FAMILY_CASES
from test_coreml import windows_of

from siliconvert.calibration import FLOAT16_MAX, Calibrations, FP16Range
from siliconvert.checkpoint import Checkpoint
from siliconvert.convert.coreml import CoreMLWriter
from siliconvert.recipe import CoreMLTarget
from siliconvert.validate.metrics import compare
from siliconvert.validate.router import router_agreement
from siliconvert.validate.runners.coreml import CoreMLRunner

pytestmark = pytest.mark.slow

CONTEXT = 64  # one prefill block: the MIL interpreter is slow, and 64 tokens already span 2+ sliding windows
MIXTURES = ["qwen3_moe", "mixtral", "qwen2_moe", "olmoe", "gpt_oss"]  # 4 experts, 2 per token


def build(source, out_dir, chunks: int | str = "auto"):
    checkpoint = Checkpoint.open(source)
    writer = CoreMLWriter(checkpoint, CoreMLTarget(format="coreml", context=CONTEXT, chunks=chunks), out_dir, "tiny")
    for info, array in checkpoint.tensors():
        writer.add(info, array)
    return writer.finish()


@pytest.fixture(scope="session", params=list(FAMILY_CASES))
def family_package(request, small_model, tmp_path_factory):
    """(family, source checkpoint, fp16 artifact, held-out windows, reference logits), built once per family."""
    tokenizer, config = FAMILY_CASES[request.param]
    source = small_model(request.param, tokenizer, config=config)
    (artifact,) = build(source, tmp_path_factory.mktemp(f"coreml-{request.param}"))
    windows = windows_of(source, count=2, length=CONTEXT)
    return request.param, source, artifact, windows, reference_logits_for(source, windows)


def test_gemma4_in_two_chunks(small_model, tmp_path):
    """The recipe end to end in two chunks: the per-layer inputs made by the first chunk pass to the second, the
    bound between them moved down from layer 2 to layer 1, which kv-shared layer 3 reads (layer 4 reads layer 2);
    the gates and the KV-cache state check pass."""
    tokenizer, config = FAMILY_CASES["gemma4_text"]
    source = small_model("gemma4_text", tokenizer, config=config)
    validate = {"tokens": 128, "context": CONTEXT, "prefill_tokens": 16, "decode_tokens": 4,
                "gates": {"max_mean_kld": 0.002, "min_same_top1": 0.97}}
    (artifact,) = run_recipe(source, tmp_path, "gemma4", targets=[{"format": "coreml", "context": CONTEXT,
                                                                   "chunks": 2}], validate=validate)["artifacts"]
    assert artifact["gates"]["passed"] and artifact["kv_cache"]["consistent"], artifact
    manifest = json.loads((Path(artifact["path"]) / "manifest.json").read_text())
    assert [(chunk["first_layer"], chunk["num_layers"]) for chunk in manifest["chunks"]] == [(0, 1), (1, 4)]
    assert manifest["chunks"][0]["outputs"] == ["hidden_states_out", "per_layer_inputs"]
    assert manifest["chunks"][1]["inputs"][-1] == "per_layer_inputs"


def test_gemma4_expert_block(tmp_path):
    """26B-A4B's expert block beside the dense MLP, its router's scales set apart from 1 (families.gemma4_experts):
    FP16 computes transformers' function within the Core ML limits, its routers choose transformers' experts, and
    decoding through the cache agrees with the whole window."""
    from families import gemma4_experts

    source = gemma4_experts(tmp_path / "gemma4-experts")
    validate = {"tokens": 2 * CONTEXT, "context": CONTEXT, "prefill_tokens": 16, "decode_tokens": 4,
                "gates": {"max_mean_kld": 0.002, "min_same_top1": 0.97, "min_router_agreement": 0.95}}
    (artifact,) = run_recipe(source, tmp_path, "gemma4-experts", targets=[{"format": "coreml", "context": CONTEXT}],
                             validate=validate)["artifacts"]
    assert artifact["gates"]["passed"] and artifact["kv_cache"]["consistent"], artifact
    assert artifact["router_agreement"]["measured"]
    assert artifact["compute"].startswith("experts evaluated per token: 4 of which 2 used")


def test_fp16_logits_match_the_reference(family_package):
    family, source, artifact, windows, reference = family_package
    runner = CoreMLRunner(artifact.path, artifact.runner_options)
    logits = runner.logits_many(windows)
    vocab = reference.shape[-1]
    scores = compare(reference[:, :-1].reshape(-1, vocab), logits[:, :-1].reshape(-1, vocab),
                     windows[:, 1:].reshape(-1))[0]
    assert scores.mean_kld < 0.002 and scores.same_top1 >= 0.97, (family, scores)
    spec = Checkpoint.open(source).spec
    assert (runner.expert_choices() is None) == (spec.experts is None)


@pytest.mark.parametrize("family_package", MIXTURES, indirect=True)
def test_routers_choose_the_reference_experts(family_package):
    """The interpreter's routers against transformers' (recorded by RouterRecorder, as the reference run
    records them), over every scored token and sparse layer; and the cost of evaluating every expert, stated."""
    _, source, artifact, windows, _ = family_package
    spec = Checkpoint.open(source).spec
    runner = CoreMLRunner(artifact.path, artifact.runner_options)
    runner.logits_many(windows)
    agreement = router_agreement(reference_choices_for(source, windows), runner.expert_choices(), spec.sparse_layers)
    assert agreement["same_experts"] >= 0.95, agreement
    statement = "experts evaluated per token: 4 of which 2 used"
    assert artifact.runner_options["compute"].startswith(statement)
    assert json.loads((artifact.path / "manifest.json").read_text())["compute"].startswith(statement)


def test_manifest_records_the_numerics(family_package):
    family, _, artifact, _, _ = family_package
    numerics = json.loads((artifact.path / "manifest.json").read_text())["numerics"]
    if family == "phi3":  # LongRoPE: a 64-token package is within the original context, so "short" factors
        assert numerics["longrope_factors"] == ["short"]
    # (1 + w) norms; Gemma 4's multiply by w itself
    assert numerics["norm_offset_folded"] == family.startswith(("gemma2", "gemma3", "qwen3_5", "qwen3_next"))


@pytest.mark.parametrize("family_package", ["gemma2", "smollm3", "qwen3_moe", "gemma4_text", "gpt_oss"], indirect=True)
def test_decode_through_the_cache_equals_prefill(family_package):
    """Sliding-window (Gemma 2) and NoPE (SmolLM3) layers through the KV cache, one token at a time past the
    window; the router of a token alone (Qwen3-MoE); Gemma 4's caches of two shapes, read by its kv-shared layers;
    gpt-oss's sinks in the one-token softmax, its sliding and full layers alternating."""
    _, _, artifact, windows, _ = family_package
    runner = CoreMLRunner(artifact.path, {})
    prompt, continuation = windows[0][:24], windows[0][24:40]
    cached = runner.cached_logits(prompt, continuation)
    full = runner.logits(windows[0][:40])[23:40]
    assert np.array_equal(cached.argmax(-1), full.argmax(-1))
    np.testing.assert_allclose(cached, full, atol=0.05)  # fp16 logits: a few ulps apart


def test_gemma4_layer_scalars(small_model, tmp_path):
    """Each layer's output × its layer_scalar (1 in the trained case: set apart from 1 here, and from each other)."""
    from safetensors.torch import load_file, save_file

    tokenizer, config = FAMILY_CASES["gemma4_text"]
    source = tmp_path / "scaled"
    shutil.copytree(small_model("gemma4_text", tokenizer, config=config), source)
    tensors = load_file(source / "model.safetensors")
    for name in tensors:
        if name.endswith("layer_scalar"):
            tensors[name] = tensors[name] * (0.5 + 0.25 * int(name.split(".")[2]))
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    (artifact,) = build(source, tmp_path / "package")
    windows = windows_of(source, count=2, length=CONTEXT)
    reference = reference_logits_for(source, windows)
    logits = CoreMLRunner(artifact.path, artifact.runner_options).logits_many(windows)
    vocab = reference.shape[-1]
    scores = compare(reference[:, :-1].reshape(-1, vocab), logits[:, :-1].reshape(-1, vocab),
                     windows[:, 1:].reshape(-1))[0]
    assert scores.mean_kld < 0.002 and scores.same_top1 >= 0.97, scores


def scorer(source, windows: np.ndarray):
    """A package's scores against the reference on `windows`, by the MIL interpreter."""
    reference = reference_logits_for(source, windows)
    vocab = reference.shape[-1]

    def scores_of(artifact):
        logits = CoreMLRunner(artifact.path, {}).logits_many(windows)
        return compare(reference[:, :-1].reshape(-1, vocab), logits[:, :-1].reshape(-1, vocab),
                       windows[:, 1:].reshape(-1))[0]
    return scores_of


def with_loud_stream(source, folder, gain: float):
    """A copy of `source` whose post-feedforward norms are `gain` times louder: a residual stream past fp16's
    range (as in real Gemma checkpoints) that transformers' float32 forward still computes exactly."""
    from safetensors.torch import load_file, save_file

    offset = Checkpoint.open(source).spec.norm_offset  # Gemma 2 and 3's norms multiply by 1 + w, Gemma 4's by w
    shutil.copytree(source, folder)
    tensors = load_file(folder / "model.safetensors")
    for name in tensors:
        if name.endswith("post_feedforward_layernorm.weight"):
            tensors[name] = (offset + tensors[name]) * gain - offset
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the unscaled package's inf / inf
@pytest.mark.parametrize("family", ["gemma2", "gemma4_text"])  # Gemma 4: its per-layer inputs read the stream raw
def test_a_stream_past_fp16_range_is_scaled_back_into_it(family, small_model, tmp_path, monkeypatch):
    tokenizer, config = FAMILY_CASES[family]
    source = with_loud_stream(small_model(family, tokenizer, config=config), tmp_path / "loud", gain=16000.0)
    windows = windows_of(source, count=2, length=CONTEXT)
    scores_of = scorer(source, windows)

    (artifact,) = build(source, tmp_path / "scaled")
    numerics = json.loads((artifact.path / "manifest.json").read_text())["numerics"]
    assert numerics["residual_stream_peak"] > FLOAT16_MAX and numerics["residual_stream_scale"] < 1
    scores = scores_of(artifact)
    assert scores.mean_kld < 0.002 and scores.same_top1 >= 0.97, scores
    # Unscaled, the stream overflows to inf in the interpreter as it would on the device: the scores say so
    monkeypatch.setattr(Calibrations, "fp16_range", lambda self: FP16Range(0.0, 1.0))
    (unscaled,) = build(source, tmp_path / "unscaled")
    assert not scores_of(unscaled).same_top1 > 0.5


def test_ministral3_past_the_original_context(small_model, tmp_path):
    """Llama 4's attention temperature in the graph: a 128-token package scores 96-token windows as transformers does
    past position 64, where q is scaled by 1 + 0.1·ln 2 (without it: KLD 0.0004 there), in prefill and through the
    cache one token at a time."""
    tokenizer, config = FAMILY_CASES["ministral3"]
    source = small_model("ministral3", tokenizer, config=config)
    checkpoint = Checkpoint.open(source)
    writer = CoreMLWriter(checkpoint, CoreMLTarget(format="coreml", context=128), tmp_path, "tiny")
    for info, array in checkpoint.tensors():
        writer.add(info, array)
    (artifact,) = writer.finish()
    windows = windows_of(source, count=2, length=96)
    reference = reference_logits_for(source, windows)[:, 64:-1]
    runner = CoreMLRunner(artifact.path, artifact.runner_options)
    vocab = reference.shape[-1]
    late = compare(reference.reshape(-1, vocab), runner.logits_many(windows)[:, 64:-1].reshape(-1, vocab),
                   windows[:, 65:].reshape(-1))[0]
    assert late.mean_kld < 5e-5 and late.same_top1 >= 0.97, late
    cached = runner.cached_logits(windows[0][:60], windows[0][60:80])
    full = runner.logits(windows[0][:80])[59:80]
    assert np.array_equal(cached.argmax(-1), full.argmax(-1))
    np.testing.assert_allclose(cached, full, atol=0.05)


def with_sinks(source, folder, values: tuple[float, ...]):
    """A copy of `source` whose attention sinks are `values` per head (the trained ones, about 0.1, move a softmax
    too little to tell a package that drops them from one that keeps them)."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, folder)
    tensors = load_file(folder / "model.safetensors")
    for name in tensors:
        if name.endswith("self_attn.sinks"):
            tensors[name] = torch.tensor(values, dtype=tensors[name].dtype)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_gpt_oss_sinks_are_in_the_softmax(small_model, tmp_path, monkeypatch):
    """Sinks set apart from 0 (each head's share of the softmax then large): the package scores as transformers does,
    in both of the interpreter's backends; the same package with its sinks zeroed fails the Core ML FP16 gate (mean
    KLD < 0.002, same top-1 ≥ 97 %)."""
    from siliconvert.convert.coreml import writer

    tokenizer, config = FAMILY_CASES["gpt_oss"]
    source = with_sinks(small_model("gpt_oss", tokenizer, config=config), tmp_path / "sinks", (3.0, 1.0, 2.0, 4.0))
    windows = windows_of(source, count=2, length=CONTEXT)
    scores_of = scorer(source, windows)

    (artifact,) = build(source, tmp_path / "kept")
    scores = scores_of(artifact)
    assert scores.mean_kld < 0.002 and scores.same_top1 >= 0.97, scores
    by_numpy = CoreMLRunner(artifact.path, {"interpreter": "numpy"}).logits(windows[0])
    np.testing.assert_allclose(by_numpy, CoreMLRunner(artifact.path, {}).logits(windows[0]), atol=0.05)
    graph_tensors = writer.graph_tensors

    def zeroed_sinks(spec, key, array, *scales):
        for part, values in graph_tensors(spec, key, array, *scales):
            yield part, np.zeros_like(values) if part[0] == "attn_sinks" else values

    monkeypatch.setattr(writer, "graph_tensors", zeroed_sinks)
    (broken,) = build(source, tmp_path / "zeroed")
    broken_scores = scores_of(broken)
    assert not (broken_scores.mean_kld < 0.002 and broken_scores.same_top1 >= 0.97), broken_scores


def test_gpt_oss_from_mxfp4_passes_every_gate(tmp_path):
    """The MXFP4-source case end to end: Core ML FP16 within its gates (router agreement among them), the KV-cache
    state check passing, and the report saying its MXFP4 experts are stored as fp16, every value exact."""
    from families import gpt_oss_mxfp4

    source = gpt_oss_mxfp4(tmp_path / "mxfp4")
    validate = {"tokens": 128, "context": CONTEXT, "prefill_tokens": 16, "decode_tokens": 4, "latency": False,
                "gates": {"max_mean_kld": 0.002, "min_same_top1": 0.97, "min_router_agreement": 0.95}}
    (artifact,) = run_recipe(source, tmp_path, "gpt-oss", targets=[{"format": "coreml", "context": CONTEXT}],
                             validate=validate)["artifacts"]
    assert artifact["gates"]["passed"] and artifact["kv_cache"]["consistent"], artifact
    assert artifact["router_agreement"]["measured"], artifact
    assert artifact["source_quantization"] == ("MXFP4 stored as float16 in 24 weights (Core ML has no MXFP4 type): "
                                               "every value exact")


def test_mxfp4_experts_re_quantized_by_int4_are_said_so(tmp_path):
    """A compressed variant re-quantizes the experts that arrived as MXFP4 (Core ML has no MXFP4 type), and the fp16
    package counts the values fp16 does not hold: here one block of 32 whose scale is 2^-30, each of its non-zero
    values (E2M1 × 2^-30) below fp16's smallest subnormal (2^-24)."""
    import re

    from families import gpt_oss_mxfp4
    from safetensors.torch import load_file, save_file

    source = gpt_oss_mxfp4(tmp_path / "mxfp4")
    tensors = load_file(source / "model.safetensors")
    tensors["model.layers.0.mlp.experts.down_proj_scales"][0, 0, 0] = 127 - 30
    codes = tensors["model.layers.0.mlp.experts.down_proj_blocks"][0, 0, 0]
    underflowing = int(((codes & 0x07) != 0).sum() + ((codes >> 4 & 0x07) != 0).sum())
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    checkpoint = Checkpoint.open(source)
    target = CoreMLTarget(format="coreml", context=CONTEXT, precision=["fp16", "int4"])
    writer = CoreMLWriter(checkpoint, target, tmp_path / "out", "tiny")
    for info, array in checkpoint.tensors():
        writer.add(info, array)
    said = {artifact.quant: artifact.source_quantization for artifact in writer.finish()}
    inexact = re.fullmatch(r"MXFP4 stored as float16 in 24 weights \(Core ML has no MXFP4 type\): (\d+) of "
                           r"(\d+) values not exact \(past float16's range\)", said["fp16"])
    assert inexact and int(inexact[1]) == underflowing > 0 and int(inexact[2]) == 2 * 4 * 3 * 96 * 128, said
    assert said["int4"] == "MXFP4 re-quantized in 24 of 24 weights (as int4)"
