"""Connection hygiene against a real server: idle, slow and surplus connections are closed, slow
bodies hold no concurrency slot, and a flood neither exhausts descriptors nor fills the log."""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cbor2
import httpx
import numpy as np
import pytest
from onnx_models import identity_model
from server_process import STOP_TIMEOUT_S, VeilServer, start_server

from veil.server.ready import ReadyLine
from veil.tls import SERVER_NAME, pinned_client_context

pytestmark = pytest.mark.slow

X = np.arange(6, dtype=np.float32).reshape(2, 3)
QUICK = {
    "--header-read-timeout-s": "1",
    "--body-read-timeout-s": "3",
    "--tls-handshake-timeout-s": "1",
    "--keep-alive-timeout-s": "1",
    "--max-concurrent-requests": "1",
    "--max-header-bytes": "4096",
}


def _serve(root: Path, flags: dict[str, str]) -> Iterator[VeilServer]:
    running = start_server(root / "data", root / "log", *[p for kv in flags.items() for p in kv])
    with running.connect() as client:
        client.upload_model(identity_model("float32"), model_id="ok")
    yield running
    assert running.stop() == 0, running.stderr()[-3000:]


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VeilServer]:
    yield from _serve(tmp_path_factory.mktemp("veil-quick"), QUICK)


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VeilServer]:
    flags = {"--max-connections": "8", "--max-connections-per-client": "4"}
    yield from _serve(tmp_path_factory.mktemp("veil-capped"), flags)


