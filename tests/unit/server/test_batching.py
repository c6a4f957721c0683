"""DynamicBatcher: merging, exact splitting, fallbacks, errors, cancellation, one worker."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from veil.server.batching import (
    BatchingConfig,
    DynamicBatcher,
    has_dynamic_batch_axis,
)

Feeds = dict[str, np.ndarray]


class Recorder:
    """A run function that records every call's inputs and how many ran at once."""

    def __init__(self, fn: Callable[[Feeds], list[np.ndarray]], block: float = 0.0) -> None:
        self.fn = fn
        self.block = block
        self.calls: list[Feeds] = []
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()

    def __call__(self, feeds: Feeds) -> list[np.ndarray]:
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self.calls.append({k: v.copy() for k, v in feeds.items()})
        try:
            if self.block:
                time.sleep(self.block)
            return self.fn(feeds)
        finally:
            with self._lock:
                self.active -= 1

    @property
    def rows(self) -> list[int]:
        return [next(iter(c.values())).shape[0] for c in self.calls]


def double(feeds: Feeds) -> list[np.ndarray]:
    x = feeds["x"]
    return [x * 2, x.sum(axis=tuple(range(1, x.ndim)))]


def rows_of(n: int, width: int = 3, start: float = 0.0) -> Feeds:
    x = (np.arange(n * width, dtype=np.float32) + start).reshape(n, width)
    return {"x": x}


async def gather(batcher: DynamicBatcher, requests: list[Feeds]) -> list[Any]:
    return await asyncio.gather(*(batcher.submit(r) for r in requests), return_exceptions=True)


# -- configuration -------------------------------------------------------------------------------


def test_config_defaults() -> None:
    config = BatchingConfig()
    assert config.enabled
    assert config.max_batch_size == 32
    assert config.max_delay_ms == 2.0


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"max_batch_size": 0}, ValueError),
        ({"max_batch_size": -3}, ValueError),
        ({"max_batch_size": 2.5}, TypeError),
        ({"max_batch_size": True}, TypeError),
        ({"max_delay_ms": -0.1}, ValueError),
        ({"max_delay_ms": 1000.5}, ValueError),
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error, match=next(iter(kwargs))):
        BatchingConfig(**kwargs)


# -- has_dynamic_batch_axis ------------------------------------------------------------------------


@dataclass
class Node:
    shape: list[Any] | None


@pytest.mark.parametrize(
    ("inputs", "outputs", "expected"),
    [
        ([["batch", 8]], [["batch", 2]], True),
        ([[None, 8]], [["N"]], True),
        ([["batch", "seq"], ["batch", "seq"]], [["batch", 384]], True),
        ([[1, 8]], [["batch", 2]], False),
        ([["batch", 8]], [[1, 2]], False),
        ([["batch", 8]], [[]], False),  # scalar output
        ([[]], [["batch"]], False),  # scalar input
        ([None], [["batch"]], False),  # unknown rank
        ([], [], False),
    ],
)
def test_has_dynamic_batch_axis(inputs: list[Any], outputs: list[Any], expected: bool) -> None:
    assert has_dynamic_batch_axis([Node(s) for s in inputs], [Node(s) for s in outputs]) is expected


def _session(nodes: list[onnx.NodeProto], batch_dim: str | int, ops: str = "") -> Any:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch_dim, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch_dim, 4])
    inits = [
        helper.make_tensor("w", TensorProto.FLOAT, [4, 4], [0.1 * i - 0.7 for i in range(16)]),
        helper.make_tensor("b", TensorProto.FLOAT, [4], [0.5, -1.0, 2.0, 0.25]),
    ]
    graph = helper.make_graph(nodes, f"g{ops}", [x], [y], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _elementwise_session(batch_dim: str | int = "batch") -> Any:
    nodes = [
        helper.make_node("Mul", ["x", "x"], ["sq"]),
        helper.make_node("Add", ["sq", "b"], ["s"]),
        helper.make_node("Tanh", ["s"], ["y"]),
    ]
    return _session(nodes, batch_dim, "ew")


def _matmul_session() -> Any:
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"]),
        helper.make_node("Add", ["m", "b"], ["s"]),
        helper.make_node("Softmax", ["s"], ["y"], axis=-1),
    ]
    return _session(nodes, "batch", "mm")


