"""``veil proxy``: the Open Inference Protocol v2 on loopback, relayed over an attested channel.

Any HTTP client (curl, tritonclient, a browser-less script in any language) talks plain OIP v2 to
the proxy; the proxy verifies the server exactly as `veil.connect` does (it *is* a
`veil.Connection`), adds the API key, and relays each request over the channel pinned to the
attested certificate. Nothing else is relayed: only the ``/v2`` routes below, only the headers
the protocol needs, bodies bounded.

Verification comes first, and fails closed:

1. at start, and whenever there is no verified connection, the server is attested from scratch
   (`veil.Connection`); a failure answers 502 with the reason (``{"error": ...}``) and nothing
   is relayed; the next request tries again (at most once per ``retry_s``);
2. when the server presents another certificate (a restart, a redeploy, or someone in the
   middle), the pinned TLS handshake fails before the request is sent: the connection is
   dropped, the server attested again, and the request sent once over the new channel only if
   that succeeds;
3. an unreachable server answers 503; a timed-out one 504. There is no plaintext path.

The listening socket is for this machine only: requests whose ``Host`` is not a loopback name
are refused (DNS rebinding), and so is any request carrying an ``Origin`` header (a web page in a
browser; curl and inference clients send none).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from veil.client.connection import Connection
from veil.errors import AttestationError, BindingError, TransportError, VeilError

__all__ = ["AttestedUpstream", "ProxySettings", "build_proxy_app"]

_log = logging.getLogger("veil.proxy")
_JSON = "application/json"
# Request headers relayed to the server, and answer headers relayed back: the protocol's own.
_REQUEST_HEADERS = ("content-type", "inference-header-content-length", "x-request-id")
_ANSWER_HEADERS = ("content-type", "inference-header-content-length", "x-request-id", "retry-after")
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """Bounds of the proxy.

    Attributes:
        max_body_bytes: the largest request body relayed (413 past it).
        body_read_timeout_s: the longest a caller may take to send its whole body (408).
        retry_s: after a failed verification, later requests get the same error for this long
            before the server is attested again (a failing server is not hammered).
        allowed_hosts: ``Host`` header names accepted besides the loopback ones.
    """

    max_body_bytes: int = 64 << 20
    body_read_timeout_s: float = 30.0
    retry_s: float = 1.0
    allowed_hosts: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.max_body_bytes <= 0 or self.body_read_timeout_s <= 0 or self.retry_s < 0:
            raise ValueError(
                f"proxy settings: got max_body_bytes={self.max_body_bytes}, "
                f"body_read_timeout_s={self.body_read_timeout_s}, retry_s={self.retry_s}, "
                "expected a positive size and time-out and a non-negative delay"
            )


class AttestedUpstream:
    """The verified connection the proxy relays through, attested again when needed.

    Args:
        connect: makes a new verified `Connection` (attests the server; raises
            `AttestationError` or `TransportError` when it cannot).
        retry_s: how long a failed verification is answered from memory.
        clock: monotonic seconds (injected for tests).
    """

    def __init__(
        self,
        connect: Callable[[], Connection],
        *,
        retry_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._connect = connect
        self._retry_s = retry_s
        self._clock = clock
        self._lock = threading.Lock()
        self._connection: Connection | None = None
        self._failure: tuple[float, VeilError] | None = None
        self.attestations = 0
        """How many times the server was verified successfully."""

    def connection(self) -> Connection:
        """The verified connection, attesting the server first if there is none.

        Raises:
            AttestationError: the server failed verification; nothing is relayed.
            TransportError: the server could not be reached.
        """
        with self._lock:
            if self._connection is not None:
                return self._connection
            if self._failure is not None and self._clock() - self._failure[0] < self._retry_s:
                raise self._failure[1]
            try:
                connection = self._connect()
            except (AttestationError, TransportError) as exc:
                self._failure = (self._clock(), exc)
                _log.error("server verification failed: %s: %s", type(exc).__name__, exc)
                raise
            self._failure = None
            self._connection = connection
            self.attestations += 1
            _log.warning(
                "server verified (%s); relaying over the attested channel",
                connection.verified.platform.value,
            )
            return connection

    def _drop(self, connection: Connection) -> None:
        with self._lock:
            if self._connection is connection:
                self._connection = None
        connection.close()

    def forward(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str]
    ) -> tuple[int, dict[str, str], bytes]:
        """Relay one request (blocking); see the module's steps 1-3."""
        connection = self.connection()
        try:
            status, answer, content = connection.forward(method, path, body, headers)
        except BindingError:
            # Step 2: the handshake failed on the pinned certificate, so nothing was sent.
            _log.warning("the server presents another certificate: verifying it again")
            self._drop(connection)
            connection = self.connection()
            status, answer, content = connection.forward(method, path, body, headers)
        kept = {name: answer[name] for name in _ANSWER_HEADERS if name in answer}
        return status, kept, content

    def close(self) -> None:
        with self._lock:
            connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()


def _error(status: int, message: str) -> Response:
    return Response(json.dumps({"error": message}).encode(), status_code=status, media_type=_JSON)


def _host_name(host: str) -> str:
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


async def _read_bounded(request: Request, limit: int) -> bytes | None:
    """The body, or None as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def build_proxy_app(upstream: AttestedUpstream, settings: ProxySettings) -> Starlette:
    """The proxy's ASGI app: the OIP v2 routes, relayed through `upstream`."""
    hosts = _LOOPBACK_HOSTS | settings.allowed_hosts

    async def relay(request: Request, template: str) -> Response:
        if _host_name(request.headers.get("host", "")) not in hosts:
            return _error(403, "veil proxy: Host is not this machine's loopback name")
        if "origin" in request.headers:
            return _error(403, "veil proxy: requests from web pages (Origin) are refused")
        body: bytes | None = None
        if request.method == "POST":
            try:
                async with asyncio.timeout(settings.body_read_timeout_s):
                    body = await _read_bounded(request, settings.max_body_bytes)
            except ClientDisconnect:
                return Response(status_code=400)
            except TimeoutError:
                return _error(
                    408, f"veil proxy: body not received within {settings.body_read_timeout_s:g} s"
                )
            if body is None:
                return _error(413, f"veil proxy: body exceeds {settings.max_body_bytes} bytes")
        # Rebuilt from the route matched here, not copied from the request line.
        path = template.format(name=quote(request.path_params.get("name", ""), safe=""))
        headers = {k: request.headers[k] for k in _REQUEST_HEADERS if k in request.headers}
        try:
            status, answer, content = await run_in_threadpool(
                upstream.forward, request.method, path, body, headers
            )
        except AttestationError as exc:
            return _error(502, f"veil proxy: the server failed verification: {exc}")
        except TransportError as exc:
            timed_out = "timeout" in str(exc).lower() or "deadline" in str(exc).lower()
            return _error(
                504 if timed_out else 503, f"veil proxy: the server is unreachable: {exc}"
            )
        return Response(content, status_code=status, headers=answer)

    def route(template: str, method: str = "GET") -> Route:
        async def endpoint(request: Request) -> Response:
            return await relay(request, template)

        return Route(template, endpoint, methods=[method])

    routes = [
        route("/v2"),
        route("/v2/health/live"),
        route("/v2/health/ready"),
        route("/v2/models/{name}"),
        route("/v2/models/{name}/ready"),
        route("/v2/models/{name}/infer", "POST"),
    ]
    return Starlette(routes=routes)
