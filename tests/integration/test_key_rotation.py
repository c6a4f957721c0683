"""Live key rotation of one running server (`veil.server.rotation`).

A simulated server in process, with an admin key: clients predict before and after a rotation
without an error and re-attest on their own; receipts from before a rotation stay verifiable;
the receipt log continues; a server that presents a new certificate without new evidence
binding it is refused.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from inprocess import listening
from onnx_models import identity_model
from server_process import veil_cli

import veil
from veil.attestation.trust import TrustStore
from veil.errors import (
    BindingError,
    ConflictError,
    PermissionDeniedError,
    ReceiptError,
    SimulationModeWarning,
)
from veil.keymap import RECEIPT_KEY
from veil.providers.measurement import simulated_measurement
from veil.receipts import VerifiedReceipt, verify_proof
from veil.server.app import ServerState
from veil.server.config import ServerConfig
from veil.server.rotation import KeyRing, ServerKeys
from veil.server.runner import prepare_state
from veil.tls import TlsIdentity, generate_identity

pytestmark = pytest.mark.slow

X = np.arange(4, dtype=np.float32).reshape(1, 4)
POLICY = veil.Policy(sgx=veil.SgxPolicy(mr_enclave=(simulated_measurement(),)))
ROTATIONS_UNDER_LOAD = 3


def connect(ports: dict[str, int], key: str, **kwargs: object) -> veil.Connection:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SimulationModeWarning)
        return veil.connect("127.0.0.1", simulation=True, api_key=key, **ports, **kwargs)  # type: ignore[arg-type]


def verify(data: bytes, **kwargs: object) -> VerifiedReceipt:
    return verify_proof(data, policy=POLICY, trust=TrustStore.simulated_only(), **kwargs)  # type: ignore[arg-type]


@dataclasses.dataclass
class Served:
    ports: dict[str, int]
    admin: str
    user: str
    state: ServerState


def _keys(state: ServerState) -> tuple[str, str]:
    admin = state.auth.store.create("admin", "rotation admin")[1]
    user = state.auth.store.create("user", "rotation user")[1]
    return admin, user


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    state, identity = prepare_state(ServerConfig(tmp_path / "data", platform="simulated"))
    admin, user = _keys(state)
    with listening(state, identity) as ports:
        with connect(ports, admin) as client:
            client.upload_model(
                identity_model("float32", (1, 4)), model_id="m", visibility="public"
            )
        yield Served(ports, admin, user, state)


def test_predict_rotate_predict(served: Served) -> None:
    with connect(served.ports, served.admin) as client:
        before = client.predict("m", X, receipt=True)
        kept = client.log_head()
        first_certificate = client.certificate_der
        first_receipt_key = client.key_map.get(RECEIPT_KEY)
        generation = client.rotate_keys()
        assert generation == 1
        after = client.predict("m", X, receipt=True)
        np.testing.assert_array_equal(after.output[0].as_numpy(), X)
        # The client attested the new keys on its own, once.
        assert client.reattestations == 1
        assert client.certificate_der != first_certificate
        assert client.certificate_der == served.state.keys.current.certificate_der
        assert client.key_map.get(RECEIPT_KEY) not in (None, first_receipt_key)
        # The log continued: one more entry, and the head kept before still extended.
        assert before.receipt is not None
        assert after.receipt is not None
        assert after.receipt.payload.seq == before.receipt.payload.seq + 1
        newer = client.check_consistency(kept.head)
        # An upload (never sent twice when its answer is lost) also goes through a rotation:
        # refused at the handshake, it was never sent.
        assert client.rotate_keys() == 2
        client.upload_model(identity_model("float32", (1, 4)), model_id="m2")
        assert client.reattestations == 2
        moved = client.prove_inclusion(before.receipt, client.log_head())
    # The receipt from before the rotation verifies offline with the evidence it embeds.
    proof = before.receipt.encode()
    assert verify(proof).payload.seq == before.receipt.payload.seq
    # Moved to a head signed by a later key: it verifies against that head kept, not alone.
    assert verify(moved.encode(), log_head=moved.tree_head).tree_head == moved.tree_head
    with pytest.raises(ReceiptError):
        verify(moved.encode())
    assert newer.head.size >= kept.head.size + 1


def test_clients_keep_predicting_through_rotations(served: Served) -> None:
    """A client predicting in a loop while another rotates the keys sees no error."""
    done = threading.Event()
    errors: list[BaseException] = []
    counts = {"predictions": 0}
    with connect(served.ports, served.user) as worker:

        def predict_until_done() -> None:
            try:
                while not done.is_set():
                    result = worker.predict("m", X, receipt=True)
                    np.testing.assert_array_equal(result.output[0].as_numpy(), X)
                    counts["predictions"] += 1
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        thread = threading.Thread(target=predict_until_done)
        thread.start()
        try:
            with connect(served.ports, served.admin) as admin:
                for expected in range(1, ROTATIONS_UNDER_LOAD + 1):
                    assert admin.rotate_keys() == expected
                    # Wait (generously) until the worker has made a prediction that started
                    # after this rotation (one may still have been in flight under the old keys).
                    seen = counts["predictions"]
                    give_up = time.monotonic() + 60
                    while counts["predictions"] <= seen + 1 and not errors:
                        assert time.monotonic() < give_up, "the worker stopped predicting"
                        time.sleep(0.05)
        finally:
            done.set()
            thread.join(timeout=60)
        assert not errors, errors
        assert worker.reattestations >= 1
        assert worker.certificate_der == served.state.keys.current.certificate_der


def test_only_an_admin_key_rotates(served: Served) -> None:
    with connect(served.ports, served.user) as client, pytest.raises(PermissionDeniedError):
        client.rotate_keys()
    assert served.state.keys.current.generation == 0


def _stale(state: ServerState, identity: TlsIdentity, what: str) -> ServerState:
    """`state` whose rotation presents a new TLS certificate without evidence that binds it:
    the unattested port then serves either the old evidence with the new certificate, or the
    old certificate and evidence (still a matching pair) while TLS presents the new one."""
    old = state.keys.current

    def renew(generation: int) -> tuple[ServerKeys, TlsIdentity]:
        fresh = generate_identity()
        served = fresh.certificate_der if what == "old evidence" else old.certificate_der
        return dataclasses.replace(old, certificate_der=served, generation=generation), fresh

    return dataclasses.replace(state, keys=KeyRing(old, identity, renew))


@pytest.mark.parametrize("what", ["old evidence", "old certificate served"])
def test_a_new_certificate_without_new_evidence_is_refused(tmp_path: Path, what: str) -> None:
    state, identity = prepare_state(ServerConfig(tmp_path / "data", platform="simulated"))
    admin, _ = _keys(state)
    stale = _stale(state, identity, what)
    with listening(stale) as ports, connect(ports, admin, failover_retries=2) as client:
        client.upload_model(identity_model("float32", (1, 4)), model_id="m")
        client.predict("m", X)
        pinned = client.certificate_der
        client.rotate_keys()
        with pytest.raises(BindingError, match="certificate"):
            client.predict("m", X)
        # Nothing was accepted in between: the client still holds the certificate it attested.
        assert client.certificate_der == pinned


def test_a_joined_server_does_not_rotate_alone(tmp_path: Path) -> None:
    state, identity = prepare_state(ServerConfig(tmp_path / "data", platform="simulated"))
    admin, _ = _keys(state)
    fixed = dataclasses.replace(state, keys=KeyRing(state.keys.current, identity, None))
    with listening(fixed) as ports, connect(ports, admin) as client:
        with pytest.raises(ConflictError, match="broker"):
            client.rotate_keys()
        client.list_models()  # still served, under the keys it had
        assert client.reattestations == 0


def test_inclusion_and_log_head_across_a_restart(tmp_path: Path) -> None:
    """The log continues across a restart (new keys, as across a rotation): a head kept before
    is extended, and a receipt from before is proved in a later head, which the command line
    checks with --log-head."""
    config = ServerConfig(tmp_path / "data", platform="simulated")
    state, identity = prepare_state(config)
    admin, _ = _keys(state)
    with listening(state, identity) as ports, connect(ports, admin) as client:
        client.upload_model(identity_model("float32", (1, 4)), model_id="m")
        old = client.predict("m", X, receipt=True).receipt
        kept = client.log_head()
        first_key = client.key_map.get(RECEIPT_KEY)
    assert old is not None
    state, identity = prepare_state(config)  # the restart: the same data directory
    with listening(state, identity) as ports, connect(ports, admin) as client:
        assert client.key_map.get(RECEIPT_KEY) != first_key
        new = client.predict("m", X, receipt=True).receipt
        assert new is not None
        assert new.payload.seq == old.payload.seq + 1
        later = client.check_consistency(kept.head)
        moved = client.prove_inclusion(old, later)
    old.save(tmp_path / "old.cbor")
    moved.save(tmp_path / "moved.cbor")
    kept.save(tmp_path / "kept.cose")
    later.save(tmp_path / "later.cose")
    for proof, head, status in (
        ("old.cbor", "kept.cose", 0),  # the receipt's own head, kept
        ("moved.cbor", "later.cose", 0),  # the head after the restart, signed by the new key
        ("moved.cbor", "kept.cose", 1),  # its path leads to the later head, not this one
    ):
        done = veil_cli(
            "verify-receipt", str(tmp_path / proof), "--simulated", "--log-head",
            str(tmp_path / head), "--json",
        )  # fmt: skip
        assert done.returncode == status, (proof, head, done.stdout, done.stderr)
        if status:
            assert json.loads(done.stdout)["error_type"] == "LogError"
