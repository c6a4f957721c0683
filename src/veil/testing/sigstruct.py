"""Build SGX SIGSTRUCTs the way ``gramine-sgx-sign`` does, for tests and the deploy guide.

The layout is the public one (Intel SDM vol. 3D, "Enclave Signature Structure (SIGSTRUCT)"); the
key is any RSA-3072 key with exponent 3. Nothing here runs in production: `veil policy
from-sigstruct` reads files that Gramine wrote.
"""

from __future__ import annotations

import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from veil.attestation.abi.sigstruct import (
    RSA_EXPONENT,
    RSA_MODULUS_SIZE,
    SIGNED_BODY,
    SIGNED_HEADER,
    SIGSTRUCT_HEADER,
    SIGSTRUCT_HEADER2,
    SIGSTRUCT_SIZE,
)

__all__ = ["generate_enclave_key", "sign_sigstruct"]

# ATTRIBUTES Gramine asks for by default: INIT off, MODE64BIT on (flags 0x04), XFRM x87+SSE (0x03);
# the mask enforces every flag (DEBUG included) and the XFRM bits above x87+SSE.
DEFAULT_ATTRIBUTES = struct.pack("<QQ", 0x04, 0x03)
DEFAULT_ATTRIBUTE_MASK = struct.pack("<QQ", 0xFFFFFFFFFFFFFFFF, 0xFFFFFFFFFFFFFFFC)


def generate_enclave_key() -> rsa.RSAPrivateKey:
    """A fresh RSA-3072 key with exponent 3, as SGX requires for enclave signing."""
    return rsa.generate_private_key(public_exponent=RSA_EXPONENT, key_size=RSA_MODULUS_SIZE * 8)


def sign_sigstruct(
    key: rsa.RSAPrivateKey,
    *,
    enclave_hash: bytes,
    isv_prod_id: int = 0,
    isv_svn: int = 0,
    attributes: bytes = DEFAULT_ATTRIBUTES,
    attribute_mask: bytes = DEFAULT_ATTRIBUTE_MASK,
    miscselect: int = 0,
    misc_mask: int = 0xFFFFFFFF,
    date: bytes = bytes.fromhex("02122026"),
) -> bytes:
    """A signed 1808-byte SIGSTRUCT for `enclave_hash` (the MRENCLAVE) under `key`."""
    out = bytearray(SIGSTRUCT_SIZE)
    out[0:16] = SIGSTRUCT_HEADER
    out[16:20] = struct.pack("<I", 0)
    out[20:24] = date
    out[24:40] = SIGSTRUCT_HEADER2
    modulus = key.public_key().public_numbers().n
    out[128:512] = modulus.to_bytes(RSA_MODULUS_SIZE, "little")
    out[512:516] = struct.pack("<I", RSA_EXPONENT)
    out[900:904] = struct.pack("<I", miscselect)
    out[904:908] = struct.pack("<I", misc_mask)
    out[928:944] = attributes
    out[944:960] = attribute_mask
    out[960:992] = enclave_hash
    out[1024:1028] = struct.pack("<HH", isv_prod_id, isv_svn)
    signed = bytes(out[SIGNED_HEADER]) + bytes(out[SIGNED_BODY])
    signature = int.from_bytes(key.sign(signed, padding.PKCS1v15(), hashes.SHA256()), "big")
    q1 = signature * signature // modulus
    q2 = (signature**3 - q1 * signature * modulus) // modulus
    out[516:900] = signature.to_bytes(RSA_MODULUS_SIZE, "little")
    out[1040:1424] = q1.to_bytes(RSA_MODULUS_SIZE, "little")
    out[1424:1808] = q2.to_bytes(RSA_MODULUS_SIZE, "little")
    return bytes(out)
