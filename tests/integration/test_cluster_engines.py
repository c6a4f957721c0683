"""Three `veil serve` replicas sharing their state in a real PostgreSQL and one sealed blob
directory, behind a real HAProxy in TCP mode (Debian's packages, on loopback).

The replicas share the sealing key as a broker would release it (here: the same simulated key
file in each data directory), not yet the TLS identity: each presents its own certificate, so
the balancer is exercised on the plain port (round robin, ``Veil-Replica`` names who answered)
and as TLS passthrough (the TLS session ends in a replica, with that replica's certificate).
"""

from __future__ import annotations

import secrets
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import cbor2
import httpx
import numpy as np
import pytest
from server_process import VeilServer, start_server
from test_sealed_restart import add_model

from veil.errors import ApiError
from veil.testing.engines import engines_missing, haproxy, postgres
from veil.tls import SERVER_NAME

pytestmark = pytest.mark.skipif(
    bool(engines_missing()),
    reason=f"{' and '.join(engines_missing())} not installed (scripts/test installs them)",
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[VeilServer]]:
    root = tmp_path_factory.mktemp("cluster")
    key = secrets.token_bytes(32)
    replicas: list[VeilServer] = []
    with postgres(root) as url:
        try:
            for i in range(3):
                data = root / f"data{i}"
                data.mkdir(mode=0o700)
                key_file = data / "sealing.key"
                key_file.write_bytes(key)
                key_file.chmod(0o600)
                replicas.append(
                    start_server(
                        data,
                        root / f"log{i}",
                        "--database-url",
                        url,
                        "--store-dir",
                        str(root / "store"),
                        "--replica-name",
                        f"replica-{i}",
                    )
                )
            yield replicas
        finally:
            for r in replicas:
                r.stop()


def test_model_stored_by_one_replica_is_predicted_by_every_replica(
    cluster: list[VeilServer],
) -> None:
    blob, w = add_model(64, 1)
    with cluster[0].connect() as client:
        client.upload_model(blob, model_id="shared")
    x = np.arange(64, dtype=np.float32)
    for replica in cluster:
        with replica.connect() as client:
            # Loaded on first use from the sealed blob the other replica committed.
            assert np.array_equal(client.predict("shared", x).output[0].as_numpy(), x + w)


def test_duplicate_id_is_refused_cluster_wide(cluster: list[VeilServer]) -> None:
    blob, _ = add_model(32, 2)
    with cluster[1].connect() as client:
        client.upload_model(blob, model_id="once")
    other, _ = add_model(32, 3)
    with cluster[2].connect() as client, pytest.raises(ApiError) as refused:
        client.upload_model(other, model_id="once")
    assert refused.value.status == 409
    assert "'once' is already taken" in refused.value.message


def test_balancer_spreads_over_every_replica(cluster: list[VeilServer], tmp_path: Path) -> None:
    with haproxy(tmp_path, [[r.unattested_port for r in cluster]]) as (port,):
        answered = [
            httpx.get(f"http://127.0.0.1:{port}/", timeout=10).headers["veil-replica"]
            for _ in range(6)
        ]
    assert sorted(set(answered)) == ["replica-0", "replica-1", "replica-2"]


def test_balancer_passes_tls_through(cluster: list[VeilServer], tmp_path: Path) -> None:
    certificates = {
        cbor2.loads(httpx.get(f"http://127.0.0.1:{r.unattested_port}/", timeout=10).content)
        for r in cluster
    }
    # Not verified here on purpose: the test only looks at which certificate arrives.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    seen = set()
    with haproxy(tmp_path, [[r.attested_port for r in cluster]]) as (port,):
        for _ in range(3):
            with (
                socket.create_connection(("127.0.0.1", port), 10) as raw,
                context.wrap_socket(raw, server_hostname=SERVER_NAME) as tls,
            ):
                seen.add(tls.getpeercert(binary_form=True))
    # Each replica's own attested certificate: the balancer never terminated TLS.
    assert seen == certificates
