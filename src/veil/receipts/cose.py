"""COSE_Sign1 (RFC 9052 §4.2) with EdDSA over Ed25519 (RFC 9053 §2.2), through pycose.

pycose builds the Sig_structure and signs or verifies; the outer message is read here, strictly
(tag 18, four items, byte-string payload, a protected header naming EdDSA), because pycose's own
decoder expects mutable lists that cbor2 6 no longer returns, and because a verifier should
refuse what it did not expect rather than let a library interpret it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import cbor2
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from veil.errors import ReceiptError

__all__ = ["MAX_MESSAGE_BYTES", "Signer", "key_id", "verify_sign1"]

MAX_MESSAGE_BYTES = 64 << 10
_COSE_SIGN1_TAG = 18
_ALG_EDDSA = -8
_HEADER_ALG = 1


def key_id(public_key: bytes) -> bytes:
    """The ``kid`` veil puts in its headers: the first 8 bytes of SHA-256 of the public key."""
    return hashlib.sha256(public_key).digest()[:8]


class Signer:
    """Signs COSE_Sign1 messages with an Ed25519 key made in this process. Never log it."""

    def __init__(self, private_key: Ed25519PrivateKey | None = None) -> None:
        # pycose is imported when first needed: it costs a third of a second, and a client
        # that never asks for a receipt should not pay it at ``import veil``.
        from pycose.algorithms import EdDSA
        from pycose.headers import KID, Algorithm
        from pycose.keys.curves import Ed25519
        from pycose.keys.okp import OKPKey

        private_key = private_key or Ed25519PrivateKey.generate()
        self.public_key = private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        """The raw 32-byte Ed25519 public key (what the key map binds)."""
        self._key = OKPKey(
            crv=Ed25519,
            d=private_key.private_bytes_raw(),
            x=self.public_key,
        )
        self._protected = {Algorithm: EdDSA, KID: key_id(self.public_key)}

    def sign(self, payload: bytes) -> bytes:
        """A tagged COSE_Sign1 over `payload`."""
        from pycose.messages.sign1message import Sign1Message

        message = Sign1Message(phdr=self._protected, payload=payload, key=self._key)
        return bytes(message.encode(tag=True))

    def __repr__(self) -> str:
        return f"Signer(kid={key_id(self.public_key).hex()})"


def _structure(message: bytes) -> list[Any]:
    if not isinstance(message, bytes) or len(message) > MAX_MESSAGE_BYTES:
        raise ReceiptError(f"COSE_Sign1: expected at most {MAX_MESSAGE_BYTES} bytes")
    try:
        value = cbor2.loads(message)
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError):
        raise ReceiptError("COSE_Sign1: malformed CBOR") from None
    if not isinstance(value, cbor2.CBORTag) or value.tag != _COSE_SIGN1_TAG:
        raise ReceiptError("COSE_Sign1: got something else, expected CBOR tag 18")
    items = value.value
    if not isinstance(items, list | tuple) or len(items) != 4:
        raise ReceiptError("COSE_Sign1: expected an array of 4 items")
    protected, unprotected, payload, signature = items
    if not all(isinstance(x, bytes) for x in (protected, payload, signature)):
        raise ReceiptError("COSE_Sign1: protected header, payload and signature must be bytes")
    if not isinstance(unprotected, Mapping):
        raise ReceiptError("COSE_Sign1: the unprotected header must be a map")
    try:
        header = cbor2.loads(protected)
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError):
        raise ReceiptError("COSE_Sign1: malformed protected header") from None
    algorithm = header.get(_HEADER_ALG) if isinstance(header, Mapping) else None
    if algorithm != _ALG_EDDSA:
        raise ReceiptError(
            f"COSE_Sign1: algorithm got {algorithm!r}, expected EdDSA ({_ALG_EDDSA})"
        )
    return [protected, dict(unprotected), payload, signature]


def verify_sign1(message: bytes, public_key: bytes) -> bytes:
    """The payload of a COSE_Sign1 whose EdDSA signature `public_key` (raw Ed25519) verifies.

    Raises:
        ReceiptError: malformed, another algorithm, or the signature does not verify.
    """
    from pycose.keys.curves import Ed25519
    from pycose.keys.okp import OKPKey
    from pycose.messages.sign1message import Sign1Message

    structure = _structure(message)
    try:
        Ed25519PublicKey.from_public_bytes(public_key)
    except ValueError:
        raise ReceiptError("receipt key: not an Ed25519 public key") from None
    try:
        decoded = Sign1Message.from_cose_obj(list(structure), True)  # it pops the items
        decoded.key = OKPKey(crv=Ed25519, x=public_key)
        valid = decoded.verify_signature()
    except Exception:  # pycose raises many types for bad input; all mean "not verified"
        valid = False
    if not valid:
        raise ReceiptError("COSE_Sign1: the signature does not verify under the bound receipt key")
    payload: bytes = structure[2]
    return payload
