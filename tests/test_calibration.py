"""Calibration (siliconvert/calibration.py): one forward measures every part as separate forwards do, bit for bit;
the provider keeps what it measured, in memory and on disk, and measures only what it was not given."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import siliconvert.calibration as calibration_module
from siliconvert.calibration import (
    HESSIAN,
    HESSIAN_HALVES,
    IMPORTANCE,
    INPUT_PEAKS,
    RANGE,
    SENSITIVITY,
    Calibration,
    Calibrations,
    FP16Range,
    calibrate,
)
from siliconvert.checkpoint import Checkpoint
from siliconvert.commands.pipeline import calibration_needs
from siliconvert.recipe import CoreMLTarget, GGUFTarget, MLXTarget
from siliconvert.streamed import streamed_logits

TOKENS, CONTEXT = 512, 128  # four importance windows: enough to tell the windows apart, quick on the demo model


def test_one_forward_measures_what_separate_forwards_do(demo_model: Path) -> None:
    checkpoint = Checkpoint.open(demo_model)
    both = calibrate(checkpoint, "builtin", {IMPORTANCE, RANGE, SENSITIVITY}, tokens=TOKENS, context=CONTEXT)
    importance = calibrate(checkpoint, "builtin", {IMPORTANCE}, tokens=TOKENS, context=CONTEXT)
    stream = calibrate(checkpoint, "builtin", {RANGE}, tokens=TOKENS, context=CONTEXT)
    assert both.stream_peak == stream.stream_peak > 0
    assert sorted(both.importance) == sorted(importance.importance) and "lm_head.weight" in both.importance
    for name, values in importance.importance.items():
        assert values.dtype == np.float32 and np.array_equal(both.importance[name], values), name
    assert both.expert_tokens == importance.expert_tokens == {}  # a dense model
    assert (both.importance_tokens, both.range_tokens) == (TOKENS, 64)
    # parts not asked for are None
    assert importance.stream_peak is None and importance.range_tokens is None
    assert stream.importance is None and stream.expert_tokens is None and stream.importance_tokens is None
    assert both.sensitivity_tokens == 256 and all(gain > 0 for gain in both.gains.values())
    assert importance.gains is None and importance.sensitivity_tokens is None
    assert both.parts == {IMPORTANCE, RANGE, SENSITIVITY}
    assert importance.parts == {IMPORTANCE} and stream.parts == {RANGE}


def measured(parts, tokens: int = TOKENS) -> Calibration:
    """A calibration as the forward returns it, with values whose every bit a cache must keep."""
    rng = np.random.default_rng(0)
    result = Calibration("a text")
    if IMPORTANCE in parts:
        result = Calibration(result.text, importance={"model.layers.0.mlp.down_proj.weight": rng.random(7, np.float32),
                                                      "lm_head.weight": rng.random(5, np.float32)},
                             expert_tokens={"model.layers.0.mlp.experts.down_proj": rng.random(3) * 100},
                             importance_tokens=tokens)
    if RANGE in parts:
        peak = float(np.random.default_rng(1).random() * 1e5)
        result = result.merged(Calibration("a text", stream_peak=peak, range_tokens=64))
    if SENSITIVITY in parts:
        gains = {"model.layers.0.mlp.down_proj.weight": float(rng.random()) / 3, "lm_head.weight": 0.1 / 3,
                 "model.embed_tokens.weight": 0.2}
        shrink_gains = {name: 30 * gain for name, gain in gains.items()}
        inputs = {"Q8_0": {"model.layers.0.mlp.down_proj.weight": float(rng.random()) / 7, "lm_head.weight": 1e-4 / 3},
                  "Q8_K": {"lm_head.weight": 2e-4 / 3}}
        result = result.merged(Calibration("a text", gains=gains, shrink_gains=shrink_gains, sensitivity_tokens=256,
                                           input_klds=inputs))
    return result


@pytest.fixture
def forwards(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, frozenset[str], int]]:
    """Each (text source, parts, tokens) the provider runs a forward for; the forward is `measured`'s."""
    calls = []

    def fake(checkpoint, source, parts, *, tokens, context, alongside=None):
        calls.append((source, frozenset(parts), tokens))
        return measured(parts, tokens)

    monkeypatch.setattr(calibration_module, "calibrate", fake)
    return calls


