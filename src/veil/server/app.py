"""The three ASGI apps of `veil serve`: routes only.

- unattested (plain HTTP): ``GET /`` certificate, ``GET /quote``, ``GET /collateral``,
  ``GET /keys`` (the key map the report data's second half binds, `veil.keymap`), ``GET /healthz``
  (CBOR, BlindAI's), ``GET /livez`` and ``GET /readyz`` (JSON), ``GET /metrics`` (Prometheus,
  `veil.server.metrics`: no inputs, outputs or model names);
- attested (HTTPS, attested certificate): ``GET /`` handshake, ``POST /run``, and ``/upload``,
  ``/delete`` for older clients; the Open Inference Protocol v2 under ``/v2``
  (`veil.server.oip`: the same models, keys, limits and errors, in JSON);
  the transparency log of receipts: ``GET /log/head``,
  ``GET /log/inclusion?index=I&size=N``, ``GET /log/consistency?first=M&second=N``;
- management (HTTPS, attested certificate): ``POST /upload``, ``POST /delete``, ``GET /models``,
  the admin-key API (``/admin/keys``, ``/admin/keys/revoke``: `veil.server.admin`), and
  ``POST /admin/rotate-keys`` (admin keys: new TLS and receipt keys and new evidence,
  `veil.server.rotation`).

Errors are turned into statuses in one place, `error_response`. Bodies are counted while they
are read, whatever Content-Length says. An upload is decoded while it arrives (the body is never
held whole, `veil.wire.UploadStreamDecoder`); every body goes through the one strict CBOR
decoder (`veil.wire.cbor`) in a worker thread, as do model checks and loading.
Predictions go through their model's batcher (`veil.server.models.LoadedModel.predict`): merged
with concurrent ones where the model allows, run in the one ONNX Runtime thread, and stopped
with a 504 past ``request_timeout_s``.

Every request on the attested and management ports goes through, in this order: a request id
(``X-Request-Id`` on the response, one log line when it ends: id, port, route, status, duration,
model id, key id, never inputs, outputs or keys); authentication (401,
`veil.server.keys.AuthGate`); the per-key rate limit (delayed up to ``max_rate_delay_s``, then
429); the body limit and the body read time-out while reading (413, 408); a request slot once
the body is complete (queued; 503 with ``Retry-After`` when the queue is full,
`veil.server.connections.RequestGate`); decoding (400); then per route: tensor limits (422)
and the model lookup (404) for a run; role and ownership (403, or 404 where the key may not
even see the model); model and storage limits (413) and `check_model` (422) for an upload,
before ONNX Runtime sees it.

Receipts (veil extension): a run, upload or delete sent with ``X-Veil-Receipt: 1`` is answered
with an ``X-Veil-Receipt`` header holding a signed receipt, the signed log head that includes it
and the inclusion path (`veil.server.receipts`); the body is what it always is. A request that
names the receipt key its client attested (``X-Veil-Receipt-Key``) and names a key rotated away
is refused with 421 before any work (`veil.server.rotation`).

Access rules (`veil.server.keys`): uploads need an ``owner`` or ``admin`` key; a model is
deleted by its uploader or an admin; it is listed to its uploader (admins: all); it is run by
any valid key when ``public`` (and by a request with no key, rate-limited per client address
and by a global anonymous budget, unless ``--no-anonymous``), else by its uploader and its
allowed keys. An upload that names
no visibility (every BlindAI client) is ``restricted`` to its uploader when the server asks for
keys, and ``public`` when it runs without authentication.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import hashlib
import logging
import math
import os
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, TypeVar, cast

import cbor2
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from veil import wire
from veil.errors import (
    ApiError,
    BadRequestError,
    ConflictError,
    SealedStateError,
    ServiceUnavailableError,
    TensorError,
    api_error_for_status,
)
from veil.receipts.payload import tensors_digest
from veil.server.admin import admin_handlers
from veil.server.admission import AdmittedModel
from veil.server.collateral import CollateralKeeper
from veil.server.config import ServerConfig
from veil.server.connections import RequestGate
from veil.server.keys import (
    API_KEY_HEADER,
    PUBLIC,
    RESTRICTED,
    AuthGate,
    Principal,
    can_delete,
    can_list,
    can_manage_keys,
    can_predict,
    can_upload,
)
from veil.server.limits import AdmissionQueue, RateLimiter, limit_error
from veil.server.metrics import CONTENT_TYPE, OTHER_ROUTE, Metrics
from veil.server.models import LoadedModel, ModelRegistry, cost_of
from veil.server.oip import OipBackend, oip_routes
from veil.server.onnx_guard import Handover, ModelBytes
from veil.server.receipts import RECEIPT_HEADER, RECEIPT_KEY_HEADER, ReceiptIssuer
from veil.server.rotation import KeyRing
from veil.server.sealing import SealedModelStore
from veil.server.state import ModelEntry
from veil.server.store import ModelStoreProtocol, StoredModel
from veil.tensors import WireTensor, numpy_dtype
from veil.tls import certificate_digest

__all__ = ["ServerState", "build_apps", "error_response", "error_status"]

_log = logging.getLogger("veil.server")
_access_log = logging.getLogger("veil.server.requests")
_CBOR = "application/cbor"
# After a body passes its limit, read (and drop) this much more so the client, still sending,
# receives the 413 instead of a reset connection; beyond it the connection is simply closed.
_DRAIN_BYTES = 16 << 20
_MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_LOG_KEY = "veil.log"  # scope entry where handlers leave what the request log line reports
_STORE_CHUNK = 4 << 20
_INLINE_DECODE_BYTES = 4 << 10  # run bodies up to this are decoded on the event loop
_FEED_BYTES = 1 << 20  # upload body handed to the decoder in pieces of about this size
_R = TypeVar("_R")
_ROOM_POLL_S = 0.01  # how often a load waiting for room in the memory budget looks again


@dataclass(frozen=True, slots=True)
class ServerState:
    """What the routes serve.

    Attributes:
        collateral: keeps the collateral served on ``/collateral`` fresh, and its health.
        simulated: whether the platform is simulated (the Server header then says ``mock``).
        registry: the loaded models.
        store: where uploads are kept (plain or sealed).
        config: the server's settings.
        auth: who is asking (API keys, or nobody checked with ``--no-auth``).
        access: owner, visibility and allowed keys of every loaded model, by id.
        keys: the current certificate, evidence, key map and receipt issuer, and their
            rotation (`veil.server.rotation`).
    """

    collateral: CollateralKeeper
    simulated: bool
    registry: ModelRegistry
    store: ModelStoreProtocol
    config: ServerConfig
    auth: AuthGate
    access: dict[str, StoredModel]
    keys: KeyRing


def error_status(exc: BaseException) -> tuple[int, str, dict[str, str] | None]:
    """The one mapping from exceptions to (HTTP status, message, headers), for every codec."""
    if isinstance(exc, ApiError):
        status, message = exc.status, exc.message
    elif isinstance(exc, TensorError):
        status, message = 422, str(exc)
    elif isinstance(exc, SealedStateError):
        # The state on disk changed under the running server (a replay, a vanished manifest):
        # refuse every request until an operator looks. The message names files and versions.
        _log.error("sealed state: %s", exc)
        status, message = 503, "the server's stored state is inconsistent; see its log"
    else:
        # Unexpected: log the type only (a message could quote model or tensor content).
        _log.error("internal error: %s", type(exc).__name__)
        status, message = 500, "internal server error"
    headers = None
    if isinstance(exc, ServiceUnavailableError) and exc.retry_after is not None:
        # Only a busy server says when to come back; a broken state does not invite retries.
        headers = {"retry-after": str(max(1, math.ceil(exc.retry_after)))}
    return status, message, headers


def error_response(exc: BaseException) -> Response:
    """`error_status` as BlindAI's routes answer it: the body is a CBOR text message."""
    status, message, headers = error_status(exc)
    return Response(
        wire.encode_error(message), status_code=status, media_type=_CBOR, headers=headers
    )


