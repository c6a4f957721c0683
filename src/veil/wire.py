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

import io
import re
import struct
from collections.abc import Callable, Mapping, Sequence
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
    "UploadStreamDecoder",
    "decode_delete_request",
    "decode_run_reply",
    "decode_run_request",
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
    return _upload_from_fields(message)


def _upload_from_fields(message: Mapping[Any, Any]) -> UploadRequest:
    raw = message.get("model")
    model: bytes | bytearray
    if isinstance(raw, bytes | bytearray):
        model = raw
    elif isinstance(raw, list):
        try:
            model = bytes(raw)
        except (ValueError, TypeError):
            raise _bad(_NOT_UINT8) from None
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


_NOT_UINT8 = "UploadModel.model: got a list, expected ints 0..255 or bytes"
# Fields before the model are kept (to fall back to a whole-body decode) up to this size; a
# field after it may not exceed it either.
_MAX_FIELDS_BYTES = 1 << 20


class _NeedMore(Exception):
    pass


class _FallBack(Exception):
    pass


class UploadStreamDecoder:
    """Decode an UploadModel body as it arrives, holding the model but not the body.

    `feed` takes the body in pieces of any size; `finish` returns what `decode_upload_request`
    returns for the whole body. The usual layouts are decoded on the fly: a definite-length
    map whose ``model`` is a byte string (veil, ideally its last field, so a client can stream
    the file after a small header) or BlindAI's array of uint8 (decoded a window at a time with
    numpy). Anything else before the model (indefinite lengths, a ``model`` of another type,
    over 1 MiB of fields) falls back to buffering the body and decoding it whole at the end.

    Args:
        max_model_bytes: the largest model accepted; a larger one is refused (400) as soon as
            its header is read, before anything is allocated for it.
        on_model_size: called first with the model's size; it may raise (the server's 413).

    Raises:
        BadRequestError: (400) from `feed` or `finish`, as `decode_upload_request` would.
    """

    def __init__(
        self, *, max_model_bytes: int, on_model_size: Callable[[int], None] | None = None
    ) -> None:
        self._max_model_bytes = max_model_bytes
        self._on_model_size = on_model_size
        self._buf = bytearray()
        self._head: bytearray | None = bytearray()  # every byte before the model, for fallback
        self._whole: bytearray | None = None  # fallback: the whole body
        self._fields: dict[Any, Any] = {}
        self._pairs = -1  # map pairs left; -1 before the map header
        self._model: bytearray | None = None
        self._filled = 0
        self._array = False  # the model is an array of uint8 (else a byte string)
        self._in_model = False

    @property
    def streaming(self) -> bool:
        """False once the decoder fell back to buffering the whole body."""
        return self._whole is None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Take the next piece of the body."""
        if self._whole is not None:
            self._whole += data
            return
        if self._head is not None:
            self._head += data
        view = memoryview(data).cast("B")
        if self._in_model and not self._array and not self._buf:
            view = self._copy_model(view)  # the common case: straight into the model
        self._buf += view
        self._parse(final=False)
        if self._head is not None and len(self._head) > _MAX_FIELDS_BYTES:
            self._fall_back()  # over 1 MiB and still no model: not worth decoding piecewise

    def finish(self) -> UploadRequest:
        """The decoded request, once the whole body was fed."""
        if self._whole is None:
            self._parse(final=True)
        if self._whole is not None:
            return decode_upload_request(self._whole)
        if self._pairs != 0:
            raise _bad("UploadModel: malformed CBOR (CBORDecodeEOF)")
        return _upload_from_fields(self._fields)

    # -- internals ---------------------------------------------------------------------------

    def _fall_back(self) -> None:
        assert self._head is not None
        self._whole, self._head = self._head, None
        self._buf = bytearray()

    def _copy_model(self, view: memoryview) -> memoryview:
        assert self._model is not None
        n = min(len(view), len(self._model) - self._filled)
        self._model[self._filled : self._filled + n] = view[:n]
        self._filled += n
        return view[n:]

    def _parse(self, *, final: bool) -> None:
        try:
            while self._whole is None and self._pairs != 0:
                if self._in_model:
                    if not self._model_step(final):
                        return
                elif self._pairs < 0:
                    self._map_header()
                else:
                    self._field()
        except _NeedMore:
            if final and self._head is not None:
                self._fall_back()  # let the whole-body decoder name the problem
            elif final:
                raise _bad("UploadModel: malformed CBOR (CBORDecodeEOF)") from None

    def _map_header(self) -> None:
        if not self._buf:
            raise _NeedMore
        initial = self._buf[0]
        if initial >> 5 != 5 or initial & 0x1F > 27:
            self._fall_back()  # not a definite-length map: the whole-body decoder judges
            return
        header = _uint_header(self._buf, 0, 5)
        if header is None:
            raise _NeedMore
        self._pairs, end = header
        del self._buf[:end]

    def _decode_at(self, decoder: cbor2.CBORDecoder) -> Any:
        """The next complete item of the buffer (else _NeedMore, or _FallBack before the model)."""
        try:
            return decoder.decode()
        except cbor2.CBORDecodeEOF:
            if len(self._buf) <= _MAX_FIELDS_BYTES:
                raise _NeedMore from None
            if self._head is not None:
                raise _FallBack from None
            raise _bad(f"UploadModel: a field exceeds {_MAX_FIELDS_BYTES} bytes") from None
        except Exception as exc:
            if self._head is not None:
                raise _FallBack from None
            raise _bad(f"UploadModel: malformed CBOR ({type(exc).__name__})") from None

    def _field(self) -> None:
        # Nothing is consumed until a whole pair (or the model's header) is in the buffer.
        decoder = cbor2.CBORDecoder(io.BytesIO(self._buf))
        try:
            key = self._decode_at(decoder)
            if key != "model":
                value = self._decode_at(decoder)
        except _FallBack:
            self._fall_back()
            return
        at = decoder.fp.tell()
        if key != "model":
            try:
                self._fields[key] = value
            except TypeError:
                raise _bad("UploadModel: malformed CBOR (unhashable key)") from None
            del self._buf[:at]
            self._pairs -= 1
            return
        if "model" in self._fields or self._model is not None:
            raise _bad("UploadModel.model: given twice")
        if at >= len(self._buf):
            raise _NeedMore
        initial = self._buf[at]
        major = initial >> 5
        if major not in (2, 4) or initial & 0x1F > 27:
            if self._head is None:
                raise _bad(_NOT_UINT8)
            self._fall_back()  # text, an indefinite length, ...: the whole-body decoder judges
            return
        header = _uint_header(self._buf, at, major)
        if header is None:
            raise _NeedMore
        size, end = header
        if self._on_model_size is not None:
            self._on_model_size(size)
        if size > self._max_model_bytes:
            raise _bad(f"UploadModel.model: {size} bytes, more than {self._max_model_bytes}")
        del self._buf[:end]
        self._model = bytearray(size)
        self._array = major == 4
        self._in_model = True
        self._head = None  # the model has begun: no fallback from here on

    def _model_step(self, final: bool) -> bool:
        """Advance inside the model; False when more data is needed."""
        assert self._model is not None
        left = len(self._model) - self._filled
        if left and not self._array:
            with memoryview(self._buf) as view:
                rest = bytes(self._copy_model(view))
            self._buf = bytearray(rest)
            left = len(self._model) - self._filled
        while left and self._array:
            if len(self._buf) < min(2 * left, _CHUNK) and not final:
                return False
            count = min(left, len(self._buf) // 2)
            decoded = _decode_uint8_array(self._buf, 0, count, len(self._buf)) if count else None
            if decoded is not None:
                values, end = decoded
            else:
                values, end = self._slow_items(left)
                if not values:
                    if final:
                        raise _bad("UploadModel: malformed CBOR (CBORDecodeEOF)")
                    return False
            self._model[self._filled : self._filled + len(values)] = values
            self._filled += len(values)
            del self._buf[:end]
            left = len(self._model) - self._filled
        if left:
            if final:
                raise _bad("UploadModel: malformed CBOR (CBORDecodeEOF)")
            return False
        self._in_model = False
        self._fields["model"] = self._model
        self._pairs -= 1
        return True

    def _slow_items(self, left: int) -> tuple[bytearray, int]:
        # Items in any valid uint form (non-canonical ones too), one at a time: only clients
        # that do not write the shortest form pay for this.
        values = bytearray()
        pos = 0
        buf = self._buf
        while len(values) < left and pos < len(buf):
            initial = buf[pos]
            if initial >> 5 != 0:
                raise _bad(_NOT_UINT8)
            if initial & 0x1F > 27:
                raise _bad("UploadModel: malformed CBOR (CBORDecodeError)")
            header = _uint_header(buf, pos, 0)
            if header is None:
                break
            value, pos = header
            if value > 255:
                raise _bad(_NOT_UINT8)
            values.append(value)
        return values, pos


def encode_upload_head(
    model_size: int,
    *,
    model_name: str,
    model_id: str | None,
    client_info: Mapping[str, Any],
    visibility: str | None = None,
    allowed_keys: Sequence[str] | None = None,
) -> bytes:
    """The start of veil's upload body: every field, then the header of the ``model`` bytes.

    The body is these bytes followed by the model's `model_size` bytes, so a client can send a
    file in pieces without holding it. `visibility` and `allowed_keys` (veil extensions) are
    sent only when given.
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
    encoded = cbor2.dumps(fields)
    # cbor2 wrote a map header for len(fields) pairs: replace it with one counting the model too.
    pairs_end = len(_encode_map_header(len(fields)))
    model_key = cbor2.dumps("model")
    size_header = _encode_bytes_header(model_size)
    return _encode_map_header(len(fields) + 1) + encoded[pairs_end:] + model_key + size_header


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
) -> bytes:
    """veil's upload: the model as one byte string, last (`encode_upload_head` + the model)."""
    head = encode_upload_head(
        len(model),
        model_name=model_name,
        model_id=model_id,
        client_info=client_info,
        visibility=visibility,
        allowed_keys=allowed_keys,
    )
    return head + bytes(model)


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
