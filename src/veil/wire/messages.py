"""The messages of the BlindAI 0.6 protocol, with veil's additive extensions.

Requests (client → server)::

    UploadModel  {model: [uint8...] | bstr, length, model_name, optimize, client_info,
                  model_id?, visibility?, allowed_keys?}
                                                  → {hash: bstr32, model_id: str}
    RunModel     {model_id, model_hash, inputs: [tensor...], client_info}
                                                  → {outputs: [tensor...]}
    DeleteModel  {model_id}                       → null

A tensor is ``{info: {fact, datum_type, node_name}, bytes_data}`` (see `veil.tensors`).
Optional fields may be absent and unknown keys are ignored, so older and newer clients both work.
Every body is read by the one strict decoder (`veil.wire.cbor`); anything malformed raises
`BadRequestError` (status 400) or `TensorError`, never a bare exception.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cbor2

from veil.errors import ApiError, BadRequestError, TensorError
from veil.tensors import WireTensor, datum_type_of
from veil.wire.cbor import DecodeLimits, StrictDecoder, decode

__all__ = [
    "DeleteRequest",
    "ModelListEntry",
    "RunRequest",
    "UploadRequest",
    "UploadStreamDecoder",
    "decode_delete_request",
    "decode_error",
    "decode_reply",
    "decode_run_reply",
    "decode_run_request",
    "decode_upload_optimization",
    "decode_upload_reply",
    "decode_upload_request",
    "encode_delete_request",
    "encode_error",
    "encode_run_reply",
    "encode_run_request",
    "encode_upload_head",
    "encode_upload_reply",
    "encode_upload_request",
]

_VISIBILITIES = ("public", "restricted")
_KEY_ID = re.compile(r"[0-9a-f]{16}")
_MAX_ALLOWED_KEYS = 1024
_MODEL_KEYS = frozenset({"model"})
_TENSOR_KEYS = frozenset({"bytes_data"})
# Replies of BlindAI's own server carry byte fields as integer arrays.
_REPLY_KEYS = frozenset({"bytes_data", "hash"})
# Collateral carries PEM chains, CRLs and TCB JSON as text; the client caps each answer anyway.
_REPLY_LIMITS = DecodeLimits(max_text_bytes=4 << 20)


@dataclass(frozen=True, slots=True)
class UploadRequest:
    """A decoded UploadModel.

    Attributes:
        model: the ONNX bytes (a bytearray when they came as BlindAI's int array: converting
            it to bytes once the request body is freed saves holding a third copy).
        model_name: the user's label (not an identifier).
        model_id: veil extension: the id the user wants; None lets the server choose.
        length: the length the client declared, when it did.
        visibility: veil extension: ``public`` or ``restricted``; None (BlindAI clients) lets
            the server choose its default.
        allowed_keys: veil extension: key ids that may run a restricted model.
        optimize: BlindAI's flag: optimize as the server's default says (None: absent).
        optimization: veil extension: ``off``, ``graph`` or ``int8`` by name
            (`veil.server.optimize`); it overrides `optimize`.
    """

    model: bytes | bytearray
    model_name: str
    model_id: str | None
    length: int | None
    visibility: str | None = None
    allowed_keys: tuple[str, ...] = ()
    optimize: bool | None = None
    optimization: str | None = None

    def __repr__(self) -> str:
        return f"UploadRequest(model_id={self.model_id!r}, {len(self.model)} bytes)"


@dataclass(frozen=True, slots=True)
class RunRequest:
    """A decoded RunModel: which model (by id, else by hex hash) and its inputs."""

    model_id: str | None
    model_hash: str | None
    inputs: tuple[WireTensor, ...]


@dataclass(frozen=True, slots=True)
class DeleteRequest:
    model_id: str


@dataclass(frozen=True, slots=True)
class ModelListEntry:
    """One model in the `GET /models` listing (veil extension)."""

    model_id: str
    model_name: str
    hash: bytes
    size: int
    inputs: tuple[Mapping[str, Any], ...]
    outputs: tuple[Mapping[str, Any], ...]


def _bad(message: str) -> BadRequestError:
    return BadRequestError(400, message)


def _as_map(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _bad(f"{what}: got CBOR {type(value).__name__}, expected a map")
    return value


def _opt_str(message: Mapping[str, Any], key: str, what: str) -> str | None:
    value = message.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _bad(f"{what}.{key}: got {type(value).__name__}, expected a text string")
    return value


# ---- UploadModel --------------------------------------------------------------------------------


def decode_upload_request(body: bytes | bytearray) -> UploadRequest:
    """Decode a whole UploadModel body (model as a uint8 array or a byte string).

    Raises:
        BadRequestError: malformed CBOR or fields of the wrong type.
    """
    message = decode(body, "UploadModel", byte_array_keys=_MODEL_KEYS)
    return _upload_from_fields(_as_map(message, "UploadModel"))


class UploadStreamDecoder:
    """Decode an UploadModel body as it arrives, holding the model but not the body.

    `feed` takes the body in pieces of any size; `finish` returns what `decode_upload_request`
    returns for the whole body. Any layout streams: the model as a byte string (veil's client
    sends it last, after a small header) or BlindAI's array of uint8, fields in any order,
    definite or indefinite lengths. Memory grows with what has arrived, never with what the
    body declares.

    Args:
        max_model_bytes: the largest model accepted; a larger one is refused (400) as soon as
            its header is read.
        on_model_size: called first with the model's declared size (-1 when its length is
            indefinite); it may raise (the server's 413).
        size: the body's length when known (Content-Length).
        limits: the decoder's structure limits.

    Raises:
        BadRequestError: (400) from `feed` or `finish`, as `decode_upload_request` would.
    """

    def __init__(
        self,
        *,
        max_model_bytes: int,
        on_model_size: Callable[[int], None] | None = None,
        size: int | None = None,
        limits: DecodeLimits | None = None,
    ) -> None:
        self._max_model_bytes = max_model_bytes
        self._on_model_size = on_model_size
        self._decoder = StrictDecoder(
            "UploadModel",
            limits=limits,
            size=size,
            byte_array_keys=_MODEL_KEYS,
            on_size=self._model_size,
        )

    def _model_size(self, key: str, size: int) -> None:
        if self._on_model_size is not None:
            self._on_model_size(size)
        if size > self._max_model_bytes:
            raise _bad(f"UploadModel.model: {size} bytes, more than {self._max_model_bytes}")

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Take the next piece of the body."""
        self._decoder.feed(data)

    def finish(self) -> UploadRequest:
        """The decoded request, once the whole body was fed."""
        request = _upload_from_fields(_as_map(self._decoder.finish(), "UploadModel"))
        if len(request.model) > self._max_model_bytes:  # an indefinite-length model
            raise _bad(
                f"UploadModel.model: {len(request.model)} bytes, more than {self._max_model_bytes}"
            )
        return request


def _upload_from_fields(message: Mapping[Any, Any]) -> UploadRequest:
    raw = message.get("model")
    model: bytes | bytearray
    if isinstance(raw, bytes | bytearray):
        model = raw
    else:
        raise _bad(
            f"UploadModel.model: got {type(raw).__name__}, expected an array of bytes or bytes"
        )
    length = message.get("length")
    if length is not None:
        if isinstance(length, bool) or not isinstance(length, int):
            raise _bad(f"UploadModel.length: got {type(length).__name__}, expected an int")
        if length != len(model):
            raise _bad(f"UploadModel.length: got {length}, but the model has {len(model)} bytes")
    name = _opt_str(message, "model_name", "UploadModel") or ""
    model_id = _opt_str(message, "model_id", "UploadModel") or None
    visibility = _opt_str(message, "visibility", "UploadModel")
    if visibility is not None and visibility not in _VISIBILITIES:
        raise _bad(
            f"UploadModel.visibility: got {visibility[:40]!r}, expected public or restricted"
        )
    allowed = message.get("allowed_keys")
    if allowed is None:
        allowed = []
    if (
        not isinstance(allowed, list)
        or len(allowed) > _MAX_ALLOWED_KEYS
        or not all(isinstance(k, str) and _KEY_ID.fullmatch(k) for k in allowed)
    ):
        raise _bad(
            f"UploadModel.allowed_keys: expected at most {_MAX_ALLOWED_KEYS} key ids "
            "(16 hex digits each)"
        )
    optimize = message.get("optimize")
    if optimize is not None and not isinstance(optimize, bool):
        raise _bad(f"UploadModel.optimize: got {type(optimize).__name__}, expected a bool")
    optimization = _opt_str(message, "optimization", "UploadModel")
    if optimization is not None and optimization not in _OPTIMIZATIONS:
        raise _bad(
            f"UploadModel.optimization: got {optimization[:40]!r}, expected off, graph or int8"
        )
    return UploadRequest(
        model=model,
        model_name=name,
        model_id=model_id,
        length=length,
        visibility=visibility,
        allowed_keys=tuple(dict.fromkeys(allowed)),
        optimize=optimize,
        optimization=optimization,
    )


_OPTIMIZATIONS = ("off", "graph", "int8")


def encode_upload_head(
    model_size: int,
    *,
    model_name: str,
    model_id: str | None,
    client_info: Mapping[str, Any],
    visibility: str | None = None,
    allowed_keys: Sequence[str] | None = None,
    optimization: str | None = None,
) -> bytes:
    """The start of veil's upload body: every field, then the header of the ``model`` bytes.

    The body is these bytes followed by the model's `model_size` bytes, so a client can send a
    file in pieces without holding it. `visibility`, `allowed_keys` and `optimization` (veil
    extensions) are sent only when given.
    """
    fields: dict[str, Any] = {
        "length": model_size,
        "model_name": model_name,
        "optimize": True,
        "client_info": dict(client_info),
    }
    if model_id is not None:
        fields["model_id"] = model_id
    if visibility is not None:
        fields["visibility"] = visibility
    if allowed_keys is not None:
        fields["allowed_keys"] = list(allowed_keys)
    if optimization is not None:
        fields["optimization"] = optimization
    encoded = cbor2.dumps(fields)
    # cbor2 wrote a map header for len(fields) pairs: replace it with one counting the model too.
    pairs_end = len(_encode_map_header(len(fields)))
    model_key = cbor2.dumps("model")
    size_header = _encode_bytes_header(model_size)
    return _encode_map_header(len(fields) + 1) + encoded[pairs_end:] + model_key + size_header


def _encode_map_header(count: int) -> bytes:
    if count < 24:
        return bytes([0xA0 | count])
    if count < 256:
        return bytes([0xB8, count])
    return b"\xb9" + struct.pack(">H", count)


def _encode_bytes_header(size: int) -> bytes:
    if size < 24:
        return bytes([0x40 | size])
    for info, width in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if size < 1 << (8 * width):
            return bytes([0x40 | info]) + size.to_bytes(width, "big")
    raise ValueError(f"model of {size} bytes: too large for CBOR")


def encode_upload_request(
    model: bytes,
    *,
    model_name: str,
    model_id: str | None,
    client_info: Mapping[str, Any],
    visibility: str | None = None,
    allowed_keys: Sequence[str] | None = None,
    optimization: str | None = None,
) -> bytes:
    """veil's upload: the model as one byte string, last (`encode_upload_head` + the model)."""
    head = encode_upload_head(
        len(model),
        model_name=model_name,
        model_id=model_id,
        client_info=client_info,
        visibility=visibility,
        allowed_keys=allowed_keys,
        optimization=optimization,
    )
    return head + bytes(model)


def encode_upload_reply(
    model_hash: bytes, model_id: str, optimization: Mapping[str, Any] | None = None
) -> bytes:
    """The upload's answer; `optimization` (veil extension) reports what optimizing did."""
    reply: dict[str, Any] = {"hash": model_hash, "model_id": model_id}
    if optimization:
        reply["optimization"] = dict(optimization)
    return bytes(cbor2.dumps(reply))


def decode_upload_reply(body: bytes, status: int = 200) -> tuple[str, bytes]:
    """(model_id, hash) from an upload reply."""
    message = _reply_map(body, status, "upload reply")
    model_id, model_hash = message.get("model_id"), message.get("hash")
    if isinstance(model_hash, bytearray):
        model_hash = bytes(model_hash)
    if not isinstance(model_id, str) or not isinstance(model_hash, bytes):
        raise ApiError(status, "upload reply: expected model_id (text) and hash (bytes)")
    return model_id, model_hash


def decode_upload_optimization(body: bytes, status: int = 200) -> dict[str, Any] | None:
    """The optimization report of an upload reply (veil extension), None when absent."""
    report = _reply_map(body, status, "upload reply").get("optimization")
    if report is None:
        return None
    if not isinstance(report, dict) or not all(isinstance(k, str) for k in report):
        raise ApiError(status, "upload reply: optimization is not a map of names")
    return dict(report)


# ---- RunModel -----------------------------------------------------------------------------------


def _decode_tensor(item: Any, where: str) -> WireTensor:
    tensor = _as_map(item, where)
    info = _as_map(tensor.get("info"), f"{where}.info")
    data = tensor.get("bytes_data")
    if isinstance(data, bytearray):  # BlindAI's integer-array form
        data = bytes(data)
    if not isinstance(data, bytes):
        raise _bad(f"{where}.bytes_data: got {type(data).__name__}, expected bytes")
    fact = info.get("fact")
    if not isinstance(fact, list | tuple) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in fact
    ):
        raise _bad(f"{where}.info.fact: expected a list of non-negative ints")
    try:
        datum_type = datum_type_of(info.get("datum_type"))
    except TensorError as exc:
        raise _bad(f"{where}.info.{exc}") from None
    name = info.get("node_name")
    if name is not None and not isinstance(name, str):
        raise _bad(f"{where}.info.node_name: got {type(name).__name__}, expected a text string")
    return WireTensor(tuple(fact), datum_type, name or None, data)


