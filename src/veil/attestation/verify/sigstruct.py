"""The SIGSTRUCT's own signature: what EINIT checks before the enclave may run.

Steps (Intel SDM vol. 3D, "EINIT"; "Enclave Signature Structure (SIGSTRUCT)"):
  1. The modulus is a 3072-bit number (its top bit set) and the exponent is 3 (checked by parsing).
  2. The signature, read little-endian, is an RSA PKCS#1 v1.5 signature with SHA-256 over the
     header (bytes 0..128) followed by the body (bytes 900..1028).
  3. Q1 = floor(S² / M) and Q2 = floor((S³ − Q1·S·M) / M): EINIT refuses a SIGSTRUCT whose helpers
     are wrong, so a file with wrong ones would never run.

A SIGSTRUCT that passes proves that the holder of the key behind MRSIGNER signed these values;
it says nothing about whether that key is the one you expect: that is what the policy pins.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from veil.attestation.abi.sigstruct import RSA_MODULUS_SIZE, Sigstruct
from veil.errors import SignatureError

__all__ = ["verify_sigstruct"]


def verify_sigstruct(sigstruct: Sigstruct) -> None:
    """Check the SIGSTRUCT's RSA-3072 signature and its Q1/Q2 helpers.

    Raises:
        SignatureError: the modulus is not 3072 bits, the signature does not verify over the
            signed bytes, or Q1/Q2 do not match the signature.
    """
    # 1. A full-size modulus: a short key would still hash to some MRSIGNER.
    modulus = int.from_bytes(sigstruct.modulus, "little")
    if modulus.bit_length() != RSA_MODULUS_SIZE * 8:
        raise SignatureError(
            f"SIGSTRUCT modulus: got {modulus.bit_length()} bits, expected {RSA_MODULUS_SIZE * 8}"
        )
    signature = int.from_bytes(sigstruct.signature, "little")
    if signature >= modulus:
        raise SignatureError("SIGSTRUCT signature: got a value not below the modulus")
    # 2. The signature over header ‖ body.
    key = rsa.RSAPublicNumbers(sigstruct.exponent, modulus).public_key()
    try:
        key.verify(
            signature.to_bytes(RSA_MODULUS_SIZE, "big"),
            sigstruct.signed_bytes,
            padding.PKCS1v15(),
            hashes.SHA256(),
        )
    except InvalidSignature:
        raise SignatureError(
            "SIGSTRUCT signature: does not verify over the header and body with its modulus "
            "(the file was altered after signing)"
        ) from None
    # 3. EINIT's helpers.
    q1 = signature * signature // modulus
    q2 = (signature**3 - q1 * signature * modulus) // modulus
    if int.from_bytes(sigstruct.q1, "little") != q1:
        raise SignatureError("SIGSTRUCT Q1: got a value that does not match the signature")
    if int.from_bytes(sigstruct.q2, "little") != q2:
        raise SignatureError("SIGSTRUCT Q2: got a value that does not match the signature")
