"""What the Open Inference Protocol and `veil proxy` cost next to BlindAI's CBOR ``/run``.

    python bench/bench_proxy.py [--requests 50] [--elements 16 50176]

Starts a simulated ``veil serve`` and a ``veil proxy`` on loopback, uploads an identity model
per tensor size (float32, shape [1, N]) and times sequential requests, one client, four ways:
the Python client (CBOR), OIP JSON and OIP binary straight to the attested port (pinned TLS),
and OIP JSON and binary through the proxy (plain HTTP to loopback, then the proxy's attested
channel). Prints median and p90 latency per way and size.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable

import cbor2
import httpx
import numpy as np
from onnx import TensorProto, helper

import veil
from veil.testing.local_server import LocalServer
from veil.tls import SERVER_NAME, pinned_client_context

_SNI = {"sni_hostname": SERVER_NAME}


def _identity(n: int) -> bytes:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "id", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _time(call: Callable[[], object], requests: int) -> tuple[float, float]:
    call()  # warm: connections, sessions
    samples = []
    for _ in range(requests):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1e3)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.9) - 1]


def _start_proxy(server: LocalServer) -> tuple[subprocess.Popen[str], str]:
    ports = [f"--{name.replace('_', '-')}={port}" for name, port in server.ports.items()]
    proxy = subprocess.Popen(
        [
            *(sys.executable, "-m", "veil", "proxy", "--server", server.host, "--simulation"),
            *("--listen", "127.0.0.1:0", *ports),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proxy.stdout is not None
    found = re.search(r"http://\S+", proxy.stdout.readline())
    if found is None:
        proxy.kill()
        raise SystemExit("veil proxy did not start")
    return proxy, found.group(0)


def _bodies(n: int) -> tuple[np.ndarray, bytes, bytes, dict[str, str]]:
    """(input, OIP JSON body, OIP binary body, its header) for a float32 [1, n] input."""
    x = np.random.default_rng(0).standard_normal((1, n)).astype(np.float32)
    tensor = {"name": "x", "shape": [1, n], "datatype": "FP32"}
    as_json = json.dumps({"inputs": [{**tensor, "data": x.ravel().tolist()}]}).encode()
    header = json.dumps(
        {
            "inputs": [{**tensor, "parameters": {"binary_data_size": x.nbytes}}],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    return x, as_json, header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header))}


def _post(http: httpx.Client, url: str, body: bytes, headers: dict[str, str]) -> None:
    extensions = _SNI if url.startswith("https") else {}
    http.post(url, content=body, headers=headers, extensions=extensions).raise_for_status()


def _ways(
    client: veil.Connection,
    direct: httpx.Client,
    plain: httpx.Client,
    attested: str,
    proxy_url: str,
    n: int,
) -> list[tuple[str, Callable[[], object]]]:
    model_id = f"id-{n}"
    client.upload_model(_identity(n), model_id=model_id)
    x, as_json, binary, binary_headers = _bodies(n)
    path = f"/v2/models/{model_id}/infer"
    return [
        ("CBOR /run (veil.connect)", lambda: client.predict(model_id, x)),
        ("OIP JSON, direct", lambda: _post(direct, attested + path, as_json, {})),
        ("OIP binary, direct", lambda: _post(direct, attested + path, binary, binary_headers)),
        ("OIP JSON, via proxy", lambda: _post(plain, proxy_url + path, as_json, {})),
        ("OIP binary, via proxy", lambda: _post(plain, proxy_url + path, binary, binary_headers)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50, help="timed requests per cell")
    parser.add_argument(
        "--elements", type=int, nargs="+", default=[16, 50176], help="float32 elements per input"
    )
    args = parser.parse_args()
    warnings.simplefilter("ignore", veil.SimulationModeWarning)
    rows = []
    with LocalServer(extra_args=["--threads", "1"]) as server:
        proxy, proxy_url = _start_proxy(server)
        certificate = cbor2.loads(httpx.get(f"http://127.0.0.1:{server.unattested_port}/").content)
        direct = httpx.Client(verify=pinned_client_context(certificate), timeout=60)
        plain = httpx.Client(timeout=60)
        attested = f"https://{server.host}:{server.attested_port}"
        try:
            with veil.connect(server.host, simulation=True, **server.ports) as client:
                for n in args.elements:
                    for name, call in _ways(client, direct, plain, attested, proxy_url, n):
                        median, p90 = _time(call, args.requests)
                        rows.append((n, name, median, p90))
        finally:
            direct.close()
            plain.close()
            proxy.terminate()
            proxy.wait(10)
            if proxy.stdout is not None:
                proxy.stdout.close()
    print(f"{'elements':>9}  {'way':<26} {'median ms':>10} {'p90 ms':>8}")
    for n, name, median, p90 in rows:
        print(f"{n:>9}  {name:<26} {median:>10.2f} {p90:>8.2f}")


if __name__ == "__main__":
    main()
