"""The Open Inference Protocol v2 (KServe v2 REST) on the attested port: routes and JSON codec.

The same models, keys, limits and errors as BlindAI's CBOR ``/run``, in the shape Triton's,
KServe's and any HTTP client expect::

    GET  /v2                          server metadata
    GET  /v2/health/live              200 while the process serves
    GET  /v2/health/ready             200 while clients accept the server (collateral not expired)
    GET  /v2/models/{name}            inputs and outputs: datatype, shape (-1 where dynamic)
    GET  /v2/models/{name}/ready      200 when the model is loaded and this key may run it
    POST /v2/models/{name}/infer      JSON tensors in, JSON tensors out

A model's OIP name is its veil model id. Tensors travel as ``{"name", "shape", "datatype",
"data"}`` with ``data`` row-major, flat or nested; datatypes are BOOL, UINT8..UINT64, INT8..INT64,
FP32 and FP64 (BYTES, FP16 and BF16 are refused: no model the server loads takes them). The
binary tensor extension is supported: a body of ``Inference-Header-Content-Length`` bytes of
JSON followed by raw little-endian tensors (``parameters.binary_data_size`` on each input), and
outputs returned the same way when asked for (``binary_data_output``, or ``binary_data`` on a
requested output).

Errors are ``{"error": message}`` with the status the CBOR routes would give (one mapping:
`veil.server.app.error_status`). JSON bodies are limited to ``max_json_request_bytes``: parsed
JSON takes several times its size in memory, which binary bodies (``max_request_bytes``) do not.
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from veil import __version__
from veil.errors import BadRequestError
from veil.server.keys import Principal
from veil.server.limits import Limits, limit_error
from veil.server.models import LoadedModel, TensorSpec
from veil.tensors import DatumType, WireTensor, numpy_dtype

__all__ = [
    "HEADER_LENGTH",
    "InferRequest",
    "OipBackend",
    "datatype_name",
    "decode_infer_request",
    "encode_infer_response",
    "model_metadata",
    "oip_routes",
]

HEADER_LENGTH = "inference-header-content-length"
_JSON = "application/json"
_DATATYPES: Mapping[str, DatumType] = {
    "BOOL": DatumType.Bool,
    "UINT8": DatumType.U8,
    "UINT16": DatumType.U16,
    "UINT32": DatumType.U32,
    "UINT64": DatumType.U64,
    "INT8": DatumType.I8,
    "INT16": DatumType.I16,
    "INT32": DatumType.I32,
    "INT64": DatumType.I64,
    "FP32": DatumType.F32,
    "FP64": DatumType.F64,
}
_NAMES: Mapping[DatumType, str] = {v: k for k, v in _DATATYPES.items()}
# numpy kinds a JSON array may parse to for each kind of datatype: ints are exact (no float is
# silently truncated), floats take ints too, booleans only true/false.
_ACCEPTED_KINDS: Mapping[str, str] = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}


def datatype_name(datum_type: DatumType) -> str:
    """The OIP name of a datum type (``FP32`` for F32)."""
    return _NAMES[datum_type]


@dataclass(frozen=True, slots=True)
class InferRequest:
    """A decoded ``/infer`` body.

    Attributes:
        request_id: the client's ``id``, echoed in the response ("" when none).
        inputs: the tensors, by name.
        outputs: the output names asked for (None: all of them).
        binary_outputs: the outputs to return as raw bytes (binary tensor extension).
    """

    request_id: str
    inputs: tuple[WireTensor, ...]
    outputs: tuple[str, ...] | None
    binary_outputs: frozenset[str]
    binary_all: bool


def _bad(message: str) -> BadRequestError:
    return BadRequestError(400, message)


def _field(obj: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    value = obj.get(key)
    if not isinstance(value, kind):
        raise _bad(f"{where}.{key}: got {type(value).__name__}, expected {kind.__name__}")
    return value


def _parameters(obj: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    value = obj.get("parameters", {})
    if not isinstance(value, dict):
        raise _bad(f"{where}.parameters: got {type(value).__name__}, expected an object")
    return value


def _shape(value: Any, where: str, limits: Limits) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value
    ):
        raise _bad(f"{where}.shape: got {str(value)[:80]}, expected a list of non-negative ints")
    if len(value) > limits.max_tensor_rank:
        raise limit_error(
            422, f"{where}: rank {len(value)} exceeds max_tensor_rank={limits.max_tensor_rank}"
        )
    return tuple(value)


def _datatype(value: Any, where: str) -> DatumType:
    if not isinstance(value, str) or value.upper() not in _DATATYPES:
        raise BadRequestError(
            422,
            f"{where}.datatype: got {str(value)[:20]!r}, expected one of {', '.join(_DATATYPES)}",
        )
    return _DATATYPES[value.upper()]


def _json_data(data: Any, datum_type: DatumType, shape: tuple[int, ...], where: str) -> bytes:
    """Raw little-endian bytes of a JSON ``data`` array (flat, or nested exactly as `shape`)."""
    if not isinstance(data, list):
        raise _bad(f"{where}.data: got {type(data).__name__}, expected a list")
    try:
        parsed = np.array(data)
    except (ValueError, RecursionError):
        raise _bad(f"{where}.data: not a rectangular array of numbers") from None
    count = math.prod(shape)
    flat_ok = parsed.ndim == 1 and parsed.size == count
    if not (flat_ok or parsed.shape == shape) or (parsed.size == 0 and count != 0):
        raise _bad(
            f"{where}.data: got {parsed.size} elements in shape {list(parsed.shape)}, "
            f"expected {count} (flat) or shape {list(shape)}"
        )
    target = numpy_dtype(datum_type)
    if parsed.dtype.kind in "fO" and datum_type == DatumType.U64:
        # UINT64 values past 2**63 beside small ones parse as floats or objects: exact ints only.
        every = np.array(data, dtype=object).reshape(-1)
        if all(type(v) is int for v in every):
            try:
                parsed = np.array(every.tolist(), dtype=np.uint64).reshape(parsed.shape)
            except OverflowError:
                raise BadRequestError(422, f"{where}.data: values outside UINT64's range") from None
    if parsed.size and parsed.dtype.kind not in _ACCEPTED_KINDS[target.kind]:
        raise BadRequestError(
            422,
            f"{where}.data: got {parsed.dtype.kind!r} elements ({parsed.dtype.name}), "
            f"expected values of {datatype_name(datum_type)}",
        )
    if parsed.size and target.kind in "iu":
        info = np.iinfo(target)
        if int(parsed.min()) < info.min or int(parsed.max()) > info.max:
            raise BadRequestError(
                422, f"{where}.data: values outside {datatype_name(datum_type)}'s range"
            )
    return np.ascontiguousarray(parsed, dtype=target).reshape(-1).tobytes()


def decode_infer_request(body: bytes, header_length: int | None, limits: Limits) -> InferRequest:
    """Parse an ``/infer`` body: JSON, or JSON then binary tensors (`header_length` bytes of JSON).

    Raises:
        BadRequestError: (400) not JSON, wrong field types, data that does not fit the shape or
            the binary section; (422) unknown datatype, values of the wrong type or range,
            tensor limits (`Limits.check_tensor`, `Limits.check_inputs`).
    """
    if header_length is not None and not 0 <= header_length <= len(body):
        raise _bad(
            f"{HEADER_LENGTH}: got {header_length}, expected 0..{len(body)} (the body's length)"
        )
    split = len(body) if header_length is None else header_length
    header, binary = body[:split], memoryview(body)[split:]
    if split > limits.max_json_request_bytes:
        raise limit_error(
            413, f"JSON part exceeds max_json_request_bytes={limits.max_json_request_bytes}"
        )
    try:
        request = json.loads(header)
    except (ValueError, RecursionError):
        raise _bad("body: not valid JSON") from None
    if not isinstance(request, dict):
        raise _bad(f"body: got {type(request).__name__}, expected an object")
    request_id = request.get("id", "")
    if not isinstance(request_id, str):
        raise _bad(f"id: got {type(request_id).__name__}, expected a string")
    raw_inputs = _field(request, "inputs", list, "body")
    limits.check_inputs(len(raw_inputs))
    inputs: list[WireTensor] = []
    offset = 0
    for index, item in enumerate(raw_inputs):
        where = f"inputs[{index}]"
        if not isinstance(item, dict):
            raise _bad(f"{where}: got {type(item).__name__}, expected an object")
        name = _field(item, "name", str, where)
        where = f"input {name[:64]!r}"
        shape = _shape(item.get("shape"), where, limits)
        datum_type = _datatype(item.get("datatype"), where)
        limits.check_tensor(shape, numpy_dtype(datum_type).itemsize, name=name)
        size = _parameters(item, where).get("binary_data_size")
        if size is not None:
            if "data" in item:
                raise _bad(f"{where}: both data and parameters.binary_data_size")
            nbytes = math.prod(shape) * numpy_dtype(datum_type).itemsize
            if isinstance(size, bool) or size != nbytes or offset + nbytes > len(binary):
                raise _bad(
                    f"{where}.parameters.binary_data_size: got {str(size)[:20]}, expected "
                    f"{nbytes} for shape {list(shape)} of {datatype_name(datum_type)}, within "
                    f"the {len(binary) - offset} binary bytes left"
                )
            data = bytes(binary[offset : offset + nbytes])
            offset += nbytes
        else:
            data = _json_data(item.get("data"), datum_type, shape, where)
        inputs.append(WireTensor(shape, datum_type, name, data))
    if offset != len(binary):
        raise _bad(f"binary section: got {len(binary)} bytes, inputs use {offset}")
    params = _parameters(request, "body")
    binary_all = params.get("binary_data_output") is True
    outputs: tuple[str, ...] | None = None
    binary_outputs: set[str] = set()
    if "outputs" in request:
        wanted = _field(request, "outputs", list, "body")
        names = []
        for index, item in enumerate(wanted):
            if not isinstance(item, dict):
                raise _bad(f"outputs[{index}]: got {type(item).__name__}, expected an object")
            name = _field(item, "name", str, f"outputs[{index}]")
            names.append(name)
            if _parameters(item, f"outputs[{index}]").get("binary_data") is True:
                binary_outputs.add(name)
        outputs = tuple(names)
    return InferRequest(request_id, tuple(inputs), outputs, frozenset(binary_outputs), binary_all)


def _json_values(tensor: WireTensor) -> list[Any]:
    array: npt.NDArray[Any] = np.frombuffer(tensor.data, dtype=numpy_dtype(tensor.datum_type))
    values: list[Any] = array.tolist()
    return values


def encode_infer_response(
    model: LoadedModel, request: InferRequest, outputs: Sequence[WireTensor]
) -> tuple[bytes, int | None]:
    """(body, JSON header length when binary outputs follow it, else None).

    Raises:
        BadRequestError: (400) an output asked for that the model does not have.
    """
    by_name = {t.name: t for t in outputs}
    names = request.outputs if request.outputs is not None else [t.name for t in outputs]
    described: list[dict[str, Any]] = []
    binary: list[bytes] = []
    for name in names:
        tensor = by_name.get(name)
        if tensor is None:
            known = ", ".join(str(t.name) for t in outputs)
            raise _bad(f"outputs: got {str(name)[:64]!r}, expected one of {known}")
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": datatype_name(tensor.datum_type),
            "shape": list(tensor.shape),
        }
        if request.binary_all or name in request.binary_outputs:
            entry["parameters"] = {"binary_data_size": len(tensor.data)}
            binary.append(tensor.data)
        else:
            entry["data"] = _json_values(tensor)
        described.append(entry)
    reply: dict[str, Any] = {"model_name": model.model_id, "outputs": described}
    if request.request_id:
        reply["id"] = request.request_id
    header = json.dumps(reply, separators=(",", ":")).encode()
    if not binary:
        return header, None
    return header + b"".join(binary), len(header)


def _spec_metadata(spec: TensorSpec) -> dict[str, Any]:
    return {
        "name": spec.name,
        "datatype": datatype_name(spec.datum_type),
        "shape": [-1 if d is None else d for d in spec.shape],
    }


def model_metadata(model: LoadedModel) -> dict[str, Any]:
    """``GET /v2/models/{name}``: name, platform, inputs and outputs (-1 for dynamic dims)."""
    return {
        "name": model.model_id,
        "versions": [],
        "platform": "onnxruntime_onnx",
        "inputs": [_spec_metadata(s) for s in model.inputs],
        "outputs": [_spec_metadata(s) for s in model.outputs],
    }


@dataclass(frozen=True, slots=True)
class OipBackend:
    """What the OIP routes share with the CBOR ones (`veil.server.app.build_apps` makes it).

    Attributes:
        limits: the server's limits.
        authenticate: who asks (401) and their rate (429).
        runnable: the model `principal` may run by this id, else 404 (the same words whether
            it does not exist or may not be seen); with a shared state, first brought up to date
            with it (loaded here on first use, dropped when deleted or replaced elsewhere).
        lease: holds a model loaded while a request uses it (`ModelRegistry.lease`).
        ready: whether clients accept the server now (collateral not expired).
        error_status: the one mapping from exceptions to (status, message, headers).
        read_body: the request body, refused (413) past a limit (bytes, name of the limit).
        note: record fields for the request's log line (model id).
    """

    limits: Limits
    authenticate: Callable[[Request], Awaitable[Principal]]
    runnable: Callable[[Principal, str], Awaitable[LoadedModel]]
    lease: Callable[[LoadedModel], AbstractContextManager[None]]
    ready: Callable[[], bool]
    error_status: Callable[[BaseException], tuple[int, str, dict[str, str] | None]]
    read_body: Callable[[Request, int, str], Awaitable[bytearray]]
    note: Callable[..., None]


def _json(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(value).encode()
    return Response(body, status_code=status, media_type=_JSON, headers=headers)


def _header_length(request: Request) -> int | None:
    value = request.headers.get(HEADER_LENGTH)
    if value is None:
        return None
    if not value.isdigit() or len(value) > 19:
        raise _bad(f"{HEADER_LENGTH}: got {value[:20]!r}, expected a byte count")
    return int(value)


def oip_routes(backend: OipBackend) -> list[Route]:
    """The ``/v2`` routes, to mount on the attested app."""
    limits = backend.limits

    def endpoint(
        handler: Callable[[Request], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def wrapped(request: Request) -> Response:
            try:
                return await handler(request)
            except ClientDisconnect:
                return Response(status_code=400)
            except Exception as exc:
                status, message, headers = backend.error_status(exc)
                return _json({"error": message}, status, headers)

        return wrapped

    async def server_metadata(request: Request) -> Response:
        return _json({"name": "veil", "version": __version__, "extensions": ["binary_tensor_data"]})

    async def live(request: Request) -> Response:
        return _json({"live": True})

    async def ready(request: Request) -> Response:
        is_ready = backend.ready()
        return _json({"ready": is_ready}, 200 if is_ready else 503)

    async def model(request: Request) -> LoadedModel:
        principal = await backend.authenticate(request)
        name = request.path_params["name"]
        backend.note(request, model_id=name[:128])
        return await backend.runnable(principal, name)

    async def metadata(request: Request) -> Response:
        return _json(model_metadata(await model(request)))

    async def model_ready(request: Request) -> Response:
        found = await model(request)
        return _json({"name": found.model_id, "ready": True})

    async def infer(request: Request) -> Response:
        # Authentication and the model first: nothing is read for a caller who may not run it.
        found = await model(request)
        with backend.lease(found):  # taken with no await since the lookup: never evicted
            return await infer_with(request, found)

    async def infer_with(request: Request, found: LoadedModel) -> Response:
        header_length = _header_length(request)
        limit, limit_name = (
            (limits.max_json_request_bytes, "max_json_request_bytes")
            if header_length is None
            else (limits.max_request_bytes, "max_request_bytes")
        )
        body = await backend.read_body(request, limit, limit_name)
        # Off the event loop: parsing a large JSON body takes a while.
        decoded = await run_in_threadpool(decode_infer_request, bytes(body), header_length, limits)
        del body
        outputs = await found.predict(decoded.inputs, limits.request_timeout_s)
        content, json_length = await run_in_threadpool(
            encode_infer_response, found, decoded, outputs
        )
        if json_length is None:
            return Response(content, media_type=_JSON)
        return Response(
            content,
            media_type="application/octet-stream",
            headers={HEADER_LENGTH: str(json_length)},
        )

    return [
        Route("/v2", endpoint(server_metadata), methods=["GET"]),
        Route("/v2/health/live", endpoint(live), methods=["GET"]),
        Route("/v2/health/ready", endpoint(ready), methods=["GET"]),
        Route("/v2/models/{name}", endpoint(metadata), methods=["GET"]),
        Route("/v2/models/{name}/ready", endpoint(model_ready), methods=["GET"]),
        Route("/v2/models/{name}/infer", endpoint(infer), methods=["POST"]),
    ]
