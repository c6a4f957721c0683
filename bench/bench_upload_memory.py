"""Where an upload's memory goes: the server's peak RSS and the admission child's, per client.

A generated model (a chain of fp32 MatMuls with random weights, no torch) is uploaded to a fresh
``veil serve --platform simulated`` by veil's client (the model as one CBOR byte string, sent in
pieces) and as BlindAI 0.6's client sends it (the model as a CBOR array of integers, built here
with numpy: the genuine 2023 client takes minutes for this size). For each:

- server peak: the server process alone (its kernel high-water mark, ``VmHWM``, reset just before
  the upload), less its idle RSS, over the model's size: the target is at most 2x;
- admission child peak: the largest RSS of a process the admission fork server started (sampled
  every 5 ms; the child is short-lived);
- total peak / model: server and every child together, sampled, as `bench_inference.py` reports
  it (idle RSS included);
- MB/s: model bytes over the upload's wall time.

    python bench/bench_upload_memory.py [--mb 200] [--optimization off|graph]
                                        [--clients veil,blindai]
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import threading
import time
import warnings
from pathlib import Path

import cbor2
import httpx
import numpy as np
import psutil
from onnx import TensorProto, helper, numpy_helper

import veil
from veil.errors import SimulationModeWarning
from veil.testing.local_server import LocalServer


def chain_model(megabytes: int, layers: int = 4) -> bytes:
    """`layers` square fp32 MatMuls holding `megabytes` of random weights in all."""
    n = int((megabytes * 2**20 / 4 / layers) ** 0.5)
    rng = np.random.default_rng(0)
    inits, nodes, previous = [], [], "x"
    for i in range(layers):
        weights = rng.standard_normal((n, n), dtype=np.float32) / np.float32(n**0.5)
        inits.append(numpy_helper.from_array(weights, f"w{i}"))
        out = "y" if i == layers - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [previous, f"w{i}"], [out]))
        previous = out
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])
    graph = helper.make_graph(nodes, "chain", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def blindai_body(model: bytes) -> bytes:
    """BlindAI 0.6's upload body: ``cbor2.dumps({"model": list(model), ...})``, by numpy."""
    values = np.frombuffer(model, np.uint8)
    small = values < 24
    # Each integer is one byte (0..23) or 0x18 followed by the byte.
    encoded = np.empty(len(values) * 2, np.uint8)
    ends = np.cumsum(np.where(small, 1, 2))
    starts = ends - np.where(small, 1, 2)
    encoded[starts[small]] = values[small]
    encoded[starts[~small]] = 0x18
    encoded[starts[~small] + 1] = values[~small]
    array = encoded[: int(ends[-1]) if len(ends) else 0].tobytes()
    n = len(values)
    header = b"\x9a" + n.to_bytes(4, "big") if n < 2**32 else b"\x9b" + n.to_bytes(8, "big")
    rest = cbor2.dumps({"length": n, "model_name": "bench.onnx", "optimize": True})
    # A map of 4 pairs: "model" first, then the 3 others (rest without its own map header).
    return b"\xa4" + cbor2.dumps("model") + header + array + rest[1:]


def _rss(pid: int) -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) << 10
    return 0


def _hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) << 10
    raise RuntimeError("no VmHWM")


class Sampler:
    """Peak RSS of the server's admission children, and of the whole tree, every 5 ms."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.child_peak = self.total_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                total = _rss(self.proc.pid)
                for child in self.proc.children(recursive=True):
                    rss = _rss(child.pid)
                    total += rss
                    if child.ppid() != self.proc.pid:  # a fork server's child: an admission
                        self.child_peak = max(self.child_peak, rss)
                self.total_peak = max(self.total_peak, total)
            self._stop.wait(0.005)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def measure(client: str, model: bytes, path: Path, optimization: str) -> dict[str, float]:
    with LocalServer(extra_args=["--no-auth", "--optimize", optimization]) as server:
        pid = server.pid
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SimulationModeWarning)
            conn = veil.connect(server.host, simulation=True, **server.ports)
        body = blindai_body(model) if client == "blindai" else b""
        try:
            time.sleep(1.0)  # let start-up settle (the warm-up admission)
            idle = _rss(pid)
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset VmHWM to the RSS now
            with Sampler(pid) as sampler:
                started = time.perf_counter()
                if client == "veil":
                    conn.upload_model(str(path), model_id="bench")
                else:
                    url = f"https://{server.host}:{server.management_port}/upload"
                    reply = httpx.post(url, content=body, verify=False, timeout=600)
                    reply.raise_for_status()
                seconds = time.perf_counter() - started
            peak = _hwm(pid)
        finally:
            conn.close()
    size = len(model)
    return {
        "idle": idle / 2**20,
        "peak": peak / 2**20,
        "ratio": (peak - idle) / size,
        "child": sampler.child_peak / 2**20,
        "total": sampler.total_peak / size,
        "mbps": size / 1e6 / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="model size in MiB (weights)")
    parser.add_argument("--optimization", default="off", choices=("off", "graph"))
    parser.add_argument("--clients", default="veil,blindai")
    args = parser.parse_args()
    model = chain_model(args.mb)
    rows = []
    with tempfile.TemporaryDirectory(prefix="veil-bench-upload-") as tmp:
        path = Path(tmp) / "chain.onnx"
        path.write_bytes(model)
        for client in args.clients.split(","):
            rows.append((client, measure(client, model, path, args.optimization)))
    size_mb = len(model) / 2**20
    print(f"model {size_mb:.0f} MiB (MatMul chain, fp32), optimization {args.optimization}")
    print(
        f"{'client':<9}{'idle MiB':>9}{'peak MiB':>9}{'(peak-idle)/size':>17}"
        f"{'child MiB':>10}{'total/size':>11}{'MB/s':>7}"
    )
    for client, r in rows:
        print(
            f"{client:<9}{r['idle']:>9.0f}{r['peak']:>9.0f}{r['ratio']:>17.2f}"
            f"{r['child']:>10.0f}{r['total']:>11.2f}{r['mbps']:>7.0f}"
        )


if __name__ == "__main__":
    main()