def test_has_dynamic_batch_axis_reads_onnxruntime_metadata() -> None:
    dynamic = _elementwise_session("batch")
    fixed = _elementwise_session(1)
    assert has_dynamic_batch_axis(dynamic.get_inputs(), dynamic.get_outputs())
    assert not has_dynamic_batch_axis(fixed.get_inputs(), fixed.get_outputs())


# -- merging and splitting -----------------------------------------------------------------------


def test_concurrent_requests_merge_into_one_run_and_split_back() -> None:
    run = Recorder(double)
    batcher = DynamicBatcher(run)
    requests = [rows_of(1, start=10.0 * i) for i in range(8)]
    results = asyncio.run(gather(batcher, requests))
    assert run.rows == [8]
    for request, result in zip(requests, results, strict=True):
        expected = double(request)
        assert len(result) == 2
        for got, want in zip(result, expected, strict=True):
            assert got.shape == want.shape
            np.testing.assert_array_equal(got, want)
    stats = batcher.stats()
    assert (stats.runs, stats.merged_runs, stats.requests, stats.rows) == (1, 1, 8, 8)
    assert stats.mean_batch_size == 8.0


def test_multi_row_requests_split_by_their_row_counts() -> None:
    run = Recorder(double)
    batcher = DynamicBatcher(run)
    requests = [rows_of(2), rows_of(3, start=100.0), rows_of(1, start=-5.0)]
    results = asyncio.run(gather(batcher, requests))
    assert run.rows == [6]
    for request, result in zip(requests, results, strict=True):
        np.testing.assert_array_equal(result[0], request["x"] * 2)
        np.testing.assert_array_equal(result[1], request["x"].sum(axis=1))
    assert batcher.stats().max_rows == 6


def test_max_batch_size_bounds_rows_per_run() -> None:
    run = Recorder(double)
    batcher = DynamicBatcher(run, config=BatchingConfig(max_batch_size=4, max_delay_ms=0))
    requests = [rows_of(1, start=float(i)) for i in range(10)]
    results = asyncio.run(gather(batcher, requests))
    assert run.rows == [4, 4, 2]
    for request, result in zip(requests, results, strict=True):
        np.testing.assert_array_equal(result[0], request["x"] * 2)


def test_request_larger_than_max_batch_runs_alone() -> None:
    run = Recorder(double)
    batcher = DynamicBatcher(run, config=BatchingConfig(max_batch_size=4))
    big, small = rows_of(6), rows_of(1, start=9.0)
    results = asyncio.run(gather(batcher, [big, small]))
    assert run.rows == [6, 1]
    np.testing.assert_array_equal(results[0][0], big["x"] * 2)
    np.testing.assert_array_equal(results[1][0], small["x"] * 2)


@pytest.mark.parametrize(
    "other",
    [
        {"x": np.ones((1, 5), np.float32)},  # another trailing dimension
        {"x": np.ones((1, 3), np.float64)},  # another dtype
        {"x": np.ones((1, 3, 1), np.float32)},  # another rank
        {"z": np.ones((1, 3), np.float32)},  # another input name
        {"x": np.ones((1, 3), np.float32), "m": np.ones((1, 3), np.int64)},  # an extra input
    ],
)
def test_incompatible_requests_are_not_merged(other: Feeds) -> None:
    def run_any(feeds: Feeds) -> list[np.ndarray]:
        return [next(iter(feeds.values())) + 1]

    run = Recorder(run_any)
    batcher = DynamicBatcher(run)
    a1, a2 = rows_of(1), rows_of(1, start=3.0)
    results = asyncio.run(gather(batcher, [a1, other, a2]))
    # the two compatible ones merge; the odd one runs on its own, after the oldest
    assert len(run.calls) == 2
    assert run.calls[0]["x"].shape == (2, 3)
    assert set(run.calls[1]) == set(other)
    np.testing.assert_array_equal(results[0][0], a1["x"] + 1)
    np.testing.assert_array_equal(results[1][0], next(iter(other.values())) + 1)
    np.testing.assert_array_equal(results[2][0], a2["x"] + 1)


