"""Values of a saved ML Program: tensor types, immediate constants, and blobs in `weights/weight.bin`.

The blob file is read here, not through coremltools, so that the interpreter runs on the bytes that ship and
a damaged file is reported as such. Its layout (MIL blob storage v2): a 64-byte header, then for each blob a
64-byte record {uint32 sentinel 0xDEADBEEF, uint32 blob dtype, uint64 size in bytes, uint64 data offset, ...}
followed by the data. A const names its blob by the offset of that record.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from coremltools.proto import MIL_pb2

from siliconvert.errors import ArtifactError

DTYPES = {  # MIL data type → numpy storage type
    MIL_pb2.BOOL: np.bool_,
    MIL_pb2.STRING: np.object_,  # scalar strings: op parameters such as cast's dtype
    MIL_pb2.FLOAT16: np.float16,
    MIL_pb2.FLOAT32: np.float32,
    MIL_pb2.INT8: np.int8,
    MIL_pb2.INT16: np.int16,
    MIL_pb2.INT32: np.int32,
    MIL_pb2.INT64: np.int64,
    MIL_pb2.UINT8: np.uint8,
    MIL_pb2.UINT16: np.uint16,
    MIL_pb2.UINT32: np.uint32,
    MIL_pb2.INT4: np.int8,  # unpacked from two per byte
    MIL_pb2.UINT4: np.uint8,
    MIL_pb2.UINT1: np.uint8,  # palette indices (constexpr_lut_to_dense), packed bit by bit
    MIL_pb2.UINT2: np.uint8,
    MIL_pb2.UINT3: np.uint8,
    MIL_pb2.UINT6: np.uint8,
}
SUB_BYTE = {MIL_pb2.INT4: (4, True), MIL_pb2.UINT4: (4, False), MIL_pb2.UINT1: (1, False), MIL_pb2.UINT2: (2, False),
            MIL_pb2.UINT3: (3, False), MIL_pb2.UINT6: (6, False)}  # bits, signed
BLOB_SENTINEL = 0xDEADBEEF
BLOB_RECORD = struct.Struct("<IIQQ")


class TensorType:
    """A declared tensor type: numpy dtype and static shape (a scalar has shape ())."""

    def __init__(self, value_type: MIL_pb2.ValueType, where: str):
        kind = value_type.WhichOneof("type")
        if kind == "stateType":
            value_type = value_type.stateType.wrappedType
            kind = value_type.WhichOneof("type")
        if kind != "tensorType":
            raise ArtifactError(f"{where}: values of type {kind} are not supported by the MIL interpreter")
        tensor = value_type.tensorType
        if tensor.dataType not in DTYPES:
            name = MIL_pb2.DataType.Name(tensor.dataType)
            raise ArtifactError(f"{where}: data type {name} is not supported by the MIL interpreter")
        if any(d.WhichOneof("dimension") != "constant" for d in tensor.dimensions):
            raise ArtifactError(f"{where}: flexible shapes are not supported by the MIL interpreter")
        self.mil_dtype = tensor.dataType
        self.dtype = np.dtype(DTYPES[tensor.dataType])
        self.shape = tuple(int(d.constant.size) for d in tensor.dimensions)


class BlobFile:
    """weight.bin. Blob records are checked when a program is compiled; values are read from the file when
    its weights are loaded, into arrays of their own: nothing stays mapped, so a program's resident memory is
    the weights it holds (a memory map would keep every page it touched resident until unmapped)."""

    def __init__(self, path: Path):
        try:
            self.size = path.stat().st_size
        except OSError as e:
            raise ArtifactError(f"cannot read the weights ({e.strerror})", path) from None
        self.path = path

    def locate(self, offset: int, declared: TensorType) -> Blob:
        """Where the blob whose record is at `offset` lies; a damaged record or a short blob is an error."""
        try:
            with self.path.open("rb") as file:
                file.seek(offset)
                record = file.read(BLOB_RECORD.size)
        except OSError as e:
            raise ArtifactError(f"cannot read the weights ({e.strerror})", self.path) from None
        if len(record) < BLOB_RECORD.size or offset + 64 > self.size:
            raise ArtifactError(f"damaged: blob record at byte {offset} lies past the end", self.path)
        sentinel, _, size, start = BLOB_RECORD.unpack(record)
        if sentinel != BLOB_SENTINEL or start + size > self.size:
            raise ArtifactError(f"damaged: no valid blob record at byte {offset}", self.path)
        count = int(np.prod(declared.shape, dtype=np.int64))
        if declared.mil_dtype in SUB_BYTE:
            bits = SUB_BYTE[declared.mil_dtype][0]
            available = size * 8 // bits
        elif size % declared.dtype.itemsize == 0:
            available = size // declared.dtype.itemsize
        else:
            raise ArtifactError(f"damaged: blob at byte {offset} has {size} bytes, not whole {declared.dtype}s",
                                self.path)
        if available < count:
            raise ArtifactError(f"damaged: blob at byte {offset} holds {available} values, needs {count}",
                                self.path)
        return Blob(start, size, declared)

    def read(self, blob: Blob) -> np.ndarray:
        declared = blob.declared
        count = int(np.prod(declared.shape, dtype=np.int64))
        try:
            with self.path.open("rb") as file:
                file.seek(blob.start)
                if declared.mil_dtype in SUB_BYTE:
                    raw = np.fromfile(file, np.uint8, blob.size)
                    values = unpack_bits(raw, *SUB_BYTE[declared.mil_dtype], count)
                else:
                    values = np.fromfile(file, declared.dtype, count)
        except OSError as e:
            raise ArtifactError(f"cannot read the weights ({e.strerror})", self.path) from None
        if values.size < count:  # the file shrank since its records were checked
            raise ArtifactError(f"damaged: blob at byte {blob.start} is cut short", self.path)
        return values.reshape(declared.shape)


@dataclass(frozen=True)
class Blob:
    """A checked blob: its data's byte range in weight.bin and the type its const declares."""

    start: int
    size: int
    declared: TensorType


