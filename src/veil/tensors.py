"""Tensors on the wire: BlindAI 0.6 datum types, shapes and raw little-endian bytes.

A tensor travels as ``{"info": {"fact": shape, "datum_type": code, "node_name": name},
"bytes_data": raw}``. `WireTensor` is that record; `encode_input` / `encode_inputs` build it from
numpy arrays, torch tensors or flat lists, and `decode_array` turns it back into a numpy array,
refusing any byte length that does not match the shape.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from veil.errors import TensorError

__all__ = [
    "DatumType",
    "WireTensor",
    "datum_type_from_onnx",
    "datum_type_of",
    "decode_array",
    "encode_input",
    "encode_inputs",
    "format_shape",
    "numpy_dtype",
]


class DatumType(enum.IntEnum):
    """Element types of the BlindAI 0.6 protocol; the value is the code sent on the wire."""

    F32 = 0
    F64 = 1
    I32 = 2
    I64 = 3
    U32 = 4
    U64 = 5
    U8 = 6
    U16 = 7
    I8 = 8
    I16 = 9
    Bool = 10

    @property
    def label(self) -> str:
        """The numpy name users know (``float32``, ``int64``, ``bool``), for messages."""
        return _NUMPY[self].name


# Wire bytes are little-endian whatever the host is.
_NUMPY: Mapping[DatumType, np.dtype[Any]] = {
    DatumType.F32: np.dtype("<f4"),
    DatumType.F64: np.dtype("<f8"),
    DatumType.I32: np.dtype("<i4"),
    DatumType.I64: np.dtype("<i8"),
    DatumType.U32: np.dtype("<u4"),
    DatumType.U64: np.dtype("<u8"),
    DatumType.U8: np.dtype("u1"),
    DatumType.U16: np.dtype("<u2"),
    DatumType.I8: np.dtype("i1"),
    DatumType.I16: np.dtype("<i2"),
    DatumType.Bool: np.dtype("?"),
}

_BY_NUMPY_NAME: Mapping[str, DatumType] = {
    "float32": DatumType.F32,
    "float64": DatumType.F64,
    "int32": DatumType.I32,
    "int64": DatumType.I64,
    "uint32": DatumType.U32,
    "uint64": DatumType.U64,
    "uint8": DatumType.U8,
    "uint16": DatumType.U16,
    "int8": DatumType.I8,
    "int16": DatumType.I16,
    "bool": DatumType.Bool,
}

# ONNX Runtime's type strings ("tensor(float)") for the element types the protocol carries.
_BY_ONNX: Mapping[str, DatumType] = {
    "tensor(float)": DatumType.F32,
    "tensor(double)": DatumType.F64,
    "tensor(int32)": DatumType.I32,
    "tensor(int64)": DatumType.I64,
    "tensor(uint32)": DatumType.U32,
    "tensor(uint64)": DatumType.U64,
    "tensor(uint8)": DatumType.U8,
    "tensor(uint16)": DatumType.U16,
    "tensor(int8)": DatumType.I8,
    "tensor(int16)": DatumType.I16,
    "tensor(bool)": DatumType.Bool,
}

_SUPPORTED = ", ".join(t.label for t in DatumType)
# What every request resolves (wire codes in, output dtypes out), found without a detour.
_BY_CODE: Mapping[int, DatumType] = {t.value: t for t in DatumType}
_BY_NATIVE_DTYPE: Mapping[np.dtype[Any], DatumType] = {
    np.dtype(name): t for name, t in _BY_NUMPY_NAME.items()
}


def format_shape(dims: Sequence[int | str | None]) -> str:
    """A shape for messages: ``[batch, 8]``; a dynamic dimension with no name shows as -1."""
    return "[" + ", ".join("-1" if d is None else str(d) for d in dims) + "]"


def numpy_dtype(datum_type: DatumType) -> np.dtype[Any]:
    """The little-endian numpy dtype of a datum type."""
    return _NUMPY[datum_type]


def datum_type_from_onnx(type_string: str) -> DatumType | None:
    """Map an ONNX Runtime type string such as ``tensor(float)``; None if the protocol lacks it."""
    return _BY_ONNX.get(type_string)


def datum_type_of(value: Any) -> DatumType:
    """Resolve a datum type: wire code, name ("F32", "float32", "f32"), numpy or torch dtype.

    Raises:
        TensorError: the value names no type the protocol carries.
    """
    if isinstance(value, DatumType):
        return value
    if type(value) is int and value in _BY_CODE:
        return _BY_CODE[value]
    if isinstance(value, np.dtype) and value in _BY_NATIVE_DTYPE:
        return _BY_NATIVE_DTYPE[value]
    if isinstance(value, bool):
        raise TensorError(f"datum type: got {value!r}, expected a code 0..10 or a name")
    if isinstance(value, int):
        try:
            return DatumType(value)
        except ValueError:
            raise TensorError(f"datum type: got code {value}, expected 0..10") from None
    if isinstance(value, str):
        for candidate in (value, value.upper()):
            if candidate in DatumType.__members__:
                return DatumType[candidate]
        lowered = value.lower()
        if lowered == "bool":
            return DatumType.Bool
        if lowered in _BY_NUMPY_NAME:
            return _BY_NUMPY_NAME[lowered]
        short = {t.name.lower(): t for t in DatumType}
        if lowered in short:
            return short[lowered]
        raise TensorError(f"datum type: got {value!r}, expected one of {_SUPPORTED}")
    if _is_torch_dtype(value):
        name = str(value).removeprefix("torch.")
        if name in _BY_NUMPY_NAME:
            return _BY_NUMPY_NAME[name]
        raise TensorError(f"datum type: got {value}, expected one of {_SUPPORTED}")
    # Only real dtypes and numpy scalar types: np.dtype() of arbitrary values (maps, lists)
    # builds structured dtypes or raises errors of its own.
    if not (
        isinstance(value, np.dtype) or (isinstance(value, type) and issubclass(value, np.generic))
    ):
        raise TensorError(
            f"datum type: got {type(value).__name__}, expected a code, a name or a dtype"
        )
    dtype = np.dtype(value)
    if dtype.name not in _BY_NUMPY_NAME:
        raise TensorError(f"datum type: got {dtype.name}, expected one of {_SUPPORTED}")
    return _BY_NUMPY_NAME[dtype.name]


@dataclass(frozen=True, slots=True)
class WireTensor:
    """One tensor as the protocol carries it.

    Attributes:
        shape: the dimensions ("fact" on the wire).
        datum_type: the element type.
        name: the model input or output it belongs to; None means "by position".
        data: the elements, little-endian, row-major.
    """

    shape: tuple[int, ...]
    datum_type: DatumType
    name: str | None
    data: bytes

    def __post_init__(self) -> None:
        expected = expected_nbytes(self.shape, self.datum_type)
        if len(self.data) != expected:
            raise TensorError(
                f"tensor {self.name or '(positional)'}: got {len(self.data)} bytes, expected "
                f"{expected} for shape {format_shape(self.shape)} of {self.datum_type.label}"
            )

    def __repr__(self) -> str:
        return (
            f"WireTensor(name={self.name!r}, shape={list(self.shape)}, "
            f"datum_type={self.datum_type.name}, {len(self.data)} bytes)"
        )

    def to_wire(self) -> dict[str, Any]:
        """The CBOR-ready map; ``info`` holds only fact, datum_type and node_name."""
        return {
            "info": {
                "fact": list(self.shape),
                "datum_type": int(self.datum_type),
                "node_name": self.name,
            },
            "bytes_data": self.data,
        }


def expected_nbytes(shape: Sequence[int], datum_type: DatumType) -> int:
    """Bytes a tensor of this shape and type must hold."""
    return math.prod(shape) * _NUMPY[datum_type].itemsize


def decode_array(
    data: bytes | memoryview, datum_type: DatumType, shape: Sequence[int]
) -> npt.NDArray[Any]:
    """View wire bytes as a numpy array of `shape` without copying them.

    Raises:
        TensorError: the byte length is not prod(shape) × itemsize.
    """
    expected = expected_nbytes(shape, datum_type)
    if len(data) != expected:
        raise TensorError(
            f"got {len(data)} bytes, expected {expected} for shape {format_shape(shape)} "
            f"of {datum_type.label}"
        )
    try:
        return np.frombuffer(data, dtype=_NUMPY[datum_type]).reshape(tuple(shape))
    except ValueError:
        # numpy refuses shapes whose nonzero dims overflow, even when a zero makes them empty
        raise TensorError(f"shape {list(shape)}: too large to represent") from None


def _is_torch_dtype(value: Any) -> bool:
    return type(value).__module__ == "torch" and type(value).__name__ == "dtype"


def _is_torch_tensor(value: Any) -> bool:
    return type(value).__module__ == "torch" and type(value).__name__ == "Tensor"


def _check_shape(shape: Any) -> tuple[int, ...]:
    try:
        dims = tuple(shape)
    except TypeError:
        raise TensorError(f"shape: got {shape!r}, expected a sequence of ints") from None
    for dim in dims:
        if isinstance(dim, bool) or not isinstance(dim, int | np.integer) or dim < 0:
            raise TensorError(f"shape: got {list(dims)}, expected non-negative ints")
    return tuple(int(d) for d in dims)


def encode_input(
    value: Any,
    *,
    dtype: Any = None,
    shape: Sequence[int] | None = None,
    name: str | None = None,
) -> WireTensor:
    """Encode one input tensor.

    Args:
        value: a numpy array, a torch tensor, or a list (flat, or nested like a numpy array).
        dtype: for lists, the element type (required for flat lists); for arrays, a check.
        shape: for flat lists, the shape (required); ignored for arrays.
        name: the model input it feeds; None feeds inputs in order.

    Raises:
        TensorError: the value cannot be encoded, or its dtype is not the one asked for.
    """
    wanted = datum_type_of(dtype) if dtype is not None else None
    if _is_torch_tensor(value):
        value = value.detach().cpu().contiguous().numpy()
    if isinstance(value, np.ndarray | np.generic):
        array = np.asarray(value)
        datum_type = datum_type_of(array.dtype)
        if wanted is not None and wanted != datum_type:
            raise TensorError(
                f"input {name or '(positional)'}: dtype got {datum_type.label}, "
                f"expected {wanted.label}"
            )
        # np.asarray with order="C", not np.ascontiguousarray, which turns a scalar (shape [])
        # into shape [1].
        out = np.asarray(array, dtype=_NUMPY[datum_type], order="C")
        return WireTensor(tuple(out.shape), datum_type, name, out.tobytes())
    if isinstance(value, list | tuple):
        if wanted is None:
            raise TensorError(
                f"input {name or '(positional)'}: a list needs dtype= (and shape= if flat)"
            )
        try:
            out = np.asarray(value, dtype=_NUMPY[wanted])
        except (ValueError, TypeError, OverflowError) as exc:
            raise TensorError(f"input {name or '(positional)'}: {exc}") from None
        if shape is not None:
            dims = _check_shape(shape)
            if math.prod(dims) != out.size:
                raise TensorError(
                    f"input {name or '(positional)'}: got {out.size} elements, "
                    f"expected {math.prod(dims)} for shape {list(dims)}"
                )
            out = out.reshape(dims)
        return WireTensor(tuple(out.shape), wanted, name, np.asarray(out, order="C").tobytes())
    raise TensorError(
        f"input {name or '(positional)'}: got {type(value).__module__}.{type(value).__name__}, "
        "expected a numpy array, a torch tensor or a list"
    )


def _is_flat_list(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, int | float | bool | np.generic) for v in value
    )


def _pick(option: Any, key: int | str) -> Any:
    if option is None:
        return None
    if isinstance(option, Mapping):
        return option.get(key)
    return option[key] if isinstance(key, int) and key < len(option) else None


def encode_inputs(
    inputs: Any,
    *,
    dtype: Any = None,
    shape: Any = None,
) -> list[WireTensor]:
    """Encode every input of one request.

    `inputs` is one tensor (numpy, torch, flat list), a list of tensors (fed in order), or a dict
    from input name to tensor. For flat lists pass `dtype` and `shape`: one value for one input,
    or a list/dict matching `inputs`.
    """
    if isinstance(inputs, Mapping):
        return [
            encode_input(
                value,
                dtype=_pick(dtype, key) if isinstance(dtype, Mapping) else dtype,
                shape=_pick(shape, key) if isinstance(shape, Mapping) else shape,
                name=str(key),
            )
            for key, value in inputs.items()
        ]
    if _is_flat_list(inputs) or not isinstance(inputs, list | tuple):
        single_dtype = dtype[0] if isinstance(dtype, list) and len(dtype) == 1 else dtype
        single_shape = shape
        if isinstance(shape, list) and len(shape) == 1 and isinstance(shape[0], list | tuple):
            single_shape = shape[0]
        return [encode_input(inputs, dtype=single_dtype, shape=single_shape)]
    dtypes = dtype if isinstance(dtype, list | tuple) else [dtype] * len(inputs)
    shapes = (
        shape
        if isinstance(shape, list | tuple) and shape and isinstance(shape[0], list | tuple)
        else [shape] * len(inputs)
    )
    return [
        encode_input(value, dtype=_pick(dtypes, i), shape=_pick(shapes, i))
        for i, value in enumerate(inputs)
    ]