def decode_run_request(body: bytes | bytearray) -> RunRequest:
    """Decode a RunModel body.

    Raises:
        BadRequestError: malformed CBOR or fields of the wrong type.
        TensorError: a tensor's byte length does not match its shape and type.
    """
    message = _as_map(decode(body, "RunModel", byte_array_keys=_TENSOR_KEYS), "RunModel")
    model_id = _opt_str(message, "model_id", "RunModel") or None
    model_hash = _opt_str(message, "model_hash", "RunModel") or None
    if model_id is None and model_hash is None:
        raise _bad("RunModel: expected a model_id or a model_hash")
    inputs = message.get("inputs")
    if not isinstance(inputs, list):
        raise _bad(f"RunModel.inputs: got {type(inputs).__name__}, expected an array")
    tensors = tuple(_decode_tensor(item, f"RunModel.inputs[{i}]") for i, item in enumerate(inputs))
    return RunRequest(model_id=model_id, model_hash=model_hash, inputs=tensors)


def encode_run_request(
    *,
    model_id: str | None,
    model_hash: str | None,
    inputs: Sequence[WireTensor],
    client_info: Mapping[str, Any],
) -> bytes:
    return bytes(
        cbor2.dumps(
            {
                "model_id": model_id or "",
                "model_hash": model_hash or "",
                "inputs": [t.to_wire() for t in inputs],
                "client_info": dict(client_info),
            }
        )
    )


