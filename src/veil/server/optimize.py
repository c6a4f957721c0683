"""Optimizing an uploaded graph, inside the admission child (`veil.server.admission`, step 3).

Two named choices, never applied silently:

- ``graph``: for transformer classifiers, the rewrite of `veil.server.fusion` first (the last
  layer run for the one token the classifier reads); then ONNX Runtime's extended graph
  optimizations, saved as a new graph: full constant folding and the fusions ONNX Runtime finds
  (layer norm, GELU, MatMul+Add…). The report's ``fusions`` names what the first part did. The
  new graph is kept only if its outputs on a probe input are within ``GRAPH_TOLERANCE`` of the
  original's and it is not slower; otherwise the original is served and the report says why.
  Constant folding runs here only, in the child under ``RLIMIT_AS`` and ``RLIMIT_CPU``: a graph
  whose folding would build huge constants fails the child's memory limit, not the server.
- ``int8``: dynamic quantization of the weights to int8 (ONNX Runtime's ``quantize_dynamic``).
  It changes the outputs by design: the change is measured on a probe set (largest absolute
  difference of any output, and how often the top class of the first output agrees) and reported,
  and the graph is kept if it is not slower; the caller chose to trade accuracy for speed.

The layout-specific level (``ORT_ENABLE_ALL``) is not saved: it is applied when the server builds
its session, from whichever graph is kept. Probe inputs are seeded and shaped from the model's
declared inputs (free dimensions 1 for the batch axis, 8 for the others); integer inputs are
zeros (valid as indices into any table), floats are standard normal.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from veil.server.fusion import fuse_transformer
from veil.server.limits import Limits
from veil.server.onnx_guard import check_model_lean, create_session

__all__ = ["GRAPH_TOLERANCE", "MODES", "optimize_graph", "probe_inputs"]

MODES = ("off", "graph", "int8")
GRAPH_TOLERANCE = 1e-4
_PROBES = 8  # inputs in the probe set (int8 accuracy)
_TIMED_RUNS = 5  # runs timed per graph, after one warm-up
_FREE_DIM = 8
_FLOAT_TYPES: dict[str, Any] = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
}
_OTHER_TYPES: dict[str, Any] = {
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def probe_inputs(session: Any, seed: int) -> dict[str, np.ndarray[Any, Any]]:
    """Seeded inputs for `session`, shaped from its declared inputs."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray[Any, Any]] = {}
    for node in session.get_inputs():
        shape = [
            d if isinstance(d, int) and d > 0 else (1 if axis == 0 else _FREE_DIM)
            for axis, d in enumerate(node.shape or ())
        ]
        kind = str(node.type)
        if kind in _FLOAT_TYPES:
            feeds[node.name] = rng.standard_normal(shape).astype(_FLOAT_TYPES[kind])
        else:
            # Zeros: a valid index into any table, a valid mask, a valid id.
            feeds[node.name] = np.zeros(shape, _OTHER_TYPES.get(kind, np.int64))
    return feeds


