"""`veil proxy` end to end: plain HTTP (httpx, curl, tritonclient) reaches a model on a simulated
server through the proxy; a server that fails verification gets no request at all; a restarted
server (new certificate) is verified again.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from onnx_models import dynamic_batch_model
from server_process import ServerFactory, VeilServer

_READY = re.compile(r"serving the Open Inference Protocol on http://127\.0\.0\.1:(\d+)")
START_TIMEOUT_S = 60
X = np.arange(8, dtype=np.float32).reshape(2, 4)
INFER = {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": X.ravel().tolist()}]}


@dataclass
class Proxy:
    process: subprocess.Popen[bytes]
    log: Path
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(15)
        if self.process.stdout is not None:
            self.process.stdout.close()


ProxyFactory = Callable[..., Proxy]


@pytest.fixture
def start_proxy(tmp_path: Path) -> Iterator[ProxyFactory]:
    started: list[Proxy] = []

    def start(server: VeilServer, *extra: str, env: dict[str, str] | None = None) -> Proxy:
        log = tmp_path / f"proxy-{len(started)}.log"
        ports = [f"--{name.replace('_', '-')}={port}" for name, port in server.ports.items()]
        command = [sys.executable, "-m", "veil.cli", "proxy", "--server", "127.0.0.1"]
        command += ["--listen", "127.0.0.1:0", *ports, *extra]
        with log.open("wb") as err:
            process = subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=err,
                env={**os.environ, **(env or {})},
            )
        assert process.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        line = b""
        while time.monotonic() < deadline and process.poll() is None:
            line = process.stdout.readline()
            found = _READY.search(line.decode())
            if found:
                proxy = Proxy(process, log, int(found.group(1)))
                started.append(proxy)
                return proxy
        process.kill()
        process.wait(15)
        process.stdout.close()
        pytest.fail(f"veil proxy did not start: {log.read_text(errors='replace')[-3000:]}")

    yield start
    for proxy in started:
        proxy.stop()


def _attested_requests(server: VeilServer) -> list[str]:
    return [line for line in server.stderr().splitlines() if "port=attested" in line]


@pytest.fixture
def served(server_factory: ServerFactory) -> VeilServer:
    server = server_factory("--log-level", "info")
    with server.connect() as client:
        client.upload_model(dynamic_batch_model().SerializeToString(), model_id="dense")
    return server


def _expected(server: VeilServer) -> list[float]:
    with server.connect() as client:
        result: list[float] = client.predict("dense", X).output[0].as_numpy().ravel().tolist()
    return result


def test_plain_http_through_the_proxy(served: VeilServer, start_proxy: ProxyFactory) -> None:
    proxy = start_proxy(served, "--simulation")
    assert "NOTHING" in proxy.stderr()  # the simulation banner
    reply = httpx.post(f"{proxy.url}/v2/models/dense/infer", json=INFER, timeout=30)
    assert reply.status_code == 200, reply.text
    (out,) = reply.json()["outputs"]
    assert out["shape"] == [2, 2]
    assert np.allclose(out["data"], _expected(served))
    meta = httpx.get(f"{proxy.url}/v2/models/dense", timeout=30).json()
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert httpx.get(f"{proxy.url}/v2/health/ready", timeout=30).json() == {"ready": True}
    # The server's errors come back as they are.
    missing = httpx.post(f"{proxy.url}/v2/models/ghost/infer", json=INFER, timeout=30)
    assert missing.status_code == 404
    assert missing.json() == {"error": "unknown model id 'ghost'"}
    # Only the protocol's routes: BlindAI's CBOR /run is not relayed.
    assert httpx.post(f"{proxy.url}/run", content=b"", timeout=30).status_code == 404
    # The request line and headers are capped (16 KiB): 431, then closed; under it, served.
    assert _raw_head(proxy, 20_000).startswith(b"HTTP/1.1 431 ")
    assert _raw_head(proxy, 8_000).startswith(b"HTTP/1.1 200 ")


def _raw_head(proxy: Proxy, pad: int) -> bytes:
    """What the proxy answers a GET with a `pad`-byte header, up to its close."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as sock:
        sock.sendall(
            b"GET /v2/health/ready HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nX-Pad: "
            + b"a" * pad
            + b"\r\n\r\n"
        )
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_through_the_proxy(served: VeilServer, start_proxy: ProxyFactory) -> None:
    proxy = start_proxy(served, "--simulation")
    curl = ["curl", "-sS", "--max-time", "30", "-H", "Content-Type: application/json"]
    result = subprocess.run(
        [*curl, "-d", json.dumps(INFER), f"{proxy.url}/v2/models/dense/infer"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    (out,) = json.loads(result.stdout)["outputs"]
    assert np.allclose(out["data"], _expected(served))


def test_tritonclient_through_the_proxy(served: VeilServer, start_proxy: ProxyFactory) -> None:
    triton = pytest.importorskip("tritonclient.http")
    proxy = start_proxy(served, "--simulation")
    client = triton.InferenceServerClient(url=f"127.0.0.1:{proxy.port}")
    try:
        assert client.is_server_live()
        assert client.is_model_ready("dense")
        assert client.get_model_metadata("dense")["inputs"][0]["shape"] == [-1, 4]
        for binary in (True, False):
            tensor = triton.InferInput("x", [2, 4], "FP32")
            tensor.set_data_from_numpy(X, binary_data=binary)
            wanted = [triton.InferRequestedOutput("y", binary_data=binary)]
            result = client.infer("dense", [tensor], outputs=wanted)
            assert np.allclose(result.as_numpy("y").ravel(), _expected(served))
    finally:
        client.close()


WRONG_POLICY = '[sgx]\nmr_enclave = ["' + "ab" * 32 + '"]\n'


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--policy", "{policy}"], "the server is simulated"),
        (["--simulation", "--policy", "{policy}"], "mr_enclave"),
    ],
    ids=["hardware-policy", "wrong-measurement"],
)
def test_a_server_failing_verification_gets_no_request(
    served: VeilServer, start_proxy: ProxyFactory, tmp_path: Path, args: list[str], words: str
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(WRONG_POLICY)
    before = _attested_requests(served)  # the fixture's own upload
    proxy = start_proxy(served, *[a.format(policy=policy) for a in args])
    for _ in range(2):
        reply = httpx.post(f"{proxy.url}/v2/models/dense/infer", json=INFER, timeout=30)
        assert reply.status_code == 502
        assert reply.headers["content-type"] == "application/json"
        error = reply.json()["error"]
        assert error.startswith("veil proxy: the server failed verification")
        assert words in error
    assert httpx.get(f"{proxy.url}/v2/health/live", timeout=30).status_code == 502
    assert _attested_requests(served) == before


def test_a_tampered_certificate_gets_no_request(
    server_factory: ServerFactory, start_proxy: ProxyFactory
) -> None:
    # The test bed's server whose evidence binds another certificate than the one it serves.
    server = server_factory(
        "--hazmat-test-tamper-certificate", "--log-level", "info", module="veil.testing.emulated"
    )
    proxy = start_proxy(server, "--simulation")
    reply = httpx.post(f"{proxy.url}/v2/models/dense/infer", json=INFER, timeout=30)
    assert reply.status_code == 502
    assert "certificate binding" in reply.json()["error"]
    assert _attested_requests(server) == []


def test_a_restarted_server_is_verified_again(
    server_factory: ServerFactory, start_proxy: ProxyFactory, tmp_path: Path
) -> None:
    data_dir = tmp_path / "kept"
    first = server_factory("--log-level", "info", data_dir=data_dir)
    with first.connect() as client:
        client.upload_model(dynamic_batch_model().SerializeToString(), model_id="dense")
    proxy = start_proxy(first, "--simulation")
    url = f"{proxy.url}/v2/models/dense/infer"
    assert httpx.post(url, json=INFER, timeout=30).status_code == 200
    ports = [f"--{name.replace('_', '-')}={port}" for name, port in first.ports.items()]
    assert first.stop() == 0
    down = httpx.post(url, json=INFER, timeout=30)
    assert down.status_code == 503
    assert "unreachable" in down.json()["error"]
    # Same ports and data, a new TLS key and evidence.
    second = server_factory("--log-level", "info", *ports, data_dir=data_dir)
    reply = httpx.post(url, json=INFER, timeout=30)
    assert reply.status_code == 200, reply.text
    log = proxy.stderr()
    assert "the server presents another certificate: verifying it again" in log
    assert log.count("server verified") == 2
    assert len(_attested_requests(second)) >= 1
