"""Core ML FP16 of a hybrid model (LFM2: gated short convolutions around one attention layer), run back through
the MIL interpreter: against transformers' float32 forward, and decoding through its states (the attention
layer's KV cache and the convolutions' conv state) against the no-state pass, which a broken conv state fails."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from conftest import reference_logits_for, run_recipe
from test_coreml import windows_of

from siliconvert.calibration import FLOAT16_MAX, Calibrations, FP16Range
from siliconvert.checkpoint import Checkpoint
from siliconvert.convert.coreml import CoreMLWriter, graph
from siliconvert.recipe import CoreMLTarget
from siliconvert.validate.metrics import compare
from siliconvert.validate.runners.coreml import CoreMLRunner
from siliconvert.validate.score import cached_window_logits, kv_cache_check

pytestmark = pytest.mark.slow

CONTEXT = 64  # one prefill block; the state check's prompt (16 tokens) is a padded one
# a recipe's validation: 128 tokens, the state check's 16-token prompt and 4 steps, the FP16 limits
FP16_VALIDATE = {"tokens": 128, "context": CONTEXT, "prefill_tokens": 16, "decode_tokens": 4,
                 "gates": {"max_mean_kld": 0.002, "min_same_top1": 0.97}}
GAIN = 8192.0  # B·x peaks at about 11 in the lfm2 test checkpoint


def build(source, out_dir, chunks: int | str = "auto"):
    checkpoint = Checkpoint.open(source)
    writer = CoreMLWriter(checkpoint, CoreMLTarget(format="coreml", context=CONTEXT, chunks=chunks), out_dir, "tiny")
    for info, array in checkpoint.tensors():
        writer.add(info, array)
    (artifact,) = writer.finish()
    return artifact


@pytest.fixture(scope="module")
def lfm2(family_model):
    """(source, windows, reference logits)."""
    source = family_model("lfm2")
    windows = windows_of(source, count=2, length=CONTEXT)
    return source, windows, reference_logits_for(source, windows)


def state_check(artifact, windows, reference):
    """The pipeline's check: the first window's prompt, then its tokens one at a time through the states."""
    runner = CoreMLRunner(artifact.path, {})
    logits = runner.logits_many(windows)
    cached, prompt = cached_window_logits(runner, windows[0])
    vocab = reference.shape[-1]
    return logits, kv_cache_check(cached[:, :vocab], prompt, logits[0], reference[0], windows[0][1:])


def scored(artifact, windows, reference):
    """The package's scores against the reference on every window (the next-token positions), and its state check."""
    logits, check = state_check(artifact, windows, reference)
    vocab = reference.shape[-1]
    scores = compare(reference[:, :-1].reshape(-1, vocab), logits[:, :-1].reshape(-1, vocab),
                     windows[:, 1:].reshape(-1))[0]
    return scores, check


@pytest.mark.parametrize("chunks", [1, 2])  # 2: the second package holds only short convolutions
def test_lfm2_matches_the_reference_and_decodes_through_its_states(lfm2, tmp_path, chunks):
    source, windows, reference = lfm2
    artifact = build(source, tmp_path, chunks)
    scores, check = scored(artifact, windows, reference)
    assert scores.mean_kld < 0.002 and scores.same_top1 >= 0.97, scores
    assert check["consistent"] and check["same_top1"] == 1.0, check
    manifest = json.loads((artifact.path / "manifest.json").read_text())
    spec = Checkpoint.open(source).spec
    conv_rows = [entry["states"]["conv_state"][0] for entry in manifest["chunks"] if "conv_state" in entry["states"]]
    assert sum(conv_rows) == len(spec.mixer_layers("short_conv")) == 3
    # fp16: the last kernel − 1 values of B·x per channel and conv layer, whatever the sequence's length
    assert manifest["state_bytes"]["conv_state"] == 2 * spec.state_numbers()["short_conv"] == 2 * 3 * 128 * 2
    assert manifest["state_bytes"]["kv_cache"] == 2 * 2 * math.prod(manifest["chunks"][0]["states"]["key_cache"])
    assert artifact.runner_options["state_bytes"] == manifest["state_bytes"]
    assert all(entry["inputs"][2:] == ["valid_tokens"] for entry in manifest["chunks"])


