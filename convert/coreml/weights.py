"""Where the graph takes its weights from: the blobs streamed into the package being written (placeholders),
the values of a finished fp16 package, or the compressed forms quantize/coreml.py chose (and, for W8A8, what the
linear layers read of their inputs)."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
from coremltools.converters.mil import Builder as mb

from siliconvert.convert.coreml.package import BLOB_RECORD, BLOB_SENTINEL
from siliconvert.quantize.coreml import CompressedWeight, quantized_const, quantized_input


class WeightConsts(ABC):
    """Makes the const (or constexpr) op of one use of a weight in the function being built. Uses with the same
    weight id read the same bytes, within a function and across the two."""

    @abstractmethod
    def const(self, weight: str, shape: tuple[int, ...], name: str): ...

    def input(self, x, weight: str, name: str):
        """What the linear layer of `weight` reads of its input `x`: `x` itself, but in a W8A8 package."""
        return x


class PlaceholderWeights(WeightConsts):
    """Consts whose bytes are already in the package's weight.bin: the value is a zero-byte broadcast of the
    right shape and dtype (what type inference needs), and StreamedExporter points the const at the blob."""

    def __init__(self, blobs: dict[str, tuple[int, int]]):
        self.blobs = blobs

    def const(self, weight: str, shape: tuple[int, ...], name: str):
        if self.blobs[weight][1] != 2 * math.prod(shape):
            raise RuntimeError(f"blob {weight} holds {self.blobs[weight][1]} bytes, not fp16 {shape}")
        var = mb.const(val=np.broadcast_to(np.float16(0), shape), name=name)
        var.op.weight_id = weight
        return var


class StoredWeights(WeightConsts):
    """Consts with the values of a finished fp16 package, memory-mapped from its weight.bin."""

    def __init__(self, path: Path, blobs: dict[str, tuple[int, int]]):
        self.data = np.memmap(path, dtype=np.uint8, mode="r")
        self.blobs = blobs

    def values(self, weight: str, shape: tuple[int, ...]) -> np.ndarray:
        sentinel, _, size, start = BLOB_RECORD.unpack_from(self.data, self.blobs[weight][0])
        if sentinel != BLOB_SENTINEL or size != 2 * math.prod(shape):
            raise RuntimeError(f"blob {weight} in {self.data.filename} is not fp16 {shape}")
        return self.data[start:start + size].view(np.float16).reshape(shape)

    def const(self, weight: str, shape: tuple[int, ...], name: str):
        var = mb.const(val=self.values(weight, shape), name=name)
        var.op.weight_id = weight
        return var


class QuantizedWeights(WeightConsts):
    """The compressed form coremltools' pass chose for each weight (quantize/coreml.py); fp16 for the rest.
    `input_scales` (W8A8): weight id → the int8 scale of its layer's input, which goes through int8 and back."""

    def __init__(self, stored: StoredWeights, quantized: dict[str, CompressedWeight],
                 input_scales: dict[str, np.float16] | None = None):
        self.stored = stored
        self.quantized = quantized
        self.input_scales = input_scales or {}

    def input(self, x, weight: str, name: str):
        return quantized_input(x, self.input_scales[weight], name) if weight in self.input_scales else x

    def const(self, weight: str, shape: tuple[int, ...], name: str):
        if weight in self.quantized:
            return quantized_const(self.quantized[weight], weight, name)
        return self.stored.const(weight, shape, name)