def assert_same(a: Calibration, b: Calibration) -> None:
    assert a.parts == b.parts and (a.text, a.stream_peak, a.importance_tokens, a.range_tokens, a.gains,
                                   a.shrink_gains, a.sensitivity_tokens) == (b.text, b.stream_peak,
                                                                             b.importance_tokens, b.range_tokens,
                                                                             b.gains, b.shrink_gains,
                                                                             b.sensitivity_tokens)
    assert a.input_klds == b.input_klds
    for table in ("importance", "expert_tokens"):
        ours, theirs = getattr(a, table), getattr(b, table)
        assert (ours is None) == (theirs is None)
        if ours is not None:
            assert sorted(ours) == sorted(theirs)
            for name in ours:
                assert ours[name].dtype == theirs[name].dtype and np.array_equal(ours[name], theirs[name]), name


def test_one_forward_per_text_and_the_disk_cache_is_hit_by_a_second_provider(random_llama: Path, tmp_path: Path,
                                                                             forwards) -> None:
    checkpoint = Checkpoint.open(random_llama)
    first = Calibrations(checkpoint, tmp_path)
    first.prepare({"builtin": {IMPORTANCE, RANGE, SENSITIVITY}})
    assert forwards == [("builtin", {IMPORTANCE, RANGE, SENSITIVITY}, 8192)]
    assert first.fp16_range() == FP16Range.of_peak(measured({RANGE}).stream_peak)
    assert first.importance() and first.expert_tokens()  # kept in the object: no second forward
    assert len(forwards) == 1
    second = Calibrations(checkpoint, tmp_path)
    assert_same(second.get("builtin", {IMPORTANCE, RANGE, SENSITIVITY}),
                measured({IMPORTANCE, RANGE, SENSITIVITY}, tokens=8192))
    assert len(forwards) == 1  # read from the cache
    assert not [file for file in tmp_path.iterdir() if file.name.startswith(".")]  # no temporary file is left


def test_a_part_not_prepared_is_measured_alone(random_llama: Path, tmp_path: Path, forwards) -> None:
    provider = Calibrations(Checkpoint.open(random_llama), None)
    provider.prepare({"builtin": {RANGE}})
    assert provider.get("builtin", {RANGE}).importance is None
    provider.importance("builtin")
    assert forwards == [("builtin", {RANGE}, 8192), ("builtin", {IMPORTANCE}, 8192)]
    assert provider.get("builtin", {RANGE, IMPORTANCE}).parts == {RANGE, IMPORTANCE}
    assert len(forwards) == 2


def test_another_text_checkpoint_or_token_count_misses_the_cache(random_llama: Path, tmp_path: Path,
                                                                forwards) -> None:
    Calibrations(Checkpoint.open(random_llama), tmp_path).prepare({"builtin": {IMPORTANCE}})
    text = tmp_path / "text.txt"
    text.write_text("another calibration text", encoding="utf-8")
    Calibrations(Checkpoint.open(random_llama), tmp_path).importance(str(text))
    Calibrations(Checkpoint.open(random_llama), tmp_path, tokens=4096).importance("builtin")
    copy = Path(shutil.copytree(random_llama, tmp_path / "copy"))  # the same files, times and fingerprint
    assert Checkpoint.open(copy).fingerprint() == Checkpoint.open(random_llama).fingerprint()
    Calibrations(Checkpoint.open(copy), tmp_path).importance("builtin")
    os.utime(copy / "model.safetensors", ns=(0, 0))  # a shard written again: another fingerprint
    Calibrations(Checkpoint.open(copy), tmp_path).importance("builtin")
    assert forwards == [("builtin", {IMPORTANCE}, 8192), (str(text), {IMPORTANCE}, 8192),
                        ("builtin", {IMPORTANCE}, 4096), ("builtin", {IMPORTANCE}, 8192)]
    Calibrations(Checkpoint.open(random_llama), tmp_path).importance(str(text))
    assert len(forwards) == 4