def not_advanced(conv, update, row):
    """The state written back as it was read: the convolution forgets every token past the prompt."""
    ORIGINAL_WRITE(conv, conv.read(row), row)


def reset(conv, update, row):
    ORIGINAL_WRITE(conv, graph.mb.mul(x=update, y=np.float16(0)), row)


ORIGINAL_WRITE = graph.ConvState.write


@pytest.mark.parametrize("broken", [not_advanced, reset])
def test_a_broken_conv_state_fails_the_state_check(lfm2, tmp_path, monkeypatch, broken):
    source, windows, reference = lfm2
    monkeypatch.setattr(graph.ConvState, "write", broken)
    _, check = state_check(build(source, tmp_path), windows, reference)
    assert not check["consistent"], check


def test_a_conv_state_past_fp16_range_is_scaled_back_into_it(lfm2, tmp_path):
    """B's rows of in_proj 8192 times louder and C's as much quieter: the same function, a B·x of ~1e5, past fp16
    (Core ML's states are fp16 only). The calibrated state scale keeps it inside, folded into the weights."""
    from safetensors.torch import load_file, save_file

    source, windows, reference = lfm2
    loud = tmp_path / "loud"
    shutil.copytree(source, loud)
    tensors = load_file(loud / "model.safetensors")
    for name in [n for n in tensors if n.endswith("conv.in_proj.weight")]:
        b, c, x = tensors[name].chunk(3)
        tensors[name] = torch.cat([b * GAIN, c / GAIN, x])
    save_file(tensors, loud / "model.safetensors", metadata={"format": "pt"})
    artifact = build(loud, tmp_path / "out")
    numerics = json.loads((artifact.path / "manifest.json").read_text())["numerics"]
    assert numerics["state_peak"] * 16 > FLOAT16_MAX and numerics["state_scale"] < 1
    scores, check = scored(artifact, windows, reference)
    assert scores.mean_kld < 0.002 and scores.same_top1 >= 0.97, scores
    assert check["consistent"], check


def test_recipe_converts_validates_and_reports_the_states(lfm2, tmp_path):
    """End to end: the recipe's Core ML FP16 target on LFM2 passes its gates and the state check, and report.json
    gives the states' bytes beside the KV cache's."""
    source = lfm2[0]
    (artifact,) = run_recipe(source, tmp_path, "lfm2", targets=[{"format": "coreml", "context": CONTEXT}],
                             validate=FP16_VALIDATE)["artifacts"]
    assert artifact["kv_cache"]["consistent"] is True
    assert artifact["state_bytes"] == {"kv_cache": 2 * 2 * 1 * 2 * CONTEXT * 32, "conv_state": 2 * 3 * 128 * 2}
    assert "conv_state 1,536 bytes" in (tmp_path / "out" / "report.md").read_text()


# ---- the gated delta rule (Qwen3.5 dense and MoE, Qwen3-Next) ----------------------------------------------------

DELTA_FAMILIES = ["qwen3_5_text", "qwen3_5_moe_text", "qwen3_next"]


@pytest.fixture(scope="module", params=DELTA_FAMILIES)
def delta_model(request, family_model):
    """(source, windows, reference logits) of a gated-delta-rule family."""
    source = family_model(request.param)
    windows = windows_of(source, count=2, length=CONTEXT)
    return source, windows, reference_logits_for(source, windows)


def test_gated_delta_families_match_the_reference_and_decode_through_their_states(delta_model, tmp_path):
    """Three gated-delta-rule layers and a gated attention layer, in two packages: the prefill block through the
    chunked form, decoding one token at a time through the conv and recurrent states and the KV cache."""
    source, windows, reference = delta_model
    artifact = build(source, tmp_path, 2)
    scores, check = scored(artifact, windows, reference)
    manifest = json.loads((artifact.path / "manifest.json").read_text())
    size = sum(f.stat().st_size for f in artifact.path.rglob("*") if f.is_file())
    print(f"{source.name}: mean KLD {scores.mean_kld:.6f}, same top-1 {scores.same_top1:.4f}, {size:,} bytes, "
          f"state bytes {manifest['state_bytes']}, state check excess KLD {check['excess_kld']:.2e}")
    assert scores.mean_kld < 0.002 and scores.same_top1 >= 0.97, scores
    assert check["consistent"] and check["same_top1"] == 1.0, check
    delta = Checkpoint.open(source).spec.gated_delta
    # fp16, per gated-delta layer: the conv's last 3 inputs of q, k, v, and S per value head, whatever the length
    assert manifest["state_bytes"]["delta_conv_state"] == 2 * 3 * delta.conv_channels * (delta.conv_kernel - 1)
    assert manifest["state_bytes"]["recurrent_state"] == 2 * 3 * 4 * 32 * 24
    assert manifest["numerics"]["recurrent_scale"] == 1.0 and manifest["numerics"]["recurrent_peak"] > 0