def unpack_bits(raw: np.ndarray, bits: int, signed: bool, count: int) -> np.ndarray:
    """Sub-byte integers packed from the least significant bit up, as Core ML stores them: a stream of bits, so
    that 3- and 6-bit values run across bytes."""
    if 8 % bits == 0:  # whole values per byte: shifts, without a byte per bit
        shifts = np.arange(8 // bits, dtype=np.uint8) * bits
        values = ((raw[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)[:count]
    else:
        stream = np.unpackbits(raw, bitorder="little")[:count * bits].reshape(count, bits)
        values = (stream @ (1 << np.arange(bits, dtype=np.uint8))).astype(np.uint8)
    if signed:
        return (values.astype(np.int8) ^ (1 << (bits - 1))) - (1 << (bits - 1))  # sign-extend
    return values


def immediate(value: MIL_pb2.Value, declared: TensorType, where: str) -> np.ndarray | str:
    """An inline constant: a tensor (reshaped to its declared type) or a string (e.g. cast's dtype)."""
    tensor = value.immediateValue.tensor
    kind = tensor.WhichOneof("value")
    if kind == "strings":
        return str(tensor.strings.values[0])
    if kind == "bytes":
        raw = np.frombuffer(tensor.bytes.values, np.uint8)
        if declared.mil_dtype in SUB_BYTE:
            values = unpack_bits(raw, *SUB_BYTE[declared.mil_dtype], int(np.prod(declared.shape)))
        else:
            values = raw.view(declared.dtype)
    elif kind in ("floats", "ints", "bools", "longInts", "doubles"):
        values = np.array(getattr(tensor, kind).values)
    else:
        raise ArtifactError(f"{where}: immediate values of kind {kind} are not supported")
    return values.astype(declared.dtype).reshape(declared.shape)
