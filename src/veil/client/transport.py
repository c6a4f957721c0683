"""The client's HTTP/1.1: kept-alive connections, a total deadline per call, capped answers.

The client speaks to one kind of server over a handful of origins, so it needs little of a
general HTTP client, and pays for what it does not need on every call (a general client cost
more CPU per predict than the TLS record layer). Each `HttpClient.request`:

1. takes an idle connection to the URL's origin that is still quiet, or opens one: TCP with
   TCP_NODELAY, then TLS with the client's context and server name. A socket readable while
   idle was closed by the server (its keep-alive timeout) or holds junk: it is discarded, so a
   server's idle timeout never fails the next call;
2. sends the head and a small body in one write (one TLS record, one segment), a large or
   streamed body after it as it comes: by ``content-length`` when given, else chunked;
3. reads the answer with httptools (a C parser): ``content-length``, chunked or until-close
   bodies, refused past a byte cap as they arrive, compressed ones refused (a small compressed
   body can expand past any cap before it is counted). An answer sent early (a 413 while the
   body was still going out) is read even if sending the rest failed;
4. puts the connection back for the next call when both sides keep it alive and the answer was
   read to its end; closes it otherwise.

Every socket operation of a call (connect, handshake, each send and receive) gets what is left
of the call's total deadline, so a peer that sends one byte every few seconds cannot keep a call
alive past it. Nothing here logs or names a body.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import suppress
from functools import lru_cache
from urllib.parse import urlsplit

import httptools

from veil.errors import BindingError, TransportError

__all__ = ["ERROR_BODY_BYTES", "Body", "Headers", "HttpClient", "ResponseError"]

Body = bytes | Iterable[bytes] | None
"""What a request sends: nothing, bytes, or pieces made as they are sent."""

ERROR_BODY_BYTES = 64 << 10
"""The cap on an error status's body: errors are short texts, no reason to read a long one."""

# Writes smaller than this are gathered: a request's head and small body leave as one TLS record
# and one send. Larger pieces go out at once (uncopied), so uploads stream.
_GATHER_BYTES = 64 * 1024
# Below glibc's mmap threshold: each receive buffer comes from the heap, not a fresh mapping.
_RECV_BYTES = 64 * 1024
# A status line and headers: room for a receipt header at its 64 KiB cap.
_MAX_HEAD_BYTES = 128 * 1024
# Connections kept idle per origin; more concurrent calls than this open and close their own.
_MAX_IDLE = 32
_NO_BODY_STATUSES = (204, 304)


class ResponseError(TransportError):
    """The peer sent no HTTP answer: malformed bytes, or the connection closed or was reset
    before the answer ended (what a TLS port does to plain HTTP)."""


