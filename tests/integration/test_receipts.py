"""Receipts end to end on emulated TDX (test PKI, PCCS stand-in, injected clocks): made by the
production server, checked by `veil.connect`, saved as proof files and verified offline after
the server is gone and long after the collateral expired; every mutation refused with a typed
error; a simulated server's proof through ``veil verify-receipt``."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import cbor2
import numpy as np
import pytest
from inprocess import listening
from onnx_models import identity_model

import veil
from veil.attestation.policy import Policy, TdxPolicy
from veil.attestation.trust import TrustStore
from veil.attestation.verifier import verify_evidence
from veil.errors import (
    AttestationError,
    BindingError,
    ExpiredError,
    HazmatWarning,
    LogError,
    PolicyError,
    ReceiptError,
    SimulationModeWarning,
)
from veil.keymap import RECEIPT_KEY, KeyMap
from veil.receipts import Receipt, verify_proof
from veil.receipts.cose import Signer
from veil.receipts.proof import read_log_head
from veil.server.config import ServerConfig
from veil.server.runner import make_provider, prepare_state
from veil.server.store import ModelStore
from veil.testing.devices import EmulatedDevices, EmulatedTsm
from veil.testing.intel_pki import IntelPki
from veil.testing.services import PccsService

pytestmark = pytest.mark.slow

START = datetime(2026, 3, 1, 12, tzinfo=UTC)
MR_TD = hashlib.sha384(b"receipts td").digest()
X = np.arange(4, dtype=np.float32).reshape(1, 4)


def hazmat(intel: IntelPki) -> TrustStore:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HazmatWarning)
        return TrustStore.hazmat_test_roots(intel_root=intel.root)


@pytest.fixture(scope="module")
def intel() -> IntelPki:
    return IntelPki(now=START - timedelta(days=1), seed=hashlib.sha256(b"veil receipts").digest())


@pytest.fixture(scope="module")
def proofs(intel: IntelPki, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A predict receipt (with its proof file), an upload receipt, and a log head kept by the
    client, from a server that is stopped before any test looks at them."""
    tmp = tmp_path_factory.mktemp("receipts")
    tdx = intel.tdx_platform()
    with PccsService(intel, [tdx], clock=lambda: START) as pccs:
        devices = EmulatedDevices(
            tsm=EmulatedTsm(quote_signer=lambda rd: tdx.quote(rd, mr_td=MR_TD))
        )
        config = ServerConfig(tmp / "data", platform="tdx", pccs_url=pccs.url, unsealed_store=True)
        provider = make_provider(config, fs=devices, clock=lambda: START)
        state, identity = prepare_state(
            config, store=ModelStore(tmp / "models"), provider=provider, clock=lambda: START
        )
        policy = Policy(tdx=TdxPolicy(mr_td=(MR_TD,)))
        with (
            listening(state, identity) as ports,
            veil.connect(
                "127.0.0.1", policy=policy, trust=hazmat(intel), now=START, **ports
            ) as client,
        ):
            upload = client.upload_model(
                identity_model("float32", (1, 4)), model_id="m", receipt=True
            )
            result = client.predict("m", X, receipt=True)
            head = client.log_head()
    assert result.receipt is not None
    assert upload.receipt is not None
    result.receipt.save(tmp / "proof.cbor")
    head.save(tmp / "head.cose")
    np.savez(tmp / "inputs.npz", X)
    np.savez(tmp / "outputs.npz", **{t.name or "": t.as_numpy() for t in result.output})
    return {
        "dir": tmp,
        "receipt": result.receipt,
        "upload": upload.receipt,
        "policy": policy,
        "proof": (tmp / "proof.cbor").read_bytes(),
    }


def test_the_client_checked_receipt_names_what_was_done(proofs: dict[str, Any]) -> None:
    receipt: Receipt = proofs["receipt"]
    assert receipt.payload.op == "predict"
    assert receipt.payload.model_id == "m"
    assert receipt.payload.time == START
    assert receipt.payload.seq == proofs["upload"].payload.seq + 1
    assert receipt.tree_head.size == receipt.payload.seq + 1
    assert proofs["upload"].payload.model_hash == receipt.payload.model_hash


