"""Intel DCAP quote bytes: SGX and TD report bodies, and a quoting enclave that signs quotes.

Layouts from Intel's "SGX ECDSA Quote Library API" appendix A (quote v3, "Enclave Report Body")
and the "TDX DCAP Quote Generation Library and Quote Verification Library" spec (quote v4 and v5,
"TD Quote Body" 1.0 and 1.5): header, body, the attestation key's signature, the QE report signed
by the PCK key whose report data binds the attestation key, and certification data type 5 (the
PEM PCK chain), wrapped in type 6 for TDX. The PKI behind the PCK is `veil.testing.intel_pki`.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

if TYPE_CHECKING:
    from veil.testing.intel_pki import Pck

__all__ = [
    "FLAG_DEBUG",
    "FLAG_INIT",
    "FLAG_MODE64",
    "FLAG_PROVISIONKEY",
    "INTEL_QE_VENDOR_ID",
    "QE_AUTH_DATA",
    "SGX_QE_MR_SIGNER",
    "TD_QE_MR_SIGNER",
    "QeIdentitySpec",
    "QuotingEnclave",
    "pad_report_data",
    "raw_public_key",
    "sgx_attributes",
    "sgx_report_body",
    "sign_raw",
    "td_report_body",
]

INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
# The Intel QE's authentication data is bytes 0..31 in every real quote.
QE_AUTH_DATA = bytes(range(32))
# Intel's quoting enclaves' signers (from Intel's published QE and TD_QE identities).
SGX_QE_MR_SIGNER = bytes.fromhex("8c4f5775d796503e96137f77c68a829a0056ac8ded70140b081b094490c57bff")
TD_QE_MR_SIGNER = bytes.fromhex("dc9e2a7c6f948f17474e34a7fc43ed030f7c1563f1babddf6340c82e0e54a8c5")

# Quote header constants (quote spec A.3): ECDSA-256-with-P-256, SGX / TDX TEE types.
_ATT_KEY_TYPE_ECDSA_P256 = 2
_TEE_TYPE_SGX, _TEE_TYPE_TDX = 0x00, 0x81
_CERT_DATA_PCK_CHAIN, _CERT_DATA_QE_REPORT = 5, 6

# SGX ATTRIBUTES.FLAGS (SDM vol. 3D 38.7.1): INIT, DEBUG, MODE64BIT, PROVISIONKEY.
FLAG_INIT, FLAG_DEBUG, FLAG_MODE64, FLAG_PROVISIONKEY = 0x01, 0x02, 0x04, 0x10
_XFRM_DEFAULT = 0xE7
_TD_XFAM_DEFAULT = bytes.fromhex("e71a060000000000")


def sign_raw(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """ECDSA P-256/SHA-256 over `data`, as the 64-byte big-endian r ‖ s DCAP uses."""
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def raw_public_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The 64-byte x ‖ y form of a P-256 public key used in quotes."""
    return key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)[1:]


@dataclass(frozen=True, slots=True)
class QeIdentitySpec:
    """The quoting enclave that signs quotes, and the identity Intel publishes for it."""

    mr_signer: bytes = SGX_QE_MR_SIGNER
    mr_enclave: bytes = hashlib.sha256(b"veil.testing quoting enclave").digest()
    isv_prod_id: int = 1
    isv_svn: int = 8
    tcb_status: str = "UpToDate"


def sgx_report_body(
    *,
    cpu_svn: bytes,
    attributes: bytes,
    mr_enclave: bytes,
    mr_signer: bytes,
    isv_prod_id: int,
    isv_svn: int,
    report_data: bytes,
    miscselect: int = 0,
) -> bytes:
    """The 384-byte SGX report body (quote spec A.4.5, "Enclave Report Body")."""
    body = b"".join(
        (
            cpu_svn,  # CPUSVN, 16
            struct.pack("<I", miscselect),  # MISCSELECT, 4
            bytes(28),  # reserved, ISVEXTPRODID (zero)
            attributes,  # ATTRIBUTES, 16
            mr_enclave,  # MRENCLAVE, 32
            bytes(32),  # reserved
            mr_signer,  # MRSIGNER, 32
            bytes(96),  # reserved, CONFIGID (zero)
            struct.pack("<HH", isv_prod_id, isv_svn),  # ISVPRODID, ISVSVN
            bytes(60),  # CONFIGSVN, reserved, ISVFAMILYID (zero)
            report_data,  # REPORTDATA, 64
        )
    )
    if len(body) != 384:
        raise ValueError(f"SGX report body: got {len(body)} bytes, expected 384")
    return body


def sgx_attributes(flags: int, xfrm: int = _XFRM_DEFAULT) -> bytes:
    """ATTRIBUTES: FLAGS then XFRM, each 8 bytes little-endian."""
    return flags.to_bytes(8, "little") + xfrm.to_bytes(8, "little")


