"""MXFP4 recovered exactly from floats that are MXFP4 values (an MXFP4 source's expert stacks, dequantized in the
stream): every value decodes to itself, whatever scale the source's quantizer chose; floats that are not MXFP4 are
refused, never rounded."""

from __future__ import annotations

import numpy as np
import pytest

from siliconvert.quantize.mxfp4 import E2M1_MAGNITUDES, NotMXFP4, exact_mxfp4

SIGNED_E2M1 = np.concatenate([E2M1_MAGNITUDES, -E2M1_MAGNITUDES])


def decode(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The hub's MXFP4 as transformers dequantizes it: the low nibble first, times 2^(scale − 127)."""
    values = np.stack([SIGNED_E2M1[codes & 0x0F], SIGNED_E2M1[codes >> 4]], axis=-1).reshape(*codes.shape[:-1], 32)
    return np.ldexp(values, scales.astype(np.int32)[..., None] - 127).reshape(*scales.shape[:-1], -1)


def mxfp4_values(rng: np.random.Generator, rows: int, columns: int) -> np.ndarray:
    """Random MXFP4 values: random codes under random scales, some blocks with a small largest value (3, 1.5, 0.5
    times the scale: a smaller scale holds them too), one all zero."""
    codes = rng.integers(0, 256, size=(rows, columns // 32, 16), dtype=np.uint8)
    codes[0, 0] &= 0x33  # magnitudes at most 1.5 × the scale
    codes[0, 1] &= 0x99  # at most 0.5
    codes[1, 0] = 0
    scales = rng.integers(100, 140, size=(rows, columns // 32), dtype=np.uint8)
    return decode(codes, scales)


def test_mxfp4_values_are_recovered_exactly() -> None:
    values = mxfp4_values(np.random.default_rng(0), 64, 256)
    codes, scales = exact_mxfp4(values)
    assert codes.shape == (64, 8, 16) and scales.shape == (64, 8)
    decoded = decode(codes, scales)
    assert np.array_equal(decoded, values) and np.array_equal(np.signbit(decoded), np.signbit(values))


def test_a_stack_of_experts_keeps_its_leading_axes() -> None:
    values = mxfp4_values(np.random.default_rng(1), 96, 64).reshape(3, 32, 64)
    codes, scales = exact_mxfp4(values)
    assert codes.shape == (3, 32, 2, 16) and np.array_equal(decode(codes, scales), values)


def test_floats_that_are_not_mxfp4_are_refused() -> None:
    values = mxfp4_values(np.random.default_rng(2), 4, 64)
    values[2, 5] *= 1.1
    with pytest.raises(NotMXFP4, match="1 blocks of 32 values are not MXFP4 values"):
        exact_mxfp4(values)
    with pytest.raises(NotMXFP4, match="no whole number of 32-value blocks"):
        exact_mxfp4(np.zeros((2, 48), dtype=np.float32))
