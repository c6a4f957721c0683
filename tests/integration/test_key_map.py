"""The key map end to end: a server binds extra public keys in its report data's second half and
serves the map on ``GET /keys``; the client trusts a key only after recomputing the digest."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import cbor2
import httpx
import pytest
from inprocess import listening

import veil
from veil.errors import BindingError, MalformedEvidenceError, SimulationModeWarning
from veil.keymap import RECEIPT_KEY, KeyMap
from veil.server.app import ServerState
from veil.server.config import ServerConfig
from veil.server.rotation import KeyRing
from veil.server.runner import prepare_state
from veil.tls import TlsIdentity

pytestmark = pytest.mark.slow

HPKE = bytes(range(32))


def simulated_state(tmp_path: Path, bound: dict[str, bytes]) -> tuple[ServerState, TlsIdentity]:
    config = ServerConfig(tmp_path / "data", platform="simulated")
    return prepare_state(config, bound_keys=bound)


def connect(ports: dict[str, int]) -> veil.Connection:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SimulationModeWarning)
        return veil.connect("127.0.0.1", simulation=True, **ports)


def serving_map(state: ServerState, identity: TlsIdentity, key_map: KeyMap) -> ServerState:
    """`state` serving `key_map` on ``GET /keys`` in place of the map its evidence binds."""
    keys = dataclasses.replace(state.keys.current, key_map=key_map)
    return dataclasses.replace(state, keys=KeyRing(keys, identity, None))


@pytest.fixture
def bound(tmp_path: Path) -> tuple[ServerState, TlsIdentity]:
    return simulated_state(tmp_path, {"hpke": HPKE})


def test_client_trusts_the_bound_map(bound: tuple[ServerState, TlsIdentity]) -> None:
    state, identity = bound
    with listening(state, identity) as ports:
        served = httpx.get(f"http://127.0.0.1:{ports['unattested_port']}/keys")
        assert served.status_code == 200
        assert KeyMap.decode(cbor2.loads(served.content)).get("hpke") == HPKE
        with connect(ports) as client:
            assert client.key_map.get("hpke") == HPKE
            assert client.verified.report_data[32:] == client.key_map.digest != bytes(32)


def test_a_substituted_map_is_refused(bound: tuple[ServerState, TlsIdentity]) -> None:
    state, identity = bound
    swapped = serving_map(state, identity, KeyMap.build({"hpke": bytes(32)}))
    with listening(swapped, identity) as ports, pytest.raises(BindingError, match="key map"):
        connect(ports)


def test_a_withheld_map_is_refused(bound: tuple[ServerState, TlsIdentity]) -> None:
    state, identity = bound
    withheld = serving_map(state, identity, KeyMap.build({}))
    with listening(withheld, identity) as ports, pytest.raises(BindingError, match="key map"):
        connect(ports)


def test_a_malformed_map_is_refused(bound: tuple[ServerState, TlsIdentity]) -> None:
    state, identity = bound
    bad = KeyMap(keys=(("hpke", HPKE),), encoded=cbor2.dumps({"hpke": HPKE}) + b"\x00")
    with (
        listening(serving_map(state, identity, bad), identity) as ports,
        pytest.raises(MalformedEvidenceError, match="key map"),
    ):
        connect(ports)


def test_the_server_always_binds_its_receipt_key(tmp_path: Path) -> None:
    state, identity = simulated_state(tmp_path, {})
    with listening(state, identity) as ports, connect(ports) as client:
        assert [name for name, _ in client.key_map.keys] == [RECEIPT_KEY]
        assert client.verified.report_data[32:] == client.key_map.digest
    with pytest.raises(ValueError, match="receipt key"):
        simulated_state(tmp_path, {RECEIPT_KEY: HPKE})
