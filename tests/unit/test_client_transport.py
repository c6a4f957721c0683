"""The client's HTTP/1.1 transport against loopback servers that misbehave on purpose: a total
deadline per call, capped and uncompressed answers, kept-alive connections that never fail the
next call, bodies framed as the server expects, and every broken answer a typed error."""

from __future__ import annotations

import socket
import ssl
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator

import pytest

import veil
from veil.client.transport import ERROR_BODY_BYTES, Headers, HttpClient, ResponseError, _readable
from veil.errors import BindingError, TransportError
from veil.tls import SERVER_NAME, generate_identity, pinned_client_context, server_context

Behaviour = Callable[[socket.socket], None]
OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


def read_request(conn: socket.socket, pending: bytearray) -> tuple[bytes, bytes] | None:
    """(head, body) of the next request on `conn` (content-length or chunked), None at its end."""

    def more() -> bool:
        data = conn.recv(65536)
        pending.extend(data)
        return bool(data)

    while b"\r\n\r\n" not in pending:
        if not more():
            return None
    end = pending.index(b"\r\n\r\n") + 4
    head = bytes(pending[:end])
    del pending[:end]
    lines = head.lower().split(b"\r\n")
    length = next((int(line[15:]) for line in lines if line.startswith(b"content-length:")), 0)
    if b"transfer-encoding: chunked" not in lines:
        while len(pending) < length:
            if not more():
                return None
        body = bytes(pending[:length])
        del pending[:length]
        return head, body
    body = bytearray()
    while True:
        while b"\r\n" not in pending:
            if not more():
                return None
        size_end = pending.index(b"\r\n")
        size = int(pending[:size_end], 16)
        while len(pending) < size_end + 2 + size + 2:
            if not more():
                return None
        body += pending[size_end + 2 : size_end + 2 + size]
        del pending[: size_end + 2 + size + 2]
        if size == 0:
            return head, bytes(body)