@pytest.mark.parametrize(
    "odd",
    [
        {"x": np.float32(3.0)},  # scalar: no axis 0
        {"x": np.ones((1, 3), np.float32), "y": np.ones((2, 3), np.float32)},  # axis 0 differs
        {"x": np.ones((0, 3), np.float32)},  # no rows
        {},  # no inputs
    ],
)
def test_requests_without_a_clean_axis_0_run_alone(odd: Feeds) -> None:
    def run_any(feeds: Feeds) -> list[np.ndarray]:
        return [np.asarray(len(feeds))]

    run = Recorder(run_any)
    batcher = DynamicBatcher(run)
    results = asyncio.run(gather(batcher, [odd, odd, rows_of(1)]))
    assert len(run.calls) == 3
    assert [r[0].item() for r in results] == [len(odd), len(odd), 1]


def test_inputs_keep_their_names_across_a_merge() -> None:
    def affine(feeds: Feeds) -> list[np.ndarray]:
        return [feeds["a"] * 10 + feeds["b"]]

    run = Recorder(affine)
    batcher = DynamicBatcher(run)
    reqs = [
        {"a": np.full((1, 2), i, np.int64), "b": np.full((1, 2), -i, np.int64)} for i in range(5)
    ]
    results = asyncio.run(gather(batcher, reqs))
    assert run.rows == [5]
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result[0], np.full((1, 2), 9 * i, np.int64))


# -- when not to batch -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda run: DynamicBatcher(run, config=BatchingConfig(enabled=False)),
        lambda run: DynamicBatcher(run, dynamic_batch_axis=False),
        lambda run: DynamicBatcher(run, config=BatchingConfig(max_batch_size=1)),
    ],
)
def test_unbatched_modes_run_requests_one_by_one_in_order(
    make: Callable[[Recorder], DynamicBatcher],
) -> None:
    run = Recorder(double)
    batcher = make(run)
    assert not batcher.batching
    requests = [rows_of(1, start=float(i)) for i in range(5)]
    results = asyncio.run(gather(batcher, requests))
    assert run.rows == [1] * 5
    assert [c["x"][0, 0] for c in run.calls] == [r["x"][0, 0] for r in requests]
    for request, result in zip(requests, results, strict=True):
        np.testing.assert_array_equal(result[0], request["x"] * 2)
    assert run.max_active == 1


def test_output_without_batch_axis_falls_back_to_unbatched_and_remembers() -> None:
    def pooled(feeds: Feeds) -> list[np.ndarray]:
        x = feeds["x"]
        return [x * 2, x.sum(axis=0, keepdims=True)]  # second output's axis 0 is always 1

    run = Recorder(pooled)
    batcher = DynamicBatcher(run)
    requests = [rows_of(1, start=float(i)) for i in range(4)]
    results = asyncio.run(gather(batcher, requests))
    # one merged attempt that could not be split, then each request alone
    assert run.rows == [4, 1, 1, 1, 1]
    for request, result in zip(requests, results, strict=True):
        for got, want in zip(result, pooled(request), strict=True):
            np.testing.assert_array_equal(got, want)
    assert not batcher.batching
    stats = batcher.stats()
    assert stats.batching_disabled
    assert stats.reruns == 4

    run.calls.clear()
    more = [rows_of(1, start=float(i)) for i in range(3)]
    asyncio.run(gather(batcher, more))
    assert run.rows == [1, 1, 1]


def test_scalar_output_falls_back() -> None:
    run = Recorder(lambda feeds: [feeds["x"].sum()])
    batcher = DynamicBatcher(run)
    requests = [rows_of(1, start=float(i)) for i in range(3)]
    results = asyncio.run(gather(batcher, requests))
    assert [r[0] for r in results] == [r["x"].sum() for r in requests]
    assert not batcher.batching


# -- errors ---------------------------------------------------------------------------------


class BadToken(Exception):
    pass


def test_failed_batch_reruns_alone_so_only_the_bad_request_fails() -> None:
    def strict(feeds: Feeds) -> list[np.ndarray]:
        if (feeds["x"] < 0).any():
            raise BadToken("negative input")
        return [feeds["x"] * 2]

    run = Recorder(strict)
    batcher = DynamicBatcher(run)
    requests = [rows_of(1, start=float(i)) for i in range(4)]
    requests[2] = rows_of(1, start=-50.0)
    results = asyncio.run(gather(batcher, requests))
    assert isinstance(results[2], BadToken)
    for i in (0, 1, 3):
        np.testing.assert_array_equal(results[i][0], requests[i]["x"] * 2)
    assert run.rows == [4, 1, 1, 1, 1]
    assert batcher.batching  # a data error does not turn batching off


