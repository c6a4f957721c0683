"""Proof-file pieces: the receipt header's codec, the client's bounds, collateral round trips."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from pathlib import Path

import cbor2
import pytest

from veil.attestation.policy import Policy, SgxPolicy
from veil.attestation.verify.collateral import DcapCollateral
from veil.attestation.verify.snp import SnpCollateral
from veil.errors import LogError, ReceiptError
from veil.receipts.cose import Signer
from veil.receipts.payload import ReceiptPayload, TreeHead, evidence_digest
from veil.receipts.proof import (
    MAX_PROOF_BYTES,
    check_receipt,
    decode_bundle,
    decode_collateral,
    encode_bundle,
    encode_collateral,
    read_log_head,
    verify_proof,
)

POLICY = Policy(sgx=SgxPolicy(mr_enclave=(bytes(32),)))


def test_bundle_round_trip_and_refusals() -> None:
    value = encode_bundle(b"r", b"h", [b"\x01" * 32])
    assert decode_bundle(value) == (b"r", b"h", (b"\x01" * 32,))
    with pytest.raises(ReceiptError, match="longer than any receipt"):
        decode_bundle("A" * 70_000)
    with pytest.raises(ReceiptError, match="malformed"):
        decode_bundle("!!!")
    bad = encode_bundle(b"r", b"h", [])
    wrong_types = cbor2.dumps({"receipt": "r", "head": b"h", "path": []})
    with pytest.raises(ReceiptError, match="must be bytes"):
        decode_bundle(base64.urlsafe_b64encode(wrong_types).decode())
    wrong_path = cbor2.dumps({"receipt": b"r", "head": b"h", "path": [1]})
    with pytest.raises(ReceiptError, match="path"):
        decode_bundle(base64.urlsafe_b64encode(wrong_path).decode())
    assert decode_bundle(bad)[2] == ()


def test_an_inclusion_path_longer_than_any_tree_is_refused() -> None:
    signer = Signer()
    now = datetime(2026, 1, 1, tzinfo=UTC)
    message = signer.sign(
        ReceiptPayload("upload", "m", b"\x01" * 32, now, 0, evidence_digest(b"e")).encode()
    )
    head = signer.sign(TreeHead(1, b"\x02" * 32, now).encode())
    with pytest.raises(LogError, match="at most 64"):
        check_receipt(
            message, head, [b"\x00" * 32] * 65, public_key=signer.public_key, evidence=b"e"
        )
    with pytest.raises(ReceiptError, match=r"receipt\.evidence"):
        check_receipt(message, head, [], public_key=signer.public_key, evidence=b"other")


def test_proof_file_bounds() -> None:
    with pytest.raises(ReceiptError, match="more than"):
        verify_proof(b"\x00" * (MAX_PROOF_BYTES + 1), policy=POLICY)
    with pytest.raises(ReceiptError, match="not a veil proof"):
        verify_proof(cbor2.dumps({"veil_proof": 1.5}), policy=POLICY)
    with pytest.raises(ReceiptError, match=r"proof\.receipt"):
        verify_proof(cbor2.dumps({"veil_proof": 1}), policy=POLICY)


def test_collateral_round_trips() -> None:
    dcap = DcapCollateral("chain", b"crl", b"pck", "chain", "{}", b"s" * 64, "chain", "{}", b"t")
    snp = SnpCollateral(b"vcek", None, b"crl")
    for collateral in (dcap, snp, {"tcb_info": b"x"}):
        stored = cbor2.loads(cbor2.dumps(encode_collateral(collateral)))
        assert decode_collateral(stored) == collateral
    with pytest.raises(TypeError, match="expected a collateral"):
        encode_collateral(5)
    with pytest.raises(ReceiptError, match="do not fit"):
        decode_collateral({"kind": "dcap", "value": {"nope": 1}})
    with pytest.raises(ReceiptError, match="kind, value"):
        decode_collateral([1])


def test_read_log_head_refuses_what_is_not_a_head(tmp_path: Path) -> None:
    path = tmp_path / "head"
    path.write_bytes(cbor2.dumps([1, 2]))
    with pytest.raises(ReceiptError, match="COSE_Sign1 tree head"):
        read_log_head(path)
    path.write_bytes(b"\xff")
    with pytest.raises(ReceiptError, match="malformed"):
        read_log_head(path)
    path.write_bytes(b"\x00" * 70_000)
    with pytest.raises(ReceiptError, match="larger"):
        read_log_head(path)
