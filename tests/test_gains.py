"""Measured gains (siliconvert/gains.py): every planned weight of the model gets one, the same on every run, and
it is KLD per unit of relative error (the same at another noise level), not the KLD of one noise; its shrink gain
too."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import siliconvert.gains as gains_module
from siliconvert.checkpoint import Checkpoint
from siliconvert.gains import EMBEDDING, HEAD, SENSITIVITY_MIN_TOKENS, SENSITIVITY_TOKENS, MeasuredGains, measured_gains
from siliconvert.gains import sensitivity_tokens as window_tokens
from siliconvert.streamed import CheckpointWeights


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
    assert SENSITIVITY_MIN_TOKENS < window_tokens(32, 7) < SENSITIVITY_TOKENS  # a 7B: 141 tokens, ≈ 2^20 layer-tokens
    assert window_tokens(80, 7) == SENSITIVITY_MIN_TOKENS