def test_model_that_always_fails_reports_to_every_member_and_keeps_serving() -> None:
    broken = {"on": True}

    def flaky(feeds: Feeds) -> list[np.ndarray]:
        if broken["on"]:
            raise RuntimeError("model failure")
        return [feeds["x"] + 1]

    batcher = DynamicBatcher(Recorder(flaky))
    results = asyncio.run(gather(batcher, [rows_of(1) for _ in range(5)]))
    assert all(isinstance(r, RuntimeError) and str(r) == "model failure" for r in results)

    broken["on"] = False
    again = asyncio.run(gather(batcher, [rows_of(1), rows_of(1, start=2.0)]))
    np.testing.assert_array_equal(again[1][0], rows_of(1, start=2.0)["x"] + 1)


@pytest.mark.parametrize("count", [1, 3])
def test_run_returning_junk_fails_its_callers_instead_of_hanging(count: int) -> None:
    batcher = DynamicBatcher(lambda feeds: None)  # type: ignore[arg-type,return-value]

    async def scenario() -> list[Any]:
        async with asyncio.timeout(5):
            return await gather(batcher, [rows_of(1) for _ in range(count)])

    results = asyncio.run(scenario())
    assert all(isinstance(r, TypeError) for r in results)


def test_requests_queued_when_the_worker_is_cancelled_are_failed() -> None:
    run = Recorder(double, block=0.05)
    batcher = DynamicBatcher(run)

    async def scenario() -> list[Any]:
        tasks = [asyncio.create_task(batcher.submit(rows_of(1))) for _ in range(2)]
        await asyncio.sleep(0.01)
        tasks.append(asyncio.create_task(batcher.submit(rows_of(1))))
        await asyncio.sleep(0)
        worker = batcher._worker
        assert worker is not None
        worker.cancel()
        async with asyncio.timeout(5):
            return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(scenario())
    assert all(isinstance(r, RuntimeError) and "stopped" in str(r) for r in results)


def test_single_request_error_propagates_unchanged() -> None:
    error = BadToken("x")

    def fail(feeds: Feeds) -> list[np.ndarray]:
        raise error

    batcher = DynamicBatcher(fail)

    async def one() -> None:
        await batcher.submit(rows_of(1))

    with pytest.raises(BadToken) as caught:
        asyncio.run(one())
    assert caught.value is error


# -- cancellation, one worker, closing ---------------------------------------------------------


def test_cancelled_waiter_while_queued_is_skipped_and_others_complete() -> None:
    run = Recorder(double, block=0.05)
    batcher = DynamicBatcher(run)

    async def scenario() -> list[Any]:
        first = asyncio.create_task(batcher.submit(rows_of(1, start=1.0)))
        await asyncio.sleep(0.01)  # first is running now; the next ones queue behind it
        queued = [
            asyncio.create_task(batcher.submit(rows_of(1, start=float(10 * i)))) for i in range(4)
        ]
        await asyncio.sleep(0)
        queued[0].cancel()  # the oldest in the queue
        queued[2].cancel()
        results = await asyncio.gather(first, *queued, return_exceptions=True)
        return results

    results = asyncio.run(scenario())
    assert isinstance(results[1], asyncio.CancelledError)
    assert isinstance(results[3], asyncio.CancelledError)
    assert run.rows == [1, 2]  # the cancelled requests never ran
    assert sorted(run.calls[1]["x"][:, 0]) == [10.0, 30.0]
    np.testing.assert_array_equal(results[2][0], rows_of(1, start=10.0)["x"] * 2)
    np.testing.assert_array_equal(results[4][0], rows_of(1, start=30.0)["x"] * 2)


def test_cancelled_waiter_during_run_does_not_disturb_the_batch() -> None:
    run = Recorder(double, block=0.05)
    batcher = DynamicBatcher(run)

    async def scenario() -> list[Any]:
        tasks = [asyncio.create_task(batcher.submit(rows_of(1, start=float(i)))) for i in range(3)]
        await asyncio.sleep(0.02)  # the merged run of 3 is in progress
        tasks[0].cancel()
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(scenario())
    assert isinstance(results[0], asyncio.CancelledError)
    assert run.rows == [3]
    np.testing.assert_array_equal(results[2][0], rows_of(1, start=2.0)["x"] * 2)