def td_report_body(
    *,
    report_data: bytes,
    mr_td: bytes,
    rtmrs: Sequence[bytes] = (bytes(48),) * 4,
    tee_tcb_svn: bytes,
    mr_seam: bytes = bytes(48),
    mr_signer_seam: bytes = bytes(48),
    seam_attributes: bytes = bytes(8),
    td_attributes: bytes = bytes(8),
    xfam: bytes = _TD_XFAM_DEFAULT,
    mr_config_id: bytes = bytes(48),
    mr_owner: bytes = bytes(48),
    mr_owner_config: bytes = bytes(48),
    tee_tcb_svn2: bytes | None = None,
    mr_servicetd: bytes | None = None,
) -> bytes:
    """A TD report body (TDX DCAP quote spec, "TD Quote Body"): 584 bytes (TD 1.0), or 648
    (TD 1.5) when `tee_tcb_svn2` and `mr_servicetd` are given."""
    if len(rtmrs) != 4:
        raise ValueError(f"rtmrs: got {len(rtmrs)}, expected 4")
    body = b"".join(
        (
            tee_tcb_svn,
            mr_seam,
            mr_signer_seam,
            seam_attributes,
            td_attributes,
            xfam,
            mr_td,
            mr_config_id,
            mr_owner,
            mr_owner_config,
            *rtmrs,
            report_data,
        )
    )
    if len(body) != 584:
        raise ValueError(f"TD report body: got {len(body)} bytes, expected 584")
    if (tee_tcb_svn2 is None) != (mr_servicetd is None):
        raise ValueError("TD 1.5 body: give both tee_tcb_svn2 and mr_servicetd, or neither")
    if tee_tcb_svn2 is not None and mr_servicetd is not None:
        body += tee_tcb_svn2 + mr_servicetd
        if len(body) != 648:
            raise ValueError(f"TD 1.5 report body: got {len(body)} bytes, expected 648")
    return body


def pad_report_data(report_data: bytes) -> bytes:
    if len(report_data) > 64:
        raise ValueError(f"report_data: got {len(report_data)} bytes, expected at most 64")
    return report_data.ljust(64, b"\0")


class QuotingEnclave:
    """An Intel-like QE: an attestation key certified by a QE report that the PCK key signs.

    Args:
        pck: the platform's PCK (its key signs the QE report).
        identity: the QE's own identity (MRSIGNER, ISVPRODID, ISVSVN).
        attestation_key: the QE's P-256 attestation key.
    """

    def __init__(
        self, pck: Pck, identity: QeIdentitySpec, attestation_key: ec.EllipticCurvePrivateKey
    ) -> None:
        self.pck = pck
        self.identity = identity
        self.attestation_key = attestation_key
        self.attestation_public_key = raw_public_key(attestation_key)
        self.qe_id = hashlib.sha256(b"veil.testing QE ID" + self.attestation_public_key).digest()[
            :16
        ]
        # Quote spec A.4.7: QE report data = SHA-256(attestation key ‖ QE auth data) ‖ 0*32.
        binding = hashlib.sha256(self.attestation_public_key + QE_AUTH_DATA).digest()
        self.qe_report = sgx_report_body(
            cpu_svn=pck.cpu_svn,
            attributes=sgx_attributes(FLAG_INIT | FLAG_MODE64 | FLAG_PROVISIONKEY),
            mr_enclave=identity.mr_enclave,
            mr_signer=identity.mr_signer,
            isv_prod_id=identity.isv_prod_id,
            isv_svn=identity.isv_svn,
            report_data=binding + bytes(32),
        )
        self.qe_report_signature = sign_raw(pck.leaf.key, self.qe_report)

    def _qe_certification(self) -> bytes:
        chain = self.pck.chain_pem.encode("ascii")
        return b"".join(
            (
                self.qe_report,
                self.qe_report_signature,
                struct.pack("<H", len(QE_AUTH_DATA)),
                QE_AUTH_DATA,
                struct.pack("<HI", _CERT_DATA_PCK_CHAIN, len(chain)),
                chain,
            )
        )

    def sgx_quote(self, body: bytes) -> bytes:
        """An SGX ECDSA quote v3 (quote spec A.4) around a 384-byte report body."""
        if len(body) != 384:
            raise ValueError(f"SGX report body: got {len(body)} bytes, expected 384")
        header = b"".join(
            (
                struct.pack("<HHI", 3, _ATT_KEY_TYPE_ECDSA_P256, _TEE_TYPE_SGX),
                struct.pack("<HH", self.identity.isv_svn, self.pck.pce_svn),
                INTEL_QE_VENDOR_ID,
                self.qe_id + bytes(4),  # user data: the QE ID, as Intel's QE writes it
            )
        )
        signature_data = (
            sign_raw(self.attestation_key, header + body)
            + self.attestation_public_key
            + self._qe_certification()
        )
        return header + body + struct.pack("<I", len(signature_data)) + signature_data

    def tdx_quote(self, body: bytes, *, version: int = 4) -> bytes:
        """A TDX ECDSA quote around a TD report body (certification data type 6).

        Version 4 takes a 584-byte TD 1.0 body; version 5 a TD 1.0 or a 648-byte TD 1.5 body,
        announced by the v5 body descriptor (type 2 or 3, then the size).
        """
        sizes = {584: 2, 648: 3} if version == 5 else {584: 2} if version == 4 else {}
        if not sizes:
            raise ValueError(f"TDX quote version: got {version}, expected 4 or 5")
        if len(body) not in sizes:
            raise ValueError(
                f"TD report body: got {len(body)} bytes, expected {' or '.join(map(str, sizes))}"
            )
        header = b"".join(
            (
                struct.pack("<HHI", version, _ATT_KEY_TYPE_ECDSA_P256, _TEE_TYPE_TDX),
                bytes(4),  # reserved in v4 and v5
                INTEL_QE_VENDOR_ID,
                self.qe_id + bytes(4),
            )
        )
        if version == 5:
            header += struct.pack("<HI", sizes[len(body)], len(body))
        inner = self._qe_certification()
        signature_data = (
            sign_raw(self.attestation_key, header + body)
            + self.attestation_public_key
            + struct.pack("<HI", _CERT_DATA_QE_REPORT, len(inner))
            + inner
        )
        return header + body + struct.pack("<I", len(signature_data)) + signature_data
