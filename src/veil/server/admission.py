"""Model admission: a child process loads, checks and measures every model before the server does.

An uploaded model is hostile input, and a static check cannot foresee everything a graph costs
once ONNX Runtime builds it (sparse tensors made dense, local functions inlined, whatever a future
release materialises). So every model, uploaded or restored at start, is first admitted by a
short-lived child process (multiprocessing's ``forkserver``: a clean process with ONNX and ONNX
Runtime imported, forked once per model; it never inherits the server's keys, sockets or
threads). The child:

1. limits itself: ``RLIMIT_CPU`` to ``admission_cpu_s``, ``RLIMIT_AS`` to what it holds now plus
   ``max_model_memory_bytes`` plus room for the model's bytes, and a lower scheduling priority,
   so that serving keeps the CPU;
2. runs the structural guard (`veil.server.onnx_guard.check_model_lean`);
3. optimizes the graph when the upload asked for it (`veil.server.optimize`: ``graph`` or
   ``int8``); a kept graph is what the server then runs (and stores), measured by step 4, and
   the outcome is reported in the upload's reply;
4. builds the ONNX Runtime session exactly as the server will and measures the resident memory
   it added; above ``max_model_memory_bytes`` the model is refused (413);
5. answers with a small JSON header (never a pickle: a child compromised by a hostile model must
   not be able to run code in the server) and, when step 3 changed it, the graph.

The parent waits off the event loop, kills the child after ``admission_timeout_s`` of wall time,
and turns a child killed by its CPU limit, or dying for want of memory, into a 413/422 naming
the limit. Only then does the server build its own session from the admitted graph; the storage
quota counts the measured size. At most one admission runs at a time (the next waits, up to the
admission time-out, then gets 429): each may use ``max_model_memory_bytes``.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import resource
import signal
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from veil.errors import ApiError, api_error_for_status
from veil.server.allocator import release_free_memory
from veil.server.limits import Limits
from veil.server.onnx_guard import Handover, ModelBytes, check_model_lean, create_session
from veil.server.optimize import MODES, optimize_graph

__all__ = ["AdmittedModel", "Admitter"]

# Address space beyond the model's own allowance: ONNX Runtime's thread stacks, the allocator's
# arenas and the libraries' own growth (virtual, mostly never touched).
_AS_SLACK = 768 << 20
_HEADER_MAX = 64 << 10
_MESSAGE_MAX = 400


@dataclass(frozen=True, slots=True)
class AdmittedModel:
    """What the child accepted: the graph the server will run and what it costs loaded.

    Attributes:
        graph: the ONNX bytes to load (the upload itself unless an optimization was kept),
            handed over to the load that consumes them (`veil.server.onnx_guard.Handover`).
        loaded_bytes: resident memory the ONNX Runtime session added in the child.
        seconds: wall time of the admission, child start to answer.
        optimization: what the optimization step did (`veil.server.optimize.optimize_graph`'s
            report), None when none was asked for.
    """

    graph: Handover
    loaded_bytes: int
    seconds: float
    optimization: dict[str, Any] | None = None
    optimized: bool = False
    """Whether `graph` is the optimized graph admission kept rather than the upload."""

    def __repr__(self) -> str:
        return f"AdmittedModel({len(self.graph)} bytes, loaded_bytes={self.loaded_bytes})"


def _context() -> Any:
    ctx = multiprocessing.get_context("forkserver")
    # The fork server imports this module (and so ONNX and ONNX Runtime) once; each child is a
    # fork of it and starts in milliseconds. multiprocessing also re-runs the main module in
    # each child (`python -m veil.cli`): preloaded, its imports cost nothing there.
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    main = getattr(spec, "name", None)
    extra = [main] if isinstance(main, str) and not main.endswith("__main__") else []
    ctx.set_forkserver_preload([__name__, *extra])
    return ctx


class Admitter:
    """Runs admissions (see the module docstring), one at a time.

    Args:
        limits: the server's limits (memory, CPU, time, and the guard's).
    """

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._one_at_a_time = threading.Lock()

    def start(self) -> None:
        """Start the fork server and admit a trivial model, so that the first upload does not
        wait for ONNX Runtime to be imported (blocking, a second or two)."""
        self.admit(_WARM_UP)

    def admit(self, blob: ModelBytes | Handover, optimization: str = "off") -> AdmittedModel:
        """Admit `blob` or raise (blocking: call it from a worker thread). Bytes handed over
        are then held by the result only (or dropped, when an optimized graph replaces them).

        Raises:
            ApiError: 413 (size or measured memory) or 422 (the guard, ONNX Runtime, the CPU or
                time limit), each naming the limit; 429 when another admission held the slot
                for the whole ``admission_timeout_s``.
        """
        limits = self._limits
        if not self._one_at_a_time.acquire(timeout=limits.admission_timeout_s):
            raise api_error_for_status(
                429, "server busy: another model is being admitted (admission_timeout_s)"
            )
        try:
            return _admit(blob, limits, optimization)
        finally:
            self._one_at_a_time.release()


def _admit(
    model: ModelBytes | Handover, limits: Limits, optimization: str = "off"
) -> AdmittedModel:
    blob = model.take() if isinstance(model, Handover) else model
    del model
    if optimization not in MODES:
        raise api_error_for_status(
            400, f"optimization: got {optimization[:40]!r}, expected one of {', '.join(MODES)}"
        )
    started = time.monotonic()
    deadline = started + limits.admission_timeout_s
    ctx = _context()
    ours, theirs = ctx.Pipe(duplex=True)
    process = ctx.Process(
        target=_child_main,
        args=(theirs, limits, optimization),
        name="veil-admission",
        daemon=True,
    )
    try:
        process.start()
        theirs.close()
        try:
            ours.send_bytes(blob)
            header = _parse_header(_receive(ours, deadline, _HEADER_MAX, limits))
            graph = blob
            del blob
            if header["graph"]:
                graph = b""  # let go of the upload before the optimized graph arrives
                graph = _receive(ours, deadline, limits.max_model_bytes, limits)
        except (EOFError, OSError):
            raise _death(process, limits) from None
    finally:
        if process.is_alive():
            process.kill()
        process.join()
        ours.close()
        process.close()
    if header["status"] != 200:
        raise api_error_for_status(header["status"], header["message"])
    return AdmittedModel(
        Handover(graph),
        header["loaded_bytes"],
        time.monotonic() - started,
        header["optimization"],
        optimized=header["graph"],
    )


def _receive(conn: Connection, deadline: float, max_bytes: int, limits: Limits) -> bytes:
    if not conn.poll(max(0.0, deadline - time.monotonic())):
        raise api_error_for_status(
            422,
            f"invalid ONNX model: loading it exceeded admission_timeout_s="
            f"{limits.admission_timeout_s:g}",
        )
    return conn.recv_bytes(max_bytes)


def _parse_header(raw: bytes) -> dict[str, Any]:
    """The child's answer, checked field by field: it ran hostile input, so trust no shape."""
    try:
        header = json.loads(raw)
        status, message = header["status"], header["message"]
        loaded, graph = header["loaded_bytes"], header["graph"]
    except (ValueError, KeyError, TypeError):
        raise api_error_for_status(422, "invalid ONNX model: admission gave no answer") from None
    ok = (
        status in (200, 413, 422)
        and isinstance(message, str)
        and type(loaded) is int
        and loaded >= 0
        and type(graph) is bool
    )
    if not ok:
        raise api_error_for_status(422, "invalid ONNX model: admission gave no answer")
    return {
        "status": status,
        "message": message[:_MESSAGE_MAX],
        "loaded_bytes": loaded,
        "graph": graph,
        "optimization": _parse_report(header.get("optimization")),
    }


