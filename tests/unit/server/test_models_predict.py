"""`LoadedModel.predict`: batching through the model's batcher, the time-out, closing."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from veil.errors import ApiError, BadRequestError, NotFoundError
from veil.server.batching import BatchingConfig
from veil.server.models import LoadedModel, ModelRegistry, load_model
from veil.tensors import DatumType, WireTensor


def _model(nodes: list[Any], inputs: list[Any], outputs: list[Any], init: list[Any]) -> bytes:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def dense(batch: str | int = "batch") -> bytes:
    rng = np.random.default_rng(3)
    w = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "w")
    return _model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])],
        [w],
    )


def slow(nodes: int = 300) -> bytes:
    w = numpy_helper.from_array(np.eye(256, dtype=np.float32), "w")
    chain = [helper.make_node("MatMul", ["x", "w"], ["h0"])]
    chain += [helper.make_node("MatMul", [f"h{i - 1}", "w"], [f"h{i}"]) for i in range(1, nodes)]
    chain.append(helper.make_node("Identity", [f"h{nodes - 1}"], ["y"]))
    return _model(
        chain,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 256])],
        [w],
    )


def wire(x: np.ndarray) -> list[WireTensor]:
    return [WireTensor(x.shape, DatumType.F32, "x", x.tobytes())]


def load(blob: bytes, registry: ModelRegistry, **kwargs: Any) -> LoadedModel:
    return load_model(
        blob, model_id="m", model_name="", threads=1, executor=registry.executor, **kwargs
    )


def test_concurrent_predictions_are_merged_and_equal_unbatched() -> None:
    registry = ModelRegistry()
    model = load(dense(), registry)
    inputs = [
        np.random.default_rng(i).standard_normal((1, 4)).astype(np.float32) for i in range(24)
    ]

    async def main() -> list[list[WireTensor]]:
        # A first request keeps the model busy so the others queue up and merge.
        return await asyncio.gather(*(model.predict(wire(x), 10.0) for x in inputs))

    results = asyncio.run(main())
    for x, outputs in zip(inputs, results, strict=True):
        (alone,) = model.run(wire(x))
        assert outputs[0].shape == (1, 3)
        got = np.frombuffer(outputs[0].data, np.float32)
        want = np.frombuffer(alone.data, np.float32)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    stats = model.batcher.stats()
    assert stats.merged_runs >= 1
    assert stats.requests == 24
    assert stats.runs < 24


def test_fixed_batch_axis_never_merges() -> None:
    registry = ModelRegistry()
    model = load(dense(batch=1), registry)
    assert not model.batcher.batching

    async def main() -> None:
        await asyncio.gather(
            *(model.predict(wire(np.ones((1, 4), np.float32)), 10) for _ in range(8))
        )

    asyncio.run(main())
    assert model.batcher.stats().merged_runs == 0
    assert model.batcher.stats().runs == 8


def test_batching_off_by_config() -> None:
    model = load(dense(), ModelRegistry(), batching=BatchingConfig(enabled=False))
    assert not model.batcher.batching


def test_bad_input_is_422_not_run() -> None:
    model = load(dense(), ModelRegistry())
    bad = [WireTensor((1, 5), DatumType.F32, "x", bytes(20))]
    with pytest.raises(BadRequestError) as info:
        asyncio.run(model.predict(bad, 10.0))
    assert info.value.status == 422
    assert model.batcher.stats().runs == 0


def test_timeout_is_504_and_stops_the_run() -> None:
    registry = ModelRegistry()
    # 3000 MatMuls of 8192 rows: most of a minute if left to run, so that a generous bound
    # below tells a stopped run from a finished one however slow the machine is.
    model = load(slow(3000), registry)
    heavy = wire(np.ones((8192, 256), np.float32))
    small = np.ones((1, 256), np.float32)

    async def main() -> float:
        with pytest.raises(ApiError) as info:
            await model.predict(heavy, 0.2)
        assert info.value.status == 504
        assert info.value.message == "inference exceeded request_timeout_s=0.2"
        started = time.monotonic()
        (out,) = await model.predict(wire(small), 10.0)
        assert np.array_equal(np.frombuffer(out.data, np.float32).reshape(1, 256), small)
        return time.monotonic() - started

    waited = asyncio.run(main())
    # The heavy run was terminated: the small one did not wait for it to finish.
    assert waited < 10.0


def test_closed_model_refuses() -> None:
    model = load(dense(), ModelRegistry())

    async def main() -> None:
        await model.close()
        with pytest.raises(NotFoundError) as info:
            await model.predict(wire(np.ones((1, 4), np.float32)), 1.0)
        assert info.value.status == 404

    asyncio.run(main())


@pytest.mark.parametrize(("rows", "inline"), [(1, True), (341, True), (342, False), (1000, False)])
def test_small_outputs_encoded_on_the_loop_large_ones_in_a_thread(rows: int, inline: bool) -> None:
    # y is [rows, 3] float32: 341 rows are 4092 bytes (on the event loop), 342 rows 4104.
    registry = ModelRegistry()
    model = load(dense(), registry)
    x = np.random.default_rng(rows).standard_normal((rows, 4)).astype(np.float32)
    threads: list[threading.Thread] = []

    def encode(outputs: list[WireTensor]) -> bytes:
        threads.append(threading.current_thread())
        return outputs[0].data

    got = asyncio.run(model.predict_encoded(wire(x), 10.0, encode))
    (alone,) = model.run(wire(x))
    assert got == alone.data
    assert (threads == [threading.main_thread()]) is inline


@pytest.mark.parametrize(
    "value",
    [
        np.arange(6, dtype=">f4").reshape(2, 3),  # big-endian
        np.arange(6, dtype=np.float32).reshape(3, 2).T,  # not C-contiguous
        np.arange(6, dtype=np.float32).reshape(2, 3),  # as ONNX Runtime returns them
    ],
)
def test_outputs_leave_little_endian_and_row_major(value: np.ndarray) -> None:
    model = load(dense(), ModelRegistry())
    (tensor,) = model._wire([value])
    assert tensor.shape == (2, 3)
    assert tensor.datum_type is DatumType.F32
    assert tensor.data == np.ascontiguousarray(value, dtype="<f4").tobytes()