def test_a_proof_verifies_offline_long_after_the_collateral_expired(
    proofs: dict[str, Any], intel: IntelPki
) -> None:
    receipt: Receipt = proofs["receipt"]
    years_later = START + timedelta(days=4 * 365)
    # Appraised today, the embedded collateral has long expired...
    with pytest.raises(ExpiredError):
        verify_evidence(
            receipt.evidence,
            receipt.collateral,
            policy=proofs["policy"],
            trust=hazmat(intel),
            now=years_later,
        )
    # ...but the proof asks whether it was valid when the receipt was made.
    verified = verify_proof(proofs["proof"], policy=proofs["policy"], trust=hazmat(intel))
    assert verified.payload == receipt.payload
    assert verified.evidence.measurements["mr_td"] == MR_TD


def test_input_output_and_log_head_checks(proofs: dict[str, Any], intel: IntelPki) -> None:
    from veil.commands.verify_receipt import npz_digest

    tmp: Path = proofs["dir"]
    head = read_log_head(tmp / "head.cose")
    verify_proof(
        proofs["proof"],
        policy=proofs["policy"],
        trust=hazmat(intel),
        inputs_digest=npz_digest(tmp / "inputs.npz"),
        outputs_digest=npz_digest(tmp / "outputs.npz"),
        log_head=head,
    )
    other = npz_digest(tmp / "inputs.npz")[::-1]
    for name in ("inputs_digest", "outputs_digest"):
        with pytest.raises(ReceiptError, match=name.split("_")[0]):
            verify_proof(
                proofs["proof"], policy=proofs["policy"], trust=hazmat(intel), **{name: other}
            )
    later = type(head)(head.size + 1, head.root, head.time)
    with pytest.raises(LogError, match="log head"):
        verify_proof(proofs["proof"], policy=proofs["policy"], trust=hazmat(intel), log_head=later)


def flip(data: bytes, at: int = -1) -> bytes:
    return data[:at] + bytes([data[at] ^ 1]) + (data[at + 1 :] if at != -1 else b"")


def _cose_with_payload_byte_flipped(message: bytes) -> bytes:
    items = list(cbor2.loads(message).value)
    items[2] = flip(items[2], 20)
    return bytes(cbor2.dumps(cbor2.CBORTag(18, items)))


def _foreign_key_map(proof: dict[str, Any]) -> bytes:
    return KeyMap.build({RECEIPT_KEY: Signer().public_key}).encoded


def _collateral_flipped(proof: dict[str, Any]) -> dict[str, Any]:
    collateral = dict(proof["collateral"])
    value = dict(collateral["value"])
    value["tcb_info"] = value["tcb_info"].replace('"version":3', '"version":4', 1) + " "
    collateral["value"] = value
    return collateral


MUTATIONS: dict[str, tuple[Callable[[dict[str, Any]], None], type[Exception], str]] = {
    "receipt signature": (
        lambda p: p.update(receipt=flip(p["receipt"])),
        ReceiptError,
        "does not verify",
    ),
    "receipt payload field": (
        lambda p: p.update(receipt=_cose_with_payload_byte_flipped(p["receipt"])),
        ReceiptError,
        "",
    ),
    "receipt key": (
        lambda p: p.update(key_map=_foreign_key_map(p)),
        BindingError,
        "key map binding",
    ),
    "certificate": (
        lambda p: p.update(certificate=flip(p["certificate"], 40)),
        BindingError,
        "certificate binding",
    ),
    "evidence": (lambda p: p.update(evidence=flip(p["evidence"], 700)), AttestationError, ""),
    "collateral": (lambda p: p.update(collateral=_collateral_flipped(p)), AttestationError, ""),
    "inclusion proof": (
        lambda p: p["log"].update(path=[flip(p["log"]["path"][0]), *p["log"]["path"][1:]]),
        LogError,
        "leads to root",
    ),
    "tree head": (lambda p: p["log"].update(head=flip(p["log"]["head"])), ReceiptError, "verify"),
    "version": (lambda p: p.update(veil_proof=2), ReceiptError, "version 1"),
    "collateral kind": (
        lambda p: p.update(collateral={"kind": "other", "value": {}}),
        ReceiptError,
        "collateral.kind",
    ),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_every_mutation_is_refused(proofs: dict[str, Any], intel: IntelPki, name: str) -> None:
    mutate, error, match = MUTATIONS[name]
    proof = cbor2.loads(proofs["proof"])
    proof["log"] = dict(proof["log"])
    mutate(proof)
    with pytest.raises(error, match=match or None) as caught:
        verify_proof(cbor2.dumps(proof), policy=proofs["policy"], trust=hazmat(intel))
    if name == "receipt payload field":
        # A changed payload either no longer parses or no longer matches its signature.
        assert "does not verify" in str(caught.value) or "receipt" in str(caught.value)


def test_the_policy_applies_to_proofs(proofs: dict[str, Any], intel: IntelPki) -> None:
    other = Policy(tdx=TdxPolicy(mr_td=(bytes(48),)))
    with pytest.raises(PolicyError, match="mr_td"):
        verify_proof(proofs["proof"], policy=other, trust=hazmat(intel))
    with pytest.raises(ReceiptError, match="malformed"):
        verify_proof(b"\xff", policy=proofs["policy"], trust=hazmat(intel))


# --- a simulated server: the client refuses lying receipts; the CLI -------------------------


@pytest.fixture(scope="module")
def simulated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, int]]:
    state, identity = prepare_state(
        ServerConfig(tmp_path_factory.mktemp("sim") / "data", platform="simulated")
    )
    with listening(state, identity) as ports:
        yield ports