# The optimization report's fields and their types: nothing else passes from the child.
_REPORT_FIELDS: dict[str, tuple[type, ...]] = {
    "mode": (str,),
    "kept": (bool,),
    "reason": (str,),
    "max_abs_diff": (float, int, type(None)),
    "speedup": (float, int, type(None)),
    "top1_agreement": (float, int, type(None)),
    "fusions": (str,),
}


def _parse_report(report: Any) -> dict[str, Any] | None:
    if not report:
        return None
    if not isinstance(report, dict) or report.get("mode") not in MODES:
        raise api_error_for_status(422, "invalid ONNX model: admission gave no answer")
    parsed: dict[str, Any] = {}
    for key, types in _REPORT_FIELDS.items():
        if key not in report:
            continue
        value = report[key]
        if key == "kept":
            ok = type(value) is bool
        else:
            ok = isinstance(value, types) and not isinstance(value, bool)
        if not ok:
            raise api_error_for_status(422, "invalid ONNX model: admission gave no answer")
        parsed[key] = value[:_MESSAGE_MAX] if isinstance(value, str) else value
    return parsed


def _death(process: Any, limits: Limits) -> ApiError:
    """The error for a child that ended without answering."""
    process.join(5.0)
    code = process.exitcode
    if code in (-signal.SIGXCPU, -signal.SIGKILL):  # soft, then hard, CPU limit
        return api_error_for_status(
            422,
            f"invalid ONNX model: loading it exceeded admission_cpu_s={limits.admission_cpu_s:g}",
        )
    return api_error_for_status(
        413,
        f"invalid ONNX model: the loader died (exit {code}) loading it; "
        f"it may need more than max_model_memory_bytes={limits.max_model_memory_bytes}",
    )


