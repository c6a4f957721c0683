"""Attacks on request decoding against a real server: each bounded, each answered with a 4xx
while the other ports keep answering."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Iterator

import cbor2
import numpy as np
import pytest
from onnx_models import identity_model
from server_process import RawClient, VeilServer, start_server

import veil
from veil import wire
from veil.tensors import DatumType, WireTensor
from veil.tls import SERVER_NAME, pinned_client_context

pytestmark = pytest.mark.slow

RUN_LIMIT = 4 << 20


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VeilServer]:
    """A server taking 4 MiB run bodies: room for a costly one."""
    root = tmp_path_factory.mktemp("veil-decoding")
    running = start_server(
        root / "data", root / "log", "--max-run-bytes", str(RUN_LIMIT), "--log-level", "info"
    )
    yield running
    assert running.stop() == 0, running.stderr()[-3000:]


@pytest.fixture(scope="module")
def raw(big: VeilServer) -> Iterator[RawClient]:
    client = RawClient(big)
    yield client
    client.close()


def _worst_latency_while(raw: RawClient, body: bytes) -> tuple[int, float]:
    """(status of POST /run with `body`, slowest GET /healthz on the plain port meanwhile)."""
    result: dict[str, int] = {}

    def post() -> None:
        result["status"] = raw.post("attested", "/run", body).status_code

    thread = threading.Thread(target=post)
    thread.start()
    worst = 0.0
    while True:
        start = time.perf_counter()
        assert raw.get("unattested", "/healthz").status_code == 200
        worst = max(worst, time.perf_counter() - start)
        if not thread.is_alive():
            break
        time.sleep(0.02)
    thread.join()
    return result["status"], worst


def test_mime_tag_body_does_not_freeze_the_other_ports(raw: RawClient) -> None:
    # Tag 36 sent each item through Python's email parser on the event loop: ~2 s per MiB here.
    item = cbor2.CBORTag(36, "a: b\n" * 20)
    body = cbor2.dumps({"model_id": "x", "inputs": [item] * 36_000})
    assert len(body) < RUN_LIMIT
    status, worst = _worst_latency_while(raw, body)
    assert status == 400
    assert worst < 1.0


def test_body_of_many_items_is_refused_without_stalling(raw: RawClient) -> None:
    body = cbor2.dumps({"model_id": "x", "inputs": [[]] * (RUN_LIMIT // 2)})
    status, worst = _worst_latency_while(raw, body)
    assert status == 400
    assert worst < 1.0


def test_huge_integer_is_400(raw: RawClient) -> None:
    response = raw.post("attested", "/run", cbor2.dumps({"model_id": 10**5000, "inputs": []}))
    assert response.status_code == 400
    assert "tag 2" in wire.decode_error(response.content)


def _run_body(model_id: str, model_hash: str) -> bytes:
    x = np.ones((2, 3), np.float32)
    tensor = WireTensor((2, 3), DatumType.F32, "x", x.tobytes())
    return wire.encode_run_request(
        model_id=model_id, model_hash=model_hash, inputs=[tensor], client_info={}
    )


def test_model_hash_pins_the_model_run_by_id(big: VeilServer, raw: RawClient) -> None:
    blob = identity_model("float32").SerializeToString()
    with big.connect() as client:
        client.upload_model(blob, model_id="pinned")
    right = hashlib.sha256(blob).hexdigest()
    assert raw.post("attested", "/run", _run_body("pinned", right)).status_code == 200
    wrong = raw.post("attested", "/run", _run_body("pinned", "00" * 32))
    assert wrong.status_code == 404
    assert "does not have hash" in wire.decode_error(wrong.content)
    # The hash alone (BlindAI) and the id alone still work.
    assert raw.post("attested", "/run", _run_body("", right)).status_code == 200
    assert raw.post("attested", "/run", _run_body("pinned", "")).status_code == 200


def test_client_disconnect_is_not_an_error(big: VeilServer, raw: RawClient) -> None:
    certificate = cbor2.loads(raw.get("unattested", "/").content)
    context = pinned_client_context(certificate)
    with (
        socket.create_connection(("127.0.0.1", big.attested_port), timeout=10) as sock,
        context.wrap_socket(sock, server_hostname=SERVER_NAME) as tls,
    ):
        tls.sendall(
            b"POST /run HTTP/1.1\r\nhost: x\r\ncontent-length: 100000\r\n\r\n" + b"\xa1" * 10
        )
        time.sleep(0.3)
    deadline = time.monotonic() + 60
    while "client disconnected" not in big.stderr() and time.monotonic() < deadline:
        time.sleep(0.1)
    log = big.stderr()
    assert "client disconnected" in log
    assert "ClientDisconnect" not in log
    assert "Traceback" not in log
    # and the server still serves
    assert raw.get("unattested", "/healthz").status_code == 200


def test_prediction_over_max_response_bytes_is_refused(big: VeilServer) -> None:
    blob = identity_model("float32", (64, 64)).SerializeToString()
    x = np.ones((64, 64), np.float32)  # a 16 KiB answer
    with big.connect() as client:
        client.upload_model(blob, model_id="wide")
    with big.connect(max_response_bytes=64 << 10) as client:
        assert client.predict("wide", x).output[0].as_numpy().shape == (64, 64)
    with big.connect(max_response_bytes=4 << 10) as client:
        with pytest.raises(veil.TransportError, match="more than 4096"):
            client.predict("wide", x)
        # the connection stays usable for answers within the limit
        with pytest.raises(veil.NotFoundError):
            client.predict("no-such-model", x)