def connect(ports: dict[str, int]) -> veil.Connection:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SimulationModeWarning)
        return veil.connect("127.0.0.1", simulation=True, **ports)


def test_a_receipt_that_does_not_match_the_reply_is_refused(
    simulated: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    with connect(simulated) as client:
        client.upload_model(identity_model("float32", (1, 4)), model_id="lie")
        assert client.predict("lie", X).receipt is None
        monkeypatch.setattr("veil.server.app.tensors_digest", lambda tensors: bytes(32))
        with pytest.raises(ReceiptError, match=r"receipt\.inputs"):
            client.predict("lie", X, receipt=True)
        monkeypatch.undo()
        receipt = client.delete_model("lie", receipt=True)
        assert receipt is not None
        assert receipt.payload.op == "delete"


def test_consistency_and_inclusion_against_later_heads(simulated: dict[str, int]) -> None:
    with connect(simulated) as client:
        up = client.upload_model(identity_model("float32", (1, 4)), model_id="log", receipt=True)
        assert up.receipt is not None
        kept = client.log_head()
        for _ in range(3):
            client.predict("log", X, receipt=True)
        later = client.check_consistency(kept.head)
        assert later.head.size >= kept.head.size + 3
        moved = client.prove_inclusion(up.receipt, later)
        assert moved.tree_head == later.head
        forged = type(kept.head)(kept.head.size, bytes(32), kept.head.time)
        with pytest.raises(LogError, match="rewritten"):
            client.check_consistency(forged)


def test_verify_receipt_cli(simulated: dict[str, int], tmp_path: Path) -> None:
    with connect(simulated) as client:
        client.upload_model(identity_model("float32", (1, 4)), model_id="cli")
        result = client.predict("cli", X, receipt=True)
        head = client.log_head()
    assert result.receipt is not None
    result.receipt.save(tmp_path / "p.cbor")
    head.save(tmp_path / "head.cose")
    np.savez(tmp_path / "in.npz", X)
    np.savez(tmp_path / "wrong.npz", X + 1)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "veil.cli", "verify-receipt", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)

    ok = cli(
        str(tmp_path / "p.cbor"), "--simulated", "--inputs", str(tmp_path / "in.npz"), "--json"
    )
    assert ok.returncode == 0, ok.stderr
    assert '"verdict": "accepted"' in ok.stdout
    wrong = cli(str(tmp_path / "p.cbor"), "--simulated", "--inputs", str(tmp_path / "wrong.npz"))
    assert wrong.returncode == 1
    assert "ReceiptError" in wrong.stdout
    stale = cli(str(tmp_path / "p.cbor"), "--simulated", "--log-head", str(tmp_path / "head.cose"))
    assert stale.returncode == 0, stale.stdout  # no receipt since: the same head
    not_simulated = cli(str(tmp_path / "p.cbor"), "--json")
    assert not_simulated.returncode == 1
    assert cli(str(tmp_path / "missing.cbor")).returncode == 2
