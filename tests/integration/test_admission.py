"""Models admitted by measured cost, outputs capped, long runs isolated: against real servers.

Each attack here passed the static guard before admission existed (issue "Hardening, round
two", item 3): a sparse initializer that decompresses, a function-nesting CPU bomb, an output
larger than any tensor limit, one long operator stalling every model.
"""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import psutil
import pytest
from onnx_models import (
    expand_model,
    identity_model,
    matmul_model,
    nested_function_model,
    sparse_initializer_model,
)
from server_process import ServerFactory, VeilServer

import veil

X = np.arange(6, dtype=np.float32).reshape(2, 3)
RELAXED_RATIO = ("--max-load-ratio", "1000000000")


def alive(server: VeilServer) -> None:
    with server.connect() as client:
        assert np.array_equal(client.predict("ok", X).output[0].as_numpy(), X)
    assert server.process.poll() is None


def with_ok_model(server: VeilServer) -> VeilServer:
    with server.connect() as client:
        client.upload_model(identity_model("float32"), model_id="ok")
    return server


def refused(server: VeilServer, blob: bytes) -> veil.BadRequestError:
    with server.connect() as client:
        with pytest.raises(veil.BadRequestError) as info:
            client.upload_model(blob, model_id="hostile")
        assert "hostile" not in {m.model_id for m in client.list_models()}
    return info.value


def test_sparse_initializer_bomb_refused_at_upload(server_factory: ServerFactory) -> None:
    server = with_ok_model(server_factory())
    blob = sparse_initializer_model(1 << 28)  # ~150 bytes, 1 GiB dense
    assert len(blob) < 400
    process = psutil.Process(server.process.pid)
    before = process.memory_info().rss
    error = refused(server, blob)
    assert error.status == 413
    assert "exceeds max_load_ratio=16" in error.message
    assert process.memory_info().rss - before < 64 << 20
    alive(server)


def test_measured_size_over_the_memory_limit_is_refused(server_factory: ServerFactory) -> None:
    # The ratio relaxed, the static guard lets it through: the child measures 128 MiB loaded.
    server = with_ok_model(
        server_factory(*RELAXED_RATIO, "--max-model-memory-bytes", str(64 << 20))
    )
    process = psutil.Process(server.process.pid)
    before = process.memory_info().rss
    error = refused(server, sparse_initializer_model(1 << 25))
    assert error.status == 413
    assert "exceeds max_model_memory_bytes=67108864" in error.message
    assert process.memory_info().rss - before < 64 << 20  # the server never built it
    alive(server)


def test_quota_counts_the_loaded_size(server_factory: ServerFactory) -> None:
    server = server_factory(*RELAXED_RATIO, "--max-total-stored-bytes", str(48 << 20))
    blob = sparse_initializer_model(1 << 23)  # ~150 bytes, 32 MiB loaded
    with server.connect() as client:
        client.upload_model(blob, model_id="first")
        with pytest.raises(veil.BadRequestError) as info:
            client.upload_model(blob, model_id="second")
        assert info.value.status == 413
        # The measured size (32 MiB and more), not the ~150 bytes uploaded.
        size = int(info.value.message.split("model of ")[1].split()[0])
        assert size >= 32 << 20
        assert "exceeds the server's storage limit" in info.value.message
        client.delete_model("first")
        client.upload_model(blob, model_id="second")  # the measured size was given back


def test_restored_models_are_admitted_again(server_factory: ServerFactory) -> None:
    server = server_factory(*RELAXED_RATIO)
    with server.connect() as client:
        client.upload_model(sparse_initializer_model(1 << 23), model_id="big")
        client.upload_model(identity_model("float32"), model_id="ok")
    assert server.stop() == 0
    tighter = server_factory(
        *RELAXED_RATIO, "--max-model-memory-bytes", str(16 << 20), data_dir=server.data_dir
    )
    with tighter.connect() as client:
        assert [m.model_id for m in client.list_models()] == ["ok"]
    assert "stored model big not loaded" in tighter.stderr()
    assert "max_model_memory_bytes=16777216" in tighter.stderr()


