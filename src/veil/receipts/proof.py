"""Receipts as the client keeps them, proof files, and their verification.

A proof file (``Receipt.save``) is one CBOR map holding everything a third party needs, offline
and years later::

    veil_proof   1
    receipt      COSE_Sign1 of the receipt payload (`veil.receipts.payload`)
    log          {"head": COSE_Sign1 of a tree head, "path": [bytes(32), ...]}
    evidence     the quote or report that binds the receipt key
    certificate  the server's TLS certificate (DER): the report data's first half
    key_map      the encoded key map: the report data's second half (`veil.keymap`)
    collateral   {"kind": "map" | "dcap" | "snp", "value": ...}: the collateral of its time

`verify_proof` appraises the evidence *at the receipt's time* with that collateral, so a proof
whose collateral has long expired still verifies: the question it answers is "was this evidence
valid when the receipt was made", not "is it valid now".
"""

from __future__ import annotations

import base64
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2

from veil.attestation.claims import VerifiedEvidence
from veil.attestation.policy import Policy
from veil.attestation.trust import TrustStore
from veil.attestation.verifier import verify_evidence
from veil.attestation.verify.collateral import DcapCollateral
from veil.attestation.verify.snp import SnpCollateral
from veil.errors import LogError, ReceiptError
from veil.keymap import RECEIPT_KEY, check_binding
from veil.receipts.cose import verify_sign1
from veil.receipts.merkle import leaf_hash, verify_inclusion
from veil.receipts.payload import ReceiptPayload, TreeHead, evidence_digest

__all__ = [
    "MAX_PROOF_BYTES",
    "Receipt",
    "SignedTreeHead",
    "VerifiedReceipt",
    "check_inclusion",
    "check_receipt",
    "check_signed_receipt",
    "decode_bundle",
    "decode_collateral",
    "encode_bundle",
    "encode_collateral",
    "read_log_head",
    "verify_proof",
]

MAX_PROOF_BYTES = 8 << 20
_PROOF_VERSION = 1
_MAX_PATH = 64


def encode_bundle(receipt: bytes, head: bytes, path: Sequence[bytes]) -> str:
    """The ``X-Veil-Receipt`` response header: base64url (unpadded) of CBOR
    ``{"receipt": COSE_Sign1, "head": COSE_Sign1, "path": [bytes(32), ...]}``."""
    bundle = cbor2.dumps({"receipt": receipt, "head": head, "path": list(path)})
    return base64.urlsafe_b64encode(bundle).decode().rstrip("=")


def decode_bundle(value: str) -> tuple[bytes, bytes, tuple[bytes, ...]]:
    """(receipt, head, path) of an ``X-Veil-Receipt`` header. Raises ReceiptError if malformed."""
    if len(value) > 1 << 16:
        raise ReceiptError("receipt header: longer than any receipt")
    try:
        bundle = cbor2.loads(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))
        receipt, head, path = bundle["receipt"], bundle["head"], bundle["path"]
    except (ValueError, TypeError, KeyError, OverflowError, cbor2.CBORDecodeError):
        raise ReceiptError("receipt header: malformed") from None
    if not (isinstance(receipt, bytes) and isinstance(head, bytes)):
        raise ReceiptError("receipt header: receipt and head must be bytes")
    if not isinstance(path, list | tuple) or not all(isinstance(p, bytes) for p in path):
        raise ReceiptError("receipt header: path must be an array of bytes")
    return receipt, head, tuple(path)


def encode_collateral(collateral: Any) -> dict[str, Any]:
    """The collateral a client verified with, as a proof file stores it."""
    if isinstance(collateral, DcapCollateral):
        return {"kind": "dcap", "value": dataclasses.asdict(collateral)}
    if isinstance(collateral, SnpCollateral):
        return {"kind": "snp", "value": dataclasses.asdict(collateral)}
    if isinstance(collateral, Mapping):
        return {"kind": "map", "value": dict(collateral)}
    raise TypeError(f"collateral: got {type(collateral).__name__}, expected a collateral")


def decode_collateral(stored: Any) -> DcapCollateral | SnpCollateral | Mapping[str, Any]:
    """Inverse of `encode_collateral`. Raises ReceiptError when malformed."""
    if not isinstance(stored, Mapping) or not isinstance(stored.get("value"), Mapping):
        raise ReceiptError("proof.collateral: expected {kind, value}")
    kind, value = stored.get("kind"), dict(stored["value"])
    try:
        if kind == "dcap":
            return DcapCollateral(**value)
        if kind == "snp":
            return SnpCollateral(**value)
    except TypeError:
        raise ReceiptError(f"proof.collateral: fields do not fit {kind} collateral") from None
    if kind == "map":
        return value
    raise ReceiptError(f"proof.collateral.kind: got {kind!r}, expected map, dcap or snp")