def test_second_moments_are_the_importance_off_the_diagonal_and_shared_by_layers_of_one_input(
        demo_model: Path, tmp_path: Path) -> None:
    """GPTQ's H is E[x xᵀ] of each linear layer's input: its diagonal is the importance matrix of the same windows;
    q, k and v (gate and up) read one input and share one array, in memory and through the disk cache."""
    checkpoint = Checkpoint.open(demo_model)
    measured_now = Calibrations(checkpoint, tmp_path, tokens=TOKENS, context=CONTEXT).get(
        "builtin", {IMPORTANCE, HESSIAN})
    for source in (measured_now, Calibrations(checkpoint, tmp_path, tokens=TOKENS,
                                              context=CONTEXT).get("builtin", {HESSIAN})):
        hessians = source.hessians
        layer = "model.layers.1"
        assert hessians[f"{layer}.self_attn.q_proj.weight"] is hessians[f"{layer}.self_attn.v_proj.weight"]
        assert hessians[f"{layer}.mlp.gate_proj.weight"] is hessians[f"{layer}.mlp.up_proj.weight"]
        down = checkpoint.tensor_infos[f"{layer}.mlp.down_proj.weight"].shape[-1]
        assert hessians[f"{layer}.mlp.down_proj.weight"].shape == (down, down)
        assert "lm_head.weight" in hessians
        for name, matrix in hessians.items():
            assert np.allclose(np.diag(matrix), measured_now.importance[name], rtol=1e-4), name
            assert np.allclose(matrix, matrix.T)


def test_hessian_halves_are_the_first_half_of_the_windows_and_the_rest_follows(demo_model: Path,
                                                                                tmp_path: Path) -> None:
    """A GPTQ plan's held-out check: the first half's second moments are those a calibration of half the tokens
    measures (the same first windows), the second half's the whole's less the first's; shared inputs stay shared,
    in memory and through the disk cache."""
    checkpoint = Checkpoint.open(demo_model)
    measured_now = Calibrations(checkpoint, tmp_path, tokens=TOKENS, context=CONTEXT)
    halves = measured_now.hessian_halves("builtin")
    assert measured_now.get("builtin", {HESSIAN_HALVES}).first_half_share == pytest.approx(0.5)
    first_half = Calibrations(checkpoint, None, tokens=TOKENS // 2, context=CONTEXT).hessians("builtin")
    whole = measured_now.hessians("builtin")
    cached = Calibrations(checkpoint, tmp_path, tokens=TOKENS, context=CONTEXT).hessian_halves("builtin")
    layer = "model.layers.1"
    for pairs in (halves, cached):
        assert sorted(pairs) == sorted(whole)
        assert pairs[f"{layer}.self_attn.q_proj.weight"] is pairs[f"{layer}.self_attn.k_proj.weight"]
        for name, (first, second) in pairs.items():
            np.testing.assert_allclose(first, first_half[name], rtol=1e-4, atol=1e-6 * np.abs(first).max())
            np.testing.assert_allclose((first + second) / 2, whole[name], rtol=1e-4, atol=1e-6 * np.abs(first).max())
            assert not np.allclose(first, second, rtol=1e-3)  # other text: other moments


def test_input_peaks_are_the_largest_input_of_each_linear_layer_and_survive_the_cache(demo_model: Path,
                                                                                      tmp_path: Path) -> None:
    """W8A8's activation peaks: on the windows given, the largest |x| entering each nn.Linear of transformers' own
    forward (hooked here on the whole model), q, k and v alike (one input); the provider measures them on the
    importance windows, where each bounds its columns' root mean square, and reads them back from its cache."""
    import torch
    from transformers import AutoModelForCausalLM

    checkpoint = Checkpoint.open(demo_model)
    windows = np.random.default_rng(0).integers(0, checkpoint.spec.vocab_size, (2, 32))
    peaks = calibration_module._forward(checkpoint, "random ids", None, windows, input_peaks=True).input_peaks
    model = AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32)
    seen: dict[str, float] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(lambda _, inputs, name=name: seen.__setitem__(
                f"{name}.weight", max(seen.get(f"{name}.weight", 0.0), float(inputs[0].abs().max()))))
    with torch.inference_mode():
        for window in windows:
            model(torch.as_tensor(window[None]))
    assert sorted(peaks) == sorted(seen) and "lm_head.weight" in peaks
    for name, peak in peaks.items():
        assert peak.shape == () and peak == pytest.approx(seen[name], rel=1e-5), name
    layer = "model.layers.1.self_attn"
    assert peaks[f"{layer}.q_proj.weight"] == peaks[f"{layer}.k_proj.weight"] == peaks[f"{layer}.v_proj.weight"]

    measured_now = Calibrations(checkpoint, tmp_path, tokens=TOKENS, context=CONTEXT).get(
        "builtin", {IMPORTANCE, INPUT_PEAKS})
    cached = Calibrations(checkpoint, tmp_path, tokens=TOKENS, context=CONTEXT).get("builtin", {INPUT_PEAKS})
    assert cached.parts == {INPUT_PEAKS} and sorted(cached.input_peaks) == sorted(measured_now.input_peaks)
    for name, peak in measured_now.input_peaks.items():
        assert cached.input_peaks[name] == peak and peak >= np.sqrt(measured_now.importance[name].max()), name


