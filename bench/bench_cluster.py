"""Throughput of one replica against three behind HAProxy, and what the balancer costs.

    python bench/bench_cluster.py [--seconds 6] [--clients 6] [--elements 4096]

Starts, on loopback: Debian's PostgreSQL, a simulated ``veil broker``, three ``veil serve
--join`` replicas (``--threads 1``) sharing the PostgreSQL state and one blob directory, and
HAProxy in TCP mode. Uploads an Add model (float32 [N]) through the balancer, then for each row
runs `--clients` threads, each with its own attested connection (HAProxy spreads connections,
not requests), predicting for `--seconds`:

- 1 replica, direct: the clients talk to replica 0's ports;
- 1 replica, via HAProxy: the same replica behind the balancer (the balancer's cost);
- 3 replicas, via HAProxy.

CAVEAT: every process shares this machine's CPUs (2 cores here): three replicas cannot run
three times the work of one, and the clients, HAProxy and PostgreSQL compete with them. The
table shows the mechanism's overhead and its scaling on this box, not a TEE cluster's.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

import veil
from veil.testing.engines import engines_missing, haproxy, postgres
from veil.testing.local_server import LocalServer

_BROKER_READY = re.compile(r"veil broker: serving on (?P<url>http://\S+) ")


def add_model(n: int) -> bytes:
    w = np.ones(n, np.float32)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n])],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


@contextmanager
def broker(root: Path) -> Iterator[str]:
    log = root / "broker.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "veil.cli", "broker", "--platform", "simulated",
             "--data-dir", str(root / "broker"), "--port", "0"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            found = _BROKER_READY.search(log.read_text(errors="replace"))
            if found:
                yield found["url"]
                return
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"broker did not start: {log.read_text(errors='replace')[-2000:]}")
    finally:
        proc.terminate()
        proc.wait(15)


def measure(ports: dict[str, int], clients: int, seconds: float, n: int) -> tuple[int, list[float]]:
    x = np.arange(n, dtype=np.float32)
    connections = [veil.connect("127.0.0.1", simulation=True, **ports) for _ in range(clients)]
    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def work(c: veil.Connection) -> None:
        mine = []
        while time.monotonic() < stop:
            start = time.perf_counter()
            c.predict("bench", x)
            mine.append(time.perf_counter() - start)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=work, args=(c,)) for c in connections]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in connections:
        c.close()
    return len(latencies), latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--elements", type=int, default=4096)
    args = parser.parse_args()
    missing = engines_missing()
    if missing:
        print(f"bench_cluster: needs {' and '.join(missing)} (scripts/test installs them)")
        return 2
    warnings.simplefilter("ignore", veil.SimulationModeWarning)
    names = ("unattested_port", "attested_port", "management_port")
    with tempfile.TemporaryDirectory(prefix="veil-bench-cluster-") as tmp, ExitStack() as stack:
        root = Path(tmp)
        url = stack.enter_context(postgres(root))
        broker_url = stack.enter_context(broker(root))
        replicas = [
            stack.enter_context(
                LocalServer(
                    data_dir=root / f"data{i}",
                    extra_args=(
                        "--join", broker_url, "--database-url", url,
                        "--store-dir", str(root / "store"), "--threads", "1",
                        "--replica-name", f"replica-{i}",
                    ),
                )
            )
            for i in range(3)
        ]  # fmt: skip
        frontends = [[getattr(r, n) for r in replicas] for n in names]
        frontends += [[getattr(replicas[0], n)] for n in names]
        ports = stack.enter_context(haproxy(root, frontends))
        all_three = dict(zip(names, ports[:3], strict=True))
        only_first = dict(zip(names, ports[3:], strict=True))
        with veil.connect("127.0.0.1", simulation=True, **all_three) as client:
            client.upload_model(add_model(args.elements), model_id="bench")
        rows = [
            ("1 replica, direct", replicas[0].ports),
            ("1 replica, via HAProxy", only_first),
            ("3 replicas, via HAProxy", all_three),
        ]
        measure(all_three, 3, 1.0, args.elements)  # warm-up: every replica loads the model
        print(
            f"cluster bench: {args.clients} clients, {args.seconds:g} s per row, Add float32 "
            f"[{args.elements}], {os.cpu_count()} CPUs shared by every process (see CAVEAT)"
        )
        print(f"{'row':<26}{'requests':>10}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}")
        for label, where in rows:
            count, latencies = measure(where, args.clients, args.seconds, args.elements)
            latencies.sort()
            p50 = statistics.median(latencies) * 1e3
            p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1e3
            print(f"{label:<26}{count:>10}{count / args.seconds:>10.0f}{p50:>9.2f}{p99:>9.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