def test_one_run_at_a_time_and_requests_arriving_during_a_run_form_the_next_batch() -> None:
    run = Recorder(double, block=0.03)
    pool = ThreadPoolExecutor(max_workers=8)
    batcher = DynamicBatcher(run, executor=pool, config=BatchingConfig(max_delay_ms=0))

    async def scenario() -> list[Any]:
        first = asyncio.create_task(batcher.submit(rows_of(1)))
        await asyncio.sleep(0.01)
        later = [asyncio.create_task(batcher.submit(rows_of(1))) for _ in range(6)]
        return await asyncio.gather(first, *later)

    try:
        asyncio.run(scenario())
    finally:
        pool.shutdown()
    assert run.max_active == 1  # even with 8 threads available
    assert run.rows == [1, 6]


def test_batchers_of_different_models_are_independent() -> None:
    run_a, run_b = Recorder(double, block=0.02), Recorder(double, block=0.02)
    a, b = DynamicBatcher(run_a), DynamicBatcher(run_b)

    async def scenario() -> None:
        await asyncio.gather(*(a.submit(rows_of(1)) for _ in range(3)))
        await asyncio.gather(*(b.submit(rows_of(1)) for _ in range(2)))

    asyncio.run(scenario())
    assert run_a.rows == [3]
    assert run_b.rows == [2]


def test_close_drains_queue_then_refuses() -> None:
    run = Recorder(double, block=0.02)
    batcher = DynamicBatcher(run)

    async def scenario() -> list[Any]:
        tasks = [asyncio.create_task(batcher.submit(rows_of(1))) for _ in range(3)]
        await asyncio.sleep(0)
        await batcher.close()
        assert all(t.done() for t in tasks)
        with pytest.raises(RuntimeError, match="closed"):
            await batcher.submit(rows_of(1))
        return [t.result() for t in tasks]

    results = asyncio.run(scenario())
    assert len(results) == 3
    await_nothing = DynamicBatcher(run)
    asyncio.run(await_nothing.close())  # closing an idle batcher returns at once


# -- the straggler window ----------------------------------------------------------------------


def _staggered(batcher: DynamicBatcher, gap_s: float) -> Callable[[], Any]:
    async def scenario() -> None:
        await asyncio.gather(*(batcher.submit(rows_of(1)) for _ in range(4)))  # batch of 4

        async def late(i: int) -> None:
            await asyncio.sleep(i * gap_s)
            await batcher.submit(rows_of(1))

        await asyncio.gather(*(late(i) for i in range(4)))

    return scenario


def test_after_a_merged_batch_the_worker_waits_for_stragglers() -> None:
    run = Recorder(double)
    batcher = DynamicBatcher(run, config=BatchingConfig(max_delay_ms=1000))
    started = time.monotonic()
    asyncio.run(_staggered(batcher, 0.01)())
    assert run.rows == [4, 4]
    # the wait ended as soon as as many requests as the last batch had arrived (~30 ms), long
    # before the 1 s window
    assert time.monotonic() - started < 0.9


def test_without_a_window_stragglers_are_not_awaited() -> None:
    run = Recorder(double)
    batcher = DynamicBatcher(run, config=BatchingConfig(max_delay_ms=0))
    asyncio.run(_staggered(batcher, 0.01)())
    assert run.rows[0] == 4
    assert len(run.rows) > 2


def test_a_lone_request_after_a_lone_request_is_not_delayed() -> None:
    run = Recorder(double)
    batcher = DynamicBatcher(run, config=BatchingConfig(max_delay_ms=1000))

    async def scenario() -> float:
        await batcher.submit(rows_of(1))
        started = time.monotonic()
        await batcher.submit(rows_of(1))
        return time.monotonic() - started

    # a 1 s window, never used: the previous batch held one request
    assert asyncio.run(scenario()) < 0.9


# -- real ONNX Runtime sessions ----------------------------------------------------------------


def _ort_run(session: Any) -> Callable[[Feeds], list[np.ndarray]]:
    def run(feeds: Feeds) -> list[np.ndarray]:
        return list(session.run(None, feeds))

    return run


def _random_requests(n: int, seed: int) -> list[Feeds]:
    rng = np.random.default_rng(seed)
    return [
        {"x": rng.standard_normal((int(rng.integers(1, 4)), 4)).astype(np.float32)}
        for _ in range(n)
    ]