Handler = Callable[[Request], Awaitable[Response]]
ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]


class _RequestLog:
    """ASGI middleware: a request id (``X-Request-Id``) and one log line per request.

    The line holds the id, port, method, route, status, duration, and the model id and key id
    handlers record, never a body, header value or API key. A client's own ``X-Request-Id`` is
    kept when it is a short plain token, so calls can be traced across systems.
    """

    def __init__(
        self,
        app: ASGIApp,
        port: str,
        metrics: Metrics,
        routes: frozenset[str],
        replica: str | None = None,
    ) -> None:
        self._app = app
        # ``Veil-Replica`` on every response when set: which replica behind a balancer answered.
        self._extra = [] if replica is None else [(b"veil-replica", replica.encode("ascii"))]
        self._port = port
        self._metrics = metrics
        self._routes = routes  # the paths this app serves: the only route labels of a metric

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        request_id = ""
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id":
                text = value.decode("latin-1")
                request_id = text if _REQUEST_ID.fullmatch(text) else ""
        # 16 random hex digits, as uuid4().hex[:16] was, without building a UUID per request
        request_id = request_id or os.urandom(8).hex()
        info: dict[str, Any] = {}
        scope[_LOG_KEY] = info
        status = 0
        start = time.perf_counter()

        async def send_with_id(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [
                    *message.get("headers", ()),
                    (b"x-request-id", request_id.encode()),
                    *self._extra,
                ]
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self._app(scope, receive, send_with_id)
        finally:
            path = str(scope.get("path", ""))
            # A route with parameters (OIP's /v2/models/{name}/infer) is counted by its
            # template, as routing matched it: a model name never becomes a label.
            template = getattr(scope.get("route"), "path", None)
            if path not in self._routes:
                path = template if template in self._routes else OTHER_ROUTE
            self._metrics.observe_request(
                self._port,
                path,
                status,
                time.perf_counter() - start,
            )
            if _access_log.isEnabledFor(logging.INFO):
                _access_log.info(
                    "request id=%s port=%s method=%s route=%r status=%d duration_ms=%.1f "
                    "model=%r key_id=%s",
                    request_id,
                    self._port,
                    scope.get("method", ""),
                    str(scope.get("path", ""))[:80],
                    status,
                    (time.perf_counter() - start) * 1e3,
                    info.get("model_id"),
                    info.get("key_id") or "-",
                )


class _ExactRoutes:
    """ASGI: a request whose method and path name a route without parameters goes straight to
    its endpoint; the rest (OIP's parameterized routes, a wrong method, an unknown path) to
    `fallback`, Starlette's router with its 404, 405 and error pages.

    Every endpoint here is wrapped by `_endpoint`, which turns any exception into its response,
    so Starlette's error layers have nothing to add on this path (with the route scan, ~5 % of a
    null request's server samples).
    """

    def __init__(self, routes: tuple[Route, ...], fallback: ASGIApp) -> None:
        self._fallback = fallback
        self._endpoints: dict[tuple[str, str], Handler] = {
            (method, route.path): route.endpoint
            for route in routes
            if not route.param_convertors
            for method in route.methods or ()
        }

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            endpoint = self._endpoints.get((scope["method"], scope["path"]))
            if endpoint is not None:
                response = await endpoint(Request(scope, receive, send))
                await response(scope, receive, send)
                return
        await self._fallback(scope, receive, send)


def _note(request: Request, **values: Any) -> None:
    """Record fields for the request's log line (model id, key id)."""
    info = request.scope.get(_LOG_KEY)
    if isinstance(info, dict):
        info.update(values)


async def _drain(request: Request) -> None:
    """After an early refusal, read (and drop) a bounded rest of the body, so the client, still
    sending, reads the error status rather than a reset connection."""
    if request.method != "POST":
        return
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > _DRAIN_BYTES:
                break
    except Exception:  # already consumed, or the client went away: nothing to drain
        return


def _endpoint(handler: Handler) -> Handler:
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except ClientDisconnect:
            # The client left mid-body: nobody reads an answer, and it is not a server fault.
            _log.info("client disconnected before its request body was read")
            return Response(status_code=400)
        except Exception as exc:
            await _drain(request)
            return error_response(exc)

    return wrapped


async def _read_body(request: Request, limit: int, limit_name: str) -> bytearray:
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
        raise limit_error(413, f"request body exceeds {limit_name}={limit}")
    return body


async def _in_thread(func: Callable[..., _R], *args: Any, **kwargs: Any) -> _R:
    """`run_in_threadpool` for calls that take or return a model's bytes.

    anyio's worker thread keeps its last job (the call with its arguments, and the future with
    its result) until it is given the next one, which on an idle server may be never: a model
    passed through it stays alive after the upload let go of it. Here the worker's job holds
    only an emptied box.
    """
    box: list[Any] = [(args, kwargs)]

    def call() -> None:
        call_args, call_kwargs = box.pop()
        box.append(func(*call_args, **call_kwargs))

    await run_in_threadpool(call)
    result: _R = box.pop()
    return result


def _content_length(request: Request) -> int | None:
    value = request.headers.get("content-length", "")
    return int(value) if value.isdigit() and len(value) < 20 else None


def _sha256(data: ModelBytes) -> bytes:
    return hashlib.sha256(data).digest()


def _slices(blob: ModelBytes, size: int = _STORE_CHUNK) -> Iterator[bytes]:
    """`blob` in views of `size` bytes: the store copies one piece at a time, not the whole.

    Views, typed as bytes: both stores only write them or append them to a buffer.
    """
    view = memoryview(blob)
    for start in range(0, len(view), size):
        yield cast(bytes, view[start : start + size])


def _upload_access(message: wire.UploadRequest, auth_on: bool) -> tuple[str, tuple[str, ...]]:
    """(visibility, allowed key ids) of an upload; the default depends on whether keys are used."""
    allowed = message.allowed_keys
    visibility = message.visibility
    if visibility is None:
        visibility = RESTRICTED if allowed or auth_on else PUBLIC
    if visibility == PUBLIC and allowed:
        raise BadRequestError(400, "allowed_keys: only for visibility 'restricted'")
    return visibility, allowed


def _cbor(value: Any) -> Response:
    return Response(cbor2.dumps(value), media_type=_CBOR)


def build_apps(state: ServerState) -> tuple[ASGIApp, ASGIApp, ASGIApp]:
    """(unattested, attested, management) apps sharing `state`."""
    config = state.config
    limits = config.limits
    registry = state.registry
    access = state.access
    auth = state.auth
    limiter = AdmissionQueue.from_limits(limits)
    metrics = Metrics()
    metrics.watch(
        in_progress=lambda: limiter.active,
        queued=lambda: limiter.queued,
        models=lambda: len(registry.all()),
    )
    registry.on_run = metrics.observe_batch
    for loaded in registry.all():  # restored at start, before the metrics existed
        loaded.batcher.on_run = metrics.observe_batch
    rates = RateLimiter.from_limits(limits)
    # Requests with no key: a bucket per client address, and one for all of them together.
    anonymous_rates = RateLimiter(
        limits.anonymous_requests_per_second,
        limits.anonymous_burst,
        max_keys=limits.max_tracked_keys,
    )
    anonymous_budget = RateLimiter(
        limits.anonymous_budget_per_second, limits.anonymous_budget_burst
    )
    # Model bytes stored, and reserved by uploads in progress: checked and updated on the event
    # loop with no await in between, so two uploads cannot both take the last free bytes.
    # The quota counts what each model costs loaded (`LoadedModel.cost`), measured at admission.
    # Charged per model key (owner and id), loaded or evicted (an evicted model is still stored).
    charged = {k: cost for k, cost in registry.costs().items() if k in access}
    storage = {"used": sum(charged.values()), "pending": 0}
    # Evicted models are loaded again from the sealed store; the plain one cannot, so there
    # nothing is evicted (past the budget a load is refused).
    can_reload = isinstance(state.store, SealedModelStore)

    def charge(key: str, cost: int) -> None:
        storage["used"] += cost - charged.get(key, 0)
        charged[key] = cost

    def uncharge(key: str) -> None:
        storage["used"] -= charged.pop(key, 0)

    def install(meta: StoredModel, model: LoadedModel, room: int, source: str) -> None:
        """A model admitted, loaded and stored: charged, its record kept, and served."""
        charge(meta.key, model.cost)
        access[meta.key] = meta
        registry.add(model, room=room)
        metrics.observe_load(source)

    async def room_for(cost: int) -> int:
        """Reserve `cost` of the memory budget (`ModelRegistry.make_room`), evicting what it
        takes. While the models in use leave no room, wait for their requests to end, at most
        ``request_timeout_s`` (then 503). The evicted models are idle: closing them is at once."""
        deadline = time.monotonic() + limits.request_timeout_s
        while True:
            try:
                evicted = registry.make_room(cost, evict=can_reload)
                break
            except ServiceUnavailableError:
                if not can_reload or time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(_ROOM_POLL_S)
        for model in evicted:
            await model.close()
            _log.info("model %s evicted (models_memory_budget_bytes)", model.model_id)
        if evicted:
            metrics.observe_evictions(len(evicted))
        return cost

    async def admit_with_room(model: Handover, optimization: str) -> tuple[AdmittedModel, int]:
        """Admission (a child process; it takes the handed-over bytes), then room in the memory
        budget for what it measured: give the room to `registry.add`, or back with
        `registry.release_room` if the model is not added."""
        admitted = await _in_thread(registry.admitter.admit, model, optimization)
        return admitted, await room_for(cost_of(len(admitted.graph), admitted.loaded_bytes))

    async def load_admitted(
        admitted: AdmittedModel, meta_id: str, name: str, model_hash: bytes, owner: str | None
    ) -> LoadedModel:
        """The server's own session of what admission accepted (its bytes freed as read)."""
        return await _in_thread(
            registry.load_admitted,
            admitted,
            model_id=meta_id,
            model_name=name,
            threads=config.threads,
            model_hash=model_hash,
            batching=config.batching,
            owner=owner,
        )

    keeper = state.collateral
    ring = state.keys
    served: dict[str, Any] = {}

    def identity_replies() -> dict[str, bytes]:
        """The encoded certificate, evidence and key map of the current keys (made once per
        rotation; read on every request, since a rotation swaps them)."""
        keys = ring.current
        if served.get("keys") is not keys:
            served["keys"] = keys
            served["replies"] = {
                "certificate": cbor2.dumps(keys.certificate_der),
                "quote": cbor2.dumps(keys.quote),
                "key_map": cbor2.dumps(keys.key_map.encoded),
            }
        replies: dict[str, bytes] = served["replies"]
        return replies

    async def get_certificate(request: Request) -> Response:
        return Response(identity_replies()["certificate"], media_type=_CBOR)

    async def get_quote(request: Request) -> Response:
        return Response(identity_replies()["quote"], media_type=_CBOR)

    async def get_key_map(request: Request) -> Response:
        return Response(identity_replies()["key_map"], media_type=_CBOR)

    async def rotate_keys(request: Request) -> Response:
        principal = await authenticate(request)
        if principal.key_id is None or not can_manage_keys(principal):
            raise api_error_for_status(
                403, f"rotating keys needs an admin key; this caller's role is {principal.role}"
            )
        keys = await ring.rotate()
        reply = {
            "generation": keys.generation,
            "certificate_sha256": certificate_digest(keys.certificate_der),
        }
        return _cbor(reply)

    async def get_collateral(request: Request) -> Response:
        # Read on every request: a background refresh swaps the served copy.
        return Response(keeper.encoded(), media_type=_CBOR)

    async def get_health(request: Request) -> Response:
        # "status" stays BlindAI's top-level key; "failing" (expired collateral: clients refuse
        # this server) also answers 503 so that load balancers take it out.
        collateral = keeper.status()
        body = {
            "status": collateral.state,
            "simulated": state.simulated,
            "collateral": collateral.as_map(),
        }
        status = 503 if collateral.state == "failing" else 200
        return Response(cbor2.dumps(body), status_code=status, media_type=_CBOR)

    async def get_metrics(request: Request) -> Response:
        # Plain HTTP, like /healthz: counts and timings only (`veil.server.metrics`), nothing a
        # tenant sent or named.
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    async def get_live(request: Request) -> Response:
        return JSONResponse({"live": True})

    async def get_ready(request: Request) -> Response:
        # Ready while clients accept the server: expired collateral makes them refuse it.
        collateral = keeper.status()
        ready = collateral.state != "failing"
        body = {"ready": ready, "simulated": state.simulated, "collateral": collateral.as_map()}
        return JSONResponse(body, status_code=200 if ready else 503)

    async def handshake(request: Request) -> Response:
        return _cbor(None)

    def current_issuer(request: Request) -> ReceiptIssuer | None:
        """The issuer of the current keys, taken once (no await after): a rotation meanwhile
        does not change the key that signs this request's receipts. A client that names the
        receipt key it attested (``X-Veil-Receipt-Key``, hex) and names another is refused
        with 421 before any work: it attests again and sends the request again."""
        issuer = ring.current.receipts
        named = request.headers.get(RECEIPT_KEY_HEADER)
        if named is not None and issuer is not None and named != issuer.public_key.hex():
            raise api_error_for_status(
                421, "the server's keys were rotated since this client attested them"
            )
        return issuer

    def receipts_wanted(request: Request) -> ReceiptIssuer | None:
        """The issuer when the request asks for a receipt (refused before any work if the
        server issues none), else None."""
        if request.headers.get(RECEIPT_HEADER) != "1":
            return None
        issuer = current_issuer(request)
        if issuer is None:
            raise BadRequestError(400, "this server issues no receipts")
        return issuer

    def with_receipt(response: Response, header: str | None) -> Response:
        if header is not None:
            response.headers[RECEIPT_HEADER] = header
        return response

    def log_issuer(request: Request) -> ReceiptIssuer:
        issuer = current_issuer(request)
        if issuer is None:
            raise api_error_for_status(404, "this server keeps no receipt log")
        return issuer

    def int_param(request: Request, name: str) -> int:
        value = request.query_params.get(name, "")
        if not value.isdigit() or len(value) > 18:
            raise BadRequestError(400, f"{name}: got {value[:20]!r}, expected a whole number")
        return int(value)

    async def log_head(request: Request) -> Response:
        return _cbor({"head": log_issuer(request).head()})

    async def log_inclusion(request: Request) -> Response:
        issuer = log_issuer(request)
        index, size = int_param(request, "index"), int_param(request, "size")
        try:
            return _cbor({"path": list(issuer.inclusion(index, size))})
        except ValueError as exc:
            raise BadRequestError(400, str(exc)) from None

    async def log_consistency(request: Request) -> Response:
        issuer = log_issuer(request)
        first, second = int_param(request, "first"), int_param(request, "second")
        try:
            return _cbor({"path": list(issuer.consistency(first, second))})
        except ValueError as exc:
            raise BadRequestError(400, str(exc)) from None

    async def authenticate(request: Request, *, allow_anonymous: bool = False) -> Principal:
        """Step 3 and 4 of the order above: who asks (401), and their rate (429)."""
        api_key = request.headers.get(API_KEY_HEADER)
        if auth.may_block:
            principal = await run_in_threadpool(
                auth.authenticate, api_key, allow_anonymous=allow_anonymous
            )
        else:
            principal = auth.authenticate(api_key, allow_anonymous=allow_anonymous)
        if principal.key_id is None and not principal.anonymous:
            return principal  # authentication is off
        if principal.anonymous:
            address = request.client.host if request.client is not None else "-"
            if not anonymous_rates.try_acquire(address):
                raise limit_error(
                    429,
                    "rate limit exceeded: anonymous_requests_per_second="
                    f"{limits.anonymous_requests_per_second:g} for this address; "
                    "send an API key for more",
                )
            if not anonymous_budget.try_acquire("anonymous"):
                raise limit_error(
                    429,
                    "the server's budget for requests without an API key is spent "
                    f"(anonymous_budget_per_second={limits.anonymous_budget_per_second:g}); "
                    "send an API key, or retry later",
                )
        elif principal.key_id is not None:
            _note(request, key_id=principal.key_id)
            # Per key: with authentication off there is no key to count by; the concurrency
            # limit still holds.
            delay = rates.reserve(principal.key_id, max_delay=limits.max_rate_delay_s)
            if delay > 0:
                # Over its rate but within the bound: slowed to the rate, not refused.
                await asyncio.sleep(delay)
        return principal

    def not_found(model_id: str | None, model_hash: str | None) -> ApiError:
        # The same words as for a model that does not exist: no existence oracle.
        if model_id:
            return api_error_for_status(404, f"unknown model id {model_id!r}")
        return api_error_for_status(404, f"no model with hash {(model_hash or '')[:80]!r}")

    def visible(principal: Principal, meta: StoredModel) -> bool:
        return can_predict(principal, meta.visibility, meta.allowed_keys, meta.owner)

    def lookup(
        principal: Principal,
        model_id: str,
        may_use: Callable[[StoredModel], bool],
        model_hash: str | None = None,
    ) -> StoredModel:
        """The model `model_id` names for `principal`: the one lookup rule of every route.

        An id belongs to its owner, so several owners may each have a model "m". Only models
        the caller may use (`may_use`) are considered, so that the answer never depends on the
        others (no existence oracle):

        1. a qualified ``<owner key id>/<id>`` names that one model;
        2. else the caller's own model of that id;
        3. else the one model of that id the caller may use, among those of `model_hash` when
           it is given; none: 404, as for an id nobody uses; several: 409, naming the ways to
           say which (the qualified form, or the hash).

        Models loaded and evicted alike (`access` knows both); `ensure_loaded` loads it.
        """
        if "/" in model_id:
            usable = [access[model_id]] if model_id in access else []
        else:
            # Filtered, then sorted: one pass over the models known here per request.
            named = sorted(k for k, m in access.items() if m.model_id == model_id)
            usable = [access[k] for k in named]
        usable = [meta for meta in usable if may_use(meta)]
        if not principal.anonymous:
            own = [meta for meta in usable if meta.owner == principal.key_id]
            if own and "/" not in model_id:
                return own[0]
        if model_hash:
            wanted = model_hash.lower()
            usable = [meta for meta in usable if meta.model_hash.hex() == wanted]
        if len(usable) == 1:
            return usable[0]
        if not usable:
            raise not_found(model_id, None)
        raise api_error_for_status(
            409,
            f"model id {model_id!r} is ambiguous: {len(usable)} models you may use have it; "
            f"name one as '<owner key id>/{model_id}' or by its hash",
        )

    async def ensure_loaded(meta: StoredModel) -> LoadedModel:
        """The loaded model of `meta` (`lookup`'s answer), loaded again from the sealed store
        when it was evicted. The caller takes its lease with no await after this returns."""
        if registry.loaded(meta.key):
            return registry.get(meta.key)
        store = state.store
        if isinstance(store, SealedModelStore):
            async with adopting:
                if not registry.loaded(meta.key):
                    entries = await run_in_threadpool(store.find, meta.key, None)
                    entry = next((e for e in entries if e.meta.key == meta.key), None)
                    if entry is not None:
                        await adopt_reserved(store, entry)
        if not registry.loaded(meta.key):  # deleted meanwhile, or being uploaded here now
            raise not_found(meta.model_id, None)
        return registry.get(meta.key)

    def check_model_size(size: int) -> None:
        # As soon as the model's header arrives: nothing is received for a model refused here.
        limits.check_model_bytes(size)
        limits.check_storage(storage["used"] + storage["pending"], size)

    async def read_upload(request: Request) -> wire.UploadRequest:
        """Decode the upload while it arrives: the body is never held whole, only the model
        (`veil.wire.UploadStreamDecoder`: memory grows with what arrives, not with what the
        body declares)."""
        decoder = wire.UploadStreamDecoder(
            max_model_bytes=limits.max_model_bytes,
            on_model_size=check_model_size,
            size=_content_length(request),
        )
        limit = limits.max_upload_bytes
        total = 0
        pending: list[bytes] = []
        pending_bytes = 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                if total - limit > _DRAIN_BYTES:
                    break
                continue
            pending.append(chunk)
            pending_bytes += len(chunk)
            if pending_bytes >= _FEED_BYTES:
                # In a worker thread: decoding BlindAI's int array takes milliseconds a window.
                await run_in_threadpool(decoder.feed, b"".join(pending))
                pending, pending_bytes = [], 0
        if total > limit:
            raise limit_error(413, f"request body exceeds max_upload_bytes={limit}")
        if pending:
            await run_in_threadpool(decoder.feed, b"".join(pending))
        return await _in_thread(decoder.finish)

    async def store_model(meta: StoredModel, graph: ModelBytes) -> None:
        try:
            await _in_thread(state.store.put_stream, meta, _slices(graph), exclusive=True)
        except OSError as exc:
            # One line, no traceback: the path and the model stay out of the log.
            _log.error(
                "storing model %s failed: %s",
                meta.model_id,
                errno.errorcode.get(exc.errno or 0, "?"),
            )
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise api_error_for_status(
                    507, "insufficient storage: the model was not stored"
                ) from None
            raise api_error_for_status(500, "storing the model failed") from None

    async def unstore(key: str, storing: asyncio.Future[None] | None) -> None:
        """Remove the model of a failed upload: stored, or being stored by `storing` (whose
        thread runs on whatever happened meanwhile: wait for it, then remove what it stored)."""
        if storing is not None:
            await asyncio.wait({storing})
            if storing.cancelled() or storing.exception() is not None:
                return
        await run_in_threadpool(state.store.delete, key)

    async def upload(request: Request) -> Response:
        principal = await authenticate(request)
        if not can_upload(principal):
            raise api_error_for_status(
                403,
                "uploading models needs an owner or admin key; "
                f"this key's role is {principal.role}",
            )
        issuer = receipts_wanted(request)
        message = await read_upload(request)
        # From here the handover holds the model's only reference: the load frees it once read.
        upload = Handover(message.model)
        model_id, model_name = message.model_id or str(uuid.uuid4()), message.model_name
        visibility, allowed = _upload_access(message, auth_on=principal.key_id is not None)
        # Named by a veil client, else BlindAI's flag asks for the server's default.
        optimization = message.optimization or (
            config.optimization if message.optimize is not False else "off"
        )
        del message
        if not _MODEL_ID.fullmatch(model_id):
            raise BadRequestError(
                400,
                f"model_id: got {model_id[:130]!r}, expected 1-128 of A-Z a-z 0-9 . _ : - "
                "starting with a letter or digit",
            )
        _note(request, model_id=model_id)
        size = len(upload)
        limits.check_model_bytes(size)
        owner = principal.key_id
        # Only the caller's own ids can be taken: another owner's "m" is never told of.
        registry.reserve(owner, model_id)
        try:
            limits.check_storage(storage["used"] + storage["pending"], size)
            storage["pending"] += size
            try:
                model_hash = await _in_thread(_sha256, upload.view())
                meta = StoredModel(
                    model_id,
                    model_hash,
                    model_name,
                    size,
                    owner=owner,
                    visibility=visibility,
                    allowed_keys=allowed,
                    created_at=time.time(),
                )
                # Served as uploaded, the model is stored while the child admits it (sealing and
                # writing take about as long as admission); it is removed again if refused.
                # The view is taken now: admission takes the bytes from the handover.
                early = (
                    asyncio.ensure_future(store_model(meta, upload.view()))
                    if optimization == "off"
                    else None
                )
                stored = False
                try:
                    # Admitted (checked, loaded, measured) in a child process first: the
                    # server's ONNX Runtime never sees what it refuses. Then loaded, once
                    # stored: the load consumes the bytes, so the server never holds them next
                    # to the session's.
                    try:
                        admitted, room = await admit_with_room(upload, optimization)
                    except ApiError as exc:
                        if exc.status != 503:  # admitted, but no room in the memory budget now
                            metrics.observe_admission(loaded=False)
                        raise
                    try:
                        graph = admitted.graph
                        cost = cost_of(len(graph), admitted.loaded_bytes)
                        limits.check_storage(storage["used"] + storage["pending"] - size, cost)
                        report = admitted.optimization
                        if early is not None:
                            await early
                        else:
                            # What is served is what is stored: the optimized graph when
                            # admission kept one, under the upload's hash (the one clients pin)
                            # and its own.
                            if admitted.optimized and report:
                                meta = replace(
                                    meta,
                                    optimization=report["mode"],
                                    graph_hash=await _in_thread(_sha256, graph.view()),
                                    graph_size=len(graph),
                                )
                            await store_model(meta, graph.view())
                        stored = True
                        try:
                            model = await load_admitted(
                                admitted, model_id, model_name, model_hash, owner
                            )
                        except ApiError:  # ONNX Runtime refused what was admitted
                            metrics.observe_admission(loaded=False)
                            raise
                        metrics.observe_admission(loaded=True)
                    except BaseException:
                        registry.release_room(room)
                        raise
                except BaseException:
                    if stored or early is not None:
                        # Shielded: a cancelled upload still removes what it stored.
                        await asyncio.shield(unstore(meta.key, None if stored else early))
                    raise
                del admitted, graph, early
            finally:
                storage["pending"] -= size
            install(meta, model, room, "upload")
        finally:
            registry.release(owner, model_id)
        _log.info("model %s uploaded (%d bytes)", model_id, model.size)
        if report is not None:
            _log.info(
                "model %s optimization %s: %s",
                model_id,
                report.get("mode"),
                "kept" if report.get("kept") else "not kept",
            )
        receipt = (
            await run_in_threadpool(issuer.issue, "upload", model_id, model.model_hash)
            if issuer
            else None
        )
        reply = Response(
            wire.encode_upload_reply(model.model_hash, model_id, report), media_type=_CBOR
        )
        return with_receipt(reply, receipt)

    adopting = asyncio.Lock()

    async def adopt(
        model_id: str | None, model_hash: str | None, usable: Callable[[StoredModel], bool]
    ) -> None:
        """Load, on its first use here, a model another replica committed to the shared state
        (``--database-url``): admitted and measured as at upload, from its sealed blob, within
        the same model-size and storage limits (413).

        Every model of that id or hash the caller may use (`usable`), whoever owns it, so that
        `lookup` sees what it would see had this replica stored them all; never the others:
        loading them (or failing to, 413) would answer differently for ids the caller may not
        see."""
        store = state.store
        if not isinstance(store, SealedModelStore):
            return
        try:
            by_hash = bytes.fromhex(model_hash) if model_hash and not model_id else None
        except ValueError:
            return
        if store.may_block:
            entries = await run_in_threadpool(store.find, model_id, by_hash)
        else:
            # A local manifest (a stat while nothing changed): cheaper than a thread's hop,
            # which every request would pay.
            entries = store.find(model_id, by_hash)
        entries = [e for e in entries if e.meta.key not in access and usable(e.meta)]
        if not entries:
            return
        async with adopting:  # one load at a time: a burst of first uses loads a model once
            for entry in entries:
                if entry.meta.key not in access:
                    await adopt_reserved(store, entry)

    async def adopt_reserved(store: SealedModelStore, entry: ModelEntry) -> None:
        try:
            registry.reserve(entry.meta.owner, entry.meta.model_id)
        except ConflictError:  # uploaded here right now: that upload adds it
            return
        try:
            await adopt_entry(store, entry)
        finally:
            registry.release(entry.meta.owner, entry.meta.model_id)

    async def adopt_entry(store: SealedModelStore, entry: ModelEntry) -> None:
        # An evicted model is stored and charged already: its own charge is not counted twice.
        used = storage["used"] - charged.get(entry.meta.key, 0)
        limits.check_model_bytes(entry.meta.size)
        limits.check_storage(used + storage["pending"], entry.meta.size)
        found = await _in_thread(store.load_latest, entry)
        if found is None:  # deleted through another replica meanwhile
            return
        meta, blob = found
        del found
        size = len(blob)
        limits.check_model_bytes(size)  # replaced meanwhile: the bytes read now count
        limits.check_storage(used + storage["pending"], size)
        storage["pending"] += size
        try:
            admitted, room = await admit_with_room(Handover(blob), "off")
            del blob
            try:
                model = await load_admitted(
                    admitted, meta.model_id, meta.model_name, meta.model_hash, meta.owner
                )
                used = storage["used"] - charged.get(meta.key, 0)
                limits.check_storage(used + storage["pending"] - size, model.cost)
            except BaseException:
                registry.release_room(room)
                raise
        finally:
            storage["pending"] -= size
        install(meta, model, room, "store")
        _log.info("model %s loaded from the store", meta.model_id)

    async def up_to_date(
        model_id: str | None, model_hash: str | None, usable: Callable[[StoredModel], bool]
    ) -> None:
        """Before a model answers (BlindAI's /run by id or by hash, OIP by name, /delete): drop
        here what another replica deleted or replaced, and load what it stored that this
        replica does not know yet, of the models the caller may use (`usable`)."""
        if model_id:
            await drop_if_superseded(model_id)
        elif model_hash:
            wanted = model_hash.lower()
            for meta in list(access.values()):
                if meta.model_hash.hex() == wanted:
                    await drop_if_superseded(meta.model_id)
        await adopt(model_id, model_hash, usable)

    async def drop_if_superseded(model_id: str) -> None:
        """Shared state (``--database-url``): a model known here (loaded or evicted) that
        another replica deleted, or stored again under the same owner and id (other bytes or
        visibility), is dropped here too before it could answer."""
        store = state.store
        if config.database_url is None or not isinstance(store, SealedModelStore):
            return
        known = [k for k, m in access.items() if model_id in (k, m.model_id)]
        if not known:  # neither loaded nor evicted here
            return
        entries = await run_in_threadpool(store.find, model_id, None)
        committed = {e.meta.key: e.meta for e in entries}
        for key in known:
            # The whole record, not only the hash: the same bytes stored again with other
            # visibility must not run under the old record's access rules.
            if committed.get(key) == access.get(key):
                continue
            async with adopting:
                if access.pop(key, None) is None:  # dropped meanwhile by another request
                    continue
                removed = registry.forget(key)
                uncharge(key)
                if removed is not None:
                    await removed.close()
            _log.info("model %s dropped: deleted or replaced through another replica", model_id)

    async def run(request: Request) -> Response:
        principal = await authenticate(request, allow_anonymous=True)
        issuer = receipts_wanted(request)
        body = await _read_body(request, limits.max_request_bytes, "max_request_bytes")
        if len(body) <= _INLINE_DECODE_BYTES:
            # A small body decodes in well under a thread hop's cost (a hostile 4 KiB of tiny
            # items 1-3 ms; the pure-Python decoder holds the GIL in a thread just the same).
            message = wire.decode_run_request(body)
        else:
            # Off the event loop: a body of the largest allowed size must not stall others.
            message = await run_in_threadpool(wire.decode_run_request, body)
        del body
        limits.check_inputs(len(message.inputs))
        for tensor in message.inputs:
            itemsize = numpy_dtype(tensor.datum_type).itemsize
            limits.check_tensor(tensor.shape, itemsize, name=tensor.name or "")
        may_run = functools.partial(visible, principal)
        await up_to_date(message.model_id, message.model_hash, may_run)
        if message.model_id is None and message.model_hash:
            # By hash (BlindAI): several models may share one; take one this key may run.
            wanted = message.model_hash.lower()
            runnable = sorted(
                (m for m in access.values() if m.model_hash.hex() == wanted and may_run(m)),
                key=lambda m: m.key,
            )
            if not runnable:
                raise not_found(None, message.model_hash)
            model = await ensure_loaded(runnable[0])
        else:
            meta = lookup(principal, message.model_id or "", may_run, message.model_hash)
            model = await ensure_loaded(meta)
            if message.model_hash and model.model_hash.hex() != message.model_hash.lower():
                # Both given: both must match, so a client can pin what it runs.
                raise api_error_for_status(
                    404,
                    f"model {message.model_id!r} does not have hash {message.model_hash[:80]!r}",
                )
        _note(request, model_id=model.model_id)
        digests: dict[str, bytes] = {}

        def encode(outputs: list[WireTensor]) -> bytes:
            if issuer is not None:  # in the worker thread, with the encoding
                digests["outputs"] = tensors_digest(outputs)
            return wire.encode_run_reply(outputs)

        with registry.lease(model):  # taken with no await since the lookup: never evicted
            reply = await model.predict_encoded(message.inputs, limits.request_timeout_s, encode)
        response = Response(reply, media_type=_CBOR)
        if issuer is None:
            return response
        issue = functools.partial(
            issuer.issue,
            "predict",
            # The id as the caller named it (its own, or qualified ``owner/id``) and the hash.
            message.model_id or model.model_id,
            model.model_hash,
            inputs=tensors_digest(message.inputs),
            outputs=digests["outputs"],
        )
        # In a worker thread: the receipt waits for its log record's fsync.
        receipt = await run_in_threadpool(issue)
        return with_receipt(response, receipt)

    async def delete(request: Request) -> Response:
        principal = await authenticate(request)
        issuer = receipts_wanted(request)
        body = await _read_body(request, limits.max_request_bytes, "max_request_bytes")
        message = await run_in_threadpool(wire.decode_delete_request, body)
        model_id = message.model_id

        # Seen: the models it may delete (an admin: all), and those it may run (a 403 then).
        def may_see(meta: StoredModel) -> bool:
            return can_delete(principal, meta.owner) or visible(principal, meta)

        await up_to_date(model_id, None, may_see)  # the owner as the shared state says now
        meta = lookup(principal, model_id, may_see)
        if not can_delete(principal, meta.owner):
            raise api_error_for_status(
                403, f"model {model_id!r} may be deleted only by its owner's key or an admin key"
            )
        _note(request, model_id=model_id)
        await run_in_threadpool(state.store.delete, meta.key)
        removed = registry.forget(meta.key)
        access.pop(meta.key, None)
        uncharge(meta.key)
        if removed is not None:
            await removed.close()
        _log.info("model %s deleted", model_id)
        receipt = (
            await run_in_threadpool(issuer.issue, "delete", model_id, meta.model_hash)
            if issuer
            else None
        )
        return with_receipt(_cbor(None), receipt)

    async def list_models(request: Request) -> Response:
        principal = await authenticate(request)
        listed = []
        for key, entry in registry.describe().items():
            meta = access.get(key)
            if meta is not None and can_list(principal, meta.owner):
                listed.append(
                    {
                        **entry,
                        "owner": meta.owner,
                        "visibility": meta.visibility,
                        "created_at": meta.created_at,
                    }
                )
        return _cbor(listed)

    async def runnable(principal: Principal, model_id: str) -> LoadedModel:
        may_run = functools.partial(visible, principal)
        await up_to_date(model_id, None, may_run)
        return await ensure_loaded(lookup(principal, model_id, may_run))

    async def authenticate_run(request: Request) -> Principal:
        # As for /run: a public model may be run without a key (unless --no-anonymous).
        return await authenticate(request, allow_anonymous=True)

    oip = OipBackend(
        limits=limits,
        authenticate=authenticate_run,
        runnable=runnable,
        lease=registry.lease,
        ready=lambda: keeper.status().state != "failing",
        error_status=error_status,
        read_body=_read_body,
        note=_note,
    )

    def route(path: str, handler: Handler, method: str) -> Route:
        return Route(path, _endpoint(handler), methods=[method])

    async def read_small_body(request: Request) -> bytearray:
        return await _read_body(request, limits.max_request_bytes, "max_request_bytes")

    admin_routes = [
        route(path, handler, method)
        for path, handler, method in admin_handlers(
            auth=auth, authenticate=authenticate, read_body=read_small_body
        )
    ]

    def app(port: str, *routes: Route) -> ASGIApp:
        router = _ExactRoutes(routes, Starlette(routes=list(routes)))
        # Work (POST) is counted against the concurrency limit once its body is in; the cheap
        # GETs are not.
        gate = RequestGate(router, limiter=limiter, body_read_timeout_s=limits.body_read_timeout_s)
        paths = frozenset(r.path for r in routes)
        return _RequestLog(
            gate, port=port, metrics=metrics, routes=paths, replica=config.replica_name
        )

    handshake_route = route("/", handshake, "GET")
    # BlindAI 0.6 clients manage models on the attested port too; veil's own use the management one.
    model_management = (route("/upload", upload, "POST"), route("/delete", delete, "POST"))
    unattested = app(
        "unattested",
        route("/", get_certificate, "GET"),
        route("/quote", get_quote, "GET"),
        route("/collateral", get_collateral, "GET"),
        route("/keys", get_key_map, "GET"),
        route("/healthz", get_health, "GET"),
        route("/metrics", get_metrics, "GET"),
        route("/livez", get_live, "GET"),
        route("/readyz", get_ready, "GET"),
    )
    attested = app(
        "attested",
        handshake_route,
        route("/run", run, "POST"),
        *model_management,
        *oip_routes(oip),
        route("/log/head", log_head, "GET"),
        route("/log/inclusion", log_inclusion, "GET"),
        route("/log/consistency", log_consistency, "GET"),
    )
    management = app(
        "management",
        handshake_route,
        *model_management,
        route("/models", list_models, "GET"),
        *admin_routes,
        route("/admin/rotate-keys", rotate_keys, "POST"),
    )
    return unattested, attested, management
