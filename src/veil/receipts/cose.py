"""COSE_Sign1 (RFC 9052 §4.2) with EdDSA over Ed25519 (RFC 9053 §2.2).

Signing is written out here: a receipt costs two signatures, and building them through pycose
(its header objects, its key re-imported on every call) cost three times the signatures
themselves. The protected header is encoded once per key, and the Sig_structure and the message
are the fixed byte layouts of RFC 9052 §4.4 and §4.2 around the payload. The bytes are the
ones pycose produces for the same key and payload (Ed25519 signatures are deterministic; a test
holds the two to each other).

Verification goes through pycose, an independent implementation of the same layouts; the outer
message is read here, strictly (tag 18, four items, byte-string payload, a protected header
naming EdDSA), because pycose's own decoder expects mutable lists that cbor2 6 no longer
returns, and because a verifier should refuse what it did not expect rather than let a library
interpret it.
"""

from __future__ import annotations

import hashlib
import struct
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
_HEADER_KID = 4
_SIGNATURE1 = b"\x6aSignature1"  # the text "Signature1" (RFC 9052 §4.4), CBOR-encoded
_TAGGED_ARRAY4 = b"\xd2\x84"  # tag 18, then an array of 4 items
_ARRAY4 = b"\x84"
_EMPTY_MAP = b"\xa0"
_EMPTY_BSTR = b"\x40"


def _bstr_head(length: int) -> bytes:
    """The shortest CBOR head of a byte string of `length` bytes (RFC 8949 §3.1, major 2)."""
    if length < 24:
        return bytes([0x40 | length])
    for extra, fmt in ((24, ">B"), (25, ">H"), (26, ">I")):
        if length < 1 << (8 * struct.calcsize(fmt)):
            return bytes([0x40 | extra]) + struct.pack(fmt, length)
    return b"\x5b" + struct.pack(">Q", length)


def key_id(public_key: bytes) -> bytes:
    """The ``kid`` veil puts in its headers: the first 8 bytes of SHA-256 of the public key."""
    return hashlib.sha256(public_key).digest()[:8]


class Signer:
    """Signs COSE_Sign1 messages with an Ed25519 key made in this process. Never log it."""

    def __init__(self, private_key: Ed25519PrivateKey | None = None) -> None:
        self._private = private_key or Ed25519PrivateKey.generate()
        self.public_key = self._private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        """The raw 32-byte Ed25519 public key (what the key map binds)."""
        # The protected header {alg: EdDSA, kid}, as pycose orders it, and the byte strings
        # around the payload, made once for this key.
        header = cbor2.dumps({_HEADER_ALG: _ALG_EDDSA, _HEADER_KID: key_id(self.public_key)})
        protected = _bstr_head(len(header)) + header
        self._to_be_signed = _ARRAY4 + _SIGNATURE1 + protected + _EMPTY_BSTR
        self._message = _TAGGED_ARRAY4 + protected + _EMPTY_MAP

    def sign(self, payload: bytes) -> bytes:
        """A tagged COSE_Sign1 over `payload`: ``18([protected, {}, payload, signature])``, the
        signature over ``["Signature1", protected, h'', payload]`` (RFC 9052 §4.4)."""
        payload_bstr = _bstr_head(len(payload)) + payload
        signature = self._private.sign(self._to_be_signed + payload_bstr)
        return self._message + payload_bstr + _bstr_head(len(signature)) + signature

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
