"""Connection hygiene: what one socket may hold, and for how long.

uvicorn reads requests; these pieces sit around it so that connections cost the server little
and never outlive their purpose (defaults in `veil.server.limits.Limits`):

- `GuardedServer` accepts each connection through a gate: past ``max_connections`` (all ports)
  or ``max_connections_per_client`` (one address) it is aborted at once, before any TLS
  handshake, and counted in a throttled log line. The caps are sized under the process's
  open-file limit at start (`connection_caps`), so ``accept`` never runs out of descriptors.
  HTTP and TLS state are allocated only once a client sends its first bytes; the handshake has
  a deadline (``tls_handshake_timeout_s``).
- `_GuardedHttp` (uvicorn's protocol on the httptools parser) closes a connection whose request
  headers are not complete within ``header_read_timeout_s`` of its first byte (the gate closes
  a socket silent that long from its opening), answers 431 and closes when a request's line and
  headers pass ``max_header_bytes`` (counted as they are fed to the parser, which has no cap of
  its own), serves no protocol upgrade, and gives the connection's place back when it closes;
  uvicorn closes idle keep-alive connections (``keep_alive_timeout_s``).
- `_GatheringTransport`, under that protocol, sends the writes of one event-loop iteration as
  one: a small response's head and body leave in one TLS record and one ``send``.
- `RequestGate` (ASGI) answers 408 when a body being read stalls for ``body_read_timeout_s``,
  and takes a ``max_concurrent_requests`` slot (waiting in the bounded queue if none is free)
  only once a body is complete: slow senders wait without holding what other tenants need.
- `LogThrottle` keeps floods from filling the log: a few lines per message per interval, then
  one line counting the rest; the loop's exception handler logs one line, no traceback.
- `run_event_loop` runs a server's loop: uvloop's where it is installed (a core dependency on
  Linux), whose loop, transports and TLS are C; asyncio's otherwise. The gate then hands TLS to
  that loop's own protocol.
"""

from __future__ import annotations

import asyncio
import logging
import math
import resource
import time
from asyncio import sslproto
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from veil.errors import ApiError
from veil.server.limits import AdmissionQueue, Limits, limit_error

__all__ = [
    "ConnectionCaps",
    "ConnectionGuard",
    "GuardedServer",
    "LogThrottle",
    "RequestGate",
    "connection_caps",
    "header_capped_http",
    "install_log_throttle",
    "open_file_limit",
    "run_event_loop",
    "server_config",
]

_T = TypeVar("_T")

try:  # not on every platform (no Windows build): asyncio's loop serves there
    import uvloop
    import uvloop.loop
except ImportError:  # pragma: no cover - installed with veil on Linux
    uvloop = None  # type: ignore[assignment]

_log = logging.getLogger("veil.server.connections")
# Descriptors kept for everything but client sockets: models, the store, the key database,
# logs, worker threads' files, listening sockets.
_RESERVED_FDS = 256
# asyncio accepts up to a backlog of connections in one callback and only then runs anything
# else: a small batch keeps a connection burst from stalling requests in progress.
_MAX_BACKLOG = 256
_THROTTLED_LOGGERS = ("asyncio", "uvicorn.error", "veil.server.connections")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


# --- caps ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConnectionCaps:
    """Open connections allowed, in total (all ports) and per client address, and the listen
    backlog of each port (also how many connections asyncio accepts in one go)."""

    total: int
    per_client: int
    backlog: int


