"""HTTP transport of the client: a total deadline per call and a cap on every response.

httpx's time-outs apply to each socket operation, so a peer that sends one byte every few seconds
keeps a call alive for as long as it likes, and its responses are read whole whatever their
size. Here every socket operation of a call is given at most the time left before the call's
deadline (`deadline`), and bodies are read as a stream and refused past a byte limit
(`read_capped`). The unattested port is plain HTTP: anyone on the path can try both.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import httpcore
import httpx

from veil.errors import TransportError

__all__ = ["deadline", "deadline_transport", "read_capped"]

_SocketOption = (
    tuple[int, int, int] | tuple[int, int, bytes | bytearray] | tuple[int, int, None, int]
)
_local = threading.local()


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Give every socket operation of this thread at most what is left of `seconds`."""
    previous = getattr(_local, "at", None)
    _local.at = time.monotonic() + seconds
    try:
        yield
    finally:
        _local.at = previous


def _clamp(timeout: float | None, error: type[Exception]) -> float | None:
    at: float | None = getattr(_local, "at", None)
    if at is None:
        return timeout
    left = at - time.monotonic()
    if left <= 0:
        raise error("the call's total deadline passed")
    return left if timeout is None else min(timeout, left)


# Writes smaller than this are gathered until the next read: a request's head and body then
# leave as one TLS record and one send. Larger ones go out at once, so uploads stream.
_GATHER_BYTES = 64 * 1024


class _DeadlineStream(httpcore.NetworkStream):
    """A stream whose operations obey `deadline`, and which sends a small request in one write.

    An HTTP/1.1 client always reads after its request: writes are held until the next `read`
    (or `close`, `start_tls`, or ``_GATHER_BYTES`` held), and then sent as one.
    """

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._write_timeout: float | None = None

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if self._held:
            # As httpcore does when a request fails to go out: read on, since a server may have
            # answered early (413) and closed its side.
            with suppress(httpcore.WriteError):
                self._flush()
        return self._inner.read(max_bytes, _clamp(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        clamped = _clamp(timeout, httpcore.WriteTimeout)
        if self._held_bytes + len(buffer) < _GATHER_BYTES:
            self._held.append(buffer)
            self._held_bytes += len(buffer)
            self._write_timeout = timeout
            return
        if self._held:
            self._flush()
            clamped = _clamp(timeout, httpcore.WriteTimeout)
        self._inner.write(buffer, clamped)

    def _flush(self) -> None:
        held = self._held[0] if len(self._held) == 1 else b"".join(self._held)
        self._held, self._held_bytes = [], 0
        self._inner.write(held, _clamp(self._write_timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        try:
            if self._held:
                self._flush()
        except (httpcore.WriteError, httpcore.WriteTimeout):
            pass  # the connection is going away: what it could not send is no one's loss
        finally:
            self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        if self._held:
            self._flush()
        inner = self._inner.start_tls(
            ssl_context, server_hostname, _clamp(timeout, httpcore.ConnectTimeout)
        )
        return _DeadlineStream(inner)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self) -> None:
        self._inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[_SocketOption] | None = None,
    ) -> httpcore.NetworkStream:
        stream = self._inner.connect_tcp(
            host,
            port,
            _clamp(timeout, httpcore.ConnectTimeout),
            local_address,
            socket_options,
        )
        return _DeadlineStream(stream)

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


_NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


def deadline_transport(verify: ssl.SSLContext | None = None) -> httpx.HTTPTransport:
    """An httpx transport whose sockets obey `deadline` and send each small request in one write
    (TCP_NODELAY set: a large body still goes out after its head, and Nagle would hold it for
    the peer's delayed ACK)."""
    transport = httpx.HTTPTransport(verify=verify if verify is not None else True)
    # httpx takes no network backend: give its pool one (the same settings, our sockets).
    transport._pool = httpcore.ConnectionPool(
        ssl_context=verify, socket_options=_NODELAY, network_backend=_DeadlineBackend()
    )
    return transport


def read_capped(response: httpx.Response, limit: int, what: str) -> bytes:
    """The body of a streamed `response`, refused as soon as it passes `limit` bytes.

    Raises:
        TransportError: the body is larger than `limit`, or compressed (a small compressed
            body can expand past any limit before it is counted).
    """
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise TransportError(f"{what}: got content-encoding {encoding[:40]!r}, expected identity")
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise TransportError(f"{what}: response of {declared} bytes, more than {limit}")
    body = bytearray()
    for chunk in response.iter_raw():
        if len(body) + len(chunk) > limit:
            raise TransportError(f"{what}: response larger than {limit} bytes")
        body += chunk
    return bytes(body)