def _median_cpu_seconds(
    original: Any, optimized: Any, feeds: dict[str, Any]
) -> tuple[float, float]:
    """Median CPU time per run of each session, their runs interleaved.

    CPU time of this thread, not wall time: the child's sessions have one intra-op thread, so ONNX
    Runtime runs on the caller's, and its CPU time is the model's work whatever else the machine
    runs (wall time moved the verdict on a ~10 % gain both ways on a loaded 2-core machine).
    """
    sessions = (original, optimized)
    for session in sessions:
        session.run(None, feeds)  # warm-up: first-run allocations
    times: tuple[list[float], list[float]] = ([], [])
    for turn in range(_TIMED_RUNS):
        for which in (0, 1) if turn % 2 == 0 else (1, 0):
            start = time.thread_time()
            sessions[which].run(None, feeds)
            times[which].append(time.thread_time() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def _max_abs_diff(reference: Sequence[Any], candidate: Sequence[Any]) -> float:
    worst = 0.0
    for a, b in zip(reference, candidate, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            return float("inf")
        if a.size == 0:
            continue
        if np.issubdtype(a.dtype, np.floating):
            diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
            if not np.all(np.isfinite(diff)):
                return float("inf")
            worst = max(worst, float(diff.max()))
        elif not np.array_equal(a, b):
            return float("inf")
    return worst


def _transformer_fused(blob: bytes) -> tuple[bytes, str]:
    """`blob` after `veil.server.fusion`'s rewrites, and what they did ("" for nothing)."""
    import onnx

    model, counts = fuse_transformer(onnx.load_from_string(blob))
    if model is None:
        return blob, ""
    return bytes(model.SerializeToString()), ", ".join(f"{k} {v}" for k, v in counts.items())


def _graph_optimized(blob: bytes, workdir: str) -> bytes:
    import onnxruntime as ort

    path = os.path.join(workdir, "optimized.onnx")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = path
    options.enable_cpu_mem_arena = False
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    # Constant folding on: this is the child, under its memory and CPU limits.
    ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
    with open(path, "rb") as file:
        return _used_opsets_only(file.read())


def _used_opsets_only(graph: bytes) -> bytes:
    """`graph` declaring only the opset domains its nodes use (and the default one).

    ONNX Runtime saves every domain it knows (``ai.onnx.training``, ``org.pytorch.aten``…),
    which the model checks refuse: declared, never used.
    """
    import onnx

    model = onnx.load_from_string(graph)
    used = {""} | {node.domain for node in model.graph.node}
    used |= {f.domain for f in model.functions}
    kept = [opset for opset in model.opset_import if opset.domain in used]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    return bytes(model.SerializeToString())


def _int8(blob: bytes, workdir: str) -> bytes:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source, target = os.path.join(workdir, "source.onnx"), os.path.join(workdir, "int8.onnx")
    with open(source, "wb") as file:
        file.write(blob)
    # It logs advice on the root logger; the child's log is not the place for it.
    logging.getLogger().setLevel(logging.ERROR)
    quantize_dynamic(source, target, weight_type=QuantType.QInt8)
    with open(target, "rb") as file:
        return file.read()


def optimize_graph(blob: bytes, mode: str, limits: Limits) -> tuple[bytes | None, dict[str, Any]]:
    """The graph to serve instead of `blob` (None: serve `blob`) and a report for the reply.

    The report: ``mode``, ``kept`` (bool), ``reason`` (why not kept, or ``""``), and where
    measured ``max_abs_diff``, ``speedup`` (original median CPU time per run / new one), for
    ``graph`` ``fusions`` (the transformer rewrite that ran with its counts, ``""`` for none), and
    for ``int8`` ``top1_agreement`` (fraction of probes whose first output's arg-max agrees).
    Never raises for a graph that fails to optimize: the original is then served.
    """
    if mode == "off":
        return None, {}
    if mode not in MODES:
        raise ValueError(f"optimization: got {mode!r}, expected one of {', '.join(MODES)}")
    report: dict[str, Any] = {"mode": mode, "kept": False, "reason": ""}
    original = create_session(blob, limits, intra_op_threads=1, checked=True)
    probes = [probe_inputs(original, seed) for seed in range(_PROBES if mode == "int8" else 1)]
    source = blob
    if mode == "graph":
        try:
            source, report["fusions"] = _transformer_fused(blob)
        except Exception as exc:  # a pattern the rewrites mishandle: ONNX Runtime's part still runs
            report["fusions"] = f"failed ({type(exc).__name__})"
    try:
        with tempfile.TemporaryDirectory(prefix="veil-optimize-") as workdir:
            candidate = (_graph_optimized if mode == "graph" else _int8)(source, workdir)
        # The graph kept is stored and admitted again at each start, like an upload: it must
        # pass the same checks (`check_model_lean`), or a restart would not serve it.
        check_model_lean(candidate, limits)
        optimized = create_session(candidate, limits, intra_op_threads=1, checked=True)
        references = [original.run(None, feeds) for feeds in probes]
        results = [optimized.run(None, feeds) for feeds in probes]
    except Exception as exc:  # ApiError, MemoryError under RLIMIT_AS, ONNX Runtime's own
        # ONNX Runtime's messages name nodes, never weights: the type is enough for the reply.
        report["reason"] = f"optimization failed ({type(exc).__name__}); serving the original"
        return None, report
    diff = max(_max_abs_diff(r, c) for r, c in zip(references, results, strict=True))
    report["max_abs_diff"] = diff if math.isfinite(diff) else None
    if mode == "int8":
        agree = [
            np.array_equal(np.argmax(r[0], axis=-1), np.argmax(c[0], axis=-1))
            for r, c in zip(references, results, strict=True)
            if np.asarray(r[0]).ndim >= 1 and np.asarray(r[0]).size
        ]
        report["top1_agreement"] = sum(agree) / len(agree) if agree else None
    elif diff > GRAPH_TOLERANCE:
        report["reason"] = (
            f"outputs moved by {diff:.3g} > {GRAPH_TOLERANCE:g} on the probe; serving the original"
        )
        return None, report
    before, after = _median_cpu_seconds(original, optimized, probes[0])
    report["speedup"] = before / after if after > 0 else None
    if after > before:
        report["reason"] = f"not faster ({before / after:.2f}x); serving the original"
        return None, report
    report["kept"] = True
    return candidate, report
