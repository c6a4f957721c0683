"""CPU-priority demotion of long ONNX Runtime runs: heavy models yield to light ones.

One ONNX Runtime operator cannot be interrupted (``RunOptions.terminate`` acts between nodes),
so a model stuck in one huge MatMul keeps its run thread and its session's intra-op worker
threads busy on every core until it finishes. Separate threads alone do not help: the
scheduler shares the cores evenly between them and a small model's run waits its turn.

The `Watchdog` (one thread per process) looks at the runs in progress every few tens of
milliseconds; a run older than ``Limits.demote_runs_after_s`` is demoted: its run thread and
its session's worker threads get nice `DEMOTED_NICE` and the ``SCHED_IDLE`` policy, so the
kernel gives the cores to every normal thread first and the heavy run uses what is left. Nice 19
alone was not enough (weight 15 against 1024, and no immediate preemption): in
``bench/attack_table.py --only long-matmul`` the victim kept 73-87 % of its throughput with nice
19, 91-98 % with ``SCHED_IDLE`` as well (32-45 % before demotion).

- The session's worker threads stay demoted: they only ever run that model. The model is
  marked heavy, and its later runs are demoted from their start.
- The run thread belongs to the shared pool; it gets its priority back when the run ends.
  Raising a nice value needs ``CAP_SYS_NICE`` (or ``RLIMIT_NICE``): without it that pool
  thread stays demoted, which is logged once; it still runs, at a lower priority.
- Where thread priorities cannot be set (no ``/proc/self/task``, a platform that refuses
  ``setpriority``) nothing is demoted and runs share the cores as before.

Worker threads are found by listing ``/proc/self/task`` around session creation, under a lock
that serializes session creation in this process; threads Python knows (pool threads) are
never counted as a session's, neither then nor when demoting.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TypeVar

__all__ = [
    "DEMOTED_NICE",
    "WATCHDOG",
    "HeavyFlag",
    "Watchdog",
    "capture_new_threads",
    "thread_nice",
]

DEMOTED_NICE = 19
_POLL_S = 0.05
_TASKS = "/proc/self/task"
_T = TypeVar("_T")
_log = logging.getLogger("veil.server")
_creation_lock = threading.Lock()


def _tasks() -> set[int] | None:
    try:
        return {int(name) for name in os.listdir(_TASKS)}
    except (OSError, ValueError):
        return None


def _python_threads() -> set[int]:
    return {t.native_id for t in threading.enumerate() if t.native_id is not None}


def capture_new_threads(create: Callable[[], _T]) -> tuple[_T, frozenset[int]]:
    """Call `create` and return what it made with the native ids of the threads it started.

    Only threads Python does not know are counted (ONNX Runtime's workers); empty where the
    kernel does not list a process's threads.
    """
    with _creation_lock:
        before = _tasks()
        made = create()
        after = _tasks()
    if before is None or after is None:
        return made, frozenset()
    return made, frozenset(after - before - _python_threads())


def thread_nice(tid: int) -> int:
    """The nice value of thread `tid` of this process."""
    return os.getpriority(os.PRIO_PROCESS, tid)


def _set_nice(tid: int, nice: int) -> bool:
    try:
        os.setpriority(os.PRIO_PROCESS, tid, nice)
        policy = os.SCHED_IDLE if nice == DEMOTED_NICE else os.SCHED_OTHER
        if os.sched_getscheduler(tid) != policy:
            os.sched_setscheduler(tid, policy, os.sched_param(0))
    except OSError:  # the thread is gone, or the platform refuses: nothing to demote
        return False
    return True


class HeavyFlag:
    """Set once a model's run has been demoted: its later runs are demoted from their start."""

    __slots__ = ("is_set",)

    def __init__(self) -> None:
        self.is_set = False


class _Run:
    __slots__ = ("deadline", "demoted", "done", "heavy", "original", "session_tids", "tid")

    def __init__(
        self, tid: int, session_tids: frozenset[int], heavy: HeavyFlag, deadline: float
    ) -> None:
        self.tid = tid
        self.session_tids = session_tids
        self.heavy = heavy
        self.deadline = deadline
        self.demoted = False
        self.done = False
        self.original = 0


class Watchdog:
    """Demotes runs that last longer than their threshold (see the module docstring)."""

    def __init__(self, *, poll_s: float = _POLL_S) -> None:
        self._poll_s = poll_s
        self._lock = threading.Lock()
        self._runs: set[_Run] = set()
        self._thread: threading.Thread | None = None
        self._restore_refused = False

    def start(self, session_tids: frozenset[int], heavy: HeavyFlag, demote_after_s: float) -> _Run:
        """Watch the run the calling thread is about to make; call `end` with what it returns.

        Two calls rather than a context manager: this is on every run's path.
        """
        run = _Run(
            threading.get_native_id(), session_tids, heavy, time.monotonic() + demote_after_s
        )
        with self._lock:
            if heavy.is_set:
                self._demote(run)
            self._runs.add(run)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="veil-run-watchdog", daemon=True
                )
                self._thread.start()
        return run

    def end(self, run: _Run) -> None:
        """The run is over: its thread gets its priority back if it was demoted."""
        with self._lock:
            run.done = True
            self._runs.discard(run)
            if run.demoted:
                self._restore(run)

    def _loop(self) -> None:
        while True:
            time.sleep(self._poll_s)
            now = time.monotonic()
            with self._lock:
                for run in self._runs:
                    if not run.demoted and not run.done and now >= run.deadline:
                        self._demote(run)

    def _demote(self, run: _Run) -> None:
        # Under self._lock, so a run cannot end between the check and the demotion.
        try:
            run.original = thread_nice(run.tid)
        except OSError:
            return
        run.demoted = _set_nice(run.tid, max(run.original, DEMOTED_NICE))
        if not run.demoted:
            return
        run.heavy.is_set = True
        busy = _python_threads() | {r.tid for r in self._runs}
        for tid in run.session_tids - busy:
            _set_nice(tid, DEMOTED_NICE)

    def _restore(self, run: _Run) -> None:
        if _set_nice(run.tid, run.original) or self._restore_refused:
            return
        self._restore_refused = True
        _log.warning(
            "a run thread demoted to nice %d could not get nice %d back (needs CAP_SYS_NICE): "
            "it stays demoted",
            DEMOTED_NICE,
            run.original,
        )


WATCHDOG = Watchdog()
"""The process's watchdog: one thread for every model's runs."""
