"""Connection hygiene pieces on their own: caps under the open-file limit, the guard's counts,
the throttled log, and the request gate's body time-out and slot timing."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from typing import Any

import pytest

from veil.errors import ApiError, ServiceUnavailableError
from veil.server.connections import (
    ConnectionCaps,
    ConnectionGuard,
    GuardedServer,
    LogThrottle,
    RequestGate,
    _LeanSSLProtocol,
    _tls_protocol,
    connection_caps,
    run_event_loop,
    server_config,
)
from veil.server.limits import AdmissionQueue, Limits
from veil.tls import SERVER_NAME, generate_identity, pinned_client_context, server_context


@pytest.mark.parametrize(
    ("open_files", "total", "per_client", "backlog"),
    [
        (1 << 20, 4096, 256, 256),  # plenty: the configured caps
        (20_000, 4096, 256, 256),
        (1024, 672, 256, 32),  # 256 kept back for the server's own files
        (200, 126, 126, 8),  # a quarter kept back; per client never more than in total
        (8, 1, 1, 8),
    ],
)
def test_caps_fit_under_the_open_file_limit(
    open_files: int, total: int, per_client: int, backlog: int
) -> None:
    caps = connection_caps(Limits(), open_files)
    assert caps == ConnectionCaps(total=total, per_client=per_client, backlog=backlog)
    if open_files > 100:
        # held connections, one accept batch per port, and the server's own files all fit
        assert caps.total + 3 * caps.backlog + min(256, open_files // 4) <= open_files


def test_guard_counts_per_client_and_total() -> None:
    guard = ConnectionGuard(ConnectionCaps(total=3, per_client=2, backlog=8))
    assert guard.try_open("a")
    assert guard.try_open("a")
    assert not guard.try_open("a")  # per client
    assert guard.try_open("b")
    assert not guard.try_open("c")  # total
    assert guard.total == 3
    guard.close("a")
    assert guard.try_open("c")
    guard.close("b")
    assert guard.try_open("a")
    assert not guard.try_open("a")


def _record(msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("veil.test", logging.WARNING, __file__, 1, msg, args, None)


def test_log_throttle_lets_a_burst_through_then_counts() -> None:
    clock = [0.0]
    throttle = LogThrottle(burst=3, interval_s=10.0, now=lambda: clock[0])
    passed = [throttle.filter(_record("refused %d", i)) for i in range(1000)]
    assert passed.count(True) == 3
    assert throttle.filter(_record("another template"))  # counted separately
    clock[0] = 10.5
    summary = _record("refused %d", 1000)
    assert throttle.filter(summary)
    assert summary.getMessage() == "refused 1000 [997 more like this in 10 s]"
    quiet = _record("refused %d", 1001)
    assert throttle.filter(quiet)
    assert quiet.getMessage() == "refused 1001"


class _Peer:
    """The ASGI side of a connection: body pieces arrive when the test says so."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.sent: list[dict[str, Any]] = []

    async def receive(self) -> dict[str, Any]:
        return await self.queue.get()

    async def send(self, message: Any) -> None:
        self.sent.append(message)


async def _read_all(receive: Any) -> None:
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


async def _reader(scope: Any, receive: Any, send: Any) -> None:
    """An app that reads the whole body, then answers 200 (or the ApiError's status, after
    draining the rest of the body as veil's endpoints do: that must not wait again)."""
    status = 200
    try:
        await _read_all(receive)
    except ApiError as exc:
        status = exc.status
        await asyncio.wait_for(_read_all(receive), 1)
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def _no_queue(limit: int = 1) -> AdmissionQueue:
    return AdmissionQueue(limit, max_queued=0, max_queued_bytes=0, retry_after_s=1, max_wait_s=5)


def _scope(method: str = "POST") -> dict[str, Any]:
    return {"type": "http", "method": method, "path": "/run", "headers": []}


def test_stalled_body_is_408_and_closes_the_connection() -> None:
    async def main() -> _Peer:
        peer = _Peer()
        gate = RequestGate(_reader, limiter=_no_queue(), body_read_timeout_s=0.05)
        await peer.queue.put({"type": "http.request", "body": b"x", "more_body": True})
        await asyncio.wait_for(gate(_scope(), peer.receive, peer.send), 5)
        return peer

    peer = asyncio.run(main())
    start = peer.sent[0]
    assert start["status"] == 408
    assert (b"connection", b"close") in start["headers"]