def test_a_tied_embedding_has_the_heads_gain_too() -> None:
    gains = measured({SENSITIVITY})
    assert gains.gain("model.embed_tokens.weight") == 0.2
    assert gains.gain("model.embed_tokens.weight", tied_head=True) == pytest.approx(0.2 + 0.1 / 3)
    assert gains.shrink_gain("model.embed_tokens.weight", tied_head=True) == pytest.approx(30 * (0.2 + 0.1 / 3))
    assert gains.gain("model.layers.9.mlp.down_proj.weight") is None  # not measured: the caller's fallback
    assert gains.shrink_gain("model.layers.9.mlp.down_proj.weight") is None
    assert Calibration("a text").gain("lm_head.weight") is None


def test_what_the_targets_need() -> None:
    targets = [GGUFTarget(format="gguf", quants=["F16", "Q4_K_M"]),  # no importance matrix
               GGUFTarget(format="gguf", quants=["F16"], imatrix="builtin"),  # nothing llama.cpp quantizes with it
               GGUFTarget(format="gguf", quants=["Q4_K_M"], imatrix="/texts/a.txt"),
               MLXTarget(format="mlx", bits=4, dtype="bfloat16"), MLXTarget(format="mlx", bits=16)]
    assert calibration_needs(targets) == {"/texts/a.txt": {IMPORTANCE}}
    # a fixed MLX width takes its float type from the residual stream's range where no dtype is set
    assert calibration_needs([MLXTarget(format="mlx", bits=4)]) == {"builtin": {RANGE}}
    planned = [GGUFTarget(format="gguf", quants=["auto"], plan={"size_mb": 3}),
               MLXTarget(format="mlx", bits="auto", plan={"size_mb": 3}),
               CoreMLTarget(format="coreml")]
    assert calibration_needs(planned) == {"builtin": {IMPORTANCE, RANGE, SENSITIVITY}}
    assert calibration_needs([GGUFTarget(format="gguf", quants=["auto"], plan={"size_mb": 3})]) == {
        "builtin": {IMPORTANCE, SENSITIVITY}}
    assert calibration_needs([MLXTarget(format="mlx", bits="auto", dtype="float16", plan={"size_mb": 3}),
                              CoreMLTarget(format="coreml", precision=["auto"], plan={"size_mb": 3})]) == {
        "builtin": {IMPORTANCE, RANGE, SENSITIVITY}}
    assert calibration_needs([MLXTarget(format="mlx", bits="auto", dtype="float16", plan={"size_mb": 3})]) == {
        "builtin": {IMPORTANCE, SENSITIVITY}}
    assert calibration_needs([CoreMLTarget(format="coreml")]) == {"builtin": {RANGE}}
    # a compressed Core ML package's weights are fitted to the importance (palettes' tables, int4/int8 scales)
    assert calibration_needs([CoreMLTarget(format="coreml", precision=["int4", "pal4"])]) == {
        "builtin": {IMPORTANCE, RANGE}}
    # W8A8's activation scales come from each linear layer's input peak
    assert calibration_needs([CoreMLTarget(format="coreml", precision=["w8a8"])]) == {
        "builtin": {IMPORTANCE, RANGE, INPUT_PEAKS}}
    assert calibration_needs([MLXTarget(format="mlx", bits=4, dtype="float16", method="gptq")]) == {
        "builtin": {HESSIAN}}
    assert calibration_needs([CoreMLTarget(format="coreml", precision=["int4"], method="gptq")]) == {
        "builtin": {IMPORTANCE, RANGE, HESSIAN}}


