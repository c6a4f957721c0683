"""The three ASGI apps of `veil serve`: routes only.

- unattested (plain HTTP): ``GET /`` certificate, ``GET /quote``, ``GET /collateral``,
  ``GET /healthz``;
- attested (HTTPS, attested certificate): ``GET /`` handshake, ``POST /run``, and ``/upload``,
  ``/delete`` for older clients;
- management (HTTPS, attested certificate): ``POST /upload``, ``POST /delete``, ``GET /models``.

Errors are turned into statuses in one place, `error_response`. Bodies are counted while they
are read, whatever Content-Length says. Inference and model loading run in worker threads.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import cbor2
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from veil import wire
from veil.errors import ApiError, BadRequestError, TensorError
from veil.server.config import ServerConfig
from veil.server.models import ModelRegistry, load_model
from veil.server.store import ModelStoreProtocol, StoredModel

__all__ = ["ServerState", "build_apps", "error_response"]

_log = logging.getLogger("veil.server")
_CBOR = "application/cbor"
# After a body passes its limit, read (and drop) this much more so the client, still sending,
# receives the 413 instead of a reset connection; beyond it the connection is simply closed.
_DRAIN_BYTES = 16 << 20
_MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


@dataclass(frozen=True, slots=True)
class ServerState:
    """What the routes serve.

    Attributes:
        certificate_der: the certificate served on the unattested port.
        quote: the evidence binding the TLS certificate.
        collateral: the collateral map served on ``/collateral``.
        simulated: whether the platform is simulated (the Server header then says ``mock``).
        registry: the loaded models.
        store: where uploads are kept (plain or sealed).
        config: the server's settings.
    """

    certificate_der: bytes
    quote: bytes
    collateral: dict[str, Any]
    simulated: bool
    registry: ModelRegistry
    store: ModelStoreProtocol
    config: ServerConfig


def error_response(exc: BaseException) -> Response:
    """The one mapping from exceptions to HTTP statuses; the body is a CBOR text message."""
    if isinstance(exc, ApiError):
        status, message = exc.status, exc.message
    elif isinstance(exc, TensorError):
        status, message = 422, str(exc)
    else:
        # Unexpected: log the type only (a message could quote model or tensor content).
        _log.error("internal error: %s", type(exc).__name__)
        status, message = 500, "internal server error"
    return Response(wire.encode_error(message), status_code=status, media_type=_CBOR)


Handler = Callable[[Request], Awaitable[Response]]


def _endpoint(handler: Handler) -> Handler:
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except Exception as exc:
            return error_response(exc)

    return wrapped


async def _read_body(request: Request, limit: int) -> bytearray:
    """The request body, refused (413) as soon as it passes `limit` bytes.

    One growing buffer (large ones are mmapped and given back whole when freed), not a list of
    chunks joined at the end, which would hold the body twice and fragment the heap.
    """
    body = bytearray()
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            if total - limit > _DRAIN_BYTES:
                break
            continue
        body += chunk
    if total > limit:
        raise BadRequestError(413, f"request body: more than {limit} bytes, the limit")
    return body


def _cbor(value: Any) -> Response:
    return Response(cbor2.dumps(value), media_type=_CBOR)


def build_apps(state: ServerState) -> tuple[Starlette, Starlette, Starlette]:
    """(unattested, attested, management) apps sharing `state`."""
    config = state.config
    registry = state.registry
    certificate = cbor2.dumps(state.certificate_der)
    quote = cbor2.dumps(state.quote)
    collateral = cbor2.dumps(state.collateral)
    health = cbor2.dumps({"status": "ok", "simulated": state.simulated})

    async def get_certificate(request: Request) -> Response:
        return Response(certificate, media_type=_CBOR)

    async def get_quote(request: Request) -> Response:
        return Response(quote, media_type=_CBOR)

    async def get_collateral(request: Request) -> Response:
        return Response(collateral, media_type=_CBOR)

    async def get_health(request: Request) -> Response:
        return Response(health, media_type=_CBOR)

    async def handshake(request: Request) -> Response:
        return _cbor(None)

    async def upload(request: Request) -> Response:
        body = await _read_body(request, config.max_upload_bytes)
        message = await run_in_threadpool(wire.decode_upload_request, body)
        del body
        # bytes() copies only a bytearray, and only now that the body is gone
        blob = bytes(message.model)
        model_id, model_name = message.model_id or str(uuid.uuid4()), message.model_name
        del message
        if not _MODEL_ID.fullmatch(model_id):
            raise BadRequestError(
                400,
                f"model_id: got {model_id[:130]!r}, expected 1-128 of A-Z a-z 0-9 . _ : - "
                "starting with a letter or digit",
            )
        registry.reserve(model_id)
        try:
            model = await run_in_threadpool(
                load_model,
                blob,
                model_id=model_id,
                model_name=model_name,
                threads=config.threads,
            )
            meta = StoredModel(model_id, model.model_hash, model_name, model.size)
            await run_in_threadpool(state.store.put, meta, blob)
            registry.add(model)
        finally:
            registry.release(model_id)
        _log.info("model %s uploaded (%d bytes)", model_id, model.size)
        return Response(wire.encode_upload_reply(model.model_hash, model_id), media_type=_CBOR)

    async def run(request: Request) -> Response:
        body = await _read_body(request, config.max_run_bytes)
        message = wire.decode_run_request(body)
        model = registry.get(message.model_id, message.model_hash)
        outputs = await run_in_threadpool(model.run, message.inputs)
        return Response(wire.encode_run_reply(outputs), media_type=_CBOR)

    async def delete(request: Request) -> Response:
        body = await _read_body(request, config.max_run_bytes)
        message = wire.decode_delete_request(body)
        registry.get(message.model_id)
        await run_in_threadpool(state.store.delete, message.model_id)
        registry.remove(message.model_id)
        _log.info("model %s deleted", message.model_id)
        return _cbor(None)

    async def list_models(request: Request) -> Response:
        return _cbor(registry.describe())

    def route(path: str, handler: Handler, method: str) -> Route:
        return Route(path, _endpoint(handler), methods=[method])

    unattested = Starlette(
        routes=[
            route("/", get_certificate, "GET"),
            route("/quote", get_quote, "GET"),
            route("/collateral", get_collateral, "GET"),
            route("/healthz", get_health, "GET"),
        ]
    )
    attested = Starlette(
        routes=[
            route("/", handshake, "GET"),
            route("/run", run, "POST"),
            route("/upload", upload, "POST"),
            route("/delete", delete, "POST"),
        ]
    )
    management = Starlette(
        routes=[
            route("/", handshake, "GET"),
            route("/upload", upload, "POST"),
            route("/delete", delete, "POST"),
            route("/models", list_models, "GET"),
        ]
    )
    return unattested, attested, management
