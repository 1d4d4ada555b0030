"""Measured gains (siliconvert/gains.py): every planned weight of the model gets one, the same on every run, and
it is KLD per unit of relative error (the same at another noise level), not the KLD of one noise; its shrink gain
too. The KLD of each weight's input rounded as llama.cpp's kernels round it: ggml's own roundings, and per-weight
shares that add up to every input rounded at once."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import siliconvert.gains as gains_module
from siliconvert.checkpoint import Checkpoint
from siliconvert.gains import (
    EMBEDDING,
    HEAD,
    INPUT_ROUNDINGS,
    Q8_0,
    Q8_K,
    SENSITIVITY_MIN_TOKENS,
    SENSITIVITY_TOKENS,
    MeasuredGains,
    measured_gains,
    round_q8_0,
    round_q8_k,
)
from siliconvert.gains import sensitivity_tokens as window_tokens
from siliconvert.streamed import CheckpointWeights, streamed_logits


def gains_of(checkpoint: Checkpoint) -> MeasuredGains:
    window = np.arange(64) % checkpoint.spec.vocab_size
    roles = {name: info.role.role for name, info in checkpoint.tensor_infos.items()}
    return measured_gains(checkpoint.transformers_config(), CheckpointWeights(checkpoint), window, roles,
                          label="test")


def test_every_weight_gets_a_gain_the_same_on_every_run(random_llama: Path) -> None:
    checkpoint = Checkpoint.open(random_llama)
    gains = gains_of(checkpoint)
    weights = {name for name, info in checkpoint.tensor_infos.items() if len(info.shape) == 2}
    assert set(gains.noise) == set(gains.shrink) == weights | {HEAD, EMBEDDING}  # a tied head: on its own path
    assert all(gain > 0 for gain in gains.noise.values()) and all(gain >= 0 for gain in gains.shrink.values())
    assert gains == gains_of(checkpoint)  # seeded


def test_a_gain_is_kld_per_unit_of_error(random_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint = Checkpoint.open(random_llama)
    at_r0 = gains_of(checkpoint)
    monkeypatch.setattr(gains_module, "R0", gains_module.R0 / 4)
    at_quarter = gains_of(checkpoint)
    for name, gain in at_r0.noise.items():  # KLD is second order in a small perturbation: linear in r
        assert at_quarter.noise[name] == pytest.approx(gain, rel=0.35), name
        assert at_quarter.shrink[name] == pytest.approx(at_r0.shrink[name], rel=0.35, abs=1e-9), name


def test_a_weight_scaled_costs_more_than_noise_of_its_error(demo_model: Path) -> None:
    """What the shrink gain is for: on the trained demo model most layer weights cost 10–200× more scaled than
    under noise of the same r (a random model's weights have no such structure)."""
    gains = gains_of(Checkpoint.open(demo_model))
    layers = [name for name in gains.noise if ".layers." in name]
    assert sum(gains.shrink[name] > 10 * gains.noise[name] for name in layers) > len(layers) / 2


def test_the_window_shrinks_for_large_models_to_a_floor() -> None:
    assert window_tokens(4, 7) == SENSITIVITY_TOKENS
    assert window_tokens(16, 7) == SENSITIVITY_TOKENS
    assert SENSITIVITY_MIN_TOKENS < window_tokens(32, 7) < SENSITIVITY_TOKENS  # a 7B: 123 tokens, ≈ 2^20 layer-tokens
    assert window_tokens(80, 7) == SENSITIVITY_MIN_TOKENS


def test_inputs_are_rounded_as_ggml_rounds_them() -> None:
    values = np.random.default_rng(0).standard_normal((4, 512)).astype(np.float32) * np.float32(3.0)
    values[1, 7] = 40.0  # an outlier sets its block's scale
    ggml_q8_0 = gguf.quants.dequantize(gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0),
                                       gguf.GGMLQuantizationType.Q8_0)
    assert np.allclose(round_q8_0(torch.from_numpy(values)).numpy(), ggml_q8_0, rtol=0, atol=1e-6)
    rounded = round_q8_k(torch.from_numpy(values)).numpy()
    blocks, approx = values.reshape(-1, 256), rounded.reshape(-1, 256)
    peaks = np.abs(blocks).argmax(-1)
    rows = np.arange(len(blocks))
    assert np.allclose(approx[rows, peaks], blocks[rows, peaks], rtol=1e-6)  # the peak sits on −127 exactly
    steps = np.abs(blocks[rows, peaks]) / 127
    assert np.all(np.abs(approx - blocks) <= steps[:, None] / 2 * (1 + 1e-5))
    assert not np.array_equal(rounded, ggml_q8_0)  # 256-blocks: a coarser step where a block holds the outlier


def test_the_input_roundings_shares_add_up_to_every_input_rounded_at_once(demo_model: Path) -> None:
    """Each weight's share of its layer's stream, summed over the model, is what rounding every matmul's input at
    once costs in a forward of the same window (within 25%: the layers' errors add, to first order)."""
    checkpoint = Checkpoint.open(demo_model)
    gains = gains_of(checkpoint)
    widths = {name: info.shape[-1] for name, info in checkpoint.tensor_infos.items() if len(info.shape) == 2}
    widths[HEAD] = widths.pop(EMBEDDING)  # looked up, not multiplied; the head's input is as wide as its rows
    window = np.arange(64) % checkpoint.spec.vocab_size
    for kind, (block, round_input) in INPUT_ROUNDINGS.items():
        fitting = {name for name, width in widths.items() if width % block == 0}
        assert set(gains.inputs[kind]) == fitting and all(kld >= 0 for kld in gains.inputs[kind].values())
        assert sum(gains.inputs[kind].values()) == pytest.approx(rounded_forward_kld(checkpoint, window, round_input),
                                                                 rel=0.25)
    assert sum(gains.inputs[Q8_K].values()) > sum(gains.inputs[Q8_0].values())  # 256-blocks round more coarsely


def rounded_forward_kld(checkpoint: Checkpoint, window: np.ndarray, round_input) -> float:
    """Mean KLD of transformers' forward with every linear layer's input rounded, against the clean forward."""
    def rounding(model) -> None:
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_pre_hook(lambda _module, inputs: (round_input(inputs[0]),))

    runs = [streamed_logits(checkpoint.transformers_config(), CheckpointWeights(checkpoint), window[None],
                            device="cpu", dtype=torch.float32, label="test", prepare=prepare)
            for prepare in (None, rounding)]
    clean, rounded = (torch.log_softmax(torch.from_numpy(logits[0]).double(), -1) for logits in runs)
    return float((clean.exp() * (clean - rounded)).sum(-1).mean())


def test_layers_fed_from_the_windows_other_layers_are_refused_by_name():
    """Gemma 4's per-layer inputs and kv-shared layers: every perturbed stream would need inputs and keys of its own."""
    import dataclasses

    from siliconvert.architectures import Layer, ModelSpec
    from siliconvert.errors import CheckpointError
    from siliconvert.gains import check_traits

    spec = ModelSpec(family="llama", hf_architecture="LlamaForCausalLM", vocab_size=96, hidden_size=64,
                     intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6,
                     rope_theta=1e4, max_position_embeddings=256, layers=(Layer(None, None), Layer(None, None)))
    check_traits(spec)
    with pytest.raises(CheckpointError, match="trait per_layer_input"):
        check_traits(dataclasses.replace(spec, per_layer_input=8, per_layer_input_vocab=96))
    with pytest.raises(CheckpointError, match="trait kv_shared_layers"):
        check_traits(dataclasses.replace(spec, layers=(Layer(None, None), Layer(None, None, kv_source=0))))
