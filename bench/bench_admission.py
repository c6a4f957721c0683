"""What admission in a child process and per-model isolation cost (bounded, loopback, ~1 min).

Two tables:

1. Admission: a model checked and loaded in process (the path before `veil.server.admission`)
   against the child process that checks, loads and measures it, p50 of a few runs.
2. Isolation: a small model's latency through a live server, idle and while another model runs
   one long MatMul after another, with ONE ONNX Runtime thread shared by all models (the old
   arrangement, ``--max-concurrent-runs 1``) and with the default pool.

    python bench/bench_admission.py [--seconds 6]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
import warnings
from collections.abc import Callable

import numpy as np
from onnx import TensorProto, helper, numpy_helper

import veil
from veil.commands.demo import LocalServer
from veil.errors import SimulationModeWarning
from veil.server.admission import Admitter
from veil.server.limits import Limits
from veil.server.onnx_guard import check_model_lean, create_session


def identity() -> bytes:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "id", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def dense(megabytes: int) -> bytes:
    n = megabytes << 18  # float32 elements
    w = numpy_helper.from_array(np.ones(n, np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [n])
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "add", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def matmul() -> bytes:
    graph = helper.make_graph(
        [
            helper.make_node("Expand", ["x", "shape"], ["a"]),
            helper.make_node("MatMul", ["a", "a"], ["m"]),
            helper.make_node("ReduceSum", ["m"], ["y"], keepdims=0),
        ],
        "matmul",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1]),
            helper.make_tensor_value_info("shape", TensorProto.INT64, [2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def p50_ms(action: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def admission_table(runs: int) -> None:
    limits = Limits()
    admitter = Admitter(limits)
    admitter.start()

    def in_process(blob: bytes) -> None:
        check_model_lean(blob, limits)
        create_session(blob, limits, intra_op_threads=1, checked=True)

    print("| model | in process p50 ms | child process p50 ms | added ms | measured loaded MiB |")
    print("|---|---|---|---|---|")
    for name, blob in (("identity", identity()), ("dense 16 MiB", dense(16))):
        here = p50_ms(lambda b=blob: in_process(b), runs)
        child = p50_ms(lambda b=blob: admitter.admit(b), runs)
        loaded = admitter.admit(blob).loaded_bytes / (1 << 20)
        print(f"| {name} | {here:.1f} | {child:.1f} | {child - here:+.1f} | {loaded:.1f} |")


def latencies(client: veil.Connection, seconds: float) -> list[float]:
    x = np.ones((1, 4), np.float32)
    out, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.perf_counter()
        client.predict("small", x)
        out.append(time.perf_counter() - started)
    return out


def isolation_row(runs: int, seconds: float) -> list[str]:
    rows = []
    extra = ("--threads", "1", "--max-concurrent-runs", str(runs))
    with LocalServer(extra_args=extra) as server:  # noqa: SIM117 - the client needs the ports
        with veil.connect(server.host, simulation=True, **server.ports) as client:
            client.upload_model(identity(), model_id="small")
            client.upload_model(matmul(), model_id="slow")
            latencies(client, 1.0)  # warm-up
            idle = latencies(client, seconds)
            stop = threading.Event()
            slow_runs = [0]

            def hog() -> None:
                feeds = [np.ones(1, np.float32), np.array([2000, 2000], np.int64)]
                with veil.connect(server.host, simulation=True, **server.ports) as other:
                    while not stop.is_set():
                        other.predict("slow", feeds)
                        slow_runs[0] += 1

            thread = threading.Thread(target=hog)
            thread.start()
            time.sleep(0.3)
            busy = latencies(client, seconds)
            stop.set()
            thread.join()
    for label, values in (("idle", idle), ("MatMul 2000^3 looping", busy)):
        ms = sorted(v * 1e3 for v in values)
        p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
        rows.append(
            f"| {runs} | {label} | {len(ms)} | {statistics.median(ms):.2f} | {p99:.2f} | "
            f"{slow_runs[0] if label != 'idle' else '-'} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="per measurement")
    parser.add_argument("--runs", type=int, default=5, help="admissions per model")
    args = parser.parse_args()
    warnings.simplefilter("ignore", SimulationModeWarning)
    admission_table(args.runs)
    print()
    print("| max_concurrent_runs | other model | requests | p50 ms | p99 ms | slow runs |")
    print("|---|---|---|---|---|---|")
    for runs in (1, Limits().max_concurrent_runs):
        for row in isolation_row(runs, args.seconds):
            print(row)


if __name__ == "__main__":
    main()