# --- the child ------------------------------------------------------------------------------


def _resident_bytes() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _address_space_bytes() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _memory_error(limits: Limits) -> ApiError:
    return api_error_for_status(
        413,
        "invalid ONNX model: loading it needs more than "
        f"max_model_memory_bytes={limits.max_model_memory_bytes}",
    )


def _child_main(conn: Connection, limits: Limits, optimization: str = "off") -> None:
    # Step 1: limits first, before a byte of the model is looked at.
    cpu = math.ceil(limits.admission_cpu_s)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    os.nice(10)
    blob = conn.recv_bytes()
    ceiling = _address_space_bytes() + limits.max_model_memory_bytes + 2 * len(blob) + _AS_SLACK
    resource.setrlimit(resource.RLIMIT_AS, (ceiling, ceiling))
    header: dict[str, Any] = {"status": 200, "message": "", "loaded_bytes": 0, "graph": False}
    graph: bytes | None = None
    try:
        graph, header["loaded_bytes"], header["optimization"] = _check_and_measure(
            blob, limits, optimization
        )
        header["graph"] = graph is not None
    except ApiError as exc:
        header.update(status=exc.status, message=exc.message)
    except MemoryError:
        refused = _memory_error(limits)
        header.update(status=refused.status, message=refused.message)
    conn.send_bytes(json.dumps(header).encode())
    if graph is not None:
        conn.send_bytes(graph)
    conn.close()


def _identity_model() -> bytes:
    from onnx import TensorProto, helper

    value = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "warm-up", [value], [])
    graph.output.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, [1]))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


_WARM_UP = _identity_model()


def _check_and_measure(
    blob: bytes, limits: Limits, optimization: str = "off"
) -> tuple[bytes | None, int, dict[str, Any]]:
    """Steps 2-4: the graph to run (None: the upload unchanged), its measured size, and the
    optimization report (empty when none was asked for)."""
    # 2. The structural guard.
    check_model_lean(blob, limits)
    # 3. Optimization, when asked for; its sessions are gone before step 4 measures.
    graph, report = optimize_graph(blob, optimization, limits)
    # 4. Load exactly as the server will, and measure. A first session in a process also sets
    # up ONNX Runtime itself (~40 MB that the server has paid once): pay it before measuring.
    create_session(_WARM_UP, limits, intra_op_threads=1, checked=True)
    release_free_memory()
    before = _resident_bytes()
    try:
        session = create_session(graph or blob, limits, intra_op_threads=1, checked=True)
    except ApiError as exc:
        if "alloc" in exc.message.lower():  # std::bad_alloc under RLIMIT_AS
            raise _memory_error(limits) from None
        raise
    # What the session keeps, not what its construction passed through and freed.
    release_free_memory()
    loaded = max(0, _resident_bytes() - before)
    del session
    limits.check_load_ratio(loaded, len(blob), what="loaded, it takes")
    if loaded > limits.max_model_memory_bytes:
        raise api_error_for_status(
            413,
            f"invalid ONNX model: loaded, it takes {loaded} bytes, exceeds "
            f"max_model_memory_bytes={limits.max_model_memory_bytes}",
        )
    return graph, loaded, report
