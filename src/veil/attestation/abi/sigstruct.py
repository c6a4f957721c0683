"""SGX SIGSTRUCT, the enclave signature structure (Intel SDM vol. 3D, "Enclave Signature Structure
(SIGSTRUCT)", 1808 bytes), as ``gramine-sgx-sign`` writes it to ``<app>.sig``.

EINIT checks it before an enclave may run: the RSA-3072 signature (exponent 3, PKCS#1 v1.5 over
SHA-256) covers the header (bytes 0..128) and the body (bytes 900..1028); Q1 and Q2 help the CPU
verify it. MRSIGNER is the SHA-256 of the modulus as stored (little-endian); ENCLAVEHASH becomes
MRENCLAVE. The CPU enforces ``(SECS.ATTRIBUTES & ATTRIBUTEMASK) == (ATTRIBUTES & ATTRIBUTEMASK)``
and the same for MISCSELECT.

Parsing records facts only; it checks the size, the two fixed headers and the must-be-zero
fields, and keeps the signed bytes exactly. The signature is checked by
`veil.attestation.verify.sigstruct`.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from veil.errors import MalformedEvidenceError

__all__ = ["SIGSTRUCT_HEADER", "SIGSTRUCT_HEADER2", "SIGSTRUCT_SIZE", "Sigstruct"]

SIGSTRUCT_SIZE = 1808
# Fixed values the SDM gives for HEADER and HEADER2.
SIGSTRUCT_HEADER = bytes.fromhex("06000000e10000000000010000000000")
SIGSTRUCT_HEADER2 = bytes.fromhex("01010000600000006000000001000000")
# VENDOR: 0x8086 for Intel's own enclaves, 0 for everybody else.
_VENDORS = (0x0000, 0x8086)
# The key is RSA-3072 with public exponent 3 (SDM: "EXPONENT ... 3").
RSA_MODULUS_SIZE = 384
RSA_EXPONENT = 3

# Offsets and sizes from the SDM's SIGSTRUCT table.
_HEADER = slice(0, 16)
_VENDOR = slice(16, 20)
_DATE = slice(20, 24)
_HEADER2 = slice(24, 40)
_SWDEFINED = slice(40, 44)
_RESERVED1 = slice(44, 128)
_MODULUS = slice(128, 512)
_EXPONENT = slice(512, 516)
_SIGNATURE = slice(516, 900)
_MISCSELECT = slice(900, 904)
_MISCMASK = slice(904, 908)
_CET_ATTRIBUTES = 908
_CET_ATTRIBUTES_MASK = 909
_RESERVED2 = slice(910, 912)
_ISV_FAMILY_ID = slice(912, 928)
_ATTRIBUTES = slice(928, 944)
_ATTRIBUTE_MASK = slice(944, 960)
_ENCLAVE_HASH = slice(960, 992)
_RESERVED3 = slice(992, 1008)
_ISV_EXT_PROD_ID = slice(1008, 1024)
_ISV_PROD_ID = slice(1024, 1026)
_ISV_SVN = slice(1026, 1028)
_RESERVED4 = slice(1028, 1040)
_Q1 = slice(1040, 1424)
_Q2 = slice(1424, 1808)
# The two signed ranges: HEADER..RESERVED1 and MISCSELECT..ISVSVN.
SIGNED_HEADER = slice(0, 128)
SIGNED_BODY = slice(900, 1028)

# ATTRIBUTES.FLAGS bit 1: the enclave can be debugged.
_ATTRIBUTE_DEBUG = 0x02


@dataclass(frozen=True, slots=True)
class Sigstruct:
    """A parsed SIGSTRUCT.

    Attributes:
        raw: the exact 1808 bytes.
        vendor: 0x8086 (Intel) or 0.
        date: the DATE field, 4 bytes as stored (BCD, not interpreted).
        swdefined: 4 bytes the signer may use freely.
        modulus: the RSA-3072 modulus, 384 bytes little-endian as stored.
        exponent: the RSA public exponent (3).
        signature: 384 bytes little-endian.
        miscselect, misc_mask: MISCSELECT the enclave needs and the bits EINIT enforces.
        cet_attributes, cet_attributes_mask: CET attributes and the bits EINIT enforces.
        isv_family_id, isv_ext_prod_id: 16-byte KSS identifiers.
        attributes, attribute_mask: 16-byte ATTRIBUTES (flags then XFRM) and the enforced bits.
        enclave_hash: the MRENCLAVE the signer signed.
        isv_prod_id, isv_svn: product id and security version.
        q1, q2: 384-byte little-endian helpers for EINIT's signature check.
    """

    raw: bytes
    vendor: int
    date: bytes
    swdefined: bytes
    modulus: bytes
    exponent: int
    signature: bytes
    miscselect: int
    misc_mask: int
    cet_attributes: int
    cet_attributes_mask: int
    isv_family_id: bytes
    attributes: bytes
    attribute_mask: bytes
    enclave_hash: bytes
    isv_ext_prod_id: bytes
    isv_prod_id: int
    isv_svn: int
    q1: bytes
    q2: bytes

    @property
    def signed_bytes(self) -> bytes:
        """The bytes the signature covers: header then body (256 bytes)."""
        return self.raw[SIGNED_HEADER] + self.raw[SIGNED_BODY]

    @property
    def mr_signer(self) -> bytes:
        """MRSIGNER as the CPU computes it: SHA-256 of the little-endian modulus."""
        return hashlib.sha256(self.modulus).digest()

    @property
    def debug(self) -> bool:
        """True when the signer asks for (and EINIT enforces) ATTRIBUTES.DEBUG."""
        return bool(self.attributes[0] & self.attribute_mask[0] & _ATTRIBUTE_DEBUG)

    @classmethod
    def parse(cls, data: bytes) -> Sigstruct:
        """Parse exactly 1808 bytes; raise `MalformedEvidenceError` otherwise."""
        data = bytes(data)
        if len(data) != SIGSTRUCT_SIZE:
            raise MalformedEvidenceError(
                f"SIGSTRUCT: got {len(data)} bytes, expected {SIGSTRUCT_SIZE}"
            )
        _expect(data[_HEADER], SIGSTRUCT_HEADER, "HEADER")
        _expect(data[_HEADER2], SIGSTRUCT_HEADER2, "HEADER2")
        (vendor,) = struct.unpack("<I", data[_VENDOR])
        if vendor not in _VENDORS:
            raise MalformedEvidenceError(f"SIGSTRUCT VENDOR: got {vendor:#x}, expected 0 or 0x8086")
        (exponent,) = struct.unpack("<I", data[_EXPONENT])
        if exponent != RSA_EXPONENT:
            raise MalformedEvidenceError(
                f"SIGSTRUCT EXPONENT: got {exponent}, expected {RSA_EXPONENT}"
            )
        for name, part in (
            ("RESERVED (44..128)", _RESERVED1),
            ("RESERVED (910..912)", _RESERVED2),
            ("RESERVED (992..1008)", _RESERVED3),
            ("RESERVED (1028..1040)", _RESERVED4),
        ):
            if any(data[part]):
                raise MalformedEvidenceError(f"SIGSTRUCT {name}: got non-zero bytes, expected 0")
        (miscselect,) = struct.unpack("<I", data[_MISCSELECT])
        (misc_mask,) = struct.unpack("<I", data[_MISCMASK])
        (isv_prod_id,) = struct.unpack("<H", data[_ISV_PROD_ID])
        (isv_svn,) = struct.unpack("<H", data[_ISV_SVN])
        return cls(
            raw=data,
            vendor=vendor,
            date=data[_DATE],
            swdefined=data[_SWDEFINED],
            modulus=data[_MODULUS],
            exponent=exponent,
            signature=data[_SIGNATURE],
            miscselect=miscselect,
            misc_mask=misc_mask,
            cet_attributes=data[_CET_ATTRIBUTES],
            cet_attributes_mask=data[_CET_ATTRIBUTES_MASK],
            isv_family_id=data[_ISV_FAMILY_ID],
            attributes=data[_ATTRIBUTES],
            attribute_mask=data[_ATTRIBUTE_MASK],
            enclave_hash=data[_ENCLAVE_HASH],
            isv_ext_prod_id=data[_ISV_EXT_PROD_ID],
            isv_prod_id=isv_prod_id,
            isv_svn=isv_svn,
            q1=data[_Q1],
            q2=data[_Q2],
        )

    def __repr__(self) -> str:
        return (
            f"Sigstruct(enclave_hash={self.enclave_hash.hex()}, mr_signer={self.mr_signer.hex()}, "
            f"isv_prod_id={self.isv_prod_id}, isv_svn={self.isv_svn}, "
            f"attributes={self.attributes.hex()}/{self.attribute_mask.hex()})"
        )


def _expect(got: bytes, expected: bytes, name: str) -> None:
    if got != expected:
        raise MalformedEvidenceError(
            f"SIGSTRUCT {name}: got {got.hex()}, expected {expected.hex()}"
        )
