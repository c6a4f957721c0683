"""The client's transport bounds: a total deadline per call, capped and uncompressed answers."""

from __future__ import annotations

import socket
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator

import httpx
import pytest

import veil
from veil.client.transport import deadline, deadline_transport, read_capped
from veil.errors import TransportError

Behaviour = Callable[[socket.socket], None]


@pytest.fixture
def hostile() -> Iterator[Callable[[Behaviour], int]]:
    """A loopback HTTP 'server' that treats each connection with a given behaviour."""
    listeners: list[socket.socket] = []
    stop = threading.Event()

    def start(behaviour: Behaviour) -> int:
        listener = socket.create_server(("127.0.0.1", 0))
        listener.settimeout(0.2)
        listeners.append(listener)

        def serve() -> None:
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except (TimeoutError, OSError):
                    continue
                with conn:
                    try:
                        conn.recv(65536)
                        behaviour(conn)
                    except OSError:
                        pass

        threading.Thread(target=serve, daemon=True).start()
        return int(listener.getsockname()[1])

    yield start
    stop.set()
    for listener in listeners:
        listener.close()


def drip(prefix: bytes, every_s: float = 0.3, total: int = 200) -> Behaviour:
    def behaviour(conn: socket.socket) -> None:
        conn.sendall(prefix)
        for _ in range(total):
            conn.sendall(b"a")
            time.sleep(every_s)

    return behaviour


def endless_chunks(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
    chunk = b"10000\r\n" + b"x" * 0x10000 + b"\r\n"
    for _ in range(4096):  # 256 MiB, unless the client hangs up first
        conn.sendall(chunk)


def test_drip_fed_evidence_ends_at_the_deadline(hostile: Callable[[Behaviour], int]) -> None:
    port = hostile(drip(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n"))
    start = time.monotonic()
    with (
        pytest.warns(veil.SimulationModeWarning),
        pytest.raises(TransportError, match=r"timed out|deadline"),
    ):
        veil.connect("127.0.0.1", unattested_port=port, simulation=True, timeout=1.0)
    # Each byte came within the per-read time-out: only the 1 s total deadline ends this
    # before the drip's 60 s (the bound leaves room for a loaded machine).
    assert time.monotonic() - start < 15


def test_drip_fed_headers_end_at_the_deadline(hostile: Callable[[Behaviour], int]) -> None:
    port = hostile(drip(b"HTTP/1.1 200 OK\r\nx-pad: "))
    start = time.monotonic()
    with (
        httpx.Client(transport=deadline_transport(), timeout=5) as client,
        deadline(1.0),
        pytest.raises(httpx.ReadTimeout, match=r"timed out|deadline"),
    ):
        client.get(f"http://127.0.0.1:{port}/")
    assert time.monotonic() - start < 15  # the drip lasts 60 s


def test_endless_evidence_stops_at_the_cap(hostile: Callable[[Behaviour], int]) -> None:
    port = hostile(endless_chunks)
    tracemalloc.start()
    try:
        with (
            pytest.warns(veil.SimulationModeWarning),
            pytest.raises(TransportError, match="larger than 524288 bytes"),
        ):
            veil.connect("127.0.0.1", unattested_port=port, simulation=True, timeout=30)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20


def _served(*chunks: bytes, headers: dict[str, str] | None = None) -> httpx.Client:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers=headers or {}, content=iter(chunks))

    return httpx.Client(transport=httpx.MockTransport(handler))


def test_read_capped() -> None:
    with _served(b"ab", b"cd") as client, client.stream("GET", "http://x/") as response:
        assert read_capped(response, 4, "what") == b"abcd"
    with (
        _served(b"ab", b"cde") as client,
        client.stream("GET", "http://x/") as response,
        pytest.raises(TransportError, match="what: response larger than 4 bytes"),
    ):
        read_capped(response, 4, "what")


def test_declared_length_over_the_cap_is_refused_unread() -> None:
    with (
        _served(b"", headers={"content-length": "1000000"}) as client,
        client.stream("GET", "http://x/") as response,
        pytest.raises(TransportError, match="response of 1000000 bytes, more than 4"),
    ):
        read_capped(response, 4, "what")


def test_compressed_answers_are_refused() -> None:
    with (
        _served(b"\x1f\x8b", headers={"content-encoding": "gzip"}) as client,
        client.stream("GET", "http://x/") as response,
        pytest.raises(TransportError, match="content-encoding 'gzip', expected identity"),
    ):
        read_capped(response, 1 << 20, "what")
