"""Intel DCAP ECDSA quotes: SGX quote v3, TDX quote v4 and v5 (bytes → structure).

Layouts follow Intel's "SGX ECDSA Quote Library API" (quote v3, appendix A) and the
"TDX DCAP Quote Generation Library and Quote Verification Library" spec (quote v4 and v5):

    v3, v4:  header (48) ‖ body (384 SGX / 584 TD 1.0) ‖ sig_len u32 ‖ signature data
    v5:      header (48) ‖ body_type u16 ‖ body_size u32 ‖ body ‖ sig_len u32 ‖ signature data

The attestation key signs everything before ``sig_len`` (`Quote.signed_bytes`). Signature data:

    v3:      sig (64) ‖ att_key (64) ‖ QE report (384) ‖ QE report sig (64) ‖
             auth_len u16 ‖ QE auth data ‖ cert_type u16 ‖ cert_len u32 ‖ cert data
    v4, v5:  sig (64) ‖ att_key (64) ‖ cert_type u16 = 6 ‖ cert_len u32 ‖
             [QE report (384) ‖ QE report sig (64) ‖ auth_len u16 ‖ QE auth data ‖
              cert_type u16 ‖ cert_len u32 ‖ cert data]

Certification data type 5 is the PEM PCK certificate chain (leaf, CA, root). Every length
field is honoured; bytes after the declared signature data (a quote generator's fixed-size
buffer) are tolerated and ignored, since nothing signs them. Anything truncated or
inconsistent raises `MalformedEvidenceError`. No trust decision is made here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from veil.attestation.abi import sgx, tdx
from veil.attestation.abi.sgx import SGX_REPORT_BODY_SIZE, SgxReportBody
from veil.attestation.abi.tdx import TD_REPORT_BODY_10_SIZE, TD_REPORT_BODY_15_SIZE, TdReportBody
from veil.errors import MalformedEvidenceError

__all__ = [
    "ATTESTATION_KEY_TYPE_ECDSA_P256",
    "CERT_DATA_PCK_CHAIN",
    "CERT_DATA_QE_REPORT",
    "HEADER_SIZE",
    "INTEL_QE_VENDOR_ID",
    "TEE_TYPE_SGX",
    "TEE_TYPE_TDX",
    "Quote",
    "parse_quote",
    "quote_report_data",
]

HEADER_SIZE = 48
TEE_TYPE_SGX = 0x00000000
TEE_TYPE_TDX = 0x00000081
ATTESTATION_KEY_TYPE_ECDSA_P256 = 2
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
CERT_DATA_PCK_CHAIN = 5
CERT_DATA_QE_REPORT = 6

# v5 body descriptor types (TDX DCAP spec, quote v5 "Quote Body Type").
_BODY_TYPE_SGX = 1
_BODY_TYPE_TD10 = 2
_BODY_TYPE_TD15 = 3
_BODY_SIZES = {
    _BODY_TYPE_SGX: SGX_REPORT_BODY_SIZE,
    _BODY_TYPE_TD10: TD_REPORT_BODY_10_SIZE,
    _BODY_TYPE_TD15: TD_REPORT_BODY_15_SIZE,
}

_ECDSA_SIG_SIZE = 64
_ECDSA_KEY_SIZE = 64
# Quotes are a few KiB; a larger declared length is garbage, not a quote.
_MAX_QUOTE_SIZE = 1 << 20


class _Reader:
    """Bounded cursor: every read names what it reads, so truncation errors say where."""

    __slots__ = ("_data", "_end", "pos")

    def __init__(self, data: bytes, start: int = 0, end: int | None = None) -> None:
        self._data = data
        self.pos = start
        self._end = len(data) if end is None else end

    @property
    def remaining(self) -> int:
        return self._end - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or n > self.remaining:
            raise MalformedEvidenceError(
                f"quote {what}: got {max(self.remaining, 0)} bytes left, expected {n}"
            )
        out = self._data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u16(self, what: str) -> int:
        value: int = struct.unpack("<H", self.take(2, what))[0]
        return value

    def u32(self, what: str) -> int:
        value: int = struct.unpack("<I", self.take(4, what))[0]
        return value


@dataclass(frozen=True, slots=True)
class Quote:
    """A parsed DCAP quote. Facts only: nothing here has been verified.

    Attributes:
        version: 3, 4 or 5.
        attestation_key_type: 2 (ECDSA-256 with P-256), the only type accepted.
        tee_type: 0 for SGX, 0x81 for TDX.
        qe_svn, pce_svn: header fields (reserved in v4/v5, informational in v3).
        qe_vendor_id: 16 bytes; Intel's QE is ``939a7233…0607``.
        user_data: 20 bytes chosen by the QE (platform identifier).
        body_type: 1 SGX, 2 TD 1.0, 3 TD 1.5 (from the v5 descriptor, or implied by v3/v4).
        body: the enclave report body (SGX) or TD report body (TDX).
        signed_bytes: header ‖ (v5 descriptor ‖) body: what the attestation key signs.
        signature: raw ECDSA r‖s over `signed_bytes`.
        attestation_key: raw P-256 public key x‖y.
        qe_report: the quoting enclave's report, signed by the PCK key.
        qe_report_signature: raw ECDSA r‖s over `qe_report.raw`.
        qe_auth_data: bytes hashed with the attestation key into the QE report data.
        certification_data_type: type of the innermost certification data (5 = PCK chain).
        certification_data: its bytes.
        pck_chain_pem: the PEM PCK chain when the type is 5, else None.
    """

    version: int
    attestation_key_type: int
    tee_type: int
    qe_svn: int
    pce_svn: int
    qe_vendor_id: bytes
    user_data: bytes
    body_type: int
    body: SgxReportBody | TdReportBody
    signed_bytes: bytes
    signature: bytes
    attestation_key: bytes
    qe_report: SgxReportBody
    qe_report_signature: bytes
    qe_auth_data: bytes
    certification_data_type: int
    certification_data: bytes
    pck_chain_pem: bytes | None

    @property
    def is_tdx(self) -> bool:
        return self.tee_type == TEE_TYPE_TDX

    def __repr__(self) -> str:
        return (
            f"Quote(version={self.version}, tee_type={self.tee_type:#x}, "
            f"body_type={self.body_type}, body={self.body!r})"
        )


def quote_report_data(data: bytes) -> bytes:
    """The 64 report-data bytes of a quote's body, found from the header alone.

    For a provider's check that a quote answers its request; nothing after the body is read, so
    this says nothing about the quote being well formed or genuine.

    Raises:
        MalformedEvidenceError: the header or body is truncated, or the version is unknown.
    """
    r = _Reader(bytes(data))
    version = r.u16("header.version")
    r.take(2, "header.attestation_key_type")
    tee_type = r.u32("header.tee_type")
    r.take(HEADER_SIZE - 8, "header")
    if version not in (3, 4, 5):
        raise MalformedEvidenceError(f"quote version: got {version}, expected 3, 4 or 5")
    if version == 5:
        r.take(6, "body descriptor")
    field = sgx.REPORT_DATA if tee_type == TEE_TYPE_SGX else tdx.REPORT_DATA
    return r.take(field.stop, "body")[field]


def parse_quote(data: bytes) -> Quote:
    """Parse an SGX (v3, v4) or TDX (v4, v5) ECDSA quote.

    Args:
        data: the raw quote; bytes after the declared signature data are ignored.

    Raises:
        MalformedEvidenceError: truncated, inconsistent or unsupported input.

    Example:
        >>> quote = parse_quote(raw)  # doctest: +SKIP
        >>> quote.body.report_data[:32]  # doctest: +SKIP
    """
    data = bytes(data)
    if len(data) > _MAX_QUOTE_SIZE:
        raise MalformedEvidenceError(
            f"quote: got {len(data)} bytes, expected at most {_MAX_QUOTE_SIZE}"
        )
    r = _Reader(data)
    version = r.u16("header.version")
    att_key_type = r.u16("header.attestation_key_type")
    tee_type = r.u32("header.tee_type")
    qe_svn = r.u16("header.qe_svn")
    pce_svn = r.u16("header.pce_svn")
    qe_vendor_id = r.take(16, "header.qe_vendor_id")
    user_data = r.take(20, "header.user_data")

    if version not in (3, 4, 5):
        raise MalformedEvidenceError(f"quote version: got {version}, expected 3, 4 or 5")
    if att_key_type != ATTESTATION_KEY_TYPE_ECDSA_P256:
        raise MalformedEvidenceError(
            f"attestation key type: got {att_key_type}, expected "
            f"{ATTESTATION_KEY_TYPE_ECDSA_P256} (ECDSA-256 with P-256)"
        )
    if tee_type not in (TEE_TYPE_SGX, TEE_TYPE_TDX):
        raise MalformedEvidenceError(f"tee type: got {tee_type:#x}, expected 0x0 or 0x81")
    if version == 3 and tee_type != TEE_TYPE_SGX:
        raise MalformedEvidenceError(f"quote v3 tee type: got {tee_type:#x}, expected 0x0 (SGX)")

    if version == 5:
        body_type = r.u16("body_type")
        body_size = r.u32("body_size")
        expected_size = _BODY_SIZES.get(body_type)
        if expected_size is None:
            raise MalformedEvidenceError(f"quote v5 body type: got {body_type}, expected 1, 2 or 3")
        if body_size != expected_size:
            raise MalformedEvidenceError(
                f"quote v5 body size for type {body_type}: got {body_size}, "
                f"expected {expected_size}"
            )
        if (body_type == _BODY_TYPE_SGX) != (tee_type == TEE_TYPE_SGX):
            raise MalformedEvidenceError(
                f"quote v5 body type {body_type} does not fit tee type {tee_type:#x}"
            )
    else:
        body_type = _BODY_TYPE_SGX if tee_type == TEE_TYPE_SGX else _BODY_TYPE_TD10
        body_size = _BODY_SIZES[body_type]

    body_raw = r.take(body_size, "body")
    body: SgxReportBody | TdReportBody = (
        SgxReportBody.parse(body_raw)
        if body_type == _BODY_TYPE_SGX
        else TdReportBody.parse(body_raw)
    )
    signed_bytes = data[: r.pos]

    sig_len = r.u32("signature_data_len")
    sig_end = r.pos + sig_len
    if sig_len > r.remaining:
        raise MalformedEvidenceError(
            f"quote signature data: got {r.remaining} bytes, expected {sig_len}"
        )
    s = _Reader(data, r.pos, sig_end)
    signature = s.take(_ECDSA_SIG_SIZE, "signature")
    attestation_key = s.take(_ECDSA_KEY_SIZE, "attestation_key")

    if version == 3:
        qe = s
    else:
        outer_type = s.u16("certification_data.type")
        if outer_type != CERT_DATA_QE_REPORT:
            raise MalformedEvidenceError(
                f"quote v{version} certification data type: got {outer_type}, "
                f"expected {CERT_DATA_QE_REPORT} (QE report certification data)"
            )
        outer_len = s.u32("certification_data.size")
        if outer_len != s.remaining:
            raise MalformedEvidenceError(
                f"QE report certification data size: got {outer_len}, expected {s.remaining}"
            )
        qe = _Reader(data, s.pos, s.pos + outer_len)

    qe_report = SgxReportBody.parse(qe.take(SGX_REPORT_BODY_SIZE, "qe_report"))
    qe_report_signature = qe.take(_ECDSA_SIG_SIZE, "qe_report_signature")
    auth_len = qe.u16("qe_auth_data.size")
    qe_auth_data = qe.take(auth_len, "qe_auth_data")
    cert_type = qe.u16("certification_data.type")
    cert_len = qe.u32("certification_data.size")
    if cert_len != qe.remaining:
        raise MalformedEvidenceError(
            f"certification data size: got {cert_len}, expected {qe.remaining}"
        )
    cert_data = qe.take(cert_len, "certification_data")

    pck_chain: bytes | None = None
    if cert_type == CERT_DATA_PCK_CHAIN:
        # Quote generators often NUL-terminate the PEM text.
        pck_chain = cert_data.rstrip(b"\x00")
        if b"-----BEGIN CERTIFICATE-----" not in pck_chain:
            raise MalformedEvidenceError("certification data type 5: no PEM certificate found")

    return Quote(
        version=version,
        attestation_key_type=att_key_type,
        tee_type=tee_type,
        qe_svn=qe_svn,
        pce_svn=pce_svn,
        qe_vendor_id=qe_vendor_id,
        user_data=user_data,
        body_type=body_type,
        body=body,
        signed_bytes=signed_bytes,
        signature=signature,
        attestation_key=attestation_key,
        qe_report=qe_report,
        qe_report_signature=qe_report_signature,
        qe_auth_data=qe_auth_data,
        certification_data_type=cert_type,
        certification_data=cert_data,
        pck_chain_pem=pck_chain,
    )
