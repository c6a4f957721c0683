"""Every resource limit breached against a real server: the right status, a message naming the
limit and its value, and the server still serving afterwards."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import cbor2
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_models import identity_model, slow_model
from server_process import SNI, RawClient, ServerFactory, VeilServer, create_key, start_server

import veil
import veil.client.connection as connection_module

LIMIT_FLAGS = {
    "--max-request-bytes": 65536,
    "--max-upload-bytes": 200_000,
    "--max-model-bytes": 100_000,
    "--max-tensor-bytes": 4000,
    "--max-tensor-elements": 2000,
    "--max-tensor-rank": 4,
    "--max-inputs": 3,
    "--requests-per-second": 0.5,
    "--burst": 20,
}
X = np.arange(6, dtype=np.float32).reshape(2, 3)


def add_model(n: int) -> bytes:
    """y = x + w, x and w float32 [n]: about 4n bytes."""
    w = np.ones(n, np.float32)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n])],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VeilServer]:
    root = tmp_path_factory.mktemp("veil-limits")
    create_key(root / "data", "admin")  # keys exist: rate limits count per key
    flags = [str(part) for item in LIMIT_FLAGS.items() for part in item]
    running = start_server(root / "data", root / "log", *flags)
    owner = create_key(root / "data", "owner")
    with running.connect(api_key=owner[1]) as client:
        client.upload_model(identity_model("float32"), model_id="ok", visibility="public")
    yield running
    assert running.stop() == 0, running.stderr()[-3000:]


def fresh(server: VeilServer) -> veil.Connection:
    """A connection with a key of its own (rate limits are per key)."""
    return server.connect(api_key=create_key(server.data_dir, "owner")[1])


def still_serves(server: VeilServer) -> None:
    with fresh(server) as client:
        assert np.array_equal(client.predict("ok", X).output[0].as_numpy(), X)


def breach(server: VeilServer, call: str, *args: object, **kwargs: object) -> veil.ApiError:
    with fresh(server) as client, pytest.raises(veil.ApiError) as info:
        getattr(client, call)(*args, **kwargs)
    still_serves(server)
    return info.value


def test_request_body(server: VeilServer) -> None:
    error = breach(server, "predict", "ok", np.zeros(20_000, np.float32))
    assert (error.status, error.message) == (413, "request body exceeds max_request_bytes=65536")


def test_upload_body(server: VeilServer) -> None:
    error = breach(server, "upload_model", add_model(60_000), model_id="huge")
    assert (error.status, error.message) == (413, "request body exceeds max_upload_bytes=200000")


def test_model_size(server: VeilServer) -> None:
    blob = add_model(30_000)
    error = breach(server, "upload_model", blob, model_id="big")
    assert error.status == 413
    assert error.message == f"model of {len(blob)} bytes exceeds max_model_bytes=100000"


def test_tensor_bytes(server: VeilServer) -> None:
    error = breach(server, "predict", "ok", {"x": np.zeros(1500, np.float32)})
    assert error.status == 422
    assert error.message == "tensor 'x' has 6000 bytes, exceeds max_tensor_bytes=4000"


def test_tensor_elements(server: VeilServer) -> None:
    error = breach(server, "predict", "ok", {"x": np.zeros((60, 50), np.uint8)})
    assert error.status == 422
    assert error.message == "tensor 'x' has 3000 elements, exceeds max_tensor_elements=2000"


def test_empty_tensor_with_an_absurd_dimension(server: VeilServer) -> None:
    error = breach(server, "predict", "ok", {"x": np.zeros((0, 10**9), np.float32)})
    assert error.status == 422
    assert "a dimension exceeds max_tensor_elements=2000" in error.message


def test_tensor_rank(server: VeilServer) -> None:
    error = breach(server, "predict", "ok", {"x": np.zeros((1,) * 5, np.float32)})
    assert error.status == 422
    assert error.message == "tensor 'x' has 5 dimensions, exceeds max_tensor_rank=4"


def test_number_of_inputs(server: VeilServer) -> None:
    error = breach(server, "predict", "ok", [X, X, X, X])
    assert (error.status, error.message) == (422, "4 input tensors exceed max_inputs=3")


def test_bytes_must_match_shape_times_dtype(server: VeilServer) -> None:
    raw = RawClient(server)
    tensor = {"info": {"fact": [3], "datum_type": 0, "node_name": "x"}, "bytes_data": bytes(10)}
    body = cbor2.dumps({"model_id": "ok", "inputs": [tensor]})
    key = create_key(server.data_dir, "user")[1]
    try:
        response = raw.pinned.post(
            raw.url("attested", "/run"),
            content=body,
            headers={"X-Veil-Api-Key": key},
            extensions=SNI,
        )
    finally:
        raw.close()
    assert response.status_code == 422
    assert cbor2.loads(response.content) == (
        "tensor x: got 10 bytes, expected 12 for shape [3] of float32"
    )
    still_serves(server)


def test_requests_per_key_per_second(server: VeilServer) -> None:
    refusal: veil.RateLimitError | None = None
    with fresh(server) as client:
        # Far more attempts than the burst: a token comes back every 2 s, so on a slow machine
        # 25 attempts spread over 10 s could all be served before any refusal.
        for attempt in range(1, 201):
            try:
                client.predict("ok", X)
            except veil.RateLimitError as exc:
                refusal, refused_at = exc, attempt
                break
    assert refusal is not None
    assert refusal.status == 429
    assert refusal.message == "rate limit exceeded: requests_per_second=0.5 (burst 20) for this key"
    # the burst of 20 goes through (plus at most a token or two refilled meanwhile)
    assert refused_at > 20
    still_serves(server)  # another key is not affected


# ---- servers of their own -----------------------------------------------------------------------


def test_total_stored_bytes(server_factory: ServerFactory) -> None:
    blob = add_model(2500)  # ~10 kB
    running = server_factory("--max-total-stored-bytes", "25000")
    with running.connect() as client:
        client.upload_model(blob, model_id="a")
        client.upload_model(blob, model_id="b")
        with pytest.raises(veil.BadRequestError) as info:
            client.upload_model(blob, model_id="c")
        assert info.value.status == 413
        # Other tenants' usage stays theirs: only this model's size is named.
        assert info.value.message == (
            f"storing this model of {len(blob)} bytes exceeds the server's storage limit"
        )
        assert str(2 * len(blob)) not in info.value.message
        # deleting frees the space
        client.delete_model("a")
        client.upload_model(blob, model_id="c")
        assert sorted(m.model_id for m in client.list_models()) == ["b", "c"]


def test_busy_server_queues_then_refuses_with_retry_after(
    server_factory: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    running = server_factory("--max-concurrent-requests", "1", "--max-queued-requests", "1")
    release = threading.Event()
    ready = threading.Barrier(3)

    def hold() -> None:
        # Two of these keep the one slot busy and the one queue place taken, most of the time.
        with running.connect(busy_retries=0) as client:
            ready.wait(60)
            while not release.is_set():
                try:
                    client.predict("slow", np.ones((1024, 1024), np.float32))
                except veil.ServiceUnavailableError:
                    time.sleep(0.01)

    # Every busy refusal the client decides to retry, with the delay it chose.
    retries: list[float] = []
    real_delay = connection_module.busy_retry_delay

    def spy(*args: Any) -> float | None:
        delay = real_delay(*args)
        if delay is not None:
            retries.append(delay)
            release.set()  # the holders stop: the retry finds room
        return delay

    monkeypatch.setattr(connection_module, "busy_retry_delay", spy)
    with running.connect() as client:
        client.upload_model(identity_model("float32"), model_id="ok")
        client.upload_model(slow_model(), model_id="slow")
    holders = [threading.Thread(target=hold) for _ in range(2)]
    for holder in holders:
        holder.start()
    try:
        refusal = None
        with running.connect(busy_retries=0) as no_retry:
            ready.wait(60)  # both holders have connected and are about to send
            deadline = time.monotonic() + 60
            while refusal is None and time.monotonic() < deadline:
                time.sleep(0.05)  # leave the holders the time to send their next request
                try:
                    no_retry.predict("ok", X)  # queued behind the slow one, or refused
                except veil.ServiceUnavailableError as exc:
                    refusal = exc
        assert refusal is not None
        assert refusal.status == 503
        assert refusal.message == "server busy: max_queued_requests=1 requests waiting"
        assert refusal.retry_after == 1.0
        assert not retries  # busy_retries=0 never retries
        # veil's client retries a busy refusal (bounded, with backoff) and gets its answer. The
        # holders stop at the first retry, but finish the slow requests they have in: 60 retries
        # (30 s or more) outlast those on a loaded machine, where 10 (5-10 s) did not.
        deadline = time.monotonic() + 120  # its own time, whatever the first loop took
        with running.connect(busy_retries=60, busy_retry_max_delay=1.0) as client:
            while not retries and time.monotonic() < deadline:
                result = client.predict("ok", X)
                assert np.array_equal(result.output[0].as_numpy(), X)
        assert retries, "no busy refusal met within 120 s"
        assert all(0.5 <= delay <= 1.0 for delay in retries)
    finally:
        release.set()
        for holder in holders:
            holder.join(60)


def test_rate_over_the_limit_is_delayed_not_refused(server_factory: ServerFactory) -> None:
    running = server_factory(
        "--requests-per-second", "5", "--burst", "1", "--max-rate-delay-s", "1"
    )
    key = create_key(running.data_dir, "owner")[1]
    with running.connect(api_key=key) as client:
        client.upload_model(identity_model("float32"), model_id="ok")
        time.sleep(0.5)  # let the bucket refill after the upload
        start = time.monotonic()
        for _ in range(4):  # one from the burst, then one every 0.2 s
            client.predict("ok", X)
        assert time.monotonic() - start >= 0.5
