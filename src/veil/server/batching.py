"""Dynamic batching: merge concurrent predictions for one model into a single ONNX Runtime call.

On a small CPU a transformer's cost per sequence falls steeply with the batch size (DistilBERT on
2 cores: ~10 ms for one sequence, ~90 ms for 32), so a server that runs concurrent requests one
by one leaves most of its throughput unused. A `DynamicBatcher` sits in front of one model's
``run`` function and, while the event loop keeps accepting requests, does this:

1. Each `DynamicBatcher.submit` call queues its inputs with a *batch key*: input names, dtypes
   and every dimension except axis 0. Only requests with equal keys are merged.
2. One worker per model drains the queue. When the model is idle a request runs at once (no
   added latency at concurrency 1). Requests that arrive while a run is in progress wait for it
   and form the next batch. If the previous batch merged several requests, the worker waits up
   to ``max_delay_ms`` for as many requests as that batch had, so clients that have just received
   their answers can rejoin before the next run.
3. The batch's inputs are concatenated along axis 0 (at most ``max_batch_size`` rows, unless a
   single request is larger) and run in ONE worker-thread call of ``run``.
4. Every output is split back along axis 0 by each request's row count. If an output's axis 0
   is not the merged row count, the model does not batch the way its metadata said: each
   request of that batch is rerun alone and the batcher stays unbatched for that model.
5. If a merged run raises, each of its requests is rerun alone, so a request with bad data
   (say a token id outside the vocabulary) fails only itself. If a request fails alone, its
   caller gets the exception `run` raised.

Cancelling one caller (a client that went away) removes its request from the queue or drops its
result; the others are unaffected. Results equal those of unbatched calls, except where a
batched matrix product rounds differently in the last unit of the last place.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

__all__ = [
    "BatcherStats",
    "BatchingConfig",
    "DynamicBatcher",
    "RunFunction",
    "has_dynamic_batch_axis",
]

Array = npt.NDArray[Any]
RunFunction = Callable[[dict[str, Array]], list[Array]]
"""Runs a model on named inputs and returns its outputs in order (ONNX Runtime's ``run``)."""

_R = TypeVar("_R")

# An upper bound keeps a misconfiguration from parking every request for seconds.
_MAX_DELAY_MS = 1000.0


@dataclass(frozen=True, slots=True)
class BatchingConfig:
    """How a `DynamicBatcher` merges requests.

    Args:
        enabled: merge concurrent requests at all. With ``False`` requests still run one at a
            time per model, in arrival order.
        max_batch_size: most rows (sum of axis 0 over merged requests) in one run. A single
            request with more rows runs alone, unsplit.
        max_delay_ms: longest wait for more requests before a run, used only after a batch that
            merged several requests (see the module docstring); ``0`` never waits.
    """

    enabled: bool = True
    max_batch_size: int = 32
    max_delay_ms: float = 2.0

    def __post_init__(self) -> None:
        if isinstance(self.max_batch_size, bool) or not isinstance(self.max_batch_size, int):
            raise TypeError(f"max_batch_size: got {self.max_batch_size!r}, expected an int")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size: got {self.max_batch_size}, expected >= 1")
        if not 0.0 <= self.max_delay_ms <= _MAX_DELAY_MS:
            raise ValueError(
                f"max_delay_ms: got {self.max_delay_ms}, expected between 0 and {_MAX_DELAY_MS}"
            )


@dataclass(frozen=True, slots=True)
class BatcherStats:
    """Counters of one `DynamicBatcher` since it was made.

    Attributes:
        runs: calls of the model's ``run`` (merged batches, single requests and reruns).
        merged_runs: runs that merged two or more requests.
        requests: requests that completed a run, successfully or not.
        rows: rows (axis 0) over those requests.
        max_rows: most rows in one run.
        reruns: requests rerun alone after their merged batch failed or did not split.
        batching_disabled: batching was turned off for this model after an output did not split.
    """

    runs: int
    merged_runs: int
    requests: int
    rows: int
    max_rows: int
    reruns: int
    batching_disabled: bool

    @property
    def mean_batch_size(self) -> float:
        """Mean number of requests per run (1.0 when nothing was merged; 0.0 before any run)."""
        return self.requests / self.runs if self.runs else 0.0


class _Shaped(Protocol):
    @property
    def shape(self) -> Sequence[Any] | None: ...


def has_dynamic_batch_axis(inputs: Iterable[_Shaped], outputs: Iterable[_Shaped]) -> bool:
    """Whether a model declares axis 0 of every input and output as a free batch dimension.

    Takes ONNX Runtime's ``session.get_inputs()`` and ``session.get_outputs()`` (anything with a
    ``shape`` list). A dimension is free when ONNX Runtime reports it as a symbolic name (``str``)
    or unknown (``None``); a fixed integer, a scalar, or a missing shape means the model cannot be
    trusted to batch along axis 0.
    """
    nodes = [*inputs, *outputs]
    if not nodes:
        return False
    for node in nodes:
        shape = node.shape
        if not shape:
            return False
        first = shape[0]
        if first is not None and not isinstance(first, str):
            return False
    return True


_BatchKey = tuple[tuple[str, str, tuple[int, ...]], ...]


class _Request:
    __slots__ = ("future", "inputs", "key", "rows")

    def __init__(
        self,
        inputs: dict[str, Array],
        key: _BatchKey | None,
        rows: int,
        future: asyncio.Future[Any],
    ) -> None:
        self.inputs = inputs
        self.key = key  # None: never merged (scalar input, inconsistent axis 0, no inputs)
        self.rows = rows
        self.future = future


def _batch_key(inputs: Mapping[str, Array]) -> tuple[_BatchKey | None, int]:
    rows: int | None = None
    parts: list[tuple[str, str, tuple[int, ...]]] = []
    for name in sorted(inputs):
        array = inputs[name]
        if array.ndim == 0:
            return None, 1
        if rows is None:
            rows = int(array.shape[0])
        elif rows != array.shape[0]:
            return None, 1  # let the model report the inconsistency, alone
        parts.append((name, array.dtype.str, tuple(int(d) for d in array.shape[1:])))
    if rows is None or rows == 0:
        return None, 1
    return tuple(parts), rows


# Outcome of one request when a batch is rerun request by request in the worker thread.
_Outcome = tuple[list[Array] | None, BaseException | None]


class DynamicBatcher:
    """Merge concurrent requests for ONE model into batched runs (see the module docstring).

    Create one per loaded model, inside or outside an event loop; call `submit` from the event
    loop. The worker runs only while requests are queued, so an idle batcher holds no task.

    Args:
        run: the model's run function, called in a worker thread with a dict of named inputs
            (``lambda feeds: session.run(None, feeds)`` for ONNX Runtime). It must be safe to
            call from a thread other than the event loop's; the batcher never calls it twice at
            once.
        config: batching settings; the default merges up to 32 rows.
        dynamic_batch_axis: whether the model's metadata declares a free axis 0 on every input
            and output (`has_dynamic_batch_axis`). Without it requests run one by one.
        executor: where ``run`` is called; the event loop's default executor if ``None``.

    Example:
        >>> import asyncio, numpy as np
        >>> batcher = DynamicBatcher(lambda feeds: [feeds["x"] * 2])
        >>> asyncio.run(batcher.submit({"x": np.ones((1, 3), np.float32)}))[0].tolist()
        [[2.0, 2.0, 2.0]]
    """

    def __init__(
        self,
        run: RunFunction,
        *,
        config: BatchingConfig | None = None,
        dynamic_batch_axis: bool = True,
        executor: Executor | None = None,
    ) -> None:
        self._run = run
        self._config = config if config is not None else BatchingConfig()
        self._executor = executor
        self._batching = (
            self._config.enabled and dynamic_batch_axis and self._config.max_batch_size > 1
        )
        self._disabled_after_split_failure = False
        self.on_run: Callable[[int, int], None] | None = None
        """Called on the event loop with (requests, rows) of each run (the server's metrics)."""
        self._queue: deque[_Request] = deque()
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self._last_requests = 1
        self._closed = False
        # counters (only touched on the event loop)
        self._runs = 0
        self._merged_runs = 0
        self._requests = 0
        self._rows = 0
        self._max_rows = 0
        self._reruns = 0

    @property
    def batching(self) -> bool:
        """Whether requests are currently merged (false if disabled or after a split failure)."""
        return self._batching

    @property
    def closed(self) -> bool:
        """Whether `close` was called (new requests are refused)."""
        return self._closed

    @property
    def config(self) -> BatchingConfig:
        """The settings this batcher was made with."""
        return self._config

    def stats(self) -> BatcherStats:
        """A snapshot of the counters."""
        return BatcherStats(
            runs=self._runs,
            merged_runs=self._merged_runs,
            requests=self._requests,
            rows=self._rows,
            max_rows=self._max_rows,
            reruns=self._reruns,
            batching_disabled=self._disabled_after_split_failure,
        )

    async def submit(self, inputs: Mapping[str, Array]) -> list[Array]:
        """Run the model on ``inputs`` (possibly merged with other requests) and return its outputs.

        Outputs come in the order ``run`` returns them, each with this request's rows only.
        Exceptions raised by ``run`` for this request propagate unchanged.

        Raises:
            RuntimeError: the batcher was closed.
        """
        if self._closed:
            raise RuntimeError("the model's batcher is closed")
        loop = asyncio.get_running_loop()
        feeds = {name: np.asarray(value) for name, value in inputs.items()}
        key, rows = _batch_key(feeds)
        if not self._batching:
            key = None
        request = _Request(feeds, key, rows, loop.create_future())
        self._queue.append(request)
        if self._arrived is not None:
            self._arrived.set()
        if self._worker is None:
            self._arrived = asyncio.Event()
            self._worker = loop.create_task(self._drain())
        result: list[Array] = await request.future
        return result

    async def close(self) -> None:
        """Refuse new requests and wait until the queued ones have run."""
        self._closed = True
        worker = self._worker
        if worker is not None:
            await asyncio.shield(worker)

    # -- worker ------------------------------------------------------------------------------

    async def _drain(self) -> None:
        batch: list[_Request] = []
        try:
            while self._queue:
                if self._batching and self._last_requests > 1 and self._config.max_delay_ms > 0:
                    await self._gather_stragglers()
                batch = self._take_batch()
                if batch:
                    try:
                        await self._execute(batch)
                    except Exception as exc:
                        # e.g. run() returned something that is not a list of arrays: whatever
                        # it was, no caller may be left waiting for ever.
                        for request in batch:
                            _fail(request, exc)
                batch = []
        finally:
            self._worker = None
            self._arrived = None
            # Only non-empty if this task was cancelled (event loop shutting down).
            stranded = [*batch, *self._queue]
            self._queue.clear()
            for request in stranded:
                _fail(request, RuntimeError("the model's batcher stopped"))

    async def _gather_stragglers(self) -> None:
        # The last batch merged several requests: their clients are likely sending the next ones
        # now. Wait (bounded) until as many are queued as that batch had, or the batch is full.
        assert self._arrived is not None
        loop = asyncio.get_running_loop()
        want_requests = self._last_requests
        want_rows = self._config.max_batch_size
        deadline = loop.time() + self._config.max_delay_ms / 1000.0
        while len(self._queue) < want_requests and sum(r.rows for r in self._queue) < want_rows:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._arrived.wait()

    def _take_batch(self) -> list[_Request]:
        # Take the oldest live request, then (if batching) every later compatible live request that
        # still fits. Incompatible ones keep their place, so the oldest always runs next.
        while self._queue and self._queue[0].future.done():
            self._queue.popleft()  # cancelled while queued
        if not self._queue:
            return []
        first = self._queue.popleft()
        batch = [first]
        if not self._batching or first.key is None:
            return batch
        rows = first.rows
        limit = self._config.max_batch_size
        kept: deque[_Request] = deque()
        while self._queue and rows < limit:
            request = self._queue.popleft()
            if request.future.done():
                continue
            if request.key == first.key and rows + request.rows <= limit:
                batch.append(request)
                rows += request.rows
            else:
                kept.append(request)
        kept.extend(self._queue)
        self._queue = kept
        return batch

    async def _execute(self, batch: list[_Request]) -> None:
        loop = asyncio.get_running_loop()
        rows = sum(r.rows for r in batch)
        self._count(len(batch), rows, runs=1)
        if self.on_run is not None:
            self.on_run(len(batch), rows)
        self._last_requests = len(batch)
        if len(batch) == 1:
            request = batch[0]
            try:
                outputs = await _in_executor(loop, self._executor, self._run, request.inputs)
            except Exception as exc:
                _fail(request, exc)
            else:
                _succeed(request, list(outputs))
            return

        merged = {
            name: np.concatenate([r.inputs[name] for r in batch], axis=0)
            for name in batch[0].inputs
        }
        try:
            outputs = await _in_executor(loop, self._executor, self._run, merged)
        except Exception:
            # One request's data may have broken the whole batch: rerun each alone.
            await self._rerun_each(batch)
            return
        pieces = _split(list(outputs), [r.rows for r in batch])
        if pieces is None:
            # An output whose axis 0 is not the batch: this model does not batch along axis 0.
            self._batching = False
            self._disabled_after_split_failure = True
            await self._rerun_each(batch)
            return
        self._merged_runs += 1
        for request, piece in zip(batch, pieces, strict=True):
            _succeed(request, piece)

    async def _rerun_each(self, batch: list[_Request]) -> None:
        live = [r for r in batch if not r.future.done()]
        if not live:
            return
        self._reruns += len(live)
        self._count(0, 0, runs=len(live))
        loop = asyncio.get_running_loop()
        outcomes = await _in_executor(
            loop, self._executor, _run_each, self._run, [r.inputs for r in live]
        )
        for request, (outputs, exc) in zip(live, outcomes, strict=True):
            if exc is not None:
                _fail(request, exc)
            else:
                assert outputs is not None
                _succeed(request, outputs)

    def _count(self, requests: int, rows: int, *, runs: int) -> None:
        self._runs += runs
        self._requests += requests
        self._rows += rows
        self._max_rows = max(self._max_rows, rows)


def _in_executor(
    loop: asyncio.AbstractEventLoop, executor: Executor | None, func: Callable[..., _R], *args: Any
) -> asyncio.Future[_R]:
    """``loop.run_in_executor(executor, func, *args)`` at half its cost per call.

    The worker settles an event-loop future itself (one ``call_soon_threadsafe``) instead of
    the executor's future being chained to a new one (``wrap_future``): a request at
    concurrency 1 pays this hop once. A cancelled caller cancels the job if it has not started.
    """
    if executor is None:
        return loop.run_in_executor(None, func, *args)
    future: asyncio.Future[_R] = loop.create_future()

    def settle(result: Any, exc: BaseException | None) -> None:
        if future.done():  # the caller was cancelled
            return
        if isinstance(exc, StopIteration):  # a future refuses it (it would end a generator)
            future.set_exception(RuntimeError("the run raised StopIteration"))
        elif exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)

    def work() -> None:
        try:
            result, exc = func(*args), None
        except BaseException as raised:  # handed to the caller, as run_in_executor does
            result, exc = None, raised
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(settle, result, exc)

    job = executor.submit(work)
    future.add_done_callback(lambda f: job.cancel() if f.cancelled() else None)
    return future


def _run_each(run: RunFunction, feeds: list[dict[str, Array]]) -> list[_Outcome]:
    outcomes: list[_Outcome] = []
    for inputs in feeds:
        try:
            outcomes.append((list(run(inputs)), None))
        except Exception as exc:
            outcomes.append((None, exc))
    return outcomes


def _split(outputs: list[Array], rows: list[int]) -> list[list[Array]] | None:
    total = sum(rows)
    for output in outputs:
        if not isinstance(output, np.ndarray) or output.ndim == 0 or output.shape[0] != total:
            return None
    pieces: list[list[Array]] = [[] for _ in rows]
    for output in outputs:
        start = 0
        for i, n in enumerate(rows):
            pieces[i].append(output[start : start + n])
            start += n
    return pieces


def _succeed(request: _Request, outputs: list[Array]) -> None:
    if not request.future.done():
        request.future.set_result(outputs)


def _fail(request: _Request, exc: BaseException) -> None:
    if not request.future.done():
        request.future.set_exception(exc)