def test_fp16_range_is_a_power_of_two_with_headroom() -> None:
    assert FP16Range.of_peak(100.0) == FP16Range(100.0, 1.0)
    loud = FP16Range.of_peak(70000.0)
    assert loud.scale == 2.0**-5 and 70000.0 * loud.scale * 16 <= 65504 < 70000.0 * loud.scale * 32


def test_logits_are_kept_only_for_windows_of_one_length(random_llama: Path) -> None:
    checkpoint = Checkpoint.open(random_llama)
    with pytest.raises(ValueError, match="one length"):
        streamed_logits(checkpoint.transformers_config(), None, [np.zeros(8, int), np.zeros(4, int)],
                        device="cpu", dtype=None, label="test")


def test_the_recurrent_peak_is_that_of_transformers_own_states() -> None:
    """What a gated delta rule's state S reaches over the tokens, from the chunked rule's inputs, as transformers'
    recurrent rule computes S one token at a time (4 value heads reading 2 key heads)."""
    import torch
    from transformers.models.qwen3_5.modeling_qwen3_5 import torch_recurrent_gated_delta_rule

    from siliconvert.calibration import recurrent_peak

    generator = torch.Generator().manual_seed(0)
    query, key = torch.randn(2, 1, 9, 2, 8, generator=generator)
    value = torch.randn(1, 9, 4, 6, generator=generator) * 30
    g = -torch.rand(1, 9, 4, generator=generator)
    beta = torch.rand(1, 9, 4, generator=generator)
    state, peak = None, 0.0
    for t in range(9):
        _, state = torch_recurrent_gated_delta_rule(query[:, t:t + 1], key[:, t:t + 1], value[:, t:t + 1],
                                                    g=g[:, t:t + 1], beta=beta[:, t:t + 1], initial_state=state,
                                                    output_final_state=True, use_qk_l2norm_in_kernel=True)
        peak = max(peak, float(state.abs().max()))
    assert recurrent_peak(key, value, g, beta) == pytest.approx(peak, rel=1e-5)


def test_an_inputs_rounding_kld_is_the_heads_for_a_tied_embedding_and_none_for_a_lookup() -> None:
    calibration = measured({SENSITIVITY})
    assert calibration.input_kld("lm_head.weight", "Q8_K") == pytest.approx(2e-4 / 3)
    assert calibration.input_kld("model.layers.0.mlp.down_proj.weight", "Q8_K") == 0  # no 256-block fits its rows
    assert calibration.input_kld("model.embed_tokens.weight", "Q8_0", tied_head=True) == pytest.approx(1e-4 / 3)
    assert calibration.input_kld("model.embed_tokens.weight", "Q8_0") == 0  # only looked up
    assert Calibration("a text").input_kld("lm_head.weight", "Q8_0") is None  # not measured
