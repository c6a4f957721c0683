"""A broker and three `veil serve --join` replicas sharing their state in a real PostgreSQL and
one sealed blob directory, behind a real HAProxy in TCP mode (Debian's packages, on loopback).

The broker releases one TLS identity and the store key to each replica, so a client that attests
whichever replica the balancer picks for the evidence can pin TLS to whichever it picks next; each
response names the replica that served it (``Veil-Replica``).
"""

from __future__ import annotations

import hashlib
import socket
import ssl
from collections.abc import Iterator

import cbor2
import httpx
import numpy as np
import pytest
from broker_process import BrokerProcess, start_broker
from server_process import SNI, VeilServer, start_server
from test_sealed_restart import add_model

import veil
from veil import wire
from veil.errors import ApiError
from veil.tensors import DatumType, WireTensor
from veil.testing.engines import engines_missing, haproxy, postgres
from veil.tls import SERVER_NAME, pinned_client_context

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        bool(engines_missing()),
        reason=f"{' and '.join(engines_missing())} not installed (scripts/test installs them)",
    ),
]


class Cluster:
    def __init__(self, broker: BrokerProcess, replicas: list[VeilServer], ports: list[int]):
        self.broker, self.replicas = broker, replicas
        self.unattested_port, self.attested_port, self.management_port = ports

    def connect(self) -> veil.Connection:
        """veil's client, through the balancer (each port balanced on its own)."""
        return veil.connect(
            "127.0.0.1",
            unattested_port=self.unattested_port,
            attested_port=self.attested_port,
            management_port=self.management_port,
            simulation=True,
        )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("cluster")
    broker = start_broker(root / "broker", root / "broker-logs")
    replicas: list[VeilServer] = []
    try:
        with postgres(root) as url:
            try:
                for i in range(3):
                    replicas.append(
                        start_server(
                            root / f"data{i}",
                            root / f"log{i}",
                            "--join",
                            broker.url,
                            "--database-url",
                            url,
                            "--store-dir",
                            str(root / "store"),
                            "--replica-name",
                            f"replica-{i}",
                        )
                    )
                frontends = [
                    [getattr(r, f"{port}_port") for r in replicas]
                    for port in ("unattested", "attested", "management")
                ]
                with haproxy(root, frontends) as ports:
                    yield Cluster(broker, replicas, ports)
            finally:
                for r in replicas:
                    r.stop()
    finally:
        broker.stop()


def _run_body(model_id: str, x: np.ndarray) -> bytes:
    tensor = WireTensor(x.shape, DatumType.F32, "x", x.tobytes())
    return wire.encode_run_request(
        model_id=model_id, model_hash=None, inputs=[tensor], client_info={}
    )


def test_model_uploaded_through_the_balancer_is_predicted_by_every_replica(
    cluster: Cluster,
) -> None:
    blob, w = add_model(64, 1)
    x = np.arange(64, dtype=np.float32)
    with cluster.connect() as client:
        client.upload_model(blob, model_id="shared")
        assert np.array_equal(client.predict("shared", x).output[0].as_numpy(), x + w)
    certificate = cbor2.loads(
        httpx.get(f"http://127.0.0.1:{cluster.unattested_port}/", timeout=10).content
    )
    served = []
    for _ in range(6):
        # A new TCP connection each time: the balancer picks the next replica.
        with httpx.Client(verify=pinned_client_context(certificate), timeout=30) as pinned:
            response = pinned.post(
                f"https://127.0.0.1:{cluster.attested_port}/run",
                content=_run_body("shared", x),
                extensions=SNI,
            )
        assert response.status_code == 200
        (y,) = wire.decode_run_reply(response.content)
        assert np.array_equal(np.frombuffer(y.data, np.float32), x + w)
        served.append(response.headers["veil-replica"])
    assert sorted(set(served)) == ["replica-0", "replica-1", "replica-2"]


def test_duplicate_id_is_refused_cluster_wide(cluster: Cluster) -> None:
    blob, _ = add_model(32, 2)
    with cluster.replicas[1].connect() as client:
        client.upload_model(blob, model_id="once")
    other, _ = add_model(32, 3)
    with cluster.replicas[2].connect() as client, pytest.raises(ApiError) as refused:
        client.upload_model(other, model_id="once")
    assert refused.value.status == 409
    assert "'once' is already taken" in refused.value.message


def test_balancer_passes_tls_through_to_the_cluster_certificate(cluster: Cluster) -> None:
    # Not verified here on purpose: the test only looks at which certificate arrives.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    seen = set()
    for _ in range(3):
        with (
            socket.create_connection(("127.0.0.1", cluster.attested_port), 10) as raw,
            context.wrap_socket(raw, server_hostname=SERVER_NAME) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            seen.add(hashlib.sha256(der).hexdigest())
    # The broker's one certificate, from the replicas themselves: the balancer never terminated
    # TLS.
    assert seen == {cluster.broker.certificate_sha256}


def test_delete_or_replace_through_one_replica_reaches_the_others(cluster: Cluster) -> None:
    first, w1 = add_model(16, 4)
    second, w2 = add_model(16, 5)
    x = np.ones(16, np.float32)
    with cluster.replicas[0].connect() as client:
        client.upload_model(first, model_id="moving")
    with cluster.replicas[1].connect() as client:
        assert np.array_equal(client.predict("moving", x).output[0].as_numpy(), x + w1)
    # Replaced elsewhere while replica 1 holds the first model loaded.
    with cluster.replicas[0].connect() as client:
        client.delete_model("moving")
    with cluster.replicas[2].connect() as client:
        client.upload_model(second, model_id="moving")
    with cluster.replicas[1].connect() as client:
        assert np.array_equal(client.predict("moving", x).output[0].as_numpy(), x + w2)
    # Deleted elsewhere: gone here too.
    with cluster.replicas[2].connect() as client:
        client.delete_model("moving")
    with cluster.replicas[1].connect() as client, pytest.raises(ApiError) as gone:
        client.predict("moving", x)
    assert gone.value.status == 404
