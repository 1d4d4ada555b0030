"""MIL values: declared tensor types, inline constants and sub-byte integers, and the types the interpreter
refuses by name."""

from __future__ import annotations

import numpy as np
import pytest
from coremltools.proto import MIL_pb2

from siliconvert.errors import ArtifactError
from siliconvert.validate.runners.mil.values import TensorType, immediate, unpack_bits


def value_type(data_type: int, *shape: int) -> MIL_pb2.ValueType:
    dimensions = [MIL_pb2.Dimension(constant=MIL_pb2.Dimension.ConstantDimension(size=d)) for d in shape]
    return MIL_pb2.ValueType(tensorType=MIL_pb2.TensorType(dataType=data_type, rank=len(shape),
                                                           dimensions=dimensions))


def test_a_tensor_type_is_a_numpy_dtype_and_a_static_shape():
    declared = TensorType(value_type(MIL_pb2.FLOAT16, 2, 3), "x")
    assert (declared.dtype, declared.shape) == (np.dtype(np.float16), (2, 3))


def test_types_the_interpreter_cannot_hold_are_refused_by_name():
    with pytest.raises(ArtifactError, match="data type BFLOAT16 is not supported"):
        TensorType(value_type(MIL_pb2.BFLOAT16, 2), "x")
    flexible = value_type(MIL_pb2.FLOAT32, 2)
    flexible.tensorType.dimensions[0].CopyFrom(MIL_pb2.Dimension(unknown=MIL_pb2.Dimension.UnknownDimension()))
    with pytest.raises(ArtifactError, match="flexible shapes"):
        TensorType(flexible, "x")


def test_sub_byte_integers_unpack_from_the_low_bits_up():
    raw = np.array([0x21, 0xF8], np.uint8)  # nibbles, low first: 1, 2, 8, 15
    assert unpack_bits(raw, 4, signed=False, count=4).tolist() == [1, 2, 8, 15]
    assert unpack_bits(raw, 4, signed=True, count=3).tolist() == [1, 2, -8]


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6])
def test_palette_indices_unpack_as_coremltools_packs_them(bits):
    """3- and 6-bit indices run across bytes: the stream of bits, low first."""
    from coremltools.optimize._utils import pack_elements_into_bits

    values = np.random.default_rng(bits).integers(0, 1 << bits, 37).astype(np.uint8)
    assert unpack_bits(pack_elements_into_bits(values, bits), bits, signed=False, count=37).tolist() == values.tolist()


def test_immediates_take_their_declared_type_and_shape():
    floats = MIL_pb2.Value(immediateValue=MIL_pb2.Value.ImmediateValue(
        tensor=MIL_pb2.TensorValue(floats=MIL_pb2.TensorValue.RepeatedFloats(values=[1, 2, 3, 4]))))
    values = immediate(floats, TensorType(value_type(MIL_pb2.FLOAT16, 2, 2), "x"), "x")
    assert values.dtype == np.float16 and values.tolist() == [[1, 2], [3, 4]]
    packed = MIL_pb2.Value(immediateValue=MIL_pb2.Value.ImmediateValue(
        tensor=MIL_pb2.TensorValue(bytes=MIL_pb2.TensorValue.RepeatedBytes(values=bytes([0x21, 0xF8])))))
    assert immediate(packed, TensorType(value_type(MIL_pb2.INT4, 4), "x"), "x").tolist() == [1, 2, -8, -1]
    text = MIL_pb2.Value(immediateValue=MIL_pb2.Value.ImmediateValue(
        tensor=MIL_pb2.TensorValue(strings=MIL_pb2.TensorValue.RepeatedStrings(values=["fp16"]))))
    assert immediate(text, TensorType(value_type(MIL_pb2.STRING), "x"), "x") == "fp16"
