"""kill -9 of a replica under bounded load behind an L4 balancer (issue 14, item 4).

Three replicas joined to one broker present one certificate; clients connect through a TCP
passthrough balancer. One replica is killed with SIGKILL mid-load: a prediction in flight on it
is retried once the client has attested whichever replica now answers; no client sees an error.
The killed replica then restarts and rejoins through the broker with the same certificate.
"""

from __future__ import annotations

import hashlib
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from broker_process import start_broker
from onnx_models import identity_model
from server_process import VeilServer, start_server
from tcp_balancer import TcpBalancer

import veil

pytestmark = pytest.mark.slow

CLIENTS = 4
BEFORE_KILL_S = 3.0
AFTER_KILL_S = 6.0


def test_kill_9_of_a_replica_under_load_loses_no_prediction(tmp_path: Path) -> None:
    broker = start_broker(tmp_path / "broker", tmp_path / "broker-logs")
    replicas: list[VeilServer] = []
    try:
        for i in range(3):
            replicas.append(
                start_server(
                    tmp_path / f"r{i}", tmp_path / f"r{i}-logs", "--no-auth", "--join", broker.url
                )
            )
        model = identity_model("float32")
        for replica in replicas:  # no shared store here: each replica gets the model itself
            with replica.connect() as connection:
                connection.upload_model(model, model_id="m")
        backends = [(r.unattested_port, r.attested_port, r.management_port) for r in replicas]
        with TcpBalancer(backends) as balancer:
            ports = dict(zip(("unattested_port", "attested_port", "management_port"),
                             balancer.ports, strict=True))  # fmt: skip
            stop = threading.Event()
            counts = {"requests": 0, "ok": 0, "retried": 0, "failed": 0, "wrong": 0}
            after_kill = {"ok": 0}
            served = [0] * CLIENTS  # answers each client got
            killed = threading.Event()
            lock = threading.Lock()

            def client(seed: int) -> None:
                rng = np.random.default_rng(seed)
                with veil.connect("127.0.0.1", simulation=True, **ports) as connection:
                    while not stop.is_set():
                        x = rng.random((2, 3), dtype=np.float32)
                        try:
                            y = connection.predict("m", x).output[0].as_numpy()
                            good, failed = np.array_equal(y, x), False
                        except veil.VeilError:
                            good, failed = False, True
                        with lock:
                            counts["requests"] += 1
                            counts["failed" if failed else "ok" if good else "wrong"] += 1
                            served[seed] += good
                            if good and killed.is_set():
                                after_kill["ok"] += 1
                    with lock:
                        counts["retried"] += connection.reattestations

            threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
            for thread in threads:
                thread.start()
            time.sleep(BEFORE_KILL_S)
            # The kill lands under load: every client has been served (bounded wait).
            _wait_until(lambda: all(served))
            replicas[1].process.send_signal(signal.SIGKILL)
            replicas[1].process.wait(10)
            killed.set()
            time.sleep(AFTER_KILL_S)
            _wait_until(lambda: after_kill["ok"] > 0)  # a slow machine takes longer to recover
            stop.set()
            for thread in threads:
                thread.join(60)
        print(
            "\nfailover (kill -9 of 1 of 3 replicas, "
            f"{CLIENTS} clients, {BEFORE_KILL_S:g}+{AFTER_KILL_S:g} s)\n"
            "| requests | retried | failed | lost |\n|---|---|---|---|\n"
            f"| {counts['requests']} | {counts['retried']} | {counts['failed']} "
            f"| {counts['wrong']} |\n"
            f"predictions answered after the kill: {after_kill['ok']}"
        )
        assert counts["failed"] == 0
        assert counts["wrong"] == 0
        assert after_kill["ok"] > 0  # throughput recovered on the two replicas left
        # The killed replica rejoins through the broker and serves the same certificate.
        replicas[1] = start_server(
            replicas[1].data_dir, tmp_path / "r1-logs-2", "--no-auth", "--join", broker.url
        )
        with replicas[1].connect() as connection:
            digest = hashlib.sha256(connection.certificate_der).hexdigest()
            assert digest == broker.certificate_sha256
            assert "1 stored model restored" in replicas[1].ready_line
    finally:
        for replica in replicas:
            replica.stop()
        broker.stop()


def _wait_until(condition: Callable[[], bool], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.1)


def test_an_upload_whose_answer_is_lost_is_found_by_its_id_not_sent_again(tmp_path: Path) -> None:
    broker = start_broker(tmp_path / "broker", tmp_path / "broker-logs")
    replica = start_server(tmp_path / "r", tmp_path / "r-logs", "--no-auth", "--join", broker.url)
    try:
        backends = [(replica.unattested_port, replica.attested_port, replica.management_port)]
        with TcpBalancer(backends) as balancer:
            ports = dict(zip(("unattested_port", "attested_port", "management_port"),
                             balancer.ports, strict=True))  # fmt: skip
            model = _large_model()  # larger than the TLS handshake, so the cut comes after it
            with veil.connect("127.0.0.1", simulation=True, **ports) as connection:
                balancer.lose_answer_after = (2, len(model))  # the management port
                uploaded = connection.upload_model(model, model_id="once")
                assert uploaded.hash == hashlib.sha256(model).digest()
                assert connection.reattestations == 1
                # Stored exactly once; the lost answer did not make the client send it again.
                assert [m.model_id for m in connection.list_models()] == ["once"]
    finally:
        replica.stop()
        broker.stop()


def _large_model() -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(
        np.random.default_rng(0).random((8192, 3), dtype=np.float32), "w"
    )
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "large",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8192, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8192, 3])],
        [weights],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