def encode_run_reply(outputs: Sequence[WireTensor]) -> bytes:
    return bytes(cbor2.dumps({"outputs": [t.to_wire() for t in outputs]}))


def decode_run_reply(body: bytes, status: int = 200) -> list[WireTensor]:
    message = _reply_map(body, status, "run reply")
    outputs = message.get("outputs")
    if not isinstance(outputs, list):
        raise ApiError(status, "run reply: expected an array of outputs")
    try:
        return [_decode_tensor(item, f"outputs[{i}]") for i, item in enumerate(outputs)]
    except (BadRequestError, TensorError) as exc:
        raise ApiError(status, f"run reply: {exc}") from None


# ---- DeleteModel, errors ------------------------------------------------------------------------


def decode_delete_request(body: bytes | bytearray) -> DeleteRequest:
    message = _as_map(decode(body, "DeleteModel"), "DeleteModel")
    model_id = _opt_str(message, "model_id", "DeleteModel")
    if not model_id:
        raise _bad("DeleteModel.model_id: expected a non-empty text string")
    return DeleteRequest(model_id=model_id)


def encode_delete_request(model_id: str) -> bytes:
    return bytes(cbor2.dumps({"model_id": model_id}))


def encode_error(message: str) -> bytes:
    """An error body: a CBOR text string saying what went wrong."""
    return bytes(cbor2.dumps(message))


def decode_error(body: bytes) -> str:
    """The message of an error body, or a short note if the server sent something else."""
    try:
        message = decode(body, "error")
    except BadRequestError:
        return body[:200].decode("utf-8", "replace")
    return message if isinstance(message, str) else repr(message)[:200]


def decode_reply(body: bytes, what: str, status: int = 200) -> Any:
    """A reply body, read by the strict decoder (byte fields may come as integer arrays).

    Raises:
        ApiError: (with the reply's status) malformed or refused CBOR.
    """
    try:
        return decode(body, what, limits=_REPLY_LIMITS, byte_array_keys=_REPLY_KEYS)
    except BadRequestError as exc:
        raise ApiError(status, exc.message) from None


def _reply_map(body: bytes, status: int, what: str) -> Mapping[str, Any]:
    message = decode_reply(body, what, status)
    if not isinstance(message, Mapping):
        raise ApiError(status, f"{what}: expected a CBOR map")
    return message
