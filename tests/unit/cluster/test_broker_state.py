"""The broker's sealed secrets: kept across restarts, rotated on request, tampering refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from veil.cluster.broker import load_or_create, rotate
from veil.errors import SealedStateError

KEY = bytes(range(32))


def test_a_restarted_broker_holds_the_same_secrets(tmp_path: Path) -> None:
    first = load_or_create(tmp_path, KEY)
    again = load_or_create(tmp_path, KEY)
    assert again.secrets.identity.certificate_der == first.secrets.identity.certificate_der
    assert again.secrets.store_key == first.secrets.store_key
    assert again.key.public == first.key.public
    assert not any(first.secrets.store_key in p.read_bytes() for p in tmp_path.iterdir())


def test_rotation_changes_the_certificate_only(tmp_path: Path) -> None:
    first = load_or_create(tmp_path, KEY)
    rotated = rotate(tmp_path, KEY)
    assert rotated.secrets.generation == first.secrets.generation + 1
    assert rotated.secrets.identity.certificate_der != first.secrets.identity.certificate_der
    assert rotated.secrets.store_key == first.secrets.store_key  # models stay readable
    assert rotated.key.public == first.key.public
    assert load_or_create(tmp_path, KEY).secrets.generation == 2


def test_a_tampered_or_foreign_file_is_refused(tmp_path: Path) -> None:
    load_or_create(tmp_path, KEY)
    with pytest.raises(SealedStateError, match=r"broker\.sealed"):
        load_or_create(tmp_path, os.urandom(32))  # another platform's sealing key
    path = tmp_path / "broker.sealed"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(SealedStateError, match=r"broker\.sealed"):
        load_or_create(tmp_path, KEY)


def test_the_broker_app_refuses_oversized_and_unattested_joins(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from datetime import UTC, datetime

    from starlette.testclient import TestClient

    from veil.attestation.trust import TrustStore
    from veil.cluster.broker import MAX_JOIN_BYTES, Offer, broker_app
    from veil.cluster.exchange import (
        JoinKey,
        broker_report_data,
        join_request,
        own_measurement_policy,
        verifier,
    )
    from veil.providers import SimulatedSgxProvider
    from veil.server.config import ServerConfig
    from veil.server.runner import collateral_keeper

    provider = SimulatedSgxProvider(tmp_path)
    state = load_or_create(tmp_path, provider.sealing_key())
    stranger = SimulatedSgxProvider(tmp_path / "stranger", mr_enclave=bytes(32))
    evidence = provider.evidence(broker_report_data(state.key))
    config = ServerConfig(data_dir=tmp_path, platform="simulated")
    app = broker_app(
        state,
        Offer.of(state.key, evidence, collateral_keeper(config, provider, evidence)),
        own_measurement_policy(provider.evidence(b"")),
        verifier(TrustStore.simulated_only(), lambda: datetime.now(UTC)),
    )
    with TestClient(app) as client:
        assert client.get("/v1/offer").status_code == 200
        assert client.post("/v1/join", content=bytes(MAX_JOIN_BYTES + 1)).status_code == 413
        request = join_request(stranger, JoinKey.generate(), state.key.public)
        with caplog.at_level("WARNING", logger="veil.broker"):
            refused = client.post("/v1/join", content=request)
    assert refused.status_code == 403
    assert "mr_enclave: got " + "00" * 32 in refused.text
    assert "refused, nothing released" in caplog.text
    assert state.secrets.store_key not in refused.content
