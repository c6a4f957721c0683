"""`veil broker` + `veil serve --join`: one attested identity across replicas (issue 14, item 1).

Real processes on loopback, simulated platform on both sides, veil's verifier and policies.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from broker_process import BrokerProcess, start_broker
from onnx_models import identity_model
from server_process import VeilServer, start_server

pytestmark = pytest.mark.slow


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    process = start_broker(tmp_path / "broker", tmp_path / "broker-logs")
    yield process
    process.stop()


def _replica(tmp_path: Path, name: str, broker: BrokerProcess) -> VeilServer:
    return start_server(
        tmp_path / name, tmp_path / f"{name}-logs", "--no-auth", "--join", broker.url
    )


def _certificate_sha256(replica: VeilServer) -> str:
    with replica.connect() as connection:  # attests: the replica's evidence binds this certificate
        return hashlib.sha256(connection.certificate_der).hexdigest()


def test_replicas_present_the_brokers_one_certificate(
    tmp_path: Path, broker: BrokerProcess
) -> None:
    replicas = [_replica(tmp_path, f"replica{i}", broker) for i in range(3)]
    try:
        seen = {_certificate_sha256(r) for r in replicas}
        assert seen == {broker.certificate_sha256}
        assert broker.stderr().count("accepted") == 3
    finally:
        for replica in replicas:
            replica.stop()


def test_a_replica_the_broker_policy_refuses_gets_nothing(tmp_path: Path) -> None:
    policy = tmp_path / "broker-policy.toml"
    other_build = hashlib.sha256(b"another veil build").hexdigest()
    policy.write_text(f'[sgx]\nmr_enclave = ["{other_build}"]\n')
    broker = start_broker(tmp_path / "broker", tmp_path / "broker-logs", "--policy", str(policy))
    try:
        replica = subprocess.run(
            [sys.executable, "-m", "veil.cli", "serve", "--platform", "simulated", "--no-auth",
             "--data-dir", str(tmp_path / "replica"), "--unattested-port", "0",
             "--attested-port", "0", "--management-port", "0", "--join", broker.url],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert replica.returncode == 2
        assert "403 refused" in replica.stderr
        assert f"expected {other_build}" in replica.stderr
        assert "serving on" not in replica.stdout
        assert not (tmp_path / "replica").exists()  # a refused start leaves nothing behind
        log = broker.stderr()
        assert "refused, nothing released" in log
        assert "mr_enclave: got" in log
        assert "accepted" not in log
    finally:
        broker.stop()


def test_broker_and_replica_restarts_keep_the_identity_and_the_models(
    tmp_path: Path, broker: BrokerProcess
) -> None:
    replica = _replica(tmp_path, "replica", broker)
    try:
        with replica.connect() as connection:
            model_id = connection.upload_model(identity_model("float32"), model_id="kept").model_id
    finally:
        replica.stop()
    broker.stop()
    # The broker unseals the same secrets; the replica rejoins and opens its models, which are
    # sealed with the cluster's store key.
    again = start_broker(broker.data_dir, tmp_path / "broker-logs-2")
    try:
        assert again.certificate_sha256 == broker.certificate_sha256
        replica = _replica(tmp_path, "replica", again)
        try:
            assert "1 stored model restored" in replica.ready_line
            assert _certificate_sha256(replica) == broker.certificate_sha256
            with replica.connect() as connection:
                x = np.ones((2, 3), dtype=np.float32)
                assert np.array_equal(connection.predict(model_id, x).output[0].as_numpy(), x)
        finally:
            replica.stop()
    finally:
        again.stop()


def test_rotation_gives_rejoining_replicas_a_new_certificate_and_clients_re_attest(
    tmp_path: Path, broker: BrokerProcess
) -> None:
    replica = _replica(tmp_path, "replica", broker)
    connection = replica.connect()
    try:
        connection.upload_model(identity_model("float32"), model_id="m")
        replica.stop()
        broker.stop()
        rotated = start_broker(broker.data_dir, tmp_path / "broker-logs-2", "--rotate")
        try:
            assert rotated.generation == broker.generation + 1
            assert rotated.certificate_sha256 != broker.certificate_sha256
            same_ports = [
                f"--{name.replace('_', '-')}={port}" for name, port in replica.ports.items()
            ]
            replica = start_server(
                replica.data_dir, tmp_path / "replica-logs-2", "--no-auth", "--join", rotated.url,
                *same_ports,
            )  # fmt: skip
            try:
                assert _certificate_sha256(replica) == rotated.certificate_sha256
                # The client still pins the old certificate: its next prediction fails over,
                # attests the server again and goes through under the new one.
                x = np.ones((2, 3), dtype=np.float32)
                assert np.array_equal(connection.predict("m", x).output[0].as_numpy(), x)
                assert connection.reattestations == 1
                new_digest = hashlib.sha256(connection.certificate_der).hexdigest()
                assert new_digest == rotated.certificate_sha256
            finally:
                replica.stop()
        finally:
            rotated.stop()
    finally:
        connection.close()