@pytest.fixture(scope="module")
def qwen3_5(family_model):
    source = family_model("qwen3_5_text")
    windows = windows_of(source, count=2, length=CONTEXT)
    return source, windows, reference_logits_for(source, windows)


def test_a_prefill_in_two_blocks_computes_as_one(qwen3_5, tmp_path):
    """A 96-token context takes 32-token prefill blocks: a 64-token window is then two chunked blocks, the second
    starting from the state the first left, and gives the logits of one 64-token block."""
    source, windows, _ = qwen3_5
    one = CoreMLRunner(build(source, tmp_path / "one").path, {})
    checkpoint = Checkpoint.open(source)
    writer = CoreMLWriter(checkpoint, CoreMLTarget(format="coreml", context=96), tmp_path / "two", "tiny")
    for info, array in checkpoint.tensors():
        writer.add(info, array)
    two = CoreMLRunner(writer.finish()[0].path, {})
    assert (one.block, two.block) == (64, 32)
    whole, halves = one.logits_many(windows[:1]), two.logits_many(windows[:1])
    log_whole = torch.log_softmax(torch.as_tensor(whole, dtype=torch.float64), -1)
    log_halves = torch.log_softmax(torch.as_tensor(halves, dtype=torch.float64), -1)
    kld = (log_whole.exp() * (log_whole - log_halves)).sum(-1)
    assert float(kld.max()) < 1e-4 and (whole.argmax(-1) == halves.argmax(-1)).all(), float(kld.max())


@pytest.fixture(scope="module")
def loud_qwen3_5(qwen3_5, tmp_path_factory):
    """The qwen3_5_text checkpoint with its gated delta layers' out_proj 8 times louder: the trained checkpoint's
    gated delta layers barely move its logits (a recurrent state not advanced there moves decoding by a KLD of
    0.0008, under the state check's limit); (source, windows, reference logits)."""
    from safetensors.torch import load_file, save_file

    source, windows, _ = qwen3_5
    loud = tmp_path_factory.mktemp("loud") / "qwen3_5_text"
    shutil.copytree(source, loud)
    tensors = load_file(loud / "model.safetensors")
    for name in [n for n in tensors if n.endswith("linear_attn.out_proj.weight")]:
        tensors[name] *= 8
    save_file(tensors, loud / "model.safetensors", metadata={"format": "pt"})
    return loud, windows, reference_logits_for(loud, windows)


def test_a_recurrent_state_scale_is_taken_back_out(qwen3_5, tmp_path, monkeypatch):
    """A recurrent state scale of 2⁻⁶ (what a state peaking at 2¹⁶ would get) applied to v and taken out of the rule's
    output leaves the function as it was: the package still matches the reference and decodes through its states."""
    source, windows, reference = qwen3_5
    monkeypatch.setattr(Calibrations, "recurrent_range", lambda self: FP16Range(2.0**16, 2.0**-6))
    artifact = build(source, tmp_path)
    assert json.loads((artifact.path / "manifest.json").read_text())["numerics"]["recurrent_scale"] == 2.0**-6
    scores, check = scored(artifact, windows, reference)
    assert scores.mean_kld < 0.002 and scores.same_top1 >= 0.97, scores
    assert check["consistent"], check


@pytest.mark.parametrize(("broken", "consistent"), [(None, True), (not_advanced, False), (reset, False)])
def test_a_broken_recurrent_state_fails_the_state_check(loud_qwen3_5, tmp_path, monkeypatch, broken, consistent):
    """The gated delta rule's S not advanced past the prompt, or reset at every call: decoding lands far from the
    no-state pass (its conv state and the KV cache left intact), where the intact state passes."""
    source, windows, reference = loud_qwen3_5
    if broken:
        monkeypatch.setattr(graph.RecurrentState, "write", broken)
    _, check = state_check(build(source, tmp_path), windows, reference)
    assert check["consistent"] is consistent, check




