"""Datum types, encoding of inputs and strict decoding of wire tensors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from veil.errors import TensorError
from veil.tensors import (
    DatumType,
    WireTensor,
    datum_type_from_onnx,
    datum_type_of,
    decode_array,
    encode_input,
    encode_inputs,
    format_shape,
    numpy_dtype,
)

NUMPY_NAMES = {
    DatumType.F32: "float32",
    DatumType.F64: "float64",
    DatumType.I32: "int32",
    DatumType.I64: "int64",
    DatumType.U32: "uint32",
    DatumType.U64: "uint64",
    DatumType.U8: "uint8",
    DatumType.U16: "uint16",
    DatumType.I8: "int8",
    DatumType.I16: "int16",
    DatumType.Bool: "bool",
}


def test_codes_are_blindai_codes() -> None:
    assert [(t.name, int(t)) for t in DatumType] == [
        ("F32", 0),
        ("F64", 1),
        ("I32", 2),
        ("I64", 3),
        ("U32", 4),
        ("U64", 5),
        ("U8", 6),
        ("U16", 7),
        ("I8", 8),
        ("I16", 9),
        ("Bool", 10),
    ]


@pytest.mark.parametrize("datum_type", list(DatumType))
def test_every_spelling_resolves(datum_type: DatumType) -> None:
    name = NUMPY_NAMES[datum_type]
    assert numpy_dtype(datum_type) == np.dtype(name)
    assert numpy_dtype(datum_type).byteorder in ("<", "|", "=")
    for spelling in (int(datum_type), datum_type.name, name, np.dtype(name), getattr(np, name)):
        assert datum_type_of(spelling) is datum_type
    onnx_name = {"float32": "float", "float64": "double"}.get(name, name)
    assert datum_type_from_onnx(f"tensor({onnx_name})") is datum_type


def test_torch_dtypes_resolve() -> None:
    torch = pytest.importorskip("torch")
    assert datum_type_of(torch.float32) is DatumType.F32
    assert datum_type_of(torch.bool) is DatumType.Bool
    with pytest.raises(TensorError, match=r"torch\.bfloat16"):
        datum_type_of(torch.bfloat16)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (11, "got code 11, expected 0..10"),
        (-1, "got code -1"),
        (True, "got True"),
        ("float16", "got 'float16'"),
        (np.float16, "got float16"),
        (np.dtype("complex64"), "got complex64"),
        (object(), "got object"),
        ({"a": []}, "got dict"),
        ([1], "got list"),
        (None, "got NoneType"),
    ],
)
def test_unknown_datum_types_are_refused(value: object, message: str) -> None:
    with pytest.raises(TensorError, match=message):
        datum_type_of(value)


def test_onnx_types_outside_the_protocol() -> None:
    assert datum_type_from_onnx("tensor(float16)") is None
    assert datum_type_from_onnx("tensor(string)") is None


@pytest.mark.parametrize("datum_type", list(DatumType))
def test_numpy_round_trip(datum_type: DatumType) -> None:
    array = (np.arange(12) % 2).astype(NUMPY_NAMES[datum_type]).reshape(3, 4)
    tensor = encode_input(array, name="x")
    assert tensor.shape == (3, 4)
    assert tensor.datum_type is datum_type
    assert tensor.name == "x"
    decoded = decode_array(tensor.data, tensor.datum_type, tensor.shape)
    np.testing.assert_array_equal(decoded, array)
    assert decoded.dtype == array.dtype


def test_big_endian_and_non_contiguous_inputs_become_little_endian_rows() -> None:
    array = np.arange(6, dtype=">i4").reshape(2, 3).T
    tensor = encode_input(array)
    assert tensor.data == np.ascontiguousarray(array, dtype="<i4").tobytes()
    assert tensor.shape == (3, 2)


def test_flat_list_needs_dtype_and_matching_shape() -> None:
    tensor = encode_input([1, 2, 3, 4, 5, 6], dtype="f32", shape=(2, 3))
    assert tensor.shape == (2, 3)
    assert tensor.data == np.arange(1, 7, dtype="<f4").tobytes()
    with pytest.raises(TensorError, match="needs dtype="):
        encode_input([1, 2, 3])
    with pytest.raises(TensorError, match="got 3 elements, expected 4 for shape"):
        encode_input([1, 2, 3], dtype="i64", shape=(2, 2))
    with pytest.raises(TensorError, match="shape: got"):
        encode_input([1, 2], dtype="i64", shape=(-1, 2))


def test_nested_list_keeps_its_shape() -> None:
    tensor = encode_input([[1, 2], [3, 4]], dtype=DatumType.U8)
    assert tensor.shape == (2, 2)
    assert tensor.data == bytes([1, 2, 3, 4])


def test_dtype_given_for_an_array_is_checked() -> None:
    with pytest.raises(TensorError, match="dtype got float64, expected float32"):
        encode_input(np.zeros(2), dtype="float32")


def test_unsupported_inputs_are_refused() -> None:
    with pytest.raises(TensorError, match="got float16"):
        encode_input(np.zeros(2, dtype=np.float16))
    with pytest.raises(TensorError, match="expected a numpy array"):
        encode_input("text")
    with pytest.raises(TensorError, match="int8"):
        encode_input([1000], dtype="int8", shape=(1,))


def test_encode_inputs_forms() -> None:
    a, b = np.zeros((1, 2), np.float32), np.ones(3, np.int64)
    assert [t.name for t in encode_inputs({"a": a, "b": b})] == ["a", "b"]
    assert [t.name for t in encode_inputs([a, b])] == [None, None]
    (single,) = encode_inputs(a)
    assert single.shape == (1, 2)
    (flat,) = encode_inputs([1, 2, 3, 4], dtype="i32", shape=[2, 2])
    assert flat.shape == (2, 2)
    two = encode_inputs([[1, 2], [3.0]], dtype=["i32", "f64"], shape=[[2], [1]])
    assert [(t.datum_type, t.shape) for t in two] == [(DatumType.I32, (2,)), (DatumType.F64, (1,))]
    named = encode_inputs({"x": [1, 2]}, dtype={"x": "u8"}, shape={"x": (2,)})
    assert named[0].data == b"\x01\x02"


def test_torch_tensor_input() -> None:
    torch = pytest.importorskip("torch")
    tensor = encode_input(torch.arange(6, dtype=torch.int16).reshape(2, 3))
    assert (tensor.shape, tensor.datum_type) == ((2, 3), DatumType.I16)
    assert tensor.data == np.arange(6, dtype="<i2").tobytes()


def test_decode_refuses_wrong_length() -> None:
    with pytest.raises(TensorError, match=r"got 10 bytes, expected 12 for shape \[3\] of int32"):
        decode_array(bytes(10), DatumType.I32, (3,))
    with pytest.raises(TensorError, match="got 1 bytes, expected 0"):
        decode_array(b"\0", DatumType.F64, (0, 5))


def test_empty_shape_with_huge_dims_is_a_tensor_error() -> None:
    with pytest.raises(TensorError, match="too large"):
        decode_array(b"", DatumType.F64, (0, 4637, 4661, 70005, 762000))


def test_wire_tensor_checks_its_length_and_hides_its_data() -> None:
    with pytest.raises(TensorError, match="got 3 bytes, expected 4"):
        WireTensor((2,), DatumType.U16, "x", b"abc")
    tensor = WireTensor((2,), DatumType.U16, "x", b"\x01\x00\x02\x00")
    assert "\\x01" not in repr(tensor)
    assert tensor.to_wire() == {
        "info": {"fact": [2], "datum_type": 7, "node_name": "x"},
        "bytes_data": b"\x01\x00\x02\x00",
    }


@given(
    st.sampled_from(list(DatumType)),
    st.lists(st.integers(0, 4), max_size=4),
    st.integers(0, 64),
)
def test_decode_accepts_exactly_the_right_length(
    datum_type: DatumType, shape: list[int], size: int
) -> None:
    expected = int(np.prod(shape, dtype=np.int64)) * numpy_dtype(datum_type).itemsize
    if size == expected:
        assert decode_array(bytes(size), datum_type, shape).shape == tuple(shape)
    else:
        with pytest.raises(TensorError):
            decode_array(bytes(size), datum_type, shape)


@pytest.mark.parametrize("value", [np.array(42), np.int64(42), np.array(42).T])
def test_a_scalar_keeps_shape_empty(value: object) -> None:
    tensor = encode_inputs({"x": value})[0]
    assert tensor.shape == ()
    assert tensor.data == (42).to_bytes(8, "little")
    np.testing.assert_array_equal(decode_array(tensor.data, tensor.datum_type, ()), np.array(42))


def test_messages_name_dtypes_and_shapes_as_users_write_them() -> None:
    assert [t.label for t in (DatumType.F32, DatumType.I64, DatumType.Bool)] == [
        "float32",
        "int64",
        "bool",
    ]
    assert format_shape(["batch", 8]) == "[batch, 8]"
    assert format_shape([None, 8]) == "[-1, 8]"
    assert format_shape([]) == "[]"
    with pytest.raises(TensorError, match=r"expected 12 for shape \[3\] of float32"):
        WireTensor((3,), DatumType.F32, "x", b"\0" * 10)
