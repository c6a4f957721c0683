"""One long operator against a small model, in one process: does demotion keep the victim's pace?

    python bench/bench_demotion.py [--seconds 4] [--repeat 3] [--json out.json]

In this process, on a 4-thread pool like the server's (`ModelRegistry`), a victim loads a small
model (a chain of 256x256 MatMuls, intra-op threads = cores) and runs it back to back (c=1). An
attacker's model is one large MatMul (one operator: ``terminate`` cannot stop it), run back to
back on the same pool. Phases, each ``--seconds`` long, repeated ``--repeat`` times:

- ``alone``: the victim only: its normal throughput and p50/p99;
- ``attack, demotion off``: ``demote_runs_after_s`` = 1e9 (what veil did before);
- ``attack, demotion on``: the default ``demote_runs_after_s``.

The table gives the victim's median over the repeats, throughput as a percentage of ``alone``,
and the load average at the start (the machine's other load moves every number).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from veil.server.limits import Limits
from veil.server.models import LoadedModel, load_model
from veil.tensors import DatumType, WireTensor


def _model(graph: Any) -> bytes:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def victim_model(nodes: int = 24) -> bytes:
    w = numpy_helper.from_array(np.eye(256, dtype=np.float32) * 0.5, "w")
    chain = [helper.make_node("MatMul", ["x" if i == 0 else f"h{i - 1}", "w"], [f"h{i}"])
             for i in range(nodes)]  # fmt: skip
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 256])
    y = helper.make_tensor_value_info(f"h{nodes - 1}", TensorProto.FLOAT, [64, 256])
    return _model(helper.make_graph(chain, "victim", [x], [y], initializer=[w]))


def attacker_model(side: int) -> bytes:
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [side, side])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [side, side])
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "a"], ["y"])], "mm", [a], [y])
    return _model(graph)


def _tensor(name: str, shape: tuple[int, ...]) -> WireTensor:
    return WireTensor(shape, DatumType.F32, name, np.ones(shape, np.float32).tobytes())


def phase(limits: Limits, seconds: float, side: int | None) -> dict[str, float]:
    pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="veil-ort")
    threads = os.cpu_count() or 1

    def load(blob: bytes, name: str) -> LoadedModel:
        return load_model(blob, model_id=name, model_name=name, threads=threads, limits=limits)

    victim = load(victim_model(), "victim")
    feed = [_tensor("x", (64, 256))]
    stop = threading.Event()
    attacker_runs = 0
    if side is not None:
        attacker = load(attacker_model(side), "attacker")
        big = [_tensor("a", (side, side))]

        def attack() -> None:
            nonlocal attacker_runs
            while not stop.is_set():
                attacker.run(big)
                attacker_runs += 1

        pool.submit(attack)
        time.sleep(0.5)  # past the demotion threshold: the attack is in full swing
    latencies = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.perf_counter()
        pool.submit(victim.run, feed).result()
        latencies.append(time.perf_counter() - start)
    stop.set()
    pool.shutdown(wait=True)
    latencies.sort()
    return {
        "rps": len(latencies) / seconds,
        "p50_ms": 1e3 * latencies[len(latencies) // 2],
        "p99_ms": 1e3 * latencies[int(len(latencies) * 0.99)],
        "attacker_runs": attacker_runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--side", type=int, default=3000, help="the attacker's MatMul side")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    phases = {
        "alone": (Limits(), None),
        "attack, demotion off": (Limits(demote_runs_after_s=1e9), args.side),
        "attack, demotion on": (Limits(), args.side),
    }
    results: dict[str, list[dict[str, float]]] = {name: [] for name in phases}
    load_avg = os.getloadavg()
    for _ in range(args.repeat):  # interleaved, so that the machine's load drifts evenly
        for name, (limits, side) in phases.items():
            results[name].append(phase(limits, args.seconds, side))
    alone = statistics.median(r["rps"] for r in results["alone"])
    print(f"load average at start {load_avg[0]:.1f} {load_avg[1]:.1f} {load_avg[2]:.1f}; "
          f"{os.cpu_count()} cores; median of {args.repeat} x {args.seconds:g} s")  # fmt: skip
    print(f"{'phase':24} {'victim req/s':>12} {'% alone':>8} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'attacker runs':>13}  (each repeat: % alone)")  # fmt: skip
    for name, rows in results.items():
        rps = statistics.median(r["rps"] for r in rows)
        each = " ".join(f"{100 * r['rps'] / alone:.0f}" for r in rows)
        print(f"{name:24} {rps:12.1f} {100 * rps / alone:8.0f} "
              f"{statistics.median(r['p50_ms'] for r in rows):7.1f} "
              f"{statistics.median(r['p99_ms'] for r in rows):7.1f} "
              f"{statistics.median(r['attacker_runs'] for r in rows):13.0f}  ({each})")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"load_average": load_avg, "results": results}, indent=1))


if __name__ == "__main__":
    main()