def test_recipe_converts_qwen3_5_validates_and_reports_its_states(qwen3_5, tmp_path):
    """End to end on Qwen3.5: the Core ML FP16 target passes its gates and the state check, and report.json gives
    the gated delta rule's conv and recurrent states' bytes beside the KV cache's."""
    source = qwen3_5[0]
    (artifact,) = run_recipe(source, tmp_path, "qwen3_5", targets=[{"format": "coreml", "context": CONTEXT}],
                             validate=FP16_VALIDATE)["artifacts"]
    assert artifact["kv_cache"]["consistent"] is True
    # one attention layer (2 KV heads of 32); three gated-delta layers: 3 × (4 − 1) conv inputs of 2·64 + 96
    # channels, and S of 4 value heads × 32 × 24
    assert artifact["state_bytes"] == {"kv_cache": 2 * 2 * 1 * 2 * CONTEXT * 32, "delta_conv_state": 2 * 3 * 224 * 3,
                                       "recurrent_state": 2 * 3 * 4 * 32 * 24}
    assert "recurrent_state 18,432 bytes" in (tmp_path / "out" / "report.md").read_text()


# ---- Mamba2 (Granite 4.0-H: NoPE attention, μP multipliers, experts beside the shared MLP) ------------------------

@pytest.fixture(scope="module")
def granite_hybrid(family_model):
    """(source, windows, reference logits) of the granitemoehybrid case: Mamba2, NoPE attention, Mamba2, Mamba2."""
    source = family_model("granitemoehybrid")
    windows = windows_of(source, count=2, length=CONTEXT)
    return source, windows, reference_logits_for(source, windows)


@pytest.mark.parametrize("chunks", [1, 2])  # 2: the second package holds only Mamba2 layers
def test_granite_hybrid_matches_the_reference_and_decodes_through_its_states(granite_hybrid, tmp_path, chunks):
    """The prefill block through Mamba2's chunked SSD form, decoding one token at a time through its conv and SSM
    states and the attention layer's KV cache; the states' bytes per sequence beside the KV cache's."""
    source, windows, reference = granite_hybrid
    artifact = build(source, tmp_path, chunks)
    scores, check = scored(artifact, windows, reference)
    manifest = json.loads((artifact.path / "manifest.json").read_text())
    size = sum(f.stat().st_size for f in artifact.path.rglob("*") if f.is_file())
    print(f"{source.name}: mean KLD {scores.mean_kld:.6f}, same top-1 {scores.same_top1:.4f}, {size:,} bytes, "
          f"state bytes {manifest['state_bytes']}, numerics {manifest['numerics']}, "
          f"state check excess KLD {check['excess_kld']:.2e}")
    assert scores.mean_kld < 0.002 and scores.same_top1 >= 0.97, scores
    assert check["consistent"] and check["same_top1"] == 1.0, check
    mamba = Checkpoint.open(source).spec.mamba2
    # fp16, per Mamba2 layer: the conv's last 3 inputs of x, B and C, and h per head, whatever the sequence's length
    assert manifest["state_bytes"]["ssm_conv_state"] == 2 * 3 * (8 * 32 + 2 * 16) * 3 == 2 * 3 * mamba.conv_channels * 3
    assert manifest["state_bytes"]["ssm_state"] == 2 * 3 * 8 * 32 * 16
    assert manifest["numerics"]["recurrent_peak"] > 0 and manifest["numerics"]["state_peak"] > 0


