"""`veil.proxy` in process: what is relayed, what is refused, when the server is verified again.

The upstream connections are fakes recording what reaches them; the end-to-end behaviour against
a real server is in tests/integration/test_proxy.py.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.testclient import TestClient

from veil.client.transport import Headers
from veil.commands.proxy import listen, parse_listen
from veil.errors import BindingError, PolicyError, TransportError
from veil.proxy import AttestedUpstream, ProxySettings, build_proxy_app


class FakeConnection:
    """Stands in for a verified `veil.Connection`: records what it is asked to send."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.sent: list[tuple[str, str, bytes | None, dict[str, str]]] = []
        self.fail = fail
        self.closed = False
        self.verified = type("Verified", (), {"platform": type("P", (), {"value": "fake"})()})()

    def forward(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str]
    ) -> tuple[int, Headers, bytes]:
        if self.fail is not None:
            raise self.fail
        self.sent.append((method, path, body, headers))
        answer = Headers([("Content-Type", "application/json"), ("set-cookie", "no")])
        return 200, answer, b'{"ok": true}'

    def close(self) -> None:
        self.closed = True


class Attester:
    """The `connect` callable: hands out the next prepared connection, or raises."""

    def __init__(self, *outcomes: FakeConnection | BaseException) -> None:
        self.outcomes = list(outcomes)
        self.calls = 0

    def __call__(self) -> Any:
        self.calls += 1
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def client_for(upstream: AttestedUpstream, **settings: Any) -> TestClient:
    app = build_proxy_app(upstream, ProxySettings(**settings))
    return TestClient(app, base_url="http://127.0.0.1:8000")


@pytest.fixture
def good() -> FakeConnection:
    return FakeConnection()


@pytest.fixture
def http(good: FakeConnection) -> Iterator[TestClient]:
    with client_for(AttestedUpstream(Attester(good))) as client:
        yield client


def test_relays_only_the_protocol_and_its_headers(http: TestClient, good: FakeConnection) -> None:
    reply = http.post(
        "/v2/models/m.1/infer",
        content=b"{}",
        headers={
            "content-type": "application/json",
            "x-veil-api-key": "veil_caller_key",
            "cookie": "c=1",
            "x-request-id": "trace-1",
        },
    )
    assert reply.status_code == 200
    assert reply.json() == {"ok": True}
    assert "set-cookie" not in reply.headers
    ((method, path, body, headers),) = good.sent
    assert (method, path, body) == ("POST", "/v2/models/m.1/infer", b"{}")
    # The caller's own key header is not relayed: the proxy's connection carries the key.
    assert headers == {"content-type": "application/json", "x-request-id": "trace-1"}
    for path in (
        "/v2",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/m",
        "/v2/models/m/ready",
    ):
        assert http.get(path).status_code == 200
    assert [sent[1] for sent in good.sent[1:]] == [
        "/v2",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/m",
        "/v2/models/m/ready",
    ]


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/run"), ("POST", "/upload"), ("GET", "/models"), ("GET", "/v2/models/m/infer")],
)
def test_other_routes_are_not_relayed(
    http: TestClient, good: FakeConnection, method: str, path: str
) -> None:
    assert http.request(method, path).status_code in (404, 405)
    assert good.sent == []


def test_a_model_name_is_requoted(http: TestClient, good: FakeConnection) -> None:
    assert http.get("/v2/models/a%3Fb%20c").status_code == 200
    assert good.sent[0][1] == "/v2/models/a%3Fb%20c"


def test_foreign_hosts_and_web_pages_are_refused(http: TestClient, good: FakeConnection) -> None:
    rebound = http.get("/v2", headers={"host": "attacker.example:8000"})
    assert rebound.status_code == 403
    assert "loopback" in rebound.json()["error"]
    page = http.post("/v2/models/m/infer", content=b"{}", headers={"origin": "https://x.example"})
    assert page.status_code == 403
    assert "Origin" in page.json()["error"]
    assert good.sent == []
    for host in ("localhost:8000", "127.0.0.1", "[::1]:8000"):
        assert http.get("/v2", headers={"host": host}).status_code == 200