def _open(port: int, source: str = "127.0.0.1") -> socket.socket:
    """A TCP connection to the server from `source` (any 127.0.0.0/8 address is loopback)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def _closed_within(sock: socket.socket, seconds: float) -> bytes | None:
    """What the server sent before closing, or None if it still held the connection."""
    sock.settimeout(seconds)
    received = b""
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                return received
            received += data
    except (ConnectionResetError, ssl.SSLError, OSError) as exc:
        if isinstance(exc, TimeoutError):
            return None
        return received
    return None


def _tls(server: VeilServer, source: str = "127.0.0.1") -> ssl.SSLSocket:
    """A TLS connection to the attested port from `source`, handshake done."""
    # The certificate first: a socket opened before it would sit silent while it is fetched,
    # and the server closes a silent socket after tls_handshake_timeout_s (1 s for `quick`).
    certificate = cbor2.loads(
        httpx.get(f"http://127.0.0.1:{server.unattested_port}/", timeout=10).content
    )
    sock = _open(server.attested_port, source)
    return pinned_client_context(certificate).wrap_socket(sock, server_hostname=SERVER_NAME)


def test_silent_connection_is_closed(quick: VeilServer) -> None:
    with _open(quick.unattested_port) as sock:
        start = time.monotonic()
        assert _closed_within(sock, 8) == b""
        assert time.monotonic() - start < 4


def test_headers_dripped_are_cut_off(quick: VeilServer) -> None:
    with _open(quick.unattested_port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        start = time.monotonic()
        closed = False
        for _ in range(40):  # one header byte every 0.2 s: 8 s if nothing stops it
            try:
                sock.sendall(b"X")
            except OSError:
                closed = True
                break
            time.sleep(0.2)
            if _closed_within(sock, 0.01) is not None:
                closed = True
                break
        assert closed
        assert time.monotonic() - start < 4


def test_oversized_headers_are_refused(quick: VeilServer) -> None:
    with _open(quick.unattested_port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 6000)
        answer = _closed_within(sock, 5)
        assert answer is not None
        assert answer.startswith(b"HTTP/1.1 431")
    with _open(quick.unattested_port) as sock:  # under the limit: served
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 3000 + b"\r\n\r\n")
        answer = _closed_within(sock, 5)
        assert answer is not None
        assert answer.startswith(b"HTTP/1.1 200")


def test_tls_handshake_has_a_deadline(quick: VeilServer) -> None:
    with _open(quick.attested_port) as sock:
        start = time.monotonic()
        assert _closed_within(sock, 8) == b""
        assert time.monotonic() - start < 4


def test_unfinished_tls_handshake_has_a_deadline(quick: VeilServer) -> None:
    with _open(quick.attested_port) as sock:
        sock.sendall(b"\x16\x03\x01\x02\x00")  # the start of a ClientHello, then nothing
        start = time.monotonic()
        assert _closed_within(sock, 8) is not None
        assert time.monotonic() - start < 4


def test_idle_keep_alive_connection_is_closed(quick: VeilServer) -> None:
    with _open(quick.unattested_port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = _closed_within(sock, 8)
        assert answer is not None
        assert answer.startswith(b"HTTP/1.1 200")


def test_slow_bodies_hold_no_slot(quick: VeilServer) -> None:
    """Eight POST /run that declare 1000 bytes and send one: others still run (the server has
    one slot), and each slow body is answered 408 once it stalls for body_read_timeout_s."""
    with quick.connect() as client, contextlib.ExitStack() as stack:
        slow = []
        for _ in range(8):
            sock = stack.enter_context(_tls(quick))
            sock.sendall(
                b"POST /run HTTP/1.1\r\nHost: veil\r\nContent-Type: application/cbor\r\n"
                b"Content-Length: 1000\r\n\r\n\xa1"
            )
            slow.append(sock)
        for _ in range(3):
            assert np.array_equal(client.predict("ok", X).output[0].as_numpy(), X)
        for sock in slow:
            answer = _closed_within(sock, 10)
            assert answer is not None
            assert answer.startswith(b"HTTP/1.1 408"), answer


def test_connections_per_client_and_in_total(capped: VeilServer) -> None:
    port = capped.unattested_port
    with contextlib.ExitStack() as stack:
        held = [stack.enter_context(_open(port, "127.0.0.2")) for _ in range(4)]
        time.sleep(0.2)
        surplus = _open(port, "127.0.0.2")
        # refused at once, not left waiting (for header_read_timeout_s=10, the default)
        assert _closed_within(surplus, 5) == b""
        surplus.close()
        # Another address still has room; the TLS ports count too, before any handshake.
        held += [stack.enter_context(_open(capped.attested_port, "127.0.0.3")) for _ in range(4)]
        # Behind those four in the same port's accept queue, so counted after them however
        # late the server gets to accept (on the other port it could be accepted first).
        with _open(capped.attested_port, "127.0.0.4") as over_total:
            assert _closed_within(over_total, 5) == b""
        assert all(_closed_within(sock, 0.05) is None for sock in held)  # these stay
        held[0].close()
        # The place comes back once the server has seen the close: ask until it has.
        deadline = time.monotonic() + 60
        answer = None
        while not answer and time.monotonic() < deadline:
            time.sleep(0.1)
            with _open(port, "127.0.0.4") as room, contextlib.suppress(OSError):
                room.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                answer = _closed_within(room, 5)
        assert answer is not None
        assert answer.startswith(b"HTTP/1.1 200")


def test_failed_handshakes_give_their_place_back(capped: VeilServer) -> None:
    for _ in range(3):  # more failures from one address than its cap: each was released
        for _ in range(4):
            with _open(capped.attested_port, "127.0.0.6") as sock:
                sock.sendall(b"GET / HTTP/1.1\r\n\r\n")  # not TLS
                assert _closed_within(sock, 5) is not None
    time.sleep(0.2)
    with _tls(capped, "127.0.0.6") as tls:
        tls.sendall(b"GET / HTTP/1.1\r\nHost: veil\r\nConnection: close\r\n\r\n")
        answer = _closed_within(tls, 5)
        assert answer is not None
        assert answer.startswith(b"HTTP/1.1 200")


def test_refused_flood_is_logged_in_a_few_lines(capped: VeilServer) -> None:
    before = len(capped.stderr())
    with contextlib.ExitStack() as stack:
        for _ in range(4):
            stack.enter_context(_open(capped.unattested_port, "127.0.0.5"))
        for _ in range(300):
            with contextlib.suppress(OSError), _open(capped.unattested_port, "127.0.0.5"):
                pass
        time.sleep(0.5)
    grown = capped.stderr()[before:]
    assert grown.count("connection refused") <= 10
    assert "Traceback" not in grown
    with capped.connect() as client:
        assert np.array_equal(client.predict("ok", X).output[0].as_numpy(), X)


def test_flood_past_the_open_file_limit(tmp_path: Path) -> None:
    """Under `ulimit -n 200` with the default caps, 400 connections: the server sizes its caps
    below the limit, never fails accept() for lack of descriptors, and serves afterwards."""
    out, err = tmp_path / "stdout.log", tmp_path / "stderr.log"
    command = [
        "prlimit", "--nofile=200:200", "--", sys.executable, "-m", "veil.cli", "serve",
        "--platform", "simulated", "--data-dir", str(tmp_path / "data"), "--host", "127.0.0.1",
        "--unattested-port", "0", "--attested-port", "0", "--management-port", "0",
        "--threads", "1", "--header-read-timeout-s", "30",
    ]  # fmt: skip
    with out.open("wb") as o, err.open("wb") as e:
        process = subprocess.Popen(command, stdout=o, stderr=e, env={**os.environ})
    try:
        ready = None
        deadline = time.monotonic() + 60
        while ready is None and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.1)
            ready = ReadyLine.find(out.read_text(errors="replace"))
        assert ready is not None, err.read_text()[-3000:]
        with contextlib.ExitStack() as stack:
            for i in range(400):
                with contextlib.suppress(OSError):
                    stack.enter_context(_open(ready.unattested_port, f"127.0.1.{i % 200 + 1}"))
            time.sleep(1.0)
        time.sleep(0.5)
        health = httpx.get(f"http://127.0.0.1:{ready.unattested_port}/healthz", timeout=10)
        assert health.status_code == 200
        log = err.read_text(errors="replace")
        assert "max_connections lowered to 126" in log
        assert "out of system resource" not in log
        assert "Traceback" not in log
        assert len(log) < 20_000
    finally:
        process.terminate()
        process.wait(STOP_TIMEOUT_S)
