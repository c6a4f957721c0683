"""The HTTP getter of the collateral services: status errors raise, bodies are bounded."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from veil.errors import CollateralError
from veil.providers.pcs import httpx_getter

BODY = b"x" * 1000


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/missing":
            self.send_error(404)
            return
        self.send_response(200)
        if self.path != "/chunked":
            self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def test_body_within_the_bound_is_returned(base_url: str) -> None:
    body, headers = httpx_getter(max_bytes=len(BODY))(f"{base_url}/ok")
    assert body == BODY
    assert headers["content-length"] == str(len(BODY))


def test_declared_length_over_the_bound_is_refused_unread(base_url: str) -> None:
    with pytest.raises(CollateralError, match="got 1000 bytes, expected at most 999"):
        httpx_getter(max_bytes=len(BODY) - 1)(f"{base_url}/ok")


def test_undeclared_length_over_the_bound_is_refused(base_url: str) -> None:
    with pytest.raises(CollateralError, match="more than 999 bytes"):
        httpx_getter(max_bytes=len(BODY) - 1)(f"{base_url}/chunked")


def test_http_error_status_raises(base_url: str) -> None:
    with pytest.raises(httpx.HTTPStatusError):
        httpx_getter()(f"{base_url}/missing")
