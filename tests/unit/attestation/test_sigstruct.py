"""SIGSTRUCT parsing and its own RSA-3072 signature, on SIGSTRUCTs built with the public layout."""

from __future__ import annotations

import hashlib
import struct

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from veil.attestation.abi.sigstruct import SIGSTRUCT_SIZE, Sigstruct
from veil.attestation.verify.sigstruct import verify_sigstruct
from veil.errors import MalformedEvidenceError, SignatureError
from veil.testing.sigstruct import generate_enclave_key, sign_sigstruct

ENCLAVE_HASH = bytes(range(32))


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return generate_enclave_key()


@pytest.fixture(scope="module")
def signed(key: rsa.RSAPrivateKey) -> bytes:
    return sign_sigstruct(key, enclave_hash=ENCLAVE_HASH, isv_prod_id=7, isv_svn=3)


def mutate(data: bytes, offset: int, xor: int = 0x01) -> bytes:
    out = bytearray(data)
    out[offset] ^= xor
    return bytes(out)


def test_parse_gives_the_signed_values(key: rsa.RSAPrivateKey, signed: bytes) -> None:
    sig = Sigstruct.parse(signed)
    verify_sigstruct(sig)
    modulus_le = key.public_key().public_numbers().n.to_bytes(384, "little")
    assert sig.enclave_hash == ENCLAVE_HASH
    assert sig.mr_signer == hashlib.sha256(modulus_le).digest()
    assert (sig.isv_prod_id, sig.isv_svn, sig.exponent, sig.vendor) == (7, 3, 3, 0)
    assert sig.attributes == struct.pack("<QQ", 0x04, 0x03)
    assert sig.debug is False
    assert sig.signed_bytes == signed[:128] + signed[900:1028]


def test_debug_attribute_is_reported(key: rsa.RSAPrivateKey) -> None:
    data = sign_sigstruct(key, enclave_hash=ENCLAVE_HASH, attributes=struct.pack("<QQ", 6, 3))
    sig = Sigstruct.parse(data)
    verify_sigstruct(sig)
    assert sig.debug is True


@pytest.mark.parametrize(
    ("offset", "what"),
    [
        (40, "SWDEFINED, in the signed header"),
        (900, "MISCSELECT"),
        (930, "ATTRIBUTES"),
        (960, "ENCLAVEHASH"),
        (1024, "ISVPRODID"),
        (1026, "ISVSVN"),
        (600, "the signature"),
    ],
)
def test_mutated_signed_field_is_refused(signed: bytes, offset: int, what: str) -> None:
    with pytest.raises(SignatureError, match="does not verify"):
        verify_sigstruct(Sigstruct.parse(mutate(signed, offset)))


@pytest.mark.parametrize(("offset", "name"), [(1100, "Q1"), (1500, "Q2")])
def test_wrong_einit_helpers_are_refused(signed: bytes, offset: int, name: str) -> None:
    with pytest.raises(SignatureError, match=f"SIGSTRUCT {name}"):
        verify_sigstruct(Sigstruct.parse(mutate(signed, offset)))


def test_other_key_modulus_is_refused(signed: bytes) -> None:
    other = generate_enclave_key().public_key().public_numbers().n.to_bytes(384, "little")
    data = signed[:128] + other + signed[512:]
    # A random modulus is below the signature's value about half the time: that refusal comes
    # first, and is as much a refusal as the signature check's.
    with pytest.raises(SignatureError, match=r"does not verify|not below the modulus"):
        verify_sigstruct(Sigstruct.parse(data))


def test_short_modulus_is_refused(signed: bytes) -> None:
    data = bytearray(signed)
    data[511] = 0  # the modulus's most significant byte
    with pytest.raises(SignatureError, match=r"modulus: got \d+ bits, expected 3072"):
        verify_sigstruct(Sigstruct.parse(bytes(data)))


def test_signature_not_below_modulus_is_refused(signed: bytes) -> None:
    data = signed[:516] + b"\xff" * 384 + signed[900:]
    with pytest.raises(SignatureError, match="not below the modulus"):
        verify_sigstruct(Sigstruct.parse(data))


@pytest.mark.parametrize(
    ("offset", "match"),
    [
        (0, "HEADER: got"),
        (30, "HEADER2: got"),
        (17, "VENDOR: got 0x100"),
        (512, "EXPONENT: got 2"),
        (100, r"RESERVED \(44..128\)"),
        (911, r"RESERVED \(910..912\)"),
        (1000, r"RESERVED \(992..1008\)"),
        (1030, r"RESERVED \(1028..1040\)"),
    ],
)
def test_malformed_fields_are_refused(signed: bytes, offset: int, match: str) -> None:
    with pytest.raises(MalformedEvidenceError, match=match):
        Sigstruct.parse(mutate(signed, offset))


@pytest.mark.parametrize("size", [0, SIGSTRUCT_SIZE - 1, SIGSTRUCT_SIZE + 1])
def test_wrong_size_is_refused(signed: bytes, size: int) -> None:
    data = (signed + b"\0")[:size]
    with pytest.raises(MalformedEvidenceError, match=f"got {size} bytes, expected 1808"):
        Sigstruct.parse(data)