def connection_caps(limits: Limits, open_files: int, ports: int = 3) -> ConnectionCaps:
    """The caps in force under a limit of `open_files` descriptors.

    A quarter of the descriptors (at most 256) stay for the server's own files and threads.
    asyncio accepts up to a backlog's worth of connections before the gate sees the first one,
    on each port: the total cap leaves room for those batches, so ``accept`` never fails with
    EMFILE (which asyncio retries, logging, every second, while accepting nobody).
    """
    usable = open_files - min(_RESERVED_FDS, open_files // 4)
    backlog = max(8, min(_MAX_BACKLOG, usable // (8 * ports)))
    total = max(1, min(limits.max_connections, usable - ports * backlog))
    return ConnectionCaps(
        total=total, per_client=min(limits.max_connections_per_client, total), backlog=backlog
    )


def open_file_limit(wanted: int) -> int:
    """Raise the soft open-file limit towards `wanted` (never past the hard one); the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # a sandbox may refuse: keep the limit we have
            pass
    return int(soft) if soft != resource.RLIM_INFINITY else wanted


class ConnectionGuard:
    """Counts open connections, in total and per client address (one event loop, no lock)."""

    def __init__(self, caps: ConnectionCaps) -> None:
        self.caps = caps
        self._total = 0
        self._by_client: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return self._total

    def try_open(self, client: str) -> bool:
        """Count a new connection from `client`; False (nothing counted) when a cap is reached."""
        if self._total >= self.caps.total or self._by_client[client] >= self.caps.per_client:
            return False
        self._total += 1
        self._by_client[client] += 1
        return True

    def close(self, client: str) -> None:
        self._total -= 1
        self._by_client[client] -= 1
        if self._by_client[client] <= 0:
            del self._by_client[client]


# --- logging ---------------------------------------------------------------------------------


class LogThrottle(logging.Filter):
    """At most `burst` records per message template per `interval_s`; the first record after a
    window in which some were dropped says how many. `now` is injected (monotonic seconds)."""

    def __init__(
        self, burst: int = 5, interval_s: float = 10.0, now: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self._burst = burst
        self._interval = interval_s
        self._now = now
        # template -> (window start, records let through in it, records dropped)
        self._windows: dict[tuple[str, str], tuple[float, int, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        t = self._now()
        start, passed, dropped = self._windows.get(key, (t, 0, 0))
        if t - start >= self._interval:
            if dropped:
                record.msg = (
                    f"{record.getMessage()} [{dropped} more like this in {t - start:.0f} s]"
                )
                record.args = None
            start, passed, dropped = t, 0, 0
        if passed >= self._burst:
            self._windows[key] = (start, passed, dropped + 1)
            return False
        if len(self._windows) > 1000:  # templates are few; this only bounds a pathological case
            self._windows.clear()
        self._windows[key] = (start, passed + 1, dropped)
        return True


def install_log_throttle(loop: asyncio.AbstractEventLoop) -> None:
    """Throttle the loggers a connection flood writes to, and log loop errors in one line."""
    for name in _THROTTLED_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, LogThrottle) for f in logger.filters):
            logger.addFilter(LogThrottle())

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        # asyncio's default prints a traceback per event: per failed accept, every second.
        exc = context.get("exception")
        _log.error(
            "event loop: %s (%s)",
            context.get("message", "error"),
            type(exc).__name__ if exc else "no exception",
            exc_info=exc if _log.isEnabledFor(logging.DEBUG) else None,
        )

    loop.set_exception_handler(handle)


# --- the server and its protocols ------------------------------------------------------------


# Writes smaller than this are gathered for one event-loop iteration (or until the response is
# done): a response's head and body then reach TLS as one write, one record and one send.
# Larger ones pass through as they are, so a large body is never copied once more.
_GATHER_BYTES = 64 * 1024


class _GatheringTransport(asyncio.Transport):
    """A transport under the HTTP protocol that sends the writes of one loop iteration as one.

    `flush` runs on the next iteration (``call_soon``), when the response is complete, before a
    `close` or `write_eof`, or as soon as a large write arrives; `abort` drops what is held.
    Everything else (flow control, reading, extra info) is the inner transport's.
    """

    def __init__(self, inner: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._inner = inner
        self._loop = loop
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._scheduled: asyncio.Handle | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if len(data) >= _GATHER_BYTES:
            self.flush()
            self._inner.write(data)
            return
        # Held past this call: a caller's bytearray must not change under us.
        self._held.append(data if isinstance(data, bytes) else bytes(data))
        self._held_bytes += len(data)
        if self._held_bytes >= _GATHER_BYTES:
            self.flush()
        elif self._scheduled is None:
            self._scheduled = self._loop.call_soon(self.flush)

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def flush(self) -> None:
        """Send what is held, as one write."""
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
        if not self._held:
            return
        held = self._held[0] if len(self._held) == 1 else b"".join(self._held)
        self._held, self._held_bytes = [], 0
        self._inner.write(held)

    def drop(self) -> None:
        """Forget what is held (the connection is gone, or aborted)."""
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
        self._held, self._held_bytes = [], 0

    def close(self) -> None:
        self.flush()
        self._inner.close()

    def abort(self) -> None:
        self.drop()
        self._inner.abort()

    def write_eof(self) -> None:
        self.flush()
        self._inner.write_eof()

    def can_write_eof(self) -> bool:
        return self._inner.can_write_eof()

    def is_closing(self) -> bool:
        return self._inner.is_closing()

    def get_write_buffer_size(self) -> int:
        return self._held_bytes + self._inner.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._inner.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._inner.set_write_buffer_limits(high, low)

    def pause_reading(self) -> None:
        self._inner.pause_reading()

    def resume_reading(self) -> None:
        self._inner.resume_reading()

    def is_reading(self) -> bool:
        return self._inner.is_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._inner.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._inner.get_protocol()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._inner.get_extra_info(name, default)


class _CappedHttp(HttpToolsProtocol):
    """uvicorn's httptools protocol with a cap on a request's header bytes (httptools has
    none), and no upgrade: a request asking for one is served as plain HTTP/1.1.

    The cap counts the bytes fed to the parser while it reads a request's line and headers: a
    read that would pass it is fed only up to the cap, and a head still incomplete there is
    answered 431 and the connection closed, before the parser buffers more. (A pipelined
    request whose head starts inside a read that finished the previous request has that read's
    rest uncounted: it may pass the cap by at most one read.)
    """

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: Any,
        app_state: dict[str, Any],
        *,
        max_header_bytes: int,
    ) -> None:
        super().__init__(config=config, server_state=server_state, app_state=app_state)
        self._max_header_bytes = max_header_bytes
        self._head_bytes = 0  # fed while the parser reads the current request's head
        self._in_body = False  # the parser is past a head, in its body
        self._heads = 0  # heads completed on this connection
        self._refused = False

    def on_headers_complete(self) -> None:
        self._in_body = True
        self._heads += 1
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_body = False
        self._head_bytes = 0
        super().on_message_complete()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._unset_keepalive_if_required()
        while data and not self._refused:
            if self._in_body:
                self._feed(data)
                break
            room = self._max_header_bytes - self._head_bytes
            if len(data) <= room:
                self._head_bytes += len(data)
                self._feed(data)
                break
            heads = self._heads
            self._head_bytes = self._max_header_bytes
            self._feed(data[:room])
            data = data[room:]
            if self._heads == heads and not self._refused:
                _log.info("request refused: headers exceed max_header_bytes")
                self._refuse(
                    431, f"request headers exceed max_header_bytes={self._max_header_bytes}"
                )

    def _feed(self, data: bytes) -> None:
        while True:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade as upgrade:
                # No upgrade is served (``ws="none"``): the request stays plain HTTP, and
                # what followed its head in this read is parsed as such.
                offset = upgrade.args[0] if upgrade.args else len(data)
                data = data[offset:]
                if data:
                    continue
            except httptools.HttpParserError:
                _log.info("request refused: invalid HTTP")
                self._refuse(400, "Invalid HTTP request received.")
            return

    def _refuse(self, status: int, message: str) -> None:
        """Answer `status` with `message` (ASCII), and close: the parser cannot go on."""
        self._refused = True
        body = message.encode("ascii")
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: text/plain; charset=utf-8\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
            body,
        ]
        if not self.transport.is_closing():
            self.transport.write(b"".join(head))
            self.transport.close()


def header_capped_http(max_header_bytes: int) -> type[asyncio.Protocol]:
    """The protocol class for a plain `uvicorn.Server` (``http=``, with ``ws="none"``) whose
    requests' line and headers are capped at `max_header_bytes` (431, then closed)."""

    class HeaderCappedHttp(_CappedHttp):
        def __init__(
            self,
            config: uvicorn.Config,
            server_state: Any,
            app_state: dict[str, Any],
            _loop: asyncio.AbstractEventLoop | None = None,
        ) -> None:
            super().__init__(config, server_state, app_state, max_header_bytes=max_header_bytes)

    return HeaderCappedHttp


class _GuardedHttp(_CappedHttp):
    """`_CappedHttp` plus a header-read deadline, the guard's release, and writes gathered
    (`_GatheringTransport`): a small response leaves as one TLS record."""

    _gathering: _GatheringTransport

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: Any,
        app_state: dict[str, Any],
        *,
        header_timeout_s: float,
        max_header_bytes: int,
        release: Callable[[], None],
    ) -> None:
        super().__init__(config, server_state, app_state, max_header_bytes=max_header_bytes)
        self._header_timeout_s = header_timeout_s
        self.release = release
        self._header_timer: asyncio.TimerHandle | None = None

    def _awaiting_head(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        self._header_timer = self.loop.call_later(self._header_timeout_s, self._header_timeout)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self._awaiting_head() and not self.transport.is_closing():
            _log.info("closing a connection: headers not complete in %g s", self._header_timeout_s)
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._gathering = _GatheringTransport(transport, self.loop)
        super().connection_made(self._gathering)
        self._arm()

    def on_response_complete(self) -> None:
        self._gathering.flush()
        super().on_response_complete()

    def data_received(self, data: bytes) -> None:
        if self._header_timer is None and self._awaiting_head():
            self._arm()  # the first byte of the next request on a kept-alive connection
        super().data_received(data)
        if not self._awaiting_head():
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._gathering.drop()
        self.release()
        super().connection_lost(exc)


class _LeanSSLProtocol(sslproto.SSLProtocol):
    """asyncio's TLS protocol with a 64 KiB read buffer instead of 256 KiB per connection: a
    full house of connections holds a quarter of the memory (TLS records are 16 KiB)."""

    max_size = 64 * 1024


def run_event_loop(main: Coroutine[Any, Any, _T]) -> _T:
    """Run `main` to completion on a new event loop: uvloop's when installed.

    On the null model's round trip (``bench/profile_request.py``) uvloop, with its TLS, took
    ~10 % of the server's CPU per request off asyncio's.
    """
    factory = uvloop.new_event_loop if uvloop is not None else None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def _tls_protocol(loop: asyncio.AbstractEventLoop) -> Callable[..., Any]:
    """The TLS protocol of `loop`'s kind. uvloop's reads into a 256 KiB buffer that malloc leaves
    untouched past what a connection has received (an idle TLS connection measured 51 KiB in all,
    92 KiB on asyncio's loop); asyncio's zero-fills its buffer, hence `_LeanSSLProtocol`'s
    smaller one."""
    if uvloop is not None and isinstance(loop, uvloop.Loop):
        tls: Callable[..., Any] = uvloop.loop.SSLProtocol  # type: ignore[attr-defined]  # not in its stubs
        return tls
    return _LeanSSLProtocol


class _Gate(asyncio.Protocol):
    """First protocol of every accepted connection: counts it, refuses it, or hands it on.

    Nothing of HTTP or TLS is allocated until the client's first bytes arrive: a silent socket
    costs the gate alone, and is closed after ``header_read_timeout_s`` (plain HTTP) or
    ``tls_handshake_timeout_s`` (TLS). From the first bytes, the headers (or the handshake)
    must be complete within that time again.
    """

    def __init__(self, server: GuardedServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._release: Callable[[], None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # An asyncio.Transport in behaviour (uvloop's are not its subclasses).
        transport = cast(asyncio.Transport, transport)
        release = self._server.admit(transport)
        if release is None:
            return
        self._transport, self._release = transport, release
        self._server.waiting.add(self)
        limits = self._server.limits
        tls = self._server.config.ssl is not None
        timeout = limits.tls_handshake_timeout_s if tls else limits.header_read_timeout_s
        self._timer = asyncio.get_running_loop().call_later(timeout, self.abort)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()  # connection_lost follows, and releases

    def data_received(self, data: bytes) -> None:
        transport, release = self._transport, self._release
        if transport is None or release is None:
            return
        self._stop_waiting()
        self._transport = self._release = None  # from here on, the next protocol releases
        protocol = self._server.make_protocol(release)
        context = self._server.config.ssl
        if context is None:
            transport.set_protocol(protocol)
            protocol.connection_made(transport)
            protocol.data_received(data)
            return
        loop = asyncio.get_running_loop()
        handshake: asyncio.Future[None] = loop.create_future()
        tls = _tls_protocol(loop)(
            loop,
            protocol,
            context,
            handshake,
            server_side=True,
            ssl_handshake_timeout=self._server.limits.tls_handshake_timeout_s,
        )

        def handshake_done(future: asyncio.Future[None]) -> None:
            # On success the HTTP protocol took over (and releases when it closes).
            if future.cancelled() or future.exception() is not None:
                _log.info("TLS handshake failed or timed out")
                transport.abort()
                release()

        handshake.add_done_callback(handshake_done)
        transport.set_protocol(tls)
        tls.connection_made(transport)
        view = memoryview(data)
        while view:
            buffer = tls.get_buffer(len(view))
            n = min(len(buffer), len(view))
            buffer[:n] = view[:n]
            view = view[n:]
            tls.buffer_updated(n)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        if self._release is not None:
            self._release()
            self._release = None

    def _stop_waiting(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._server.waiting.discard(self)


def server_config(
    app: ASGIApp,
    *,
    host: str,
    port: int,
    log_level: str,
    server_header: str,
    limits: Limits,
    backlog: int,
) -> uvicorn.Config:
    """The loaded uvicorn configuration of one `GuardedServer` port (TLS is set by the caller)."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        lifespan="off",
        server_header=False,
        date_header=True,
        headers=[("server", server_header)],
        timeout_graceful_shutdown=5,
        # `GuardedServer` makes the connections' protocol (`_GuardedHttp`, on httptools); no
        # upgrade is served: a websocket's protocol would escape the connection guard.
        http="httptools",
        ws="none",
        # Nothing forwards for veil (TLS ends in the TEE): a client's ``X-Forwarded-For``
        # through a balancer on this host would otherwise pick the address its anonymous rate
        # is counted by. (Also one middleware less per request.)
        proxy_headers=False,
        backlog=backlog,
        # clients keep one verified connection open between requests
        timeout_keep_alive=max(1, math.ceil(limits.keep_alive_timeout_s)),
    )
    config.load()
    return config


class GuardedServer(uvicorn.Server):
    """A uvicorn server whose connections pass a `ConnectionGuard` (shared by all ports).

    The configured ``ssl`` context is applied here, after the caps (asyncio's own TLS would
    allocate and handshake first, uncounted); handshakes end within ``tls_handshake_timeout_s``.
    """

    def __init__(self, config: uvicorn.Config, *, guard: ConnectionGuard, limits: Limits) -> None:
        super().__init__(config)
        self.guard = guard
        self.limits = limits
        self.waiting: set[_Gate] = set()  # connections that have not sent a byte yet

    async def startup(self, sockets: list[Any] | None = None) -> None:
        if not sockets:
            raise ValueError("GuardedServer serves the sockets it is given")
        await self.lifespan.startup()
        loop = asyncio.get_running_loop()
        self.servers = [
            await loop.create_server(lambda: _Gate(self), sock=sock, backlog=self.config.backlog)
            for sock in sockets
        ]
        self.started = True

    async def shutdown(self, sockets: list[Any] | None = None) -> None:
        for gate in list(self.waiting):
            gate.abort()
        await super().shutdown(sockets)

    def admit(self, transport: asyncio.Transport) -> Callable[[], None] | None:
        """What gives the connection's place back, or None (and the connection aborted)."""
        peer = transport.get_extra_info("peername")
        client = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        if not self.guard.try_open(client):
            _log.warning(
                "connection refused: open connections at max_connections=%d or "
                "max_connections_per_client=%d",
                self.guard.caps.total,
                self.guard.caps.per_client,
            )
            transport.abort()
            return None
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.guard.close(client)

        return release

    def make_protocol(self, release: Callable[[], None]) -> _GuardedHttp:
        return _GuardedHttp(
            self.config,
            self.server_state,
            self.lifespan.state,
            header_timeout_s=self.limits.header_read_timeout_s,
            max_header_bytes=self.limits.max_header_bytes,
            release=release,
        )


# --- requests --------------------------------------------------------------------------------


class RequestGate:
    """ASGI middleware: the body read time-out, and concurrency slots taken once a body is in.

    While the application waits for the next piece of a body, more than ``body_read_timeout_s``
    without one raises a 408 (the response then closes the connection). A ``POST`` takes a slot
    of `limiter` when its last body piece arrives (waiting in its queue, counted with its body's
    size; 503 when the queue is full), and gives it back when its response is done: a request
    still sending holds no slot.
    """

    def __init__(
        self, app: ASGIApp, *, limiter: AdmissionQueue | None, body_read_timeout_s: float
    ) -> None:
        self._app = app
        self._limiter = limiter
        self._timeout = body_read_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        limiter = self._limiter if scope.get("method") == "POST" else None
        body_done = holding = timed_out = False
        received = 0
        # The last piece of a body refused a slot: handed out again to whoever drains the body.
        refused: Message | None = None

        async def gated_receive() -> Message:
            nonlocal body_done, holding, timed_out, refused, received
            if timed_out:  # the rest of the body is not waited for again
                return {"type": "http.disconnect"}
            if refused is not None:
                message, refused = refused, None
                return message
            if body_done:
                return await receive()
            try:
                async with asyncio.timeout(self._timeout):
                    message = await receive()
            except TimeoutError:
                timed_out = True
                raise limit_error(
                    408, f"request body: nothing received for body_read_timeout_s={self._timeout:g}"
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
                if limiter is not None and message["type"] == "http.request":
                    try:
                        await limiter.acquire(received)
                    except ApiError:
                        refused = message
                        raise
                    holding = True
            return message

        async def gated_send(message: Message) -> None:
            if timed_out and message["type"] == "http.response.start":
                # The rest of the body may still come: the connection cannot carry another
                # request, so say it closes.
                message = {**message, "headers": [*message.get("headers", ()), _CLOSE]}
            await send(message)

        try:
            await self._app(scope, gated_receive, gated_send)
        finally:
            if holding and limiter is not None:
                limiter.release()


_CLOSE = (b"connection", b"close")
