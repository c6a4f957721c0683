"""The server sends the writes of one loop iteration as one: a small response is one TLS record
and one send; closing sends what is held first, aborting drops it; large writes pass through."""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from uvicorn.server import ServerState

from veil.server.connections import _GATHER_BYTES, _GatheringTransport, _GuardedHttp


class _Recorder(asyncio.Transport):
    """An inner transport that records calls in order."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, Any]] = []
        self.closing = False
        self.protocol: asyncio.BaseProtocol | None = None

    def write(self, data: Any) -> None:
        self.calls.append(("write", data))

    def close(self) -> None:
        self.calls.append(("close", None))
        self.closing = True

    def abort(self) -> None:
        self.calls.append(("abort", None))
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        self.calls.append(("pause_reading", None))

    def resume_reading(self) -> None:
        self.calls.append(("resume_reading", None))

    def get_write_buffer_size(self) -> int:
        return 10

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.calls.append(("limits", (high, low)))

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("192.0.2.1", 4000), "sockname": ("192.0.2.2", 443)}.get(name, default)

    def writes(self) -> list[Any]:
        return [data for name, data in self.calls if name == "write"]


async def _next_iteration() -> None:
    await asyncio.sleep(0)
    await asyncio.sleep(0)


def test_writes_of_one_iteration_arrive_as_one() -> None:
    async def main() -> _Recorder:
        inner = _Recorder()
        transport = _GatheringTransport(inner, asyncio.get_running_loop())
        transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
        transport.write(bytearray(b"body"))
        transport.write(b"")
        assert inner.calls == []
        assert transport.get_write_buffer_size() == 10 + 23
        await _next_iteration()
        transport.write(b"next")
        await _next_iteration()
        return inner

    inner = asyncio.run(main())
    assert inner.writes() == [b"HTTP/1.1 200 OK\r\n\r\nbody", b"next"]


def test_a_held_bytearray_is_copied() -> None:
    async def main() -> _Recorder:
        inner = _Recorder()
        transport = _GatheringTransport(inner, asyncio.get_running_loop())
        data = bytearray(b"abc")
        transport.write(data)
        data[:] = b"xyz"
        await _next_iteration()
        return inner

    assert asyncio.run(main()).writes() == [b"abc"]


def test_close_sends_what_is_held_first() -> None:
    async def main() -> _Recorder:
        inner = _Recorder()
        transport = _GatheringTransport(inner, asyncio.get_running_loop())
        transport.write(b"HTTP/1.1 413 \r\n\r\n")
        transport.write(b"too large")
        transport.close()
        assert transport.is_closing()
        await _next_iteration()
        return inner

    inner = asyncio.run(main())
    assert inner.calls == [("write", b"HTTP/1.1 413 \r\n\r\ntoo large"), ("close", None)]


def test_abort_drops_what_is_held() -> None:
    async def main() -> _Recorder:
        inner = _Recorder()
        transport = _GatheringTransport(inner, asyncio.get_running_loop())
        transport.write(b"never sent")
        transport.abort()
        await _next_iteration()
        return inner

    assert asyncio.run(main()).calls == [("abort", None)]


def test_a_large_write_passes_through_after_what_is_held() -> None:
    body = b"x" * _GATHER_BYTES

    async def main() -> _Recorder:
        inner = _Recorder()
        transport = _GatheringTransport(inner, asyncio.get_running_loop())
        transport.write(b"head")
        transport.write(body)
        assert len(inner.writes()) == 2  # at once, not on the next iteration
        await _next_iteration()
        return inner

    writes = asyncio.run(main()).writes()
    assert writes == [b"head", body]
    assert writes[1] is body


def test_small_writes_are_sent_once_they_add_up_to_the_gather_size() -> None:
    piece = b"y" * (_GATHER_BYTES // 2)

    async def main() -> _Recorder:
        inner = _Recorder()
        transport = _GatheringTransport(inner, asyncio.get_running_loop())
        transport.write(piece)
        transport.write(piece)
        assert inner.writes() == [piece * 2]
        return inner

    asyncio.run(main())


def test_flow_control_and_the_rest_are_the_inner_transports() -> None:
    async def main() -> None:
        inner = _Recorder()
        transport = _GatheringTransport(inner, asyncio.get_running_loop())
        transport.pause_reading()
        transport.resume_reading()
        transport.set_write_buffer_limits(high=100, low=10)
        protocol = asyncio.Protocol()
        transport.set_protocol(protocol)
        assert inner.protocol is protocol
        assert transport.get_extra_info("peername") == ("192.0.2.1", 4000)
        assert transport.get_extra_info("sslcontext") is None
        assert inner.calls == [
            ("pause_reading", None),
            ("resume_reading", None),
            ("limits", (100, 10)),
        ]

    asyncio.run(main())


async def _hello(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5")]}
    )
    await send({"type": "http.response.body", "body": b"hello"})


def _protocol(inner: _Recorder) -> _GuardedHttp:
    config = uvicorn.Config(_hello, lifespan="off", log_level="critical")
    config.load()
    protocol = _GuardedHttp(
        config, ServerState(), {}, header_timeout_s=30, max_header_bytes=16384, release=lambda: None
    )
    protocol.connection_made(inner)
    return protocol


def test_a_small_response_leaves_the_http_protocol_as_one_write() -> None:
    async def main() -> _Recorder:
        inner = _Recorder()
        protocol = _protocol(inner)
        for _ in range(2):  # and again on the kept-alive connection
            protocol.data_received(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            for _ in range(50):
                await asyncio.sleep(0)
        protocol.connection_lost(None)
        return inner

    inner = asyncio.run(main())
    writes = inner.writes()
    assert len(writes) == 2
    for response in writes:
        assert response.startswith(b"HTTP/1.1 200 OK\r\n")
        assert response.endswith(b"\r\n\r\nhello")


def test_a_bad_request_is_answered_in_one_write_then_closed() -> None:
    async def main() -> _Recorder:
        inner = _Recorder()
        protocol = _protocol(inner)
        protocol.data_received(b"GET / HTTP/1.1\r\nbad header\r\n\r\n")
        protocol.connection_lost(None)
        return inner

    inner = asyncio.run(main())
    (name, answer), *rest = inner.calls
    assert name == "write"
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert answer.endswith(b"Invalid HTTP request received.")
    assert rest[0] == ("close", None)
