"""CBOR messages of the BlindAI 0.6 protocol, with veil's additive extensions.

Requests (client → server)::

    UploadModel  {model: [uint8...] | bstr, length, model_name, optimize, client_info,
                  model_id?}                      → {hash: bstr32, model_id: str}
    RunModel     {model_id, model_hash, inputs: [tensor...], client_info}
                                                  → {outputs: [tensor...]}
    DeleteModel  {model_id}                       → null

A tensor is ``{info: {fact, datum_type, node_name}, bytes_data}`` (see `veil.tensors`).
Optional fields may be absent and unknown keys are ignored, so older and newer clients both work.
Decoding is strict about what it reads: anything malformed raises `BadRequestError` (status 400)
or `TensorError`, never a bare exception.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cbor2
import numpy as np

from veil.errors import ApiError, BadRequestError, TensorError
from veil.tensors import WireTensor, datum_type_of

__all__ = [
    "DeleteRequest",
    "ModelListEntry",
    "RunRequest",
    "UploadRequest",
    "decode_delete_request",
    "decode_run_reply",
    "decode_run_request",
    "decode_upload_reply",
    "decode_upload_request",
    "encode_delete_request",
    "encode_error",
    "encode_run_reply",
    "encode_run_request",
    "encode_upload_reply",
    "encode_upload_request",
]


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
    """

    model: bytes | bytearray
    model_name: str
    model_id: str | None
    length: int | None
    visibility: str | None = None
    allowed_keys: tuple[str, ...] = ()

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


def _loads(body: bytes | bytearray, what: str) -> Any:
    try:
        return cbor2.loads(body)
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise _bad(f"{what}: malformed CBOR ({type(exc).__name__})") from None
    except Exception as exc:  # cbor2 raises assorted errors on hostile input
        raise _bad(f"{what}: malformed CBOR ({type(exc).__name__})") from None


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


def _uint_header(body: bytes | bytearray, pos: int, major: int) -> tuple[int, int] | None:
    """Read a definite CBOR header of `major` type at `pos`: (argument, next position)."""
    if pos >= len(body):
        return None
    initial = body[pos]
    if initial >> 5 != major:
        return None
    info = initial & 0x1F
    if info < 24:
        return info, pos + 1
    sizes = {24: 1, 25: 2, 26: 4, 27: 8}
    if info not in sizes:
        return None
    size = sizes[info]
    if pos + 1 + size > len(body):
        return None
    return int.from_bytes(body[pos + 1 : pos + 1 + size], "big"), pos + 1 + size


_CHUNK = 1 << 22
_VISIBILITIES = ("public", "restricted")
_KEY_ID = re.compile(r"[0-9a-f]{16}")
_MAX_ALLOWED_KEYS = 1024


def _decode_uint8_array(
    body: bytes | bytearray, start: int, count: int, chunk: int = _CHUNK
) -> tuple[bytearray, int] | None:
    """Decode `count` CBOR uints 0..255 from `body[start:]` with numpy; (bytes, end) or None.

    BlindAI sends a model as ``list(model_bytes)``: each item is one byte (0x00-0x17) or
    0x18 followed by the value (0x18-0xff, canonical). A run of 0x18 bytes always starts an item
    (the byte before it ends one), so inside a run even offsets are headers and odd offsets are
    the value 24. Chunks of 4 MiB keep temporaries small. None means "not this simple form".
    """
    result = bytearray(count)
    out = np.frombuffer(result, dtype=np.uint8)
    view = np.frombuffer(body, dtype=np.uint8)
    done = 0
    pos = start
    while done < count:
        window = view[pos : pos + chunk]
        if window.size == 0:
            return None
        is18 = window == 0x18
        idx = np.arange(window.size, dtype=np.int32)
        run_start = np.empty_like(is18)
        run_start[0] = is18[0]
        run_start[1:] = is18[1:] & ~is18[:-1]
        last_run = np.maximum.accumulate(np.where(run_start, idx, 0))
        is_head = np.where(is18, ((idx - last_run) & 1) == 0, window < 0x18)
        heads = np.flatnonzero(is_head)[: count - done]
        if heads.size and is18[heads[-1]] and heads[-1] + 1 >= window.size:
            heads = heads[:-1]  # its value lies in the next chunk, which starts with it
        if heads.size == 0:
            return None
        last_head = int(heads[-1])
        end = last_head + (2 if is18[last_head] else 1)
        # Every non-header byte must be the value right after a 0x18 header ...
        payload_ok = np.zeros(end, dtype=bool)
        payload_ok[1:] = is_head[: end - 1] & is18[: end - 1]
        if bool(np.any(~is_head[:end] & ~payload_ok)):
            return None
        # ... and every 0x18 header must be followed by its value (non-canonical forms refused).
        header18 = is18[heads]
        if bool(np.any(is_head[heads[header18] + 1])):
            return None
        values = np.where(header18, window[np.minimum(heads + 1, end - 1)], window[heads])
        out[done : done + heads.size] = values
        done += heads.size
        pos += end
    return result, pos


