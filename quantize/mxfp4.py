"""MXFP4 (the OCP microscaling format: 32 E2M1 values sharing one E8M0 power of two) recovered from floats that are
MXFP4 already: the expert stacks of an MXFP4 source (gpt-oss), dequantized in the stream, stored again exactly.

A block of values v = e2m1 · 2^(s − 127) is encoded with the smallest scale that puts its largest magnitude at most
6 (E2M1's largest): that is the source's own scale, or a smaller one under which every value of the block is still
an E2M1 value (a block whose largest value is 3 · 2^k is also 6 · 2^(k−1)). Either way each value decodes to itself,
so the format's dot products see the source's numbers. A block no scale holds exactly is refused: this is not a
quantizer, and rounding floats to MXFP4 is the format's own quantizer's job.

Codes are in the hub's byte order (and mlx's): byte j of a block holds value 2j in its low nibble, 2j + 1 in its
high one; a code is sign << 3 | the index of the magnitude in E2M1_MAGNITUDES.
"""

from __future__ import annotations

import numpy as np

BLOCK = 32
E2M1_MAGNITUDES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float32)
SCALE_BIAS = 127
BLOCKS_AT_ONCE = 1 << 16  # blocks encoded at a time: the float scratch beside the result (a few MB)


class NotMXFP4(ValueError):
    """Values that no MXFP4 block holds exactly."""


def exact_mxfp4(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes [..., rows, columns / 32, 16] uint8, scales [..., rows, columns / 32] uint8) holding exactly the values
    of `array` [..., rows, columns] (float32), blocks of 32 along the last axis; NotMXFP4 where a block is not."""
    if array.shape[-1] % BLOCK:
        raise NotMXFP4(f"rows of {array.shape[-1]} values are no whole number of {BLOCK}-value blocks")
    values = np.ascontiguousarray(array, dtype=np.float32).reshape(-1, BLOCK)
    codes = np.empty((values.shape[0], BLOCK // 2), dtype=np.uint8)
    scales = np.empty(values.shape[0], dtype=np.uint8)
    for start in range(0, values.shape[0], BLOCKS_AT_ONCE):
        stop = min(values.shape[0], start + BLOCKS_AT_ONCE)
        block_codes, scales[start:stop] = _encode(values[start:stop])
        codes[start:stop] = block_codes[:, 0::2] | (block_codes[:, 1::2] << 4)
    return codes.reshape(*array.shape[:-1], -1, BLOCK // 2), scales.reshape(*array.shape[:-1], -1)


def _encode(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per block: each value's 4-bit code (one per byte) and the block's scale byte."""
    largest = np.abs(values).max(axis=1)
    with np.errstate(divide="ignore"):  # an all-zero block takes the scale 2^0
        exponent = np.where(largest > 0, np.ceil(np.log2(largest / 6.0)), 0.0)
    for _ in range(4):  # the smallest scale can fail only where a larger one (the source's) holds the block
        scaled = values / np.exp2(exponent)[:, None]
        index = np.searchsorted(E2M1_MAGNITUDES, np.abs(scaled))
        index = np.minimum(index, len(E2M1_MAGNITUDES) - 1)
        exact = (E2M1_MAGNITUDES[index] == np.abs(scaled)).all(axis=1)
        if exact.all():
            break
        exponent = np.where(exact, exponent, exponent + 1)
    else:
        raise NotMXFP4(f"{int((~exact).sum())} blocks of 32 values are not MXFP4 values under any scale")
    if ((exponent + SCALE_BIAS < 0) | (exponent + SCALE_BIAS > 254)).any():
        raise NotMXFP4("a block's scale is beyond E8M0's range")
    codes = index.astype(np.uint8) | (np.signbit(values).astype(np.uint8) << 3)
    return codes, (exponent + SCALE_BIAS).astype(np.uint8)
