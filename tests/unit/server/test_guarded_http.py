"""The server's HTTP protocol (`_GuardedHttp`, uvicorn's httptools protocol guarded): the header
byte cap, malformed and upgrade requests, pipelining, 100-continue, chunked and large bodies
(streamed under flow control), and the guard's release."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn
from uvicorn.server import ServerState

from veil.server.connections import _GuardedHttp, header_capped_http, server_config
from veil.server.limits import Limits

_CAP = 1024


class _Wire(asyncio.Transport):
    """An inner transport that keeps what the protocol writes and whether reading is paused."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = bytearray()
        self.closed = False
        self.paused = False
        self.pauses = 0
        self.peer = ("192.0.2.1", 4000)

    def write(self, data: Any) -> None:
        self.sent += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.paused = True
        self.pauses += 1

    def resume_reading(self) -> None:
        self.paused = False

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": self.peer, "sockname": ("192.0.2.2", 80)}.get(name, default)


class _Echo:
    """An ASGI app answering each request with its method, path and body size; it records the
    pieces of body it received."""

    def __init__(self, *, read_slowly: bool = False) -> None:
        self.pieces: list[int] = []
        self.read_slowly = read_slowly

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        total = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            self.pieces.append(len(message["body"]))
            total += len(message["body"])
            if self.read_slowly:
                await asyncio.sleep(0.01)
            if not message.get("more_body", False):
                break
        body = f"{scope['method']} {scope['path']} {total}".encode()
        headers = [(b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _run(
    app: Any, script: Callable[[_GuardedHttp, _Wire], Awaitable[None]]
) -> tuple[_Wire, list[int]]:
    """Run `script` against a fresh protocol over a `_Wire`; the wire and the release count."""
    released: list[int] = []

    async def main() -> _Wire:
        config = uvicorn.Config(app, lifespan="off", log_level="critical", ws="none")
        config.load()
        wire = _Wire()
        protocol = _GuardedHttp(
            config,
            ServerState(),
            {},
            header_timeout_s=30,
            max_header_bytes=_CAP,
            release=lambda: released.append(1),
        )
        protocol.connection_made(wire)
        await script(protocol, wire)
        await _settle()
        protocol.connection_lost(None)
        return wire

    return asyncio.run(main()), released


async def _settle() -> None:
    for _ in range(100):
        await asyncio.sleep(0)


def _head(pad: int) -> bytes:
    """A GET head of exactly `pad` + 39 bytes."""
    return b"GET /x HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * pad + b"\r\n\r\n"


def test_a_head_at_the_cap_is_served_one_byte_more_is_431() -> None:
    at_cap = _head(_CAP - len(_head(0)))
    assert len(at_cap) == _CAP

    async def served(protocol: _GuardedHttp, wire: _Wire) -> None:
        protocol.data_received(at_cap)

    async def refused(protocol: _GuardedHttp, wire: _Wire) -> None:
        protocol.data_received(_head(_CAP - len(_head(0)) + 1))

    wire, released = _run(_Echo(), served)
    assert wire.sent.startswith(b"HTTP/1.1 200 ")
    assert released == [1]
    wire, released = _run(_Echo(), refused)
    assert wire.sent.startswith(b"HTTP/1.1 431 ")
    assert b"max_header_bytes=1024" in wire.sent
    assert b"connection: close\r\n" in wire.sent
    assert wire.closed
    assert released == [1]


def test_a_head_dripped_past_the_cap_is_refused_before_it_ends() -> None:
    app = _Echo()

    async def script(protocol: _GuardedHttp, wire: _Wire) -> None:
        protocol.data_received(b"GET /x HTTP/1.1\r\nHost: x\r\nX-Pad: ")
        for _ in range(2 * _CAP // 100):
            protocol.data_received(b"a" * 100)
        protocol.data_received(b"\r\n\r\n")  # after the refusal: ignored

    wire, _ = _run(app, script)
    assert wire.sent.startswith(b"HTTP/1.1 431 ")
    assert wire.sent.count(b"HTTP/1.1") == 1
    assert app.pieces == []


def test_body_bytes_do_not_count_as_header_bytes() -> None:
    body = b"b" * (8 * _CAP)
    request = b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body

    async def script(protocol: _GuardedHttp, wire: _Wire) -> None:
        protocol.data_received(request)  # head and body in one read

    wire, _ = _run(_Echo(), script)
    assert wire.sent.startswith(b"HTTP/1.1 200 ")
    assert wire.sent.endswith(b"POST /up %d" % len(body))


def test_each_kept_alive_request_has_the_whole_cap() -> None:
    near_cap = _head(_CAP - len(_head(0)) - 10)

    async def script(protocol: _GuardedHttp, wire: _Wire) -> None:
        for _ in range(3):
            protocol.data_received(near_cap)
            await _settle()

    wire, _ = _run(_Echo(), script)
    assert wire.sent.count(b"HTTP/1.1 200 ") == 3


def test_pipelined_requests_are_answered_in_order() -> None:
    requests = (
        b"".join(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(3))
        + b"POST /3 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi"
    )

    async def script(protocol: _GuardedHttp, wire: _Wire) -> None:
        protocol.data_received(requests)

    wire, _ = _run(_Echo(), script)
    answers = [part for part in wire.sent.split(b"HTTP/1.1 ")[1:]]
    assert len(answers) == 4
    assert [a.rsplit(b"\r\n\r\n", 1)[1] for a in answers] == [
        b"GET /0 0",
        b"GET /1 0",
        b"GET /2 0",
        b"POST /3 2",
    ]


def test_malformed_request_is_400_and_closed() -> None:
    async def script(protocol: _GuardedHttp, wire: _Wire) -> None:
        protocol.data_received(b"GET / HTTP/1.1\r\nbad header\r\n\r\n")
        protocol.data_received(b"GET / HTTP/1.1\r\n\r\n")  # after the refusal: ignored

    wire, released = _run(_Echo(), script)
    assert wire.sent.startswith(b"HTTP/1.1 400 ")
    assert wire.sent.count(b"HTTP/1.1") == 1
    assert wire.closed
    assert released == [1]


def test_an_upgrade_request_is_served_as_plain_http() -> None:
    request = b"GET /u HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"

    async def script(protocol: _GuardedHttp, wire: _Wire) -> None:
        protocol.data_received(request + b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")

    wire, released = _run(_Echo(), script)
    assert wire.sent.count(b"HTTP/1.1 200 ") == 2
    assert b"GET /u 0" in wire.sent
    assert b"GET /next 0" in wire.sent
    assert released == [1]


def test_expect_100_continue_is_answered_before_the_body() -> None:
    async def script(protocol: _GuardedHttp, wire: _Wire) -> None:
        protocol.data_received(
            b"POST /c HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n"
        )
        await _settle()
        assert wire.sent == b"HTTP/1.1 100 Continue\r\n\r\n"
        protocol.data_received(b"data")

    wire, _ = _run(_Echo(), script)
    assert wire.sent.endswith(b"POST /c 4")


def test_a_chunked_body_arrives_whole() -> None:
    async def script(protocol: _GuardedHttp, wire: _Wire) -> None:
        protocol.data_received(b"POST /k HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(3):
            protocol.data_received(b"5\r\nhello\r\n")
            await _settle()
        protocol.data_received(b"0\r\n\r\n")

    wire, _ = _run(_Echo(), script)
    assert wire.sent.endswith(b"POST /k 15")


def test_a_large_body_is_streamed_under_flow_control() -> None:
    app = _Echo(read_slowly=True)
    piece = b"z" * (64 * 1024)
    pieces = 32

    async def script(protocol: _GuardedHttp, wire: _Wire) -> None:
        protocol.data_received(
            b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (len(piece) * pieces)
        )
        for _ in range(pieces):
            # a paused transport delivers nothing until the application reads
            for _ in range(1000):
                if not wire.paused:
                    break
                await asyncio.sleep(0.001)
            assert not wire.paused
            protocol.data_received(piece)
        for _ in range(1000):
            if wire.sent:
                break
            await asyncio.sleep(0.001)

    wire, _ = _run(app, script)
    assert wire.sent.endswith(b"POST /big %d" % (len(piece) * pieces))
    assert wire.pauses > 0
    assert len(app.pieces) > 1
    assert max(app.pieces) <= 4 * len(piece)  # never the whole body buffered at once


def test_the_client_address_is_the_peer_whatever_it_forwards() -> None:
    """The anonymous rate limit counts by ``scope["client"]``: a client reaching the server
    through a balancer on its own host must not choose it with ``X-Forwarded-For``."""
    seen: list[Any] = []

    async def client_of(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["client"])
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def main() -> None:
        config = server_config(
            client_of,
            host="127.0.0.1",
            port=0,
            log_level="critical",
            server_header="veil/test",
            limits=Limits(),
            backlog=8,
        )
        wire = _Wire()
        wire.peer = ("127.0.0.1", 4000)
        protocol = _GuardedHttp(
            config,
            ServerState(),
            {},
            header_timeout_s=30,
            max_header_bytes=_CAP,
            release=lambda: None,
        )
        protocol.connection_made(wire)
        protocol.data_received(
            b"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 203.0.113.9\r\n"
            b"X-Forwarded-Proto: https\r\n\r\n"
        )
        await _settle()
        protocol.connection_lost(None)
        assert wire.sent.startswith(b"HTTP/1.1 204 ")

    asyncio.run(main())
    assert seen == [("127.0.0.1", 4000)]


def test_a_plain_uvicorn_server_gets_the_header_cap() -> None:
    """`header_capped_http` (``veil proxy``): uvicorn builds it as it builds its own."""

    async def main(pad: int) -> bytes:
        config = uvicorn.Config(
            _Echo(), lifespan="off", log_level="critical", ws="none", http=header_capped_http(_CAP)
        )
        config.load()
        wire = _Wire()
        protocol = config.http_protocol_class(
            config=config, server_state=ServerState(), app_state={}
        )
        protocol.connection_made(wire)
        protocol.data_received(_head(pad))
        await _settle()
        protocol.connection_lost(None)
        return bytes(wire.sent)

    assert asyncio.run(main(_CAP - len(_head(0)))).startswith(b"HTTP/1.1 200 ")
    assert asyncio.run(main(_CAP - len(_head(0)) + 1)).startswith(b"HTTP/1.1 431 ")