class Headers(Mapping[str, str]):
    """Response headers: a read-only mapping by lower-case name, repeated headers joined
    with ``", "``."""

    __slots__ = ("_map",)

    def __init__(self, pairs: Iterable[tuple[str, str]] = ()) -> None:
        merged: dict[str, str] = {}
        for name, value in pairs:
            key = name.lower()
            merged[key] = f"{merged[key]}, {value}" if key in merged else value
        self._map = merged

    def __getitem__(self, name: str) -> str:
        return self._map[name.lower()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._map

    def __iter__(self) -> Iterator[str]:
        return iter(self._map)

    def __len__(self) -> int:
        return len(self._map)

    def __repr__(self) -> str:  # names only: values are the server's business
        return f"Headers({sorted(self._map)})"


class _Deadline:
    __slots__ = ("_at",)

    def __init__(self, seconds: float) -> None:
        self._at = time.monotonic() + seconds

    def left(self) -> float:
        left = self._at - time.monotonic()
        if left <= 0:
            raise TimeoutError("the call's total deadline passed")
        return left


@lru_cache(maxsize=256)
def _split(url: str) -> tuple[tuple[str, str, int], str, str]:
    """((scheme, host, port), request target, Host header) of an http(s) URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"url: got {url[:80]!r}, expected http(s)://host[:port]/path")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = parts.path or "/"
    if parts.query:
        target = f"{target}?{parts.query}"
    return (parts.scheme, parts.hostname, port), target, parts.netloc


def _header_lines(headers: Mapping[str, str]) -> str:
    lines = []
    for name, value in headers.items():
        # A header cannot end early or start another: refused as the server's parser would.
        if not name or any(c in name for c in " \t\r\n:\0") or any(c in value for c in "\r\n\0"):
            raise TransportError(f"header {name[:40]!r}: got a name or value that breaks the head")
        lines.append(f"{name}: {value}\r\n")
    return "".join(lines)


def _readable(sock: socket.socket) -> bool:
    """Whether an idle socket has something to read (an end of stream included), or is broken."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    try:
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            return bool(poller.poll(0))
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return True


class _Writer:
    """Holds small writes and sends them together; larger ones go out at once, uncopied."""

    __slots__ = ("_deadline", "_held", "_held_bytes", "_sock")

    def __init__(self, sock: socket.socket, deadline: _Deadline) -> None:
        self._sock, self._deadline = sock, deadline
        self._held: list[bytes] = []
        self._held_bytes = 0

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self._held_bytes + len(data) < _GATHER_BYTES:
            self._held.append(data)
            self._held_bytes += len(data)
            return
        self.flush()
        self._send(data)

    def flush(self) -> None:
        if self._held:
            held = self._held[0] if len(self._held) == 1 else b"".join(self._held)
            self._held, self._held_bytes = [], 0
            self._send(held)

    def _send(self, data: bytes) -> None:
        self._sock.settimeout(self._deadline.left())
        self._sock.sendall(data)


class _Answer:
    """The httptools callbacks: status, headers and a body kept within its cap."""

    __slots__ = (
        "begun",
        "body",
        "body_bytes",
        "complete",
        "head_bytes",
        "head_done",
        "keep_alive",
        "limit",
        "max_body",
        "over",
        "pairs",
        "parser",
        "status",
        "trailing",
        "until_close",
    )

    def __init__(self, max_body: int) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.max_body = self.limit = max_body
        self.pairs: list[tuple[str, str]] = []
        self.body: list[bytes] = []
        self.body_bytes = self.head_bytes = self.status = 0
        self.begun = 0
        self.head_done = self.complete = self.over = self.trailing = self.until_close = False
        self.keep_alive = False

    def on_message_begin(self) -> None:
        self.begun += 1
        if self.complete:  # bytes after the answer: nothing this connection should carry
            self.trailing = True

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.head_done:  # not a chunked body's trailer
            self.pairs.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if self.status < 200:
            return  # an interim answer (100, 103): the real one follows
        self.head_done = True
        # Asked here: the parser forgets the answer's framing once it has ended.
        self.keep_alive = self.parser.should_keep_alive()
        if self.status >= 400:
            self.limit = min(self.max_body, ERROR_BODY_BYTES)
        names = {name.lower() for name, _ in self.pairs}
        self.until_close = (
            self.status not in _NO_BODY_STATUSES
            and "content-length" not in names
            and "transfer-encoding" not in names
        )

    def on_body(self, body: bytes) -> None:
        if self.over or self.complete:  # past the cap, or past the answer
            return
        if self.body_bytes + len(body) > self.limit:
            self.over = True
            self.body.clear()
            return
        self.body.append(body)
        self.body_bytes += len(body)

    def on_message_complete(self) -> None:
        if not self.head_done:  # the end of an interim answer
            self.pairs.clear()
            return
        self.complete = True


class _Conn:
    __slots__ = ("sock",)

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def close(self) -> None:
        with suppress(OSError):
            self.sock.close()


class HttpClient:
    """Kept-alive HTTP/1.1 connections per origin, shared safely by threads.

    Args:
        context: the TLS context of ``https`` URLs (an ``https`` URL without one is refused).
        server_name: the TLS server name (SNI, and the name the certificate is checked for);
            default the URL's host.
        headers: sent with every request; a request's own headers of the same name win.
    """

    def __init__(
        self,
        *,
        context: ssl.SSLContext | None = None,
        server_name: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self._context, self._server_name = context, server_name
        self._headers = {name.lower(): value for name, value in (headers or {}).items()}
        self._header_block = _header_lines(self._headers)
        self._idle: dict[tuple[str, str, int], list[_Conn]] = {}
        self._lock = threading.Lock()
        self._closed = False

    def request(
        self,
        method: str,
        url: str,
        *,
        body: Body = None,
        headers: Mapping[str, str] | None = None,
        timeout: float,
        max_body: int,
    ) -> tuple[int, Headers, bytes]:
        """(status, headers, body) of one call, all of it within `timeout` seconds.

        `max_body` caps the answer's body (`ERROR_BODY_BYTES` for an error status).

        Raises:
            BindingError: the TLS handshake failed on the server's certificate (nothing sent).
            ResponseError: the peer sent no HTTP answer (malformed, or closed mid-answer).
            TransportError: anything else on the network (refused, reset, timed out), a body
                over its cap, a compressed or an oversized answer.
        """
        if method == "HEAD":
            raise ValueError("method: got HEAD, expected one whose answer has its body")
        origin, target, host = _split(url)
        deadline = _Deadline(timeout)
        head, sized = self._head(method, target, host, body, headers)
        conn = self._take(origin, url, deadline)
        kept = False
        try:
            status, answer, content, kept = self._exchange(
                conn, head, body, sized, deadline, max_body
            )
        except TransportError as exc:
            raise type(exc)(f"{url}: {exc}") from None
        except TimeoutError as exc:
            raise TransportError(f"{url}: ReadTimeout: {exc}") from None
        except httptools.HttpParserError as exc:
            raise ResponseError(f"{url}: RemoteProtocolError: malformed response: {exc}") from None
        except OSError as exc:
            raise ResponseError(f"{url}: ReadError: {exc}") from None
        finally:
            if kept:
                self._put(origin, conn)
            else:
                conn.close()
        return status, answer, content

    def close(self) -> None:
        """Close the idle connections; those in use close when their call ends."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()

    # ---- steps 1 and 4: the pool --------------------------------------------------------------

    def _take(self, origin: tuple[str, str, int], url: str, deadline: _Deadline) -> _Conn:
        while True:
            with self._lock:
                if self._closed:
                    raise TransportError(f"{url}: the client is closed")
                conns = self._idle.get(origin)
                conn = conns.pop() if conns else None
            if conn is None:
                return self._open(origin, url, deadline)
            if _readable(conn.sock):
                conn.close()  # closed by the server while idle, or junk: never reused
                continue
            return conn

    def _put(self, origin: tuple[str, str, int], conn: _Conn) -> None:
        with self._lock:
            conns = self._idle.setdefault(origin, [])
            if not self._closed and len(conns) < _MAX_IDLE:
                conns.append(conn)
                return
        conn.close()

    def _open(self, origin: tuple[str, str, int], url: str, deadline: _Deadline) -> _Conn:
        scheme, host, port = origin
        if scheme == "https" and self._context is None:
            raise ValueError(
                f"url: got {url[:80]!r}, expected http: this client has no TLS context"
            )
        try:
            sock = socket.create_connection((host, port), timeout=deadline.left())
        except TimeoutError as exc:
            raise TransportError(f"{url}: ConnectTimeout: {exc}") from None
        except OSError as exc:
            raise TransportError(f"{url}: ConnectError: {exc}") from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if scheme == "https" and self._context is not None:
                sock = self._context.wrap_socket(
                    sock,
                    server_hostname=self._server_name or host,
                    do_handshake_on_connect=False,
                )
                sock.settimeout(deadline.left())
                sock.do_handshake()
        except ssl.SSLCertVerificationError as exc:
            sock.close()
            raise BindingError(f"{url}: certificate verification failed: {exc}") from None
        except TimeoutError as exc:
            sock.close()
            raise TransportError(f"{url}: ConnectTimeout: {exc}") from None
        except OSError as exc:
            sock.close()
            raise TransportError(f"{url}: ConnectError: {exc}") from None
        return _Conn(sock)

    # ---- steps 2 and 3: one request, one answer -----------------------------------------------

    def _head(
        self,
        method: str,
        target: str,
        host: str,
        body: Body,
        headers: Mapping[str, str] | None,
    ) -> tuple[bytes, int | None]:
        """The request head, and the body's declared size (None: sent chunked)."""
        block = self._header_block
        sized: int | None = None
        if headers:
            own = {name.lower(): value for name, value in headers.items()}
            declared = own.pop("content-length", None)
            own.pop("transfer-encoding", None)
            own.pop("host", None)
            if declared is not None and not isinstance(body, bytes) and body is not None:
                if not declared.isdigit():
                    raise TransportError(f"content-length: got {declared[:20]!r}, expected digits")
                sized = int(declared)
            merged = {k: v for k, v in self._headers.items() if k not in own}
            merged.update(own)
            block = _header_lines(merged)
        if isinstance(body, bytes):
            framing = f"content-length: {len(body)}\r\n"
        elif body is None:
            framing = (
                "" if method in ("GET", "HEAD", "DELETE", "OPTIONS") else "content-length: 0\r\n"
            )
        elif sized is not None:
            framing = f"content-length: {sized}\r\n"
        else:
            framing = "transfer-encoding: chunked\r\n"
        text = f"{method} {target} HTTP/1.1\r\nhost: {host}\r\n{block}{framing}\r\n"
        try:
            return text.encode("latin-1"), sized
        except UnicodeEncodeError:
            raise TransportError("request head: got characters outside latin-1") from None

    def _exchange(
        self,
        conn: _Conn,
        head: bytes,
        body: Body,
        sized: int | None,
        deadline: _Deadline,
        max_body: int,
    ) -> tuple[int, Headers, bytes, bool]:
        """(status, headers, body, whether the connection can carry another call)."""
        writer = _Writer(conn.sock, deadline)
        unsent: OSError | None = None
        try:
            writer.write(head)
            if isinstance(body, bytes):
                writer.write(body)
            elif body is not None:
                _write_pieces(writer, body, sized)
            writer.flush()
        except TimeoutError as exc:
            raise TransportError(f"WriteTimeout: {exc}") from None
        except OSError as exc:
            # As httpcore does: read on, since the server may have answered early (a 413) and
            # closed its side. If it did not, the failure to send is the error.
            unsent = exc
        try:
            answer = _read(conn.sock, deadline, max_body)
        except (OSError, TransportError, httptools.HttpParserError):
            if unsent is not None:
                raise TransportError(f"WriteError: {unsent}") from None
            raise
        content = b"".join(answer.body)
        keep = (
            unsent is None and not answer.until_close and not answer.trailing and answer.keep_alive
        )
        return answer.status, Headers(answer.pairs), content, keep


def _read(sock: socket.socket, deadline: _Deadline, max_body: int) -> _Answer:
    answer = _Answer(max_body)
    checked = False
    received = 0
    while not answer.complete:
        sock.settimeout(deadline.left())
        data = sock.recv(_RECV_BYTES)
        if not data:
            if answer.head_done and answer.until_close:
                answer.complete = True
                break
            if received == 0:
                raise ResponseError("ReadError: the server closed the connection without answering")
            raise ResponseError("RemoteProtocolError: the connection closed mid-answer")
        received += len(data)
        if not answer.head_done:
            answer.head_bytes += len(data)
        try:
            answer.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            raise ResponseError("RemoteProtocolError: an upgrade was not asked for") from None
        if not answer.head_done and answer.head_bytes > _MAX_HEAD_BYTES:
            raise ResponseError(
                f"RemoteProtocolError: response head larger than {_MAX_HEAD_BYTES} bytes"
            )
        if answer.head_done and not checked:
            checked = True
            _check_head(answer)
        if answer.over:
            raise TransportError(f"response larger than {answer.limit} bytes")
    return answer


def _check_head(answer: _Answer) -> None:
    headers = Headers(answer.pairs)
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise TransportError(f"got content-encoding {encoding[:40]!r}, expected identity")
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > answer.limit:
        raise TransportError(f"response of {declared} bytes, more than {answer.limit}")


def _write_pieces(writer: _Writer, pieces: Iterable[bytes], sized: int | None) -> None:
    sent = 0
    for piece in pieces:
        if not piece:
            continue
        sent += len(piece)
        if sized is None:
            writer.write(b"%x\r\n" % len(piece))
            writer.write(piece)
            writer.write(b"\r\n")
            continue
        if sent > sized:
            raise TransportError(f"request body: more than its content-length {sized}")
        writer.write(piece)
    if sized is None:
        writer.write(b"0\r\n\r\n")
    elif sent != sized:
        raise TransportError(f"request body: {sent} bytes, expected its content-length {sized}")