class Loopback:
    """A loopback server: each connection (in its own thread) gets `behaviour`."""

    def __init__(self, behaviour: Behaviour, context: ssl.SSLContext | None = None) -> None:
        self.behaviour = behaviour
        self.context = context
        self.accepted = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = int(self.listener.getsockname()[1])
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._serve, daemon=True)]
        self.threads[0].start()

    def url(self, path: str = "/", scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            self.accepted += 1
            thread = threading.Thread(target=self._handle, args=(conn,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        try:
            if self.context is not None:
                conn = self.context.wrap_socket(conn, server_side=True)
            with conn:
                self.behaviour(conn)
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        self.stop.set()
        self.listener.close()
        for thread in self.threads:
            thread.join(timeout=5)


@pytest.fixture
def serve() -> Iterator[Callable[..., Loopback]]:
    servers: list[Loopback] = []

    def start(behaviour: Behaviour, context: ssl.SSLContext | None = None) -> Loopback:
        servers.append(Loopback(behaviour, context))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def client() -> Iterator[HttpClient]:
    http = HttpClient(headers={"user-agent": "test", "accept-encoding": "identity"})
    yield http
    http.close()


def answering(*answers: bytes, seen: list[tuple[bytes, bytes]] | None = None) -> Behaviour:
    """Read a request, send the next answer, until `answers` run out (then wait for the close)."""

    def behaviour(conn: socket.socket) -> None:
        pending = bytearray()
        for answer in answers:
            request = read_request(conn, pending)
            if request is None:
                return
            if seen is not None:
                seen.append(request)
            conn.sendall(answer)
        read_request(conn, pending)

    return behaviour


def echo(conn: socket.socket) -> None:
    """Answer every request with its own body, for as long as the client keeps the connection."""
    pending = bytearray()
    while (request := read_request(conn, pending)) is not None:
        body = request[1]
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))


def get(http: HttpClient, url: str, *, max_body: int = 1 << 20) -> tuple[int, Headers, bytes]:
    return http.request("GET", url, timeout=30, max_body=max_body)


# ---- the total deadline -------------------------------------------------------------------------


def drip(prefix: bytes, every_s: float = 0.3, total: int = 200) -> Behaviour:
    def behaviour(conn: socket.socket) -> None:
        conn.recv(65536)
        conn.sendall(prefix)
        for _ in range(total):
            conn.sendall(b"a")
            time.sleep(every_s)

    return behaviour


def test_drip_fed_evidence_ends_at_the_deadline(serve: Callable[..., Loopback]) -> None:
    server = serve(drip(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n"))
    start = time.monotonic()
    with (
        pytest.warns(veil.SimulationModeWarning),
        pytest.raises(TransportError, match=r"ReadTimeout: .*deadline|timed out"),
    ):
        veil.connect("127.0.0.1", unattested_port=server.port, simulation=True, timeout=1.0)
    # Each byte came within a per-read time-out: only the 1 s total deadline ends this before
    # the drip's 60 s (the bound leaves room for a loaded machine).
    assert time.monotonic() - start < 15


def test_drip_fed_headers_end_at_the_deadline(
    serve: Callable[..., Loopback], client: HttpClient
) -> None:
    server = serve(drip(b"HTTP/1.1 200 OK\r\nx-pad: "))
    start = time.monotonic()
    with pytest.raises(TransportError, match=rf"{server.url()}: ReadTimeout: .*(deadline|timed)"):
        client.request("GET", server.url(), timeout=1.0, max_body=100)
    assert time.monotonic() - start < 15  # the drip lasts 60 s


def test_a_server_that_never_reads_ends_an_upload_at_the_deadline(
    serve: Callable[..., Loopback], client: HttpClient
) -> None:
    done = threading.Event()
    server = serve(lambda conn: done.wait(60))  # reads nothing
    piece = bytes(1 << 20)

    def endless() -> Iterator[bytes]:
        for _ in range(4096):  # 4 GiB: only the deadline ends it
            yield piece

    start = time.monotonic()
    try:
        with pytest.raises(TransportError, match=r"WriteTimeout: .*(deadline|timed)"):
            client.request("POST", server.url("/upload"), body=endless(), timeout=1.0, max_body=100)
    finally:
        done.set()
    assert time.monotonic() - start < 15


# ---- caps ----------------------------------------------------------------------------------------


def endless_chunks(conn: socket.socket) -> None:
    conn.recv(65536)
    conn.sendall(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
    chunk = b"10000\r\n" + b"x" * 0x10000 + b"\r\n"
    for _ in range(4096):  # 256 MiB, unless the client hangs up first
        conn.sendall(chunk)


def test_endless_evidence_stops_at_the_cap(serve: Callable[..., Loopback]) -> None:
    server = serve(endless_chunks)
    tracemalloc.start()
    try:
        with (
            pytest.warns(veil.SimulationModeWarning),
            pytest.raises(TransportError, match="larger than 524288 bytes"),
        ):
            veil.connect("127.0.0.1", unattested_port=server.port, simulation=True, timeout=30)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20


def test_a_body_within_the_cap_is_read_and_one_past_it_refused(
    serve: Callable[..., Loopback], client: HttpClient
) -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n"
    )
    server = serve(answering(chunked, chunked))
    assert get(client, server.url(), max_body=5)[2] == b"abcde"
    with pytest.raises(TransportError, match=r"/: response larger than 4 bytes"):
        get(client, server.url(), max_body=4)


def test_a_declared_length_over_the_cap_is_refused_unread(
    serve: Callable[..., Loopback], client: HttpClient
) -> None:
    server = serve(answering(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\n"))
    with pytest.raises(TransportError, match="response of 1000000 bytes, more than 4"):
        get(client, server.url(), max_body=4)


def test_an_error_body_is_capped_at_64_kib(
    serve: Callable[..., Loopback], client: HttpClient
) -> None:
    big = b"e" * (ERROR_BODY_BYTES + 1)
    small = b"e" * ERROR_BODY_BYTES
    server = serve(
        answering(
            b"HTTP/1.1 500 Oops\r\ncontent-length: %d\r\n\r\n%s" % (len(small), small),
            b"HTTP/1.1 500 Oops\r\ntransfer-encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
            % (len(big), big),
        )
    )
    status, _, body = get(client, server.url(), max_body=1 << 20)
    assert (status, body) == (500, small)
    with pytest.raises(TransportError, match=f"larger than {ERROR_BODY_BYTES} bytes"):
        get(client, server.url(), max_body=1 << 20)


def test_compressed_answers_are_refused(serve: Callable[..., Loopback], client: HttpClient) -> None:
    server = serve(
        answering(b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ncontent-length: 2\r\n\r\n\x1f\x8b")
    )
    with pytest.raises(TransportError, match="content-encoding 'gzip', expected identity"):
        get(client, server.url())


def test_an_endless_head_is_refused(serve: Callable[..., Loopback], client: HttpClient) -> None:
    def headers_forever(conn: socket.socket) -> None:
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\n")
        for n in range(100_000):
            conn.sendall(b"x-pad-%d: %s\r\n" % (n, b"p" * 100))

    server = serve(headers_forever)
    with pytest.raises(ResponseError, match="response head larger than 131072 bytes"):
        get(client, server.url())


# ---- answers: framing and broken ones ------------------------------------------------------------


def test_chunked_and_until_close_bodies(serve: Callable[..., Loopback], client: HttpClient) -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Twice: a\r\nx-twice: b\r\n\r\n"
        b"3\r\nabc\r\n1;ext=1\r\nd\r\n0\r\nx-trailer: t\r\n\r\n"
    )
    server = serve(answering(chunked, chunked))
    for _ in range(2):
        status, headers, body = get(client, server.url())
        assert (status, body) == (200, b"abcd")
        assert headers["x-twice"] == "a, b"
        assert "x-trailer" not in headers
    assert server.accepted == 1  # kept alive across chunked answers

    def until_close(conn: socket.socket) -> None:
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\n\r\nuntil the ")
        conn.sendall(b"end")

    other = serve(until_close)
    assert get(client, other.url())[2] == b"until the end"
    assert get(client, other.url())[2] == b"until the end"
    assert other.accepted == 2  # its end was the connection's


def test_an_interim_answer_is_skipped(serve: Callable[..., Loopback], client: HttpClient) -> None:
    server = serve(answering(b"HTTP/1.1 100 Continue\r\nx-early: 1\r\n\r\n" + OK))
    status, headers, body = get(client, server.url())
    assert (status, body, "x-early" in headers) == (200, b"ok", False)


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789", "closed mid-answer"),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nab", "closed mid-answer"),
        (b"HTTP/1.1 200 OK\r\ncontent-le", "closed mid-answer"),
        (b"", "closed the connection without answering"),
        (b"HTTP/1.1 2x0 OK\r\ncontent-length: 0\r\n\r\n", "malformed response"),
        (b"SSH-2.0-OpenSSH_9.6\r\n", "malformed response"),
        (b"\x15\x03\x01\x00\x02\x02\x32", "malformed response"),  # a TLS alert
        (b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab", "malformed"),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n", "malformed response"),
        (b"HTTP/1.1 101 Switching\r\nupgrade: x\r\nconnection: upgrade\r\n\r\n", "upgrade"),
    ],
)
def test_a_broken_answer_is_a_response_error(
    serve: Callable[..., Loopback], client: HttpClient, answer: bytes, error: str
) -> None:
    def once(conn: socket.socket) -> None:
        conn.recv(65536)
        conn.sendall(answer)

    server = serve(once)
    with pytest.raises(ResponseError, match=error) as info:
        get(client, server.url())
    assert str(info.value).startswith(f"{server.url()}: ")


def test_the_plain_port_hint_survives(serve: Callable[..., Loopback]) -> None:
    def tls_alert(conn: socket.socket) -> None:
        conn.recv(65536)
        conn.sendall(b"\x15\x03\x01\x00\x02\x02\x32")

    server = serve(tls_alert)
    with (
        pytest.warns(veil.SimulationModeWarning),
        pytest.raises(TransportError, match=rf"is {server.port} the server's unattested plain"),
    ):
        veil.connect("127.0.0.1", unattested_port=server.port, simulation=True, timeout=10)


def test_a_refused_connection_names_the_url(client: HttpClient) -> None:
    with socket.create_server(("127.0.0.1", 0)) as unused:
        port = unused.getsockname()[1]
    with pytest.raises(TransportError, match=rf"http://127.0.0.1:{port}/x: ConnectError: "):
        get(client, f"http://127.0.0.1:{port}/x")


# ---- kept-alive connections ----------------------------------------------------------------------


def test_a_connection_is_kept_unless_an_answer_says_otherwise(
    serve: Callable[..., Loopback], client: HttpClient
) -> None:
    server = serve(answering(OK, OK, OK))
    assert [get(client, server.url())[2] for _ in range(3)] == [b"ok"] * 3
    assert server.accepted == 1
    closing = b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok"
    old = b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok"
    for answer in (closing, old):
        other = serve(answering(answer, answer))
        assert [get(client, other.url())[2] for _ in range(2)] == [b"ok"] * 2
        assert other.accepted == 2


def idle_connection(client: HttpClient) -> socket.socket:
    ((conn,),) = client._idle.values()
    return conn.sock


def wait_readable(sock: socket.socket) -> None:
    until = time.monotonic() + 20
    while not _readable(sock):
        assert time.monotonic() < until, "the server's close never arrived"
        time.sleep(0.01)


def test_a_connection_the_server_closed_while_idle_fails_no_call(
    serve: Callable[..., Loopback], client: HttpClient
) -> None:
    # The server's keep-alive timeout: it answers once, then closes the idle connection.
    def once(conn: socket.socket) -> None:
        read_request(conn, bytearray())
        conn.sendall(OK)

    server = serve(once)
    for _ in range(3):
        assert get(client, server.url())[2] == b"ok"
        wait_readable(idle_connection(client))
    assert server.accepted == 3


def test_junk_on_an_idle_connection_discards_it(
    serve: Callable[..., Loopback], client: HttpClient
) -> None:
    def junk_after(conn: socket.socket) -> None:
        if server.accepted > 1:
            echo(conn)
            return
        read_request(conn, bytearray())
        conn.sendall(OK)
        time.sleep(0.05)
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nstale")
        echo(conn)

    server = serve(junk_after)
    assert get(client, server.url())[2] == b"ok"
    wait_readable(idle_connection(client))
    assert client.request("POST", server.url(), body=b"fresh", timeout=30, max_body=99)[2] == (
        b"fresh"
    )
    assert server.accepted == 2


def test_bytes_after_an_answer_are_not_read_as_the_next_one(
    serve: Callable[..., Loopback], client: HttpClient
) -> None:
    server = serve(answering(OK + b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nstale", OK))
    assert get(client, server.url())[2] == b"ok"
    assert get(client, server.url())[2] == b"ok"
    assert server.accepted == 2


def test_threads_share_one_client(serve: Callable[..., Loopback], client: HttpClient) -> None:
    server = serve(echo)
    failures: list[BaseException] = []

    def calls(n: int) -> None:
        try:
            for i in range(25):
                body = b"thread %d call %d" % (n, i)
                status, _, answer = client.request(
                    "POST", server.url("/run"), body=body, timeout=30, max_body=99
                )
                assert (status, answer) == (200, body)
        except BaseException as exc:  # reported below, with the thread's own failure
            failures.append(exc)

    threads = [threading.Thread(target=calls, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not failures, failures
    assert 1 <= server.accepted <= 8  # no more connections than calls in flight at once
    assert sum(len(conns) for conns in client._idle.values()) == server.accepted


def test_a_closed_client_refuses_calls(serve: Callable[..., Loopback], client: HttpClient) -> None:
    server = serve(answering(OK))
    get(client, server.url())
    client.close()
    assert client._idle == {}
    with pytest.raises(TransportError, match="the client is closed"):
        get(client, server.url())


# ---- requests -----------------------------------------------------------------------------------


def test_the_request_head(serve: Callable[..., Loopback], client: HttpClient) -> None:
    seen: list[tuple[bytes, bytes]] = []
    server = serve(answering(OK, OK, seen=seen))
    client.request(
        "POST",
        server.url("/run?x=1"),
        body=b"body",
        headers={"User-Agent": "mine", "x-extra": "1", "content-length": "99"},
        timeout=30,
        max_body=9,
    )
    get(client, server.url("/"))
    (post_head, post_body), (get_head, get_body) = seen
    assert post_head == (
        b"POST /run?x=1 HTTP/1.1\r\nhost: 127.0.0.1:%d\r\naccept-encoding: identity\r\n"
        b"user-agent: mine\r\nx-extra: 1\r\ncontent-length: 4\r\n\r\n" % server.port
    )
    assert post_body == b"body"
    assert get_head == (
        b"GET / HTTP/1.1\r\nhost: 127.0.0.1:%d\r\nuser-agent: test\r\n"
        b"accept-encoding: identity\r\n\r\n" % server.port
    )
    assert get_body == b""


@pytest.mark.parametrize(
    "headers",
    [{"x-a": "1\r\nx-b: 2"}, {"x-a\r\nx-b": "1"}, {"x a": "1"}, {"": "1"}, {"x-a": "\u20ac"}],
)
def test_a_header_that_breaks_the_head_is_refused_unsent(
    serve: Callable[..., Loopback], client: HttpClient, headers: dict[str, str]
) -> None:
    server = serve(answering(OK))
    with pytest.raises(TransportError, match=r"header|latin-1"):
        client.request("GET", server.url(), headers=headers, timeout=30, max_body=9)
    assert server.accepted == 0


def test_streamed_bodies_are_sized_when_told_else_chunked(
    serve: Callable[..., Loopback], client: HttpClient
) -> None:
    seen: list[tuple[bytes, bytes]] = []
    server = serve(answering(OK, OK, seen=seen))
    pieces = [b"head", b"", b"x" * 100_000, b"tail"]
    sized = {"content-length": str(sum(map(len, pieces)))}
    client.request("POST", server.url(), body=iter(pieces), headers=sized, timeout=30, max_body=9)
    client.request("POST", server.url(), body=iter(pieces), timeout=30, max_body=9)
    (sized_head, sized_body), (chunked_head, chunked_body) = seen
    assert b"content-length: 100008\r\n" in sized_head
    assert b"transfer-encoding" not in sized_head
    assert b"transfer-encoding: chunked\r\n" in chunked_head
    assert b"content-length" not in chunked_head
    assert sized_body == chunked_body == b"".join(pieces)
    assert server.accepted == 1


@pytest.mark.parametrize(
    ("declared", "error"), [("3", "more than its"), ("9", "4 bytes, expected")]
)
def test_a_streamed_body_must_match_its_content_length(
    serve: Callable[..., Loopback], client: HttpClient, declared: str, error: str
) -> None:
    server = serve(answering(OK))
    with pytest.raises(TransportError, match=error):
        client.request(
            "POST",
            server.url(),
            body=iter([b"ab", b"cd"]),
            headers={"content-length": declared},
            timeout=30,
            max_body=9,
        )


def test_an_early_answer_is_read_after_the_server_stopped_reading(
    serve: Callable[..., Loopback], client: HttpClient
) -> None:
    # A server refuses a body by its declared size (413) and closes without reading it.
    def refuse(conn: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            head += conn.recv(1)
        conn.sendall(b"HTTP/1.1 413 Too Large\r\nconnection: close\r\ncontent-length: 3\r\n\r\nbig")
        conn.shutdown(socket.SHUT_WR)
        time.sleep(2)

    server = serve(refuse)
    status, _, body = client.request(
        "POST", server.url(), body=bytes(16 << 20), timeout=30, max_body=9
    )
    assert (status, body) == (413, b"big")


# ---- TLS -----------------------------------------------------------------------------------------


def test_tls_with_the_pinned_certificate_and_server_name(serve: Callable[..., Loopback]) -> None:
    identity = generate_identity()
    names: list[str | None] = []
    context = server_context(identity)

    def record(sock: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
        names.append(name)

    context.sni_callback = record
    server = serve(answering(OK, OK), context)
    pinned = HttpClient(
        context=pinned_client_context(identity.certificate_der), server_name=SERVER_NAME
    )
    try:
        for _ in range(2):
            assert get(pinned, server.url(scheme="https"))[2] == b"ok"
    finally:
        pinned.close()
    assert names == [SERVER_NAME]  # one handshake, for the name the certificate holds
    other = HttpClient(
        context=pinned_client_context(generate_identity().certificate_der),
        server_name=SERVER_NAME,
    )
    try:
        with pytest.raises(BindingError, match="certificate verification failed"):
            get(other, server.url(scheme="https"))
    finally:
        other.close()


def test_https_without_a_context_is_refused(client: HttpClient) -> None:
    with pytest.raises(ValueError, match="this client has no TLS context"):
        get(client, "https://127.0.0.1:1/")


# ---- headers ------------------------------------------------------------------------------------


def test_headers_are_a_read_only_mapping_by_any_case() -> None:
    headers = Headers([("Retry-After", "2"), ("X-A", "1"), ("x-a", "2")])
    assert headers.get("retry-after") == headers["RETRY-AFTER"] == "2"
    assert headers["x-a"] == "1, 2"
    assert "X-a" in headers
    assert 3 not in headers
    assert dict(headers) == {"retry-after": "2", "x-a": "1, 2"}
    assert len(headers) == 2
    assert repr(headers) == "Headers(['retry-after', 'x-a'])"  # names only
    with pytest.raises(TypeError):
        headers["x-b"] = "3"  # type: ignore[index]