def test_bodies_are_bounded(good: FakeConnection) -> None:
    with client_for(AttestedUpstream(Attester(good)), max_body_bytes=10) as http:
        assert http.post("/v2/models/m/infer", content=b"x" * 10).status_code == 200

        def chunks() -> Iterator[bytes]:
            yield b"x" * 6
            yield b"x" * 6

        streamed = http.post("/v2/models/m/infer", content=chunks())
        assert streamed.status_code == 413
        assert http.post("/v2/models/m/infer", content=b"x" * 11).status_code == 413
    assert len(good.sent) == 1


def test_failed_verification_answers_502_and_sends_nothing() -> None:
    clock = Clock()
    attester = Attester(PolicyError("mr_enclave: got 01, expected 02"), FakeConnection())
    upstream = AttestedUpstream(attester, retry_s=1.0, clock=clock)
    with client_for(upstream) as http:
        for _ in range(3):
            reply = http.post("/v2/models/m/infer", content=b"{}")
            assert reply.status_code == 502
            assert reply.json() == {
                "error": "veil proxy: the server failed verification: "
                "mr_enclave: got 01, expected 02"
            }
        # Within retry_s the same error is answered without attesting again.
        assert attester.calls == 1
        clock.now += 1.0
        assert http.post("/v2/models/m/infer", content=b"{}").status_code == 200
    assert attester.calls == 2
    assert upstream.attestations == 1


def test_a_new_certificate_is_verified_before_the_request_is_sent() -> None:
    old = FakeConnection(fail=BindingError("the server's certificate is not the attested one"))
    new = FakeConnection()
    upstream = AttestedUpstream(Attester(old, new))
    with client_for(upstream) as http:
        assert http.post("/v2/models/m/infer", content=b"{}").status_code == 200
    assert old.closed
    assert len(new.sent) == 1
    assert upstream.attestations == 2


def test_a_new_certificate_that_fails_verification_is_not_sent_to() -> None:
    old = FakeConnection(fail=BindingError("the server's certificate is not the attested one"))
    attester = Attester(old, PolicyError("mr_td: got 01, expected 02"))
    with client_for(AttestedUpstream(attester)) as http:
        reply = http.post("/v2/models/m/infer", content=b"{}")
    assert reply.status_code == 502
    assert "mr_td" in reply.json()["error"]
    assert old.sent == []


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (TransportError("https://h:9924/v2: ConnectError: refused"), 503),
        (TransportError("https://h:9924/v2: ReadTimeout: the call's total deadline passed"), 504),
    ],
)
def test_an_unreachable_server(error: TransportError, status: int) -> None:
    with client_for(AttestedUpstream(Attester(FakeConnection(fail=error)))) as http:
        reply = http.get("/v2")
    assert reply.status_code == status
    assert "unreachable" in reply.json()["error"]


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("127.0.0.1:8000", ("127.0.0.1", 8000)), ("[::1]:0", ("::1", 0)), ("localhost:1", None)],
)
def test_listen_accepts_loopback(text: str, parsed: tuple[str, int] | None) -> None:
    assert parse_listen(text) == (parsed or ("localhost", 1))


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("0.0.0.0:8000", "expected a loopback address"),
        ("10.0.0.5:8000", "expected a loopback address"),
        ("example.com:8000", "expected a loopback address"),
        ("127.0.0.1", "expected ADDR:PORT"),
        ("127.0.0.1:99999", "expected ADDR:PORT"),
    ],
)
def test_listen_refuses_the_rest(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        parse_listen(text)


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="max_body_bytes=0"):
        ProxySettings(max_body_bytes=0)


def test_accepted_connections_send_without_delay() -> None:
    with listen("127.0.0.1", 0) as listener, socket.create_connection(listener.getsockname()):
        accepted, _ = listener.accept()
        with accepted:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_a_stalled_body_times_out(good: FakeConnection) -> None:
    app = build_proxy_app(AttestedUpstream(Attester(good)), ProxySettings(body_read_timeout_s=0.1))
    sent: list[dict[str, Any]] = []
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v2/models/m/infer",
        "raw_path": b"/v2/models/m/infer",
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1:8000")],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }
    pieces = [{"type": "http.request", "body": b"{", "more_body": True}]

    async def receive() -> dict[str, Any]:
        if pieces:
            return pieces.pop()
        await asyncio.sleep(30)  # the caller stops sending
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(asyncio.wait_for(app(scope, receive, send), 10))
    assert sent[0]["status"] == 408
    assert b"body not received within 0.1 s" in sent[1]["body"]
    assert good.sent == []