def _fast_upload_fields(body: bytes | bytearray, chunk: int = _CHUNK) -> dict[str, Any] | None:
    """Decode an upload whose first key is ``model`` without cbor2 building it.

    A uint8 array (BlindAI) is converted with numpy instead of as ints; a byte string (veil) is
    copied once out of the body. None means "another layout": cbor2 decodes it then.
    """
    header = _uint_header(body, 0, 5)
    if header is None or header[0] == 0:
        return None
    pairs, pos = header
    if body[pos : pos + 6] != b"\x65model":
        return None
    array = _uint_header(body, pos + 6, 4)
    string = _uint_header(body, pos + 6, 2)
    model: bytes | bytearray
    if array is not None:
        count, pos = array
        if count > len(body) - pos:  # each item takes at least one byte: a lie
            return None
        decoded = _decode_uint8_array(body, pos, count, chunk) if count else (bytearray(), pos)
        if decoded is None:
            return None
        model, end = decoded
    elif string is not None:
        size, pos = string
        end = pos + size
        if end > len(body):
            return None
        model = bytes(memoryview(body)[pos:end])
    else:
        return None
    rest_header = _encode_map_header(pairs - 1)
    try:
        rest = cbor2.loads(rest_header + bytes(memoryview(body)[end:]))
    except Exception:
        return None
    if not isinstance(rest, dict) or "model" in rest:
        return None
    rest["model"] = model
    return rest


def _encode_map_header(count: int) -> bytes:
    if count < 24:
        return bytes([0xA0 | count])
    if count < 256:
        return bytes([0xB8, count])
    return b"\xb9" + struct.pack(">H", count)


def decode_upload_request(body: bytes | bytearray) -> UploadRequest:
    """Decode an UploadModel body (model as a uint8 array or a byte string).

    Raises:
        BadRequestError: malformed CBOR or fields of the wrong type.
    """
    message = _fast_upload_fields(body)
    if message is None:
        message = dict(_as_map(_loads(body, "UploadModel"), "UploadModel"))
    raw = message.get("model")
    model: bytes | bytearray
    if isinstance(raw, bytes | bytearray):
        model = raw
    elif isinstance(raw, list):
        try:
            model = bytes(raw)
        except (ValueError, TypeError):
            raise _bad("UploadModel.model: got a list, expected ints 0..255 or bytes") from None
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
    return UploadRequest(
        model=model,
        model_name=name,
        model_id=model_id,
        length=length,
        visibility=visibility,
        allowed_keys=tuple(dict.fromkeys(allowed)),
    )


def encode_upload_request(
    model: bytes,
    *,
    model_name: str,
    model_id: str | None,
    client_info: Mapping[str, Any],
    visibility: str | None = None,
    allowed_keys: Sequence[str] | None = None,
) -> bytes:
    """veil's upload: the model as one byte string (compact); BlindAI servers took an array.

    `visibility` and `allowed_keys` (veil extensions) are sent only when given.
    """
    message: dict[str, Any] = {
        "model": model,
        "length": len(model),
        "model_name": model_name,
        "optimize": True,
        "client_info": dict(client_info),
    }
    if model_id is not None:
        message["model_id"] = model_id
    if visibility is not None:
        message["visibility"] = visibility
    if allowed_keys is not None:
        message["allowed_keys"] = list(allowed_keys)
    return bytes(cbor2.dumps(message))


def encode_upload_reply(model_hash: bytes, model_id: str) -> bytes:
    return bytes(cbor2.dumps({"hash": model_hash, "model_id": model_id}))


def decode_upload_reply(body: bytes, status: int = 200) -> tuple[str, bytes]:
    """(model_id, hash) from an upload reply."""
    message = _reply_map(body, status, "upload reply")
    model_id, model_hash = message.get("model_id"), message.get("hash")
    if not isinstance(model_id, str) or not isinstance(model_hash, bytes):
        raise ApiError(status, "upload reply: expected model_id (text) and hash (bytes)")
    return model_id, model_hash


# ---- RunModel -----------------------------------------------------------------------------------


def _decode_tensor(item: Any, where: str) -> WireTensor:
    tensor = _as_map(item, where)
    info = _as_map(tensor.get("info"), f"{where}.info")
    data = tensor.get("bytes_data")
    if isinstance(data, list):
        try:
            data = bytes(data)
        except (ValueError, TypeError):
            raise _bad(f"{where}.bytes_data: expected bytes") from None
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
    message = _as_map(_loads(body, "RunModel"), "RunModel")
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
    message = _as_map(_loads(body, "DeleteModel"), "DeleteModel")
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
        message = cbor2.loads(body)
    except Exception:
        return body[:200].decode("utf-8", "replace")
    return message if isinstance(message, str) else repr(message)[:200]


def _reply_map(body: bytes, status: int, what: str) -> Mapping[str, Any]:
    try:
        message = cbor2.loads(body)
    except Exception:
        raise ApiError(status, f"{what}: malformed CBOR") from None
    if not isinstance(message, Mapping):
        raise ApiError(status, f"{what}: expected a CBOR map")
    return message
