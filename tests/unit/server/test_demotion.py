"""CPU-priority demotion of long runs (`veil.server.demotion`): the mechanism, on real threads.

A run past ``demote_runs_after_s`` gets nice 19 on its run thread and its session's worker
threads; the run thread gets its priority back when the run ends, the workers keep theirs, and
the model's later runs are demoted from their start. A short run is left alone.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
from onnx import TensorProto, helper

from veil.server.demotion import (
    DEMOTED_NICE,
    HeavyFlag,
    Watchdog,
    capture_new_threads,
    thread_nice,
)
from veil.server.limits import Limits
from veil.server.models import LoadedModel, load_model
from veil.tensors import DatumType, WireTensor

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="thread priorities through /proc/self/task"
)
SIDE = 1536
# What every thread starts with: the process's nice value (tests may run under `nice`).
BASE = os.getpriority(os.PRIO_PROCESS, 0)


def _matmul_model() -> bytes:
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [SIDE, SIDE])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [SIDE, SIDE])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [SIDE, SIDE])
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["y"])], "mm", [a, b], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _inputs() -> list[WireTensor]:
    data = np.ones((SIDE, SIDE), np.float32).tobytes()
    return [WireTensor((SIDE, SIDE), DatumType.F32, name, data) for name in ("a", "b")]


def _load(demote_after_s: float) -> LoadedModel:
    limits = Limits(demote_runs_after_s=demote_after_s)
    return load_model(_matmul_model(), model_id="mm", model_name="mm", threads=2, limits=limits)


def _in_thread(work: Callable[[], None]) -> tuple[threading.Thread, list[int]]:
    tid: list[int] = []

    def target() -> None:
        tid.append(threading.get_native_id())
        work()

    thread = threading.Thread(target=target)
    thread.start()
    return thread, tid


def _living(tids: frozenset[int]) -> set[int]:
    """The threads among `tids` that still exist. A thread something else in this process started
    and ended while a session was built is counted with the session's, and is gone later (seen
    once in CI); ONNX Runtime's workers live as long as their session."""
    living = {t for t in tids if os.path.exists(f"/proc/self/task/{t}")}
    assert living, "no worker thread of the session is left"
    return living


def _wait_for(condition: Callable[[], bool], timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return condition()


def test_session_worker_threads_are_found_and_pool_threads_are_not() -> None:
    model = _load(60.0)
    python_tids = {t.native_id for t in threading.enumerate()}
    # intra_op_threads=2: the caller and one worker thread ONNX Runtime starts.
    assert len(model.session_tids) >= 1
    assert not model.session_tids & python_tids
    assert all(thread_nice(tid) == BASE for tid in _living(model.session_tids))


def test_capture_new_threads_ignores_python_threads() -> None:
    started = threading.Event()
    stop = threading.Event()

    def make() -> None:
        threading.Thread(target=lambda: (started.set(), stop.wait())).start()
        started.wait()

    try:
        _, tids = capture_new_threads(make)
    finally:
        stop.set()
    assert tids == frozenset()


def test_long_run_demotes_its_threads_then_gives_the_run_thread_back() -> None:
    model = _load(0.02)
    seen: dict[str, int] = {}
    observed = threading.Event()

    def work() -> None:
        # Keep running until the observer has seen this thread demoted mid-run: the demotion only
        # lasts while a run is in progress, and a loaded machine can make any one window short.
        # Once the watchdog has caught one run, the model's later runs start demoted, so the
        # observer gets a fresh window with every run.
        deadline = time.monotonic() + 60
        while not observed.is_set() and time.monotonic() < deadline:
            model.run(_inputs())
        seen["run after"] = thread_nice(threading.get_native_id())
        seen["run after idle"] = int(os.sched_getscheduler(0) == os.SCHED_IDLE)

    thread, tid = _in_thread(work)
    try:

        def demoted() -> bool:
            if not tid or not thread.is_alive():
                return False
            try:
                nice = thread_nice(tid[0])
            except ProcessLookupError:  # the thread ended between the two checks
                return False
            if nice == DEMOTED_NICE:
                seen["run"] = DEMOTED_NICE
                workers = _living(model.session_tids)
                seen["workers"] = min(thread_nice(t) for t in workers)
                idle = {os.sched_getscheduler(t) == os.SCHED_IDLE for t in workers}
                seen["workers idle"] = int(idle == {True})
                return True
            return False

        assert _wait_for(demoted, 60), "the run thread was never demoted"
    finally:
        observed.set()
        thread.join()
    # The run thread stands for a pool thread: its priority is back once the run ended.
    assert seen == {
        "run": DEMOTED_NICE,
        "workers": DEMOTED_NICE,
        "workers idle": 1,
        "run after": BASE,
        "run after idle": 0,
    }
    # Set only by the watchdog catching a run in progress.
    assert model.heavy.is_set
    # The session's workers only ever run this model: they stay demoted.
    assert all(thread_nice(t) == DEMOTED_NICE for t in _living(model.session_tids))


def test_short_runs_are_not_demoted() -> None:
    model = _load(60.0)
    nice_during: list[int] = []

    def work() -> None:
        model.run(_inputs())
        nice_during.append(thread_nice(threading.get_native_id()))

    thread, _ = _in_thread(work)
    thread.join()
    assert nice_during == [BASE]
    assert not model.heavy.is_set
    assert all(thread_nice(t) == BASE for t in _living(model.session_tids))


def test_a_heavy_model_runs_demoted_from_the_start() -> None:
    watchdog = Watchdog(poll_s=0.01)
    heavy = HeavyFlag()
    heavy.is_set = True
    nice: list[int] = []

    def work() -> None:
        run = watchdog.start(frozenset(), heavy, 60.0)
        nice.append(thread_nice(threading.get_native_id()))
        watchdog.end(run)
        nice.append(thread_nice(threading.get_native_id()))

    thread, _ = _in_thread(work)
    thread.join()
    assert nice == [DEMOTED_NICE, BASE]


def test_watchdog_demotes_only_past_the_threshold() -> None:
    watchdog = Watchdog(poll_s=0.01)
    heavy = HeavyFlag()
    release = threading.Event()
    in_run = threading.Event()

    def work() -> None:
        # 3 s: the checks "before the threshold" below must come first on a loaded machine.
        run = watchdog.start(frozenset(), heavy, 3.0)
        in_run.set()
        release.wait()
        watchdog.end(run)

    thread, tid = _in_thread(work)
    try:
        assert in_run.wait(10)
        # Well before the threshold: still at normal priority.
        assert thread_nice(tid[0]) == BASE
        assert not heavy.is_set
        assert _wait_for(lambda: thread_nice(tid[0]) == DEMOTED_NICE, 60)
        assert heavy.is_set
    finally:
        release.set()
        thread.join()
