"""The client's stream sends a small request in one write, streams large ones, and keeps the
call's deadline on what it held."""

from __future__ import annotations

import ssl
from typing import Any

import httpcore
import pytest

from veil.client.transport import _GATHER_BYTES, _DeadlineStream, deadline


class _Recorder(httpcore.NetworkStream):
    """An inner stream that records what it is asked to do, and answers reads with `answer`."""

    def __init__(self, answer: bytes = b"", fail_writes: bool = False) -> None:
        self.calls: list[tuple[str, Any, float | None]] = []
        self.answer = answer
        self.fail_writes = fail_writes

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        self.calls.append(("read", max_bytes, timeout))
        answer, self.answer = self.answer, b""
        return answer

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.calls.append(("write", buffer, timeout))
        if self.fail_writes:
            raise httpcore.WriteError("connection reset by peer")

    def close(self) -> None:
        self.calls.append(("close", None, None))

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        self.calls.append(("start_tls", server_hostname, timeout))
        return _Recorder()

    def writes(self) -> list[bytes]:
        return [buffer for name, buffer, _ in self.calls if name == "write"]


def test_head_and_body_of_a_small_request_leave_as_one_write_before_the_read() -> None:
    inner = _Recorder(answer=b"HTTP/1.1 200 OK\r\n")
    stream = _DeadlineStream(inner)
    stream.write(b"POST /run HTTP/1.1\r\ncontent-length: 4\r\n\r\n", 5.0)
    stream.write(b"body", 5.0)
    stream.write(b"", 5.0)  # h11's end of a sized body
    assert inner.calls == []
    assert stream.read(65536, 5.0) == b"HTTP/1.1 200 OK\r\n"
    assert [name for name, _, _ in inner.calls] == ["write", "read"]
    assert inner.writes() == [b"POST /run HTTP/1.1\r\ncontent-length: 4\r\n\r\nbody"]


def test_each_request_on_a_kept_alive_connection_is_flushed_by_its_read() -> None:
    inner = _Recorder()
    stream = _DeadlineStream(inner)
    for n in range(3):
        stream.write(b"head%d" % n)
        stream.write(b"body%d" % n)
        stream.read(100)
    assert [name for name, _, _ in inner.calls] == ["write", "read"] * 3
    assert inner.writes() == [b"head0body0", b"head1body1", b"head2body2"]


def test_a_large_body_is_not_held_and_not_copied() -> None:
    inner = _Recorder()
    stream = _DeadlineStream(inner)
    body = b"x" * (4 * _GATHER_BYTES)
    stream.write(b"head")
    stream.write(body)
    # The held head goes first, then the body itself (the same object), before any read.
    assert inner.writes() == [b"head", body]
    assert inner.writes()[1] is body
    stream.read(100)
    assert [name for name, _, _ in inner.calls] == ["write", "write", "read"]


def test_small_pieces_are_sent_once_they_add_up_to_the_gather_size() -> None:
    inner = _Recorder()
    stream = _DeadlineStream(inner)
    piece = b"y" * (_GATHER_BYTES // 4)
    for _ in range(4):
        stream.write(piece)
    assert inner.writes() == [piece * 3, piece]


def test_the_flush_keeps_the_calls_deadline() -> None:
    inner = _Recorder()
    stream = _DeadlineStream(inner)
    with deadline(30):
        stream.write(b"request", None)
        stream.read(100, None)
    (_, _, write_timeout), (_, _, read_timeout) = inner.calls
    assert write_timeout is not None
    assert 0 < write_timeout <= 30
    assert read_timeout is not None
    assert 0 < read_timeout <= 30


def test_a_deadline_that_passes_while_held_fails_the_flush() -> None:
    inner = _Recorder()
    stream = _DeadlineStream(inner)
    with deadline(30):
        stream.write(b"request", 10.0)
    # deadline(0) has passed by the time anything checks it, whatever the machine's load.
    with deadline(0), pytest.raises(httpcore.WriteTimeout, match="total deadline passed"):
        stream.read(100, 10.0)
    assert inner.calls == []


def test_a_write_after_the_deadline_fails_at_once() -> None:
    inner = _Recorder()
    stream = _DeadlineStream(inner)
    with deadline(0), pytest.raises(httpcore.WriteTimeout, match="total deadline passed"):
        stream.write(b"request", 10.0)
    assert inner.calls == []


def test_a_failed_flush_still_reads_the_servers_early_answer() -> None:
    # httpcore itself reads on after a WriteError: the server may have answered 413 and closed.
    inner = _Recorder(answer=b"HTTP/1.1 413 Content Too Large\r\n", fail_writes=True)
    stream = _DeadlineStream(inner)
    stream.write(b"head")
    assert stream.read(100) == b"HTTP/1.1 413 Content Too Large\r\n"
    stream.read(100)  # nothing held any more: no second attempt
    assert [name for name, _, _ in inner.calls] == ["write", "read", "read"]


def test_close_sends_what_is_held_then_closes() -> None:
    inner = _Recorder()
    stream = _DeadlineStream(inner)
    stream.write(b"held")
    stream.close()
    assert [(name, buffer) for name, buffer, _ in inner.calls] == [
        ("write", b"held"),
        ("close", None),
    ]


def test_close_closes_even_when_the_held_bytes_cannot_go_out() -> None:
    inner = _Recorder(fail_writes=True)
    stream = _DeadlineStream(inner)
    stream.write(b"held")
    stream.close()
    assert [name for name, _, _ in inner.calls] == ["write", "close"]
    stream = _DeadlineStream(inner := _Recorder())
    with deadline(30):
        stream.write(b"held")
    with deadline(0):
        stream.close()
    assert [name for name, _, _ in inner.calls] == ["close"]


def test_start_tls_sends_what_is_held_first() -> None:
    inner = _Recorder()
    stream = _DeadlineStream(inner)
    stream.write(b"CONNECT x:443 HTTP/1.1\r\n\r\n")
    stream.start_tls(ssl.create_default_context(), "x")
    assert [name for name, _, _ in inner.calls] == ["write", "start_tls"]


def test_an_http_call_through_the_stream_sends_its_request_in_one_write() -> None:
    inner = _Recorder(answer=b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")

    class Backend(httpcore.NetworkBackend):
        def connect_tcp(self, *args: Any, **kwargs: Any) -> httpcore.NetworkStream:
            return _DeadlineStream(inner)

    pool = httpcore.ConnectionPool(network_backend=Backend())
    response = pool.request("POST", "http://127.0.0.1:1/run", content=b"0123456789")
    assert response.status == 200
    assert response.content == b"ok"
    (request,) = inner.writes()
    assert request.startswith(b"POST /run HTTP/1.1\r\n")
    assert request.endswith(b"\r\n\r\n0123456789")
    pool.close()