def test_nested_functions_refused_by_node_count(server_factory: ServerFactory) -> None:
    server = with_ok_model(server_factory())
    started = time.monotonic()
    error = refused(server, nested_function_model(40))
    assert error.status == 422
    assert "max_graph_nodes=500000" in error.message
    assert time.monotonic() - started < 30
    alive(server)


def test_cpu_bomb_is_killed_while_other_models_answer(server_factory: ServerFactory) -> None:
    # With the node count unbounded, only the child's CPU limit stops 2^24 inlined nodes.
    server = with_ok_model(
        server_factory("--max-graph-nodes", str(10**12), "--admission-cpu-s", "5")
    )
    outcome: list[BaseException] = []

    def upload() -> None:
        with server.connect() as client:
            try:
                client.upload_model(nested_function_model(24), model_id="hostile")
            except veil.BadRequestError as exc:
                outcome.append(exc)

    thread = threading.Thread(target=upload)
    thread.start()
    latencies = []
    with server.connect() as client:
        while thread.is_alive():
            t = time.perf_counter()
            assert np.array_equal(client.predict("ok", X).output[0].as_numpy(), X)
            latencies.append(time.perf_counter() - t)
    thread.join()
    assert len(outcome) == 1, "the CPU bomb was accepted"
    error = outcome[0]
    assert isinstance(error, veil.BadRequestError)
    assert error.status == 422
    assert "exceeded admission_cpu_s=5" in error.message
    assert latencies, "the upload ended before any prediction"
    # A loop that waited for the child would hold one prediction for all of its 5 CPU seconds
    # or more; the bound leaves the rest for a loaded machine.
    assert max(latencies) < 4.0, f"a prediction took {max(latencies):.2f} s during the upload"
    alive(server)


def test_output_larger_than_max_tensor_bytes_is_refused(server_factory: ServerFactory) -> None:
    server = server_factory("--max-tensor-bytes", str(1 << 20))
    one = np.ones(1, np.float32)
    with server.connect() as client:
        client.upload_model(expand_model(), model_id="expand")
        small = client.predict("expand", [one, np.array([256, 256], np.int64)])
        assert small.output[0].as_numpy().shape == (256, 256)
        with pytest.raises(veil.BadRequestError) as info:
            client.predict("expand", [one, np.array([1024, 1024], np.int64)])  # 4 MiB out
    assert info.value.status == 422
    assert info.value.message == (
        "model output: tensor 'y' has 4194304 bytes, exceeds max_tensor_bytes=1048576"
    )


def _requests_in_progress(server: VeilServer) -> float:
    metrics = httpx.get(f"http://127.0.0.1:{server.unattested_port}/metrics", timeout=10).text
    for line in metrics.splitlines():
        if line.startswith("veil_requests_in_progress "):
            return float(line.split()[1])
    raise AssertionError("veil_requests_in_progress not served")


def test_long_operator_does_not_stall_other_models(server_factory: ServerFactory) -> None:
    server = with_ok_model(server_factory())
    feeds = [np.ones(1, np.float32), np.array([4000, 4000], np.int64)]
    with server.connect() as client:
        client.upload_model(matmul_model(), model_id="slow")
    finished: dict[str, float] = {}

    def slow() -> None:
        with server.connect() as client:
            client.predict("slow", feeds)
        finished["slow"] = time.monotonic()

    thread = threading.Thread(target=slow)
    thread.start()
    # The MatMul is running once its request holds a slot (the only request at this point).
    deadline = time.monotonic() + 60
    while _requests_in_progress(server) < 1:
        assert time.monotonic() < deadline, "the slow request never started"
        assert "slow" not in finished, "the slow request ended before it was seen running"
        time.sleep(0.02)
    with server.connect() as client:
        assert np.array_equal(client.predict("ok", X).output[0].as_numpy(), X)
    finished["ok"] = time.monotonic()
    thread.join(120)
    assert "slow" in finished
    assert finished["ok"] < finished["slow"], "the small model waited for the long operator"
