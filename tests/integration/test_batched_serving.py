"""Dynamic batching and the per-request time-out against a real server.

Concurrent predictions must give what in-process, unbatched ONNX Runtime gives; requests of
different shapes, models without a batch axis and failing requests must not disturb the others;
a request past ``--request-timeout-s`` is answered 504 and the server keeps serving.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_models import dynamic_batch_model, identity_model, reference
from server_process import ServerFactory, VeilServer

import veil

# 32 clients at once: lift the concurrency limit (default 8) so none is answered 429.
CAPACITY = ("--max-concurrent-requests", "64")
CLIENTS = 32


def _model(nodes: list[Any], inputs: list[Any], outputs: list[Any], init: list[Any]) -> bytes:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def scale_model() -> bytes:
    """y = 2x, x float32 [batch, seq]: both axes free, so only equal seq lengths may merge."""
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    return _model(
        [helper.make_node("Mul", ["x", "two"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq"])],
        [two],
    )


def lookup_model() -> bytes:
    """y = table[ids]: ids int64 [batch, 3]; an id outside 0..9 fails the run."""
    table = numpy_helper.from_array(np.arange(20, dtype=np.float32).reshape(10, 2), "table")
    return _model(
        [helper.make_node("Gather", ["table", "ids"], ["y"])],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, 2])],
        [table],
    )


def slow_model(nodes: int = 400) -> bytes:
    """x [batch, 256] multiplied by one 256x256 matrix `nodes` times: slow for many rows."""
    weights = numpy_helper.from_array(np.eye(256, dtype=np.float32), "w")
    chain = [helper.make_node("MatMul", ["x", "w"], ["h0"])]
    chain += [helper.make_node("MatMul", [f"h{i - 1}", "w"], [f"h{i}"]) for i in range(1, nodes)]
    chain.append(helper.make_node("Identity", [f"h{nodes - 1}"], ["y"]))
    return _model(
        chain,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 256])],
        [weights],
    )


def _in_threads(server: VeilServer, jobs: list[Callable[[veil.Connection], Any]]) -> list[Any]:
    """Run each job at once from its own thread and connection; results or exceptions."""
    barrier = threading.Barrier(len(jobs))

    def call(job: Callable[[veil.Connection], Any]) -> Any:
        with server.connect() as client:
            barrier.wait(30)
            try:
                return job(client)
            except veil.ApiError as exc:
                return exc

    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(call, jobs))


def _output(client: veil.Connection, model_id: str, x: npt.NDArray[Any]) -> npt.NDArray[Any]:
    return client.predict(model_id, x).output[0].as_numpy()


def test_concurrent_predictions_equal_unbatched(server_factory: ServerFactory) -> None:
    server = server_factory(*CAPACITY)
    model = dynamic_batch_model()
    with server.connect() as client:
        client.upload_model(model.SerializeToString(), model_id="dense")
    rng = np.random.default_rng(1)
    inputs = [rng.standard_normal((1 + i % 3, 4)).astype(np.float32) for i in range(CLIENTS)]
    results = _in_threads(server, [lambda c, x=x: _output(c, "dense", x) for x in inputs])
    for x, got in zip(inputs, results, strict=True):
        assert isinstance(got, np.ndarray), got
        (want,) = reference(model, {"x": x})
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_mixed_shapes_are_not_merged(server_factory: ServerFactory) -> None:
    server = server_factory(*CAPACITY)
    with server.connect() as client:
        client.upload_model(scale_model(), model_id="scale")
    rng = np.random.default_rng(2)
    inputs = [
        rng.standard_normal((1 + i % 2, (3, 5, 8)[i % 3])).astype(np.float32)
        for i in range(CLIENTS)
    ]
    results = _in_threads(server, [lambda c, x=x: _output(c, "scale", x) for x in inputs])
    for x, got in zip(inputs, results, strict=True):
        assert isinstance(got, np.ndarray), got
        assert np.array_equal(got, x * 2)  # elementwise: exact


def test_model_without_batch_axis_still_served(server_factory: ServerFactory) -> None:
    server = server_factory(*CAPACITY)
    with server.connect() as client:
        client.upload_model(identity_model("float32"), model_id="fixed")  # x, y [2, 3]
    inputs = [np.full((2, 3), i, np.float32) for i in range(16)]
    results = _in_threads(server, [lambda c, x=x: _output(c, "fixed", x) for x in inputs])
    for x, got in zip(inputs, results, strict=True):
        assert isinstance(got, np.ndarray), got
        assert np.array_equal(got, x)


def test_failing_request_does_not_fail_the_others(server_factory: ServerFactory) -> None:
    server = server_factory(*CAPACITY)
    with server.connect() as client:
        client.upload_model(lookup_model(), model_id="lookup")
    table = np.arange(20, dtype=np.float32).reshape(10, 2)
    inputs = [np.array([[i % 10, (i + 1) % 10, (i + 2) % 10]], np.int64) for i in range(CLIENTS)]
    bad = {3, 17, 30}
    for i in bad:
        inputs[i] = np.array([[0, 1000 + i, 2]], np.int64)  # outside the table
    results = _in_threads(server, [lambda c, x=x: _output(c, "lookup", x) for x in inputs])
    for i, (ids, got) in enumerate(zip(inputs, results, strict=True)):
        if i in bad:
            assert isinstance(got, veil.BadRequestError), got
            assert got.status == 422
            assert got.message.startswith("inference failed:")
        else:
            assert isinstance(got, np.ndarray), got
            assert np.array_equal(got, table[ids])


def test_batching_can_be_turned_off(server_factory: ServerFactory) -> None:
    server = server_factory(*CAPACITY, "--no-batching", "--max-batch-size", "4")
    model = dynamic_batch_model()
    with server.connect() as client:
        client.upload_model(model.SerializeToString(), model_id="dense")
    inputs = [np.full((1, 4), i, np.float32) for i in range(8)]
    results = _in_threads(server, [lambda c, x=x: _output(c, "dense", x) for x in inputs])
    for x, got in zip(inputs, results, strict=True):
        np.testing.assert_allclose(got, reference(model, {"x": x})[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--max-batch-size", "0", "max_batch_size: got 0, expected >= 1"),
        ("--max-batch-delay-ms", "-1", "max_delay_ms: got -1.0, expected between 0 and 1000.0"),
    ],
)
def test_bad_batching_flags_refused(tmp_path: Path, flag: str, value: str, message: str) -> None:
    command = [sys.executable, "-m", "veil.cli", "serve", "--platform", "simulated"]
    command += ["--data-dir", str(tmp_path), "--unattested-port", "0", flag, value]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert message in result.stderr


def test_request_timeout(server_factory: ServerFactory) -> None:
    # 1 s: light requests finish well within it even on a loaded machine.
    server = server_factory(*CAPACITY, "--request-timeout-s", "1")
    with server.connect() as client:
        client.upload_model(slow_model(1000), model_id="slow")
        small = np.ones((1, 256), np.float32)
        assert np.array_equal(_output(client, "slow", small), small)
        # ~4 TFLOP: most of a minute on one thread if left to run, far above the bound below
        heavy = np.ones((32768, 256), np.float32)
        started = time.monotonic()
        with pytest.raises(veil.ApiError) as info:
            client.predict("slow", heavy)
        assert info.value.status == 504
        assert info.value.message == "inference exceeded request_timeout_s=1"
        # the run in flight was stopped, so the next request is answered at once
        assert np.array_equal(_output(client, "slow", small), small)
        assert time.monotonic() - started < 15  # unstopped: 40 s or more
        # a heavy request among light ones: only it times out
        jobs: list[Callable[[veil.Connection], Any]] = [
            lambda c: _output(c, "slow", heavy),
            *[lambda c: _output(c, "slow", small) for _ in range(3)],
        ]
    results = _in_threads(server, jobs)
    assert all(isinstance(r, np.ndarray) or r.status == 504 for r in results), results
    assert isinstance(results[0], veil.ApiError)
    assert results[0].status == 504
    with server.connect() as client:
        assert np.array_equal(_output(client, "slow", small), small)