@pytest.fixture(scope="module")
def slow_granite_hybrid(granite_hybrid, tmp_path_factory):
    """The granitemoehybrid checkpoint with its Mamba2 layers' decay rates e⁵ times slower and out_proj 4 times
    louder: the trained checkpoint's h fades within a few tokens (exp(Δ·A) ≈ 0.3 per token at best), so that an h
    not advanced or reset moves decoding by a KLD of 4e-5, under the state check's limit; (source, windows,
    reference logits)."""
    from safetensors.torch import load_file, save_file

    source, windows, _ = granite_hybrid
    slow = tmp_path_factory.mktemp("slow") / "granitemoehybrid"
    shutil.copytree(source, slow)
    tensors = load_file(slow / "model.safetensors")
    for name in [n for n in tensors if n.endswith("mamba.A_log")]:
        tensors[name] -= 5
    for name in [n for n in tensors if n.endswith("mamba.out_proj.weight")]:
        tensors[name] *= 4
    save_file(tensors, slow / "model.safetensors", metadata={"format": "pt"})
    return slow, windows, reference_logits_for(slow, windows)


@pytest.mark.parametrize(("state", "broken", "consistent"),
                         [("RecurrentState", None, True), ("RecurrentState", not_advanced, False),
                          ("RecurrentState", reset, False), ("ConvState", not_advanced, False)])
def test_a_broken_mamba2_state_fails_the_state_check(slow_granite_hybrid, tmp_path, monkeypatch, state, broken,
                                                     consistent):
    """Mamba2's h not advanced past the prompt, or reset at every call, or its conv state not advanced: decoding
    lands far from the no-state pass (the other states left intact), where the intact states pass."""
    source, windows, reference = slow_granite_hybrid
    if broken:
        monkeypatch.setattr(getattr(graph, state), "write", broken)
    _, check = state_check(build(source, tmp_path), windows, reference)
    print(state, broken and broken.__name__, check)
    assert check["consistent"] is consistent, check


def test_mamba2_state_scales_are_taken_back_out(granite_hybrid, tmp_path, monkeypatch):
    """A conv state scale of 2⁻⁴ (folded into in_proj's xBC rows and out of the kernel, its bias left as it is) and an
    SSM state scale of 2⁻⁶ (applied to Δ·x, taken out of the scan's output, not of D·x) leave the function as it
    was: the package still matches the reference and decodes through its states."""
    source, windows, reference = granite_hybrid
    monkeypatch.setattr(Calibrations, "state_range", lambda self: FP16Range(2.0**14, 2.0**-4))
    monkeypatch.setattr(Calibrations, "recurrent_range", lambda self: FP16Range(2.0**16, 2.0**-6))
    artifact = build(source, tmp_path)
    numerics = json.loads((artifact.path / "manifest.json").read_text())["numerics"]
    assert (numerics["state_scale"], numerics["recurrent_scale"]) == (2.0**-4, 2.0**-6)
    scores, check = scored(artifact, windows, reference)
    assert scores.mean_kld < 0.002 and scores.same_top1 >= 0.97, scores
    assert check["consistent"], check


def test_recipe_converts_granite_hybrid_validates_and_reports_its_states(granite_hybrid, tmp_path):
    """End to end on Granite 4.0-H: Core ML FP16 and int4 pass their gates and the state check, and report.json gives
    Mamba2's conv and SSM states' bytes beside the KV cache's."""
    source = granite_hybrid[0]
    report = run_recipe(source, tmp_path, "granite_hybrid",
                        targets=[{"format": "coreml", "context": CONTEXT, "precision": ["fp16", "int4"]}],
                        validate=FP16_VALIDATE | {"gates": {"max_mean_kld": 0.06, "min_same_top1": 0.8}})
    fp16, int4 = report["artifacts"]
    print({a["quant"]: (a["metrics"]["mean_kld"], a["metrics"]["same_top1"], a["size_bytes"]) for a in (fp16, int4)})
    assert fp16["metrics"]["mean_kld"] < 0.002 and int4["metrics"]["mean_kld"] <= 0.06
    assert fp16["kv_cache"]["consistent"] is True and int4["kv_cache"]["consistent"] is True
    # one NoPE attention layer (2 KV heads of 32); three Mamba2 layers: 3 × (4 − 1) conv inputs of 8·32 + 2·16
    # channels, and h of 8 heads × 32 × 16
    assert fp16["state_bytes"] == {"kv_cache": 2 * 2 * 1 * 2 * CONTEXT * 32, "ssm_conv_state": 2 * 3 * 288 * 3,
                                   "ssm_state": 2 * 3 * 8 * 32 * 16}
    assert "ssm_state 24,576 bytes" in (tmp_path / "out" / "report.md").read_text()