@dataclass(frozen=True, slots=True)
class SignedTreeHead:
    """A tree head of the server's transparency log and the COSE_Sign1 that signs it."""

    message: bytes = field(repr=False)
    head: TreeHead

    @classmethod
    def verify(cls, message: bytes, public_key: bytes) -> SignedTreeHead:
        """Raises ReceiptError when the signature or the payload is not valid."""
        return cls(message, TreeHead.decode(verify_sign1(message, public_key)))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the signed head (COSE_Sign1 bytes), e.g. for ``veil verify-receipt --log-head``."""
        Path(path).write_bytes(self.message)


def read_log_head(path: str | os.PathLike[str]) -> TreeHead:
    """A tree head saved by `SignedTreeHead.save` (trusted as its holder kept it).

    Raises ReceiptError when it is not a signed tree head; OSError when unreadable.
    """
    data = Path(path).read_bytes()
    if len(data) > 1 << 16:
        raise ReceiptError("log head: larger than any tree head")
    try:
        value = cbor2.loads(data)
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError):
        raise ReceiptError("log head: malformed CBOR") from None
    items = getattr(value, "value", None)
    if getattr(value, "tag", None) != 18 or not isinstance(items, tuple | list) or len(items) != 4:
        raise ReceiptError("log head: expected a COSE_Sign1 tree head")
    if not isinstance(items[2], bytes):
        raise ReceiptError("log head: payload must be bytes")
    return TreeHead.decode(items[2])


def check_receipt(
    message: bytes,
    head: bytes,
    path: Sequence[bytes],
    *,
    public_key: bytes,
    evidence: bytes,
    head_key: bytes | None = None,
) -> tuple[ReceiptPayload, TreeHead]:
    """Steps shared by the client and the offline verifier, once the key is bound:

    1. the receipt's signature under `public_key`, and its payload;
    2. the payload names the digest of `evidence` (the evidence that binds the key);
    3. the tree head's signature under `head_key` (default: the same key; a later head, after
       a key rotation or a restart, is signed by the key bound then);
    4. the receipt is leaf ``seq`` of that tree (RFC 9162 inclusion proof).

    Raises:
        ReceiptError: any step fails (`LogError` for step 4).
    """
    payload = check_signed_receipt(message, public_key=public_key, evidence=evidence)
    tree = TreeHead.decode(verify_sign1(head, public_key if head_key is None else head_key))
    check_inclusion(message, payload, tree, path)
    return payload, tree


def check_signed_receipt(message: bytes, *, public_key: bytes, evidence: bytes) -> ReceiptPayload:
    """Steps 1 and 2 of `check_receipt`: the payload, signed by `public_key`, names `evidence`."""
    payload = ReceiptPayload.decode(verify_sign1(message, public_key))
    expected = evidence_digest(evidence)
    if payload.evidence != expected:
        raise ReceiptError(
            f"receipt.evidence: got {payload.evidence.hex()}, expected {expected.hex()} "
            "(the digest of the evidence that binds the receipt key)"
        )
    return payload


def check_inclusion(
    message: bytes, payload: ReceiptPayload, tree: TreeHead, path: Sequence[bytes]
) -> None:
    """Step 4 of `check_receipt`: the receipt is leaf ``payload.seq`` of `tree`.

    Raises:
        LogError: the path does not lead from the receipt to the tree's root.
    """
    if len(path) > _MAX_PATH or not all(isinstance(p, bytes) and len(p) == 32 for p in path):
        raise LogError("inclusion proof: expected at most 64 hashes of 32 bytes")
    verify_inclusion(leaf_hash(message), payload.seq, tree.size, path, tree.root)


@dataclass(frozen=True, slots=True)
class Receipt:
    """A verified receipt with everything needed to verify it again offline (`save`).

    Attributes:
        payload: what the server signed (operation, model, digests, time, sequence number).
        tree_head: the log's tree head that includes the receipt.
    """

    payload: ReceiptPayload
    tree_head: TreeHead
    message: bytes = field(repr=False)
    head: bytes = field(repr=False)
    path: tuple[bytes, ...] = field(repr=False)
    evidence: bytes = field(repr=False)
    certificate_der: bytes = field(repr=False)
    key_map: bytes = field(repr=False)
    collateral: Any = field(repr=False)

    def encode(self) -> bytes:
        """The proof file's bytes."""
        return bytes(
            cbor2.dumps(
                {
                    "veil_proof": _PROOF_VERSION,
                    "receipt": self.message,
                    "log": {"head": self.head, "path": list(self.path)},
                    "evidence": self.evidence,
                    "certificate": self.certificate_der,
                    "key_map": self.key_map,
                    "collateral": encode_collateral(self.collateral),
                }
            )
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a self-contained proof file (see the module docstring)."""
        Path(path).write_bytes(self.encode())


@dataclass(frozen=True, slots=True)
class VerifiedReceipt:
    """What `verify_proof` established."""

    payload: ReceiptPayload
    tree_head: TreeHead
    evidence: VerifiedEvidence


def _bytes(value: Mapping[str, Any], name: str) -> bytes:
    item = value.get(name)
    if not isinstance(item, bytes):
        raise ReceiptError(f"proof.{name}: got {type(item).__name__}, expected bytes")
    return item


def verify_proof(
    data: bytes,
    *,
    policy: Policy,
    trust: TrustStore | None = None,
    inputs_digest: bytes | None = None,
    outputs_digest: bytes | None = None,
    log_head: TreeHead | None = None,
) -> VerifiedReceipt:
    """Verify a proof file offline.

    Steps:

    1. Read the file; take the receipt's time from its payload (trusted only after step 4).
    2. Appraise the evidence at that time with the embedded collateral, under `policy` and
       `trust` (`veil.attestation.verifier.verify_evidence`).
    3. Check the report data binds the certificate and the key map; take the receipt key.
    4. The receipt's signature under that key, and the evidence digest it names
       (`check_signed_receipt`).
    5. Compare the inputs and outputs digests with the ones given (``--inputs``/``--outputs``).
    6. Inclusion: with `log_head` (a head the auditor kept and trusts), the proof's path must
       lead from the receipt to that head's root; the proof's own signed head is then not
       needed (after a key rotation or a restart it is signed by a later receipt key, which
       this proof's evidence does not bind). Without it, the proof's head must be signed by
       the receipt key and the path must lead to it.

    Raises:
        ReceiptError: the file, the receipt, a digest or the log does not verify.
        AttestationError: (a subclass) the evidence does not pass at the receipt's time.
    """
    # Step 1.
    if len(data) > MAX_PROOF_BYTES:
        raise ReceiptError(f"proof: {len(data)} bytes, more than {MAX_PROOF_BYTES}")
    try:
        value = cbor2.loads(data)
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError):
        raise ReceiptError("proof: malformed CBOR") from None
    if not isinstance(value, Mapping) or value.get("veil_proof") != _PROOF_VERSION:
        raise ReceiptError("proof: not a veil proof file (version 1)")
    message, evidence = _bytes(value, "receipt"), _bytes(value, "evidence")
    certificate, key_map = _bytes(value, "certificate"), _bytes(value, "key_map")
    log = value.get("log")
    if not isinstance(log, Mapping) or not isinstance(log.get("path"), list | tuple):
        raise ReceiptError("proof.log: expected {head, path}")
    head, path = _bytes(log, "head"), tuple(log["path"])
    collateral = decode_collateral(value.get("collateral"))
    claimed = _claimed_payload(message)
    # Step 2.
    verified = verify_evidence(evidence, collateral, policy=policy, trust=trust, now=claimed.time)
    # Step 3.
    public_key = check_binding(verified.report_data, certificate, key_map).get(RECEIPT_KEY)
    if public_key is None:
        raise ReceiptError("proof: the evidence binds no receipt key")
    # Step 4.
    payload = check_signed_receipt(message, public_key=public_key, evidence=evidence)
    # Step 5.
    for name, given, signed in (
        ("inputs", inputs_digest, payload.inputs),
        ("outputs", outputs_digest, payload.outputs),
    ):
        if given is not None and given != signed:
            raise ReceiptError(
                f"receipt.{name}: got {signed.hex() if signed else None}, expected {given.hex()} "
                f"(the digest of the {name} given)"
            )
    # Step 6.
    if log_head is None:
        tree = TreeHead.decode(verify_sign1(head, public_key))
        check_inclusion(message, payload, tree, path)
    else:
        tree = log_head
        try:
            check_inclusion(message, payload, tree, path)
        except LogError as exc:
            raise LogError(
                f"log head: the proof's path does not lead to the head kept (size {tree.size}, "
                f"root {tree.root.hex()}): {exc}; ask the server for an inclusion proof at that "
                "head (Connection.prove_inclusion)"
            ) from None
    return VerifiedReceipt(payload=payload, tree_head=tree, evidence=verified)


def _claimed_payload(message: bytes) -> ReceiptPayload:
    """The payload before its signature is checked: only its time is used, to pick the moment
    the evidence is appraised at; a forged time fails the signature in step 4."""
    try:
        value = cbor2.loads(message)
        payload = value.value[2]
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, AttributeError):
        raise ReceiptError("receipt: malformed COSE_Sign1") from None
    except (IndexError, KeyError):
        raise ReceiptError("receipt: malformed COSE_Sign1") from None
    if not isinstance(payload, bytes):
        raise ReceiptError("receipt: payload must be bytes")
    return ReceiptPayload.decode(payload)
