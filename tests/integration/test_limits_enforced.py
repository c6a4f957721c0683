"""Every resource limit breached against a real server: the right status, a message naming the
limit and its value, and the server still serving afterwards."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import cbor2
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_models import identity_model, slow_model
from server_process import SNI, RawClient, ServerFactory, VeilServer, create_key, start_server

import veil

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
        for attempt in range(1, 26):
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


def test_concurrent_requests(server_factory: ServerFactory) -> None:
    running = server_factory("--max-concurrent-requests", "1")
    busy = threading.Event()
    release = threading.Event()

    def hold() -> None:
        # A complete request whose inference takes a while holds the one slot.
        with running.connect() as client:
            while not release.is_set():
                busy.set()
                client.predict("slow", np.ones((1024, 1024), np.float32))

    with running.connect() as client:
        client.upload_model(identity_model("float32"), model_id="ok")
        client.upload_model(slow_model(), model_id="slow")
        holder = threading.Thread(target=hold)
        holder.start()
        try:
            busy.wait(30)
            refusal = None
            deadline = time.monotonic() + 30
            while refusal is None and time.monotonic() < deadline:
                try:
                    client.predict("ok", X)
                except veil.RateLimitError as exc:
                    refusal = exc
                time.sleep(0.05)
        finally:
            release.set()
            holder.join(60)
        assert refusal is not None
        assert refusal.status == 429
        assert refusal.message == "server busy: max_concurrent_requests=1 requests in progress"
        assert np.array_equal(client.predict("ok", X).output[0].as_numpy(), X)
