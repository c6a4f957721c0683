"""The key-release exchange in one process: both sides on the simulated platform, veil's verifier.

Each rejection path is driven by one changed input and must fail for the right typed error,
with nothing released.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path

import cbor2
import pytest

from veil.attestation.trust import TrustStore
from veil.cluster.broker import BrokerState, load_or_create
from veil.cluster.exchange import (
    BrokerKey,
    JoinKey,
    broker_report_data,
    encode_message,
    join_request,
    open_release,
    own_measurement_policy,
    release,
    verifier,
    verify_join,
    verify_offer,
)
from veil.errors import BindingError, JoinError, MalformedEvidenceError, PolicyError
from veil.keymap import KeyMap
from veil.providers import SimulatedSgxProvider
from veil.tls import certificate_digest

VERIFY = verifier(TrustStore.simulated_only(), lambda: datetime.now(UTC))
OTHER_BUILD = hashlib.sha256(b"another veil build").digest()


@pytest.fixture
def broker(tmp_path: Path) -> tuple[SimulatedSgxProvider, BrokerState]:
    provider = SimulatedSgxProvider(tmp_path / "broker")
    (tmp_path / "broker").mkdir()
    return provider, load_or_create(tmp_path / "broker", provider.sealing_key())


def _offer(provider: SimulatedSgxProvider, state: BrokerState) -> bytes:
    return encode_message(provider.evidence(broker_report_data(state.key)), state.key.key_map)


def test_a_replica_of_the_same_build_gets_the_cluster_secrets(
    tmp_path: Path, broker: tuple[SimulatedSgxProvider, BrokerState]
) -> None:
    broker_provider, state = broker
    replica = SimulatedSgxProvider(tmp_path / "replica")
    policy = own_measurement_policy(broker_provider.evidence(b""))

    broker_public = verify_offer(_offer(broker_provider, state), policy, VERIFY)
    assert broker_public == state.key.public
    join = JoinKey.generate()
    join_public, verified = verify_join(
        join_request(replica, join, broker_public), state.key, policy, VERIFY
    )
    assert verified.measurements["mr_enclave"] == replica.mr_enclave
    secrets = open_release(release(state.key, join_public, state.secrets), join, broker_public)

    assert secrets.identity.certificate_der == state.secrets.identity.certificate_der
    assert secrets.store_key == state.secrets.store_key
    assert secrets.generation == state.secrets.generation == 1


def test_a_replica_with_another_measurement_is_refused(
    tmp_path: Path, broker: tuple[SimulatedSgxProvider, BrokerState]
) -> None:
    broker_provider, state = broker
    stranger = SimulatedSgxProvider(tmp_path / "stranger", mr_enclave=OTHER_BUILD)
    policy = own_measurement_policy(broker_provider.evidence(b""))
    request = join_request(stranger, JoinKey.generate(), state.key.public)
    with pytest.raises(PolicyError, match=f"mr_enclave: got {OTHER_BUILD.hex()}"):
        verify_join(request, state.key, policy, VERIFY)


def test_a_broker_with_another_measurement_is_not_trusted(
    tmp_path: Path, broker: tuple[SimulatedSgxProvider, BrokerState]
) -> None:
    _, state = broker
    impostor = SimulatedSgxProvider(tmp_path / "impostor", mr_enclave=OTHER_BUILD)
    replica = SimulatedSgxProvider(tmp_path / "replica")
    policy = own_measurement_policy(replica.evidence(b""))
    with pytest.raises(PolicyError, match="mr_enclave"):
        verify_offer(_offer(impostor, state), policy, VERIFY)


def test_an_offer_whose_key_map_is_not_the_bound_one_is_refused(
    broker: tuple[SimulatedSgxProvider, BrokerState],
) -> None:
    provider, state = broker
    evidence = provider.evidence(broker_report_data(state.key))
    swapped = encode_message(evidence, BrokerKey.generate().key_map)  # a key the TEE never bound
    policy = own_measurement_policy(provider.evidence(b""))
    with pytest.raises(BindingError, match=r"key map binding"):
        verify_offer(swapped, policy, VERIFY)


def test_a_server_quote_does_not_pass_as_an_offer(
    broker: tuple[SimulatedSgxProvider, BrokerState],
) -> None:
    provider, state = broker
    # Evidence of the same build that binds a certificate, as `veil serve` makes it.
    evidence = provider.evidence(certificate_digest(b"cert") + state.key.key_map.digest)
    policy = own_measurement_policy(provider.evidence(b""))
    with pytest.raises(BindingError, match=r"report data \[0:32\]"):
        verify_offer(encode_message(evidence, state.key.key_map), policy, VERIFY)


def test_a_join_meant_for_another_broker_is_refused(
    tmp_path: Path, broker: tuple[SimulatedSgxProvider, BrokerState]
) -> None:
    provider, state = broker
    replica = SimulatedSgxProvider(tmp_path / "replica")
    request = join_request(replica, JoinKey.generate(), BrokerKey.generate().public)
    policy = own_measurement_policy(provider.evidence(b""))
    with pytest.raises(BindingError, match=r"report data \[0:32\]"):
        verify_join(request, state.key, policy, VERIFY)


def test_a_join_whose_key_was_swapped_is_refused(
    tmp_path: Path, broker: tuple[SimulatedSgxProvider, BrokerState]
) -> None:
    provider, state = broker
    replica = SimulatedSgxProvider(tmp_path / "replica")
    genuine = cbor2.loads(join_request(replica, JoinKey.generate(), state.key.public))
    # Someone in between puts their own key next to the replica's evidence.
    genuine["keys"] = JoinKey.generate().key_map.encoded
    policy = own_measurement_policy(provider.evidence(b""))
    with pytest.raises(BindingError, match="key map binding"):
        verify_join(cbor2.dumps(genuine), state.key, policy, VERIFY)


@pytest.mark.parametrize(
    "body",
    [b"\xff", cbor2.dumps([1]), cbor2.dumps({"quote": "x", "keys": b"", "collateral": {}})],
)
def test_malformed_join_requests_are_refused(
    body: bytes, broker: tuple[SimulatedSgxProvider, BrokerState]
) -> None:
    provider, state = broker
    policy = own_measurement_policy(provider.evidence(b""))
    with pytest.raises(MalformedEvidenceError):
        verify_join(body, state.key, policy, VERIFY)


def test_a_release_sealed_by_anyone_but_the_attested_broker_does_not_open(
    broker: tuple[SimulatedSgxProvider, BrokerState],
) -> None:
    _, state = broker
    join = JoinKey.generate()
    join_public = join.key_map.get("join-hpke")
    assert join_public is not None
    forged = release(
        BrokerKey.generate(), join_public, state.secrets
    )  # right recipient, wrong sender
    with pytest.raises(JoinError, match="attested broker's key"):
        open_release(forged, join, state.key.public)
    sealed = release(state.key, join_public, state.secrets)
    with pytest.raises(JoinError, match="attested broker's key"):
        open_release(sealed, JoinKey.generate(), state.key.public)  # another replica's key
    value = cbor2.loads(sealed)
    value["ciphertext"] = bytes([value["ciphertext"][0] ^ 1]) + value["ciphertext"][1:]
    with pytest.raises(JoinError, match="attested broker's key"):
        open_release(cbor2.dumps(value), join, state.key.public)
    with pytest.raises(JoinError, match="expected enc and ciphertext"):
        open_release(cbor2.dumps({"enc": b""}), join, state.key.public)


def test_key_maps_name_the_exchange_keys() -> None:
    assert KeyMap.decode(BrokerKey.generate().key_map.encoded).get("broker-hpke") is not None
    assert JoinKey.generate().key_map.get("join-hpke") is not None
