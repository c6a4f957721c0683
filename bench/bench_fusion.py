"""What the transformer rewrites of ``optimization="graph"`` gain on the bench DistilBERT (~1 min).

    python bench/bench_fusion.py [--seqs 8,128] [--runs 15] [--repeats 2]

Three graphs of bench/_models.py's ``distilbert`` (torch's SDPA attention, no attention mask):

- ``default``: the exported file, which ONNX Runtime optimizes at ``ORT_ENABLE_ALL`` when the
  session is built (in-process default ONNX Runtime);
- ``extended``: ONNX Runtime's ``ORT_ENABLE_EXTENDED`` graph alone, saved (what
  ``optimization="graph"`` kept before `veil.server.fusion`: SkipLayerNormalization / BiasGelu);
- ``veil``: `veil.server.fusion`'s rewrite: the classifier's last layer run for the one token it
  reads (then ONNX Runtime optimizes it at ``ORT_ENABLE_ALL`` like the others).

Prints, per graph: what the rewrites did, the largest output difference from ``default``, and per
sequence length the median CPU time (user+sys of this process, intra-op spinning off) and wall time
of interleaved runs with 2 intra-op threads, as ratios to ``default``; then the share of kernel
time per operator type from ONNX Runtime's profiler (1 thread, seq 128). CPU time is the figure
to read on a shared machine: wall time moves with other load, CPU time much less.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from veil.server.fusion import fuse_transformer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _models import ensure_model

THREADS = 2


def transformer_rewritten(blob: bytes) -> tuple[bytes, dict[str, int]]:
    model, report = fuse_transformer(onnx.load_from_string(blob))
    if model is None:
        raise SystemExit("veil.server.fusion found nothing to rewrite in the bench model")
    return bytes(model.SerializeToString()), report


def ort_extended(path: Path) -> bytes:
    with tempfile.TemporaryDirectory() as workdir:
        target = os.path.join(workdir, "extended.onnx")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = target
        options.log_severity_level = 3
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return Path(target).read_bytes()


def session(model: bytes, threads: int, profile: bool = False) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.enable_profiling = profile
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(
    sessions: dict[str, Any], feeds: dict[str, Any], runs: int
) -> dict[str, tuple[float, float]]:
    """Median (CPU s, wall s) per session, runs interleaved in alternating order."""
    cpu: dict[str, list[float]] = {name: [] for name in sessions}
    wall: dict[str, list[float]] = {name: [] for name in sessions}
    names = list(sessions)
    for name in names:
        sessions[name].run(None, feeds)
    for index in range(runs):
        for name in names if index % 2 == 0 else names[::-1]:
            c, w = _cpu_seconds(), time.perf_counter()
            sessions[name].run(None, feeds)
            wall[name].append(time.perf_counter() - w)
            cpu[name].append(_cpu_seconds() - c)
    return {n: (statistics.median(cpu[n]), statistics.median(wall[n])) for n in names}


def op_shares(model: bytes, feeds: dict[str, Any]) -> list[tuple[str, float]]:
    profiled = session(model, 1, profile=True)
    for _ in range(6):
        profiled.run(None, feeds)
    trace = Path(profiled.end_profiling())
    try:
        events = json.loads(trace.read_text())
    finally:
        trace.unlink(missing_ok=True)
    spent: collections.Counter[str] = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            spent[event["args"]["op_name"]] += event["dur"]
    total = sum(spent.values()) or 1
    return [(op, count / total) for op, count in spent.most_common(6)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", default="8,128")
    parser.add_argument("--runs", type=int, default=15, help="timed runs per graph and repeat")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    bench = ensure_model("distilbert")
    graphs = {
        "default": bench.path.read_bytes(),
        "extended": ort_extended(bench.path),
    }
    graphs["veil"], rewrites = transformer_rewritten(graphs["default"])
    print(f"veil: {rewrites}")
    sessions = {name: session(blob, THREADS) for name, blob in graphs.items()}
    for batch, seq in ((1, 8), (3, 128)):
        feeds = bench.inputs(batch, seq, seed=1)
        reference = sessions["default"].run(None, feeds)[0]
        for name, s in sessions.items():
            diff = float(np.abs(s.run(None, feeds)[0] - reference).max())
            print(f"max |diff| {name:8s} vs default, batch {batch} seq {seq}: {diff:.2e}")
    print("\n| seq | graph | CPU ms (ratio) per repeat | wall ms (ratio) per repeat |")
    print("|---|---|---|---|")
    for seq in (int(s) for s in args.seqs.split(",")):
        feeds = bench.inputs(1, seq)
        results = [timed(sessions, feeds, args.runs) for _ in range(args.repeats)]
        for name in sessions:
            cells = []
            for kind in (0, 1):
                cells.append(
                    ", ".join(
                        f"{r[name][kind] * 1e3:.1f} ({r[name][kind] / r['default'][kind]:.3f})"
                        for r in results
                    )
                )
            print(f"| {seq} | {name} | {cells[0]} | {cells[1]} |")
    feeds = bench.inputs(1, 128)
    for name in ("default", "veil"):
        shares = ", ".join(f"{op} {share:.1%}" for op, share in op_shares(graphs[name], feeds))
        print(f"kernel time, {name}, 1 thread, seq 128: {shares}")


if __name__ == "__main__":
    main()