def test_slot_taken_only_once_the_body_is_complete() -> None:
    async def main() -> None:
        limiter = _no_queue()
        gate = RequestGate(_reader, limiter=limiter, body_read_timeout_s=5)
        slow = _Peer()
        await slow.queue.put({"type": "http.request", "body": b"x", "more_body": True})
        slow_task = asyncio.create_task(gate(_scope(), slow.receive, slow.send))
        await asyncio.sleep(0.01)
        assert limiter.active == 0  # still sending: holds nothing

        # A complete request passes meanwhile, and gives its slot back.
        fast = _Peer()
        await fast.queue.put({"type": "http.request", "body": b"done", "more_body": False})
        await gate(_scope(), fast.receive, fast.send)
        assert fast.sent[0]["status"] == 200
        assert limiter.active == 0

        # The slow one completes, and is counted while its handler runs.
        seen: list[int] = []

        async def busy(scope: Any, receive: Any, send: Any) -> None:
            await receive()
            seen.append(limiter.active)
            await send({"type": "http.response.start", "status": 200, "headers": []})

        busy_gate = RequestGate(busy, limiter=limiter, body_read_timeout_s=5)
        held = _Peer()
        await held.queue.put({"type": "http.request", "body": b"", "more_body": False})
        await busy_gate(_scope(), held.receive, held.send)
        assert seen == [1]
        assert limiter.active == 0
        await slow.queue.put({"type": "http.request", "body": b"y", "more_body": False})
        await slow_task
        assert slow.sent[0]["status"] == 200
        assert limiter.active == 0

    asyncio.run(main())


def test_no_free_slot_and_no_queue_room_is_503() -> None:
    async def main() -> None:
        limiter = _no_queue()
        await limiter.acquire()  # someone else's request in progress
        gate = RequestGate(_reader, limiter=limiter, body_read_timeout_s=5)
        peer = _Peer()
        await peer.queue.put({"type": "http.request", "body": b"x", "more_body": False})
        await gate(_scope(), peer.receive, peer.send)
        assert peer.sent[0]["status"] == 503
        assert limiter.active == 1
        # GETs are not counted at all.
        get = _Peer()
        await get.queue.put({"type": "http.request", "body": b"", "more_body": False})
        await gate(_scope("GET"), get.receive, get.send)
        assert get.sent[0]["status"] == 200

    asyncio.run(main())


def test_the_busy_refusal_is_a_503_with_retry_after() -> None:
    async def main() -> None:
        limiter = _no_queue()
        await limiter.acquire()
        with pytest.raises(ServiceUnavailableError, match="max_queued_requests=0") as info:
            await limiter.acquire()
        assert info.value.retry_after == 1
        limiter.release()
        await limiter.acquire()

    asyncio.run(main())


def test_a_queued_body_waits_for_the_slot_counted_by_its_size() -> None:
    async def main() -> None:
        limiter = AdmissionQueue(
            1, max_queued=1, max_queued_bytes=10, retry_after_s=1, max_wait_s=5
        )
        await limiter.acquire()
        gate = RequestGate(_reader, limiter=limiter, body_read_timeout_s=5)
        peer = _Peer()
        await peer.queue.put({"type": "http.request", "body": b"abc", "more_body": True})
        await peer.queue.put({"type": "http.request", "body": b"de", "more_body": False})
        task = asyncio.create_task(gate(_scope(), peer.receive, peer.send))
        while limiter.queued < 1:
            await asyncio.sleep(0)
        assert limiter.queued_bytes == 5
        assert not peer.sent
        limiter.release()
        await task
        assert peer.sent[0]["status"] == 200
        assert (limiter.active, limiter.queued) == (0, 0)

    asyncio.run(main())


async def _hello(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"hello " + scope["path"].encode()})


@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
def test_tls_through_the_gate_on_either_loop(loop_kind: str) -> None:
    # The gate hands TLS to the running loop's own protocol (uvloop's, or asyncio's with the
    # smaller buffer): a pinned client gets its answer over both, and the server says which.
    uvloop = pytest.importorskip("uvloop")
    identity = generate_identity()
    limits = Limits()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    port = sock.getsockname()[1]
    config = server_config(
        _hello,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        server_header="t",
        limits=limits,
        backlog=8,
    )
    config.ssl = server_context(identity)
    server = GuardedServer(
        config, guard=ConnectionGuard(connection_caps(limits, 1 << 16)), limits=limits
    )
    seen: list[Any] = []

    async def serve() -> None:
        seen.append(_tls_protocol(asyncio.get_running_loop()))
        await server.serve(sockets=[sock])

    if loop_kind == "uvloop":
        thread = threading.Thread(target=run_event_loop, args=(serve(),), daemon=True)
    else:
        thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        context = pinned_client_context(identity.certificate_der)
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname=SERVER_NAME) as tls,
        ):
            tls.sendall(b"GET /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := tls.recv(4096):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200")
        assert b"\r\nhello /x\r\n" in answer
        expected = uvloop.loop.SSLProtocol if loop_kind == "uvloop" else _LeanSSLProtocol
        assert seen == [expected]
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert not thread.is_alive()
