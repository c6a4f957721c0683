"""SGX enclave report body (Intel SGX DCAP quote spec, "Enclave Report Body", 384 bytes).

The same structure is the body of an SGX quote and the QE report inside every DCAP quote.
Parsing records facts only; no trust decision is made here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from veil.errors import MalformedEvidenceError

__all__ = ["REPORT_DATA", "SGX_REPORT_BODY_SIZE", "SgxReportBody"]

SGX_REPORT_BODY_SIZE = 384

# Offsets and sizes from the spec's report body table.
_CPUSVN = slice(0, 16)
_MISCSELECT = slice(16, 20)
_RESERVED1 = slice(20, 32)
_ISV_EXT_PROD_ID = slice(32, 48)
_ATTRIBUTES = slice(48, 64)
_MR_ENCLAVE = slice(64, 96)
_RESERVED2 = slice(96, 128)
_MR_SIGNER = slice(128, 160)
_RESERVED3 = slice(160, 192)
_CONFIG_ID = slice(192, 256)
_ISV_PROD_ID = slice(256, 258)
_ISV_SVN = slice(258, 260)
_CONFIG_SVN = slice(260, 262)
_RESERVED4 = slice(262, 304)
_ISV_FAMILY_ID = slice(304, 320)
REPORT_DATA = slice(320, 384)

# SGX ATTRIBUTES.FLAGS bit 1: the enclave can be debugged (its memory is readable).
_ATTRIBUTE_DEBUG = 0x02


@dataclass(frozen=True, slots=True)
class SgxReportBody:
    """An SGX report body.

    Attributes:
        raw: the exact 384 bytes (signed by the attestation key or, for the QE report, the PCK).
        cpu_svn: 16-byte security version of the CPU.
        miscselect: MISCSELECT as an integer (little-endian in the report).
        isv_ext_prod_id: extended product id.
        attributes: 16-byte ATTRIBUTES (flags then XFRM, little-endian).
        mr_enclave: enclave measurement.
        mr_signer: hash of the enclave signer's public key.
        config_id: 64-byte configuration id.
        isv_prod_id: product id.
        isv_svn: security version of the enclave.
        config_svn: security version of the configuration.
        isv_family_id: family id.
        report_data: 64 bytes chosen by the enclave.
    """

    raw: bytes
    cpu_svn: bytes
    miscselect: int
    isv_ext_prod_id: bytes
    attributes: bytes
    mr_enclave: bytes
    mr_signer: bytes
    config_id: bytes
    isv_prod_id: int
    isv_svn: int
    config_svn: int
    isv_family_id: bytes
    report_data: bytes

    @property
    def debug(self) -> bool:
        """True when ATTRIBUTES.DEBUG is set (a debugger can read the enclave)."""
        return bool(self.attributes[0] & _ATTRIBUTE_DEBUG)

    @classmethod
    def parse(cls, data: bytes) -> SgxReportBody:
        """Parse exactly 384 bytes; raise `MalformedEvidenceError` otherwise."""
        data = bytes(data)
        if len(data) != SGX_REPORT_BODY_SIZE:
            raise MalformedEvidenceError(
                f"SGX report body: got {len(data)} bytes, expected {SGX_REPORT_BODY_SIZE}"
            )
        (miscselect,) = struct.unpack("<I", data[_MISCSELECT])
        (isv_prod_id,) = struct.unpack("<H", data[_ISV_PROD_ID])
        (isv_svn,) = struct.unpack("<H", data[_ISV_SVN])
        (config_svn,) = struct.unpack("<H", data[_CONFIG_SVN])
        return cls(
            raw=data,
            cpu_svn=data[_CPUSVN],
            miscselect=miscselect,
            isv_ext_prod_id=data[_ISV_EXT_PROD_ID],
            attributes=data[_ATTRIBUTES],
            mr_enclave=data[_MR_ENCLAVE],
            mr_signer=data[_MR_SIGNER],
            config_id=data[_CONFIG_ID],
            isv_prod_id=isv_prod_id,
            isv_svn=isv_svn,
            config_svn=config_svn,
            isv_family_id=data[_ISV_FAMILY_ID],
            report_data=data[REPORT_DATA],
        )

    def __repr__(self) -> str:
        return (
            f"SgxReportBody(mr_enclave={self.mr_enclave.hex()}, mr_signer={self.mr_signer.hex()}, "
            f"isv_prod_id={self.isv_prod_id}, isv_svn={self.isv_svn}, "
            f"attributes={self.attributes.hex()}, report_data={self.report_data.hex()})"
        )
