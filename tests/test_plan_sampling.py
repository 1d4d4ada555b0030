"""Costs measured on sampled rows (quantize/sensitivity.py `sample_rows`): with a small budget forced on synthetic
tensors shaped like trained weights, every format's sampled errors stay near the whole tensor's, in the same order,
and its bytes are the whole tensor's exactly; tensors within the budget are measured whole."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from siliconvert.quantize.gguf import TensorQuantizer
from siliconvert.quantize.sensitivity import (
    MIN_SAMPLED_ROWS,
    SAMPLED_WEIGHTS,
    TensorCosts,
    coreml_costs,
    gguf_costs,
    mlx_costs,
    sample_rows,
)

BUDGET = 1 << 18  # 512 of the 2048 rows of a 2048 × 512 tensor
# sampled relative error within this fraction of the whole tensor's, per candidate: over 300 draws of the strata's
# rows on such a tensor Core ML's int8 estimate (the noisiest: one scale per row) was off by 2.7% (sd), 6.6% at p99
TOLERANCE = 0.15
# mlx's float modes scale each group by a power of two: a group's error swings with where its largest value falls in
# its octave, so a sample of rows spreads wider around the whole tensor's (mxfp8 on the test weight: 17 %)
FLOAT_MODE_TOLERANCE = 0.25
ROUTED = np.array([30.0, 0.0, 10.0])


def trained_like(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Gaussian values, rows of lognormal scale, and 2% of columns eight times larger (the outlier input channels
    of trained models)."""
    weight = rng.standard_normal(shape) * rng.lognormal(0.0, 0.5, (*shape[:-1], 1))
    weight[..., rng.choice(shape[-1], shape[-1] // 50, replace=False)] *= 8
    return weight.astype(np.float32)


@pytest.fixture(scope="module")
def dense() -> tuple[np.ndarray, np.ndarray]:
    """A 2048 × 512 weight and an importance vector with a heavy tail (lognormal, σ 1.5)."""
    rng = np.random.default_rng(1)
    return trained_like(rng, (2048, 512)), rng.lognormal(0.0, 1.5, 512).astype(np.float32)


@pytest.fixture(scope="module")
def stack() -> tuple[np.ndarray, np.ndarray]:
    """The gate half of a gate_up stack of three experts (a view that skips the up rows, as the writers pass it),
    512 × 256 each, and an importance row per expert."""
    rng = np.random.default_rng(2)
    return trained_like(rng, (3, 1024, 256))[:, :512], rng.lognormal(0.0, 1.5, (3, 256)).astype(np.float32)


@pytest.fixture(scope="module")
def quantizer():
    quantizer = TensorQuantizer(threads=2)
    yield quantizer
    quantizer.close()


def assert_estimates(whole: TensorCosts, sampled: TensorCosts) -> None:
    """Same candidates, bytes and size; each error within TOLERANCE of the whole one; the candidates' order by
    error kept, but between two whose whole errors are closer than the sampling's own tolerance (IQ3_S and Q3_K
    take the same bytes; a palette and an int4 block size can cost within a percent of each other)."""
    assert sorted((o.kind, o.nbytes) for o in sampled.options) == sorted((o.kind, o.nbytes) for o in whole.options)
    assert sampled.params == whole.params
    errors = {o.kind: o.error for o in sampled.options}
    for option in whole.options:
        tolerance = FLOAT_MODE_TOLERANCE if option.kind.startswith(("mxfp", "nvfp")) else TOLERANCE
        assert errors[option.kind] == pytest.approx(option.error, rel=tolerance, abs=1e-12), option.kind
    by_error = sorted(whole.options, key=lambda o: o.error)
    for lower, higher in itertools.combinations(by_error, 2):
        if higher.error > lower.error * (1 + 2 * FLOAT_MODE_TOLERANCE) + 1e-12:
            assert errors[lower.kind] < errors[higher.kind], (lower.kind, higher.kind)


def test_sample_rows_takes_the_same_spread_rows_of_every_expert():
    stack = np.arange(2 * 1000 * 64, dtype=np.float32).reshape(2, 1000, 64)
    assert sample_rows(stack, stack.size) is stack and sample_rows(stack, None) is stack  # within budget: whole
    sample = sample_rows(stack, 100 * 2 * 64)
    rows = sample[0, :, 0] // 64
    assert sample.shape == (2, 100, 64) and np.array_equal(sample[1], stack[1, rows.astype(int)])
    assert np.array_equal(rows // 10, np.arange(100))  # one row of each stratum of ten
    assert np.array_equal(sample, sample_rows(stack, 100 * 2 * 64))  # deterministic
    assert sample_rows(stack, 1).shape == (2, MIN_SAMPLED_ROWS, 64)  # never fewer rows than the floor
    assert SAMPLED_WEIGHTS >= 4096 * 256  # the demo model's largest tensor is measured whole


def test_gguf_sampled_costs_match_the_whole_tensor(dense, stack, quantizer):
    weight, importance = dense
    whole = gguf_costs("w", weight, importance, quantizer, sample_budget=None)
    assert whole == gguf_costs("w", weight, importance, quantizer, sample_budget=weight.size)
    sampled = gguf_costs("w", weight, importance, quantizer, sample_budget=BUDGET)
    assert_estimates(whole, sampled)
    assert sampled == gguf_costs("w", weight, importance, quantizer, sample_budget=BUDGET)
    gate, rows = stack  # 128 rows of each expert, each with its own importance row and routed share
    assert_estimates(gguf_costs("s", gate, rows, quantizer, routed_tokens=ROUTED, sample_budget=None),
                     gguf_costs("s", gate, rows, quantizer, routed_tokens=ROUTED, sample_budget=3 * 128 * 256))


def test_mlx_sampled_costs_match_the_whole_tensor(dense, stack):
    weight, importance = dense
    assert_estimates(mlx_costs("w", weight, importance, 2, sample_budget=None),
                     mlx_costs("w", weight, importance, 2, sample_budget=BUDGET))
    gate, rows = stack
    assert_estimates(mlx_costs("s", gate, rows, 2, routed_tokens=ROUTED, sample_budget=None),
                     mlx_costs("s", gate, rows, 2, routed_tokens=ROUTED, sample_budget=3 * 128 * 256))


def test_coreml_sampled_costs_match_the_whole_weight(dense):
    weight, importance = dense
    # 2000 rows: the blobs' padding to 64 bytes differs between the sample and the whole weight
    half = weight[:2000].astype(np.float16)
    assert_estimates(coreml_costs("w", half, importance, sample_budget=None),
                     coreml_costs("w", half, importance, sample_budget=BUDGET))