def test_onnxruntime_elementwise_model_is_bit_exact() -> None:
    session = _elementwise_session()
    assert has_dynamic_batch_axis(session.get_inputs(), session.get_outputs())
    run = Recorder(_ort_run(session))
    batcher = DynamicBatcher(run)
    requests = _random_requests(12, seed=1)
    results = asyncio.run(gather(batcher, requests))
    assert len(run.calls) == 1
    for request, result in zip(requests, results, strict=True):
        np.testing.assert_array_equal(result[0], session.run(None, request)[0])


def test_onnxruntime_matmul_model_matches_unbatched() -> None:
    session = _matmul_session()
    run = Recorder(_ort_run(session))
    batcher = DynamicBatcher(run, config=BatchingConfig(max_batch_size=16))
    requests = _random_requests(20, seed=2)
    results = asyncio.run(gather(batcher, requests))
    assert len(run.calls) >= 2
    assert all(r <= 16 for r in run.rows)
    for request, result in zip(requests, results, strict=True):
        np.testing.assert_allclose(result[0], session.run(None, request)[0], rtol=1e-6, atol=1e-6)


def _embedding_session() -> Any:
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 2])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2, 3])
    table = helper.make_tensor("t", TensorProto.FLOAT, [10, 3], [float(i) for i in range(30)])
    graph = helper.make_graph(
        [helper.make_node("Gather", ["t", "ids"], ["y"], axis=0)], "emb", [ids], [out], [table]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_onnxruntime_error_reaches_only_the_bad_request() -> None:
    session = _embedding_session()
    run = Recorder(_ort_run(session))
    batcher = DynamicBatcher(run)
    good = [{"ids": np.array([[i, 9 - i]], np.int64)} for i in range(3)]
    bad = {"ids": np.array([[1, 99]], np.int64)}  # outside the 10-row table
    results = asyncio.run(gather(batcher, [good[0], bad, good[1], good[2]]))
    assert run.rows[0] == 4  # merged, failed as a whole, then rerun one by one
    assert isinstance(results[1], Exception)
    for request, result in zip(good, [results[0], results[2], results[3]], strict=True):
        np.testing.assert_array_equal(result[0], session.run(None, request)[0])


def test_runs_in_a_given_executor_return_raise_and_run_in_its_threads() -> None:
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="given-pool")
    threads: list[str] = []

    def run(feeds: dict[str, Any]) -> list[Any]:
        threads.append(threading.current_thread().name)
        if float(feeds["x"][0, 0]) < 0:
            raise ValueError("negative")
        return [feeds["x"] * 2]

    batcher = DynamicBatcher(run, executor=pool, config=BatchingConfig(enabled=False))

    async def scenario() -> tuple[Any, BaseException | None]:
        ok = await batcher.submit(rows_of(1, start=1.0))
        try:
            await batcher.submit(rows_of(1, start=-5.0))
        except ValueError as exc:
            return ok, exc
        return ok, None

    try:
        ok, exc = asyncio.run(scenario())
    finally:
        pool.shutdown()
    np.testing.assert_array_equal(ok[0], rows_of(1, start=1.0)["x"] * 2)
    assert isinstance(exc, ValueError)
    assert str(exc) == "negative"
    assert len(threads) == 2
    assert all(name.startswith("given-pool") for name in threads)


def test_a_cancelled_run_not_yet_started_in_a_busy_executor_never_runs() -> None:
    pool = ThreadPoolExecutor(max_workers=1)
    release = threading.Event()
    ran: list[float] = []

    def run(feeds: dict[str, Any]) -> list[Any]:
        ran.append(float(feeds["x"][0, 0]))
        return [feeds["x"]]

    batcher = DynamicBatcher(run, executor=pool, config=BatchingConfig(enabled=False))

    async def scenario() -> None:
        blocker = asyncio.get_running_loop().run_in_executor(pool, release.wait, 60)
        waiting = asyncio.create_task(batcher.submit(rows_of(1, start=7.0)))
        for _ in range(100):  # the batcher's run is queued behind the blocker
            await asyncio.sleep(0)
        assert batcher._worker is not None
        batcher._worker.cancel()  # as the loop shutting down does
        with pytest.raises(RuntimeError, match="batcher stopped"):
            await waiting
        release.set()
        await blocker

    try:
        asyncio.run(scenario())
    finally:
        pool.shutdown(wait=True)
    assert ran == []
