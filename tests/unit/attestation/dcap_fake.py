"""A throw-away Intel-like DCAP PKI for unit tests: quotes, CRLs, TCB info and QE identity signed
by freshly generated keys, so that paths no real vector covers (revocation, every TCB status)
can be exercised end to end. Trust it only through a TrustStore built on its own root."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from veil.attestation.trust import TrustStore
from veil.attestation.verify.collateral import DcapCollateral

UTC = dt.UTC
START = dt.datetime(2024, 1, 1, tzinfo=UTC)
END = dt.datetime(2034, 1, 1, tzinfo=UTC)
NOW = dt.datetime(2025, 1, 15, tzinfo=UTC)
ISSUE = dt.datetime(2025, 1, 1, tzinfo=UTC)
NEXT = dt.datetime(2025, 2, 1, tzinfo=UTC)
INTEL_VENDOR = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
QE_MRSIGNER = bytes.fromhex("8c4f5775d796503e96137f77c68a829a0056ac8ded70140b081b094490c57bff")
FMSPC = bytes.fromhex("00906ED50000")


def _name(cn: str) -> x509.Name:
    return x509.Name.from_rfc4514_string(f"CN={cn},O=Test Corporation,C=US")


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
    extra: x509.ExtensionType | None = None,
    not_before: dt.datetime = START,
    not_after: dt.datetime = END,
) -> x509.Certificate:
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer.subject if issuer is not None else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if extra is not None:
        b = b.add_extension(extra, critical=False)
    return b.sign(issuer_key, hashes.SHA256())


# --- tiny DER encoder for the SGX extension ---------------------------------------------------


def _tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + content


def _oid(dotted: str) -> bytes:
    parts = [int(p) for p in dotted.split(".")]
    out = bytearray([parts[0] * 40 + parts[1]])
    for p in parts[2:]:
        chunk = [p & 0x7F]
        p >>= 7
        while p:
            chunk.append(0x80 | (p & 0x7F))
            p >>= 7
        out += bytes(reversed(chunk))
    return _tlv(0x06, bytes(out))


def _int(v: int) -> bytes:
    return _tlv(0x02, v.to_bytes(max(1, (v.bit_length() + 8) // 8), "big"))


def _pair(oid: str, value: bytes) -> bytes:
    return _tlv(0x30, _oid(oid) + value)


SGX = "1.2.840.113741.1.13.1"


def sgx_extension_der(
    components: Sequence[int], pcesvn: int, fmspc: bytes, pce_id: bytes = b"\0\0"
) -> bytes:
    tcb = b"".join(_pair(f"{SGX}.2.{i + 1}", _int(c)) for i, c in enumerate(components))
    tcb += _pair(f"{SGX}.2.17", _int(pcesvn)) + _pair(f"{SGX}.2.18", _tlv(0x04, bytes(components)))
    body = (
        _pair(f"{SGX}.1", _tlv(0x04, b"\x42" * 16))
        + _pair(f"{SGX}.2", _tlv(0x30, tcb))
        + _pair(f"{SGX}.3", _tlv(0x04, pce_id))
        + _pair(f"{SGX}.4", _tlv(0x04, fmspc))
        + _pair(f"{SGX}.5", _tlv(0x0A, b"\x00"))
    )
    return _tlv(0x30, body)


def raw_sig(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def pem(*certs: x509.Certificate) -> str:
    return "".join(c.public_bytes(Encoding.PEM).decode() for c in certs)


def crl(
    issuer: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    revoked: Sequence[int] = (),
    this: dt.datetime = ISSUE,
    nxt: dt.datetime = NEXT,
) -> bytes:
    b = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(this)
        .next_update(nxt)
    )
    for serial in revoked:
        b = b.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(this).build()
        )
    return b.sign(key, hashes.SHA256()).public_bytes(Encoding.DER)


@dataclass
class FakeDcap:
    """Keys, certificates and knobs for one fake SGX platform."""

    components: tuple[int, ...] = (5, 5, 2, 2, 3, 1, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0)
    pcesvn: int = 13
    fmspc: bytes = FMSPC
    qe_isvsvn: int = 8
    qe_mrsigner: bytes = QE_MRSIGNER
    keys: dict[str, ec.EllipticCurvePrivateKey] = field(default_factory=dict)
    certs: dict[str, x509.Certificate] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for n in ("root", "ca", "leaf", "tcb", "att"):
            self.keys[n] = ec.generate_private_key(ec.SECP256R1())
        k = self.keys
        self.certs["root"] = _cert("Test SGX Root CA", k["root"], None, k["root"], ca=True)
        self.certs["ca"] = _cert(
            "Test SGX PCK Processor CA", k["ca"], self.certs["root"], k["root"], ca=True
        )
        ext = x509.UnrecognizedExtension(
            x509.ObjectIdentifier(SGX), sgx_extension_der(self.components, self.pcesvn, self.fmspc)
        )
        self.certs["leaf"] = _cert(
            "Test SGX PCK Certificate", k["leaf"], self.certs["ca"], k["ca"], ca=False, extra=ext
        )
        self.certs["tcb"] = _cert(
            "Test SGX TCB Signing", k["tcb"], self.certs["root"], k["root"], ca=False
        )

    @property
    def trust(self) -> TrustStore:
        return TrustStore(intel_root=self.certs["root"])

    def quote(
        self,
        report_data: bytes = b"\x07" * 64,
        qe_attributes: bytes | None = None,
        vendor: bytes = INTEL_VENDOR,
        chain_names: tuple[str, ...] = ("leaf", "ca", "root"),
    ) -> bytes:
        header = struct.pack("<HHIHH", 3, 2, 0, 0, 0) + vendor + b"\0" * 20
        body = bytearray(384)
        body[48:64] = bytes.fromhex("0500000000000000e700000000000000")
        body[64:96] = b"\xaa" * 32
        body[320:384] = report_data
        att_pub = (
            self.keys["att"]
            .public_key()
            .public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)[1:]
        )
        auth = bytes(range(32))
        qe = bytearray(384)
        qe[48:64] = qe_attributes or bytes.fromhex("11000000000000000000000000000000")
        qe[128:160] = self.qe_mrsigner
        qe[256:258] = struct.pack("<H", 1)
        qe[258:260] = struct.pack("<H", self.qe_isvsvn)
        qe[320:352] = hashlib.sha256(att_pub + auth).digest()
        signed = header + bytes(body)
        chain = pem(*(self.certs[n] for n in chain_names)).encode() + b"\0"
        sig_data = (
            raw_sig(self.keys["att"], signed)
            + att_pub
            + bytes(qe)
            + raw_sig(self.keys["leaf"], bytes(qe))
            + struct.pack("<H", len(auth))
            + auth
            + struct.pack("<HI", 5, len(chain))
            + chain
        )
        return signed + struct.pack("<I", len(sig_data)) + sig_data

    def collateral(
        self,
        *,
        tcb_levels: list[dict[str, Any]] | None = None,
        qe_levels: list[dict[str, Any]] | None = None,
        tcb_info: dict[str, Any] | None = None,
        qe_identity: dict[str, Any] | None = None,
        revoked_leaf: bool = False,
        revoked_ca: bool = False,
        crl_window: tuple[dt.datetime, dt.datetime] = (ISSUE, NEXT),
    ) -> DcapCollateral:
        info = tcb_info or sgx_tcb_info(self.fmspc, tcb_levels or [level(self.components, 13)])
        ident = qe_identity or qe_identity_json(qe_levels or [{"isvsvn": 8, "status": "UpToDate"}])
        info_text = json.dumps(info, separators=(",", ":"))
        ident_text = json.dumps(ident, separators=(",", ":"))
        c, k = self.certs, self.keys
        return DcapCollateral(
            pck_crl_issuer_chain=pem(c["ca"], c["root"]),
            root_ca_crl=crl(c["root"], k["root"], [c["ca"].serial_number] if revoked_ca else []),
            pck_crl=crl(
                c["ca"],
                k["ca"],
                [c["leaf"].serial_number] if revoked_leaf else [12345],
                *crl_window,
            ),
            tcb_info_issuer_chain=pem(c["tcb"], c["root"]),
            tcb_info=info_text,
            tcb_info_signature=raw_sig(k["tcb"], info_text.encode()),
            qe_identity_issuer_chain=pem(c["tcb"], c["root"]),
            qe_identity=ident_text,
            qe_identity_signature=raw_sig(k["tcb"], ident_text.encode()),
        )


def _ts(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def level(
    components: Sequence[int],
    pcesvn: int,
    status: str = "UpToDate",
    advisories: Sequence[str] = (),
    tdx: Sequence[int] | None = None,
    date: str = "2024-11-13T00:00:00Z",
) -> dict[str, Any]:
    tcb: dict[str, Any] = {
        "sgxtcbcomponents": [{"svn": c} for c in components],
        "pcesvn": pcesvn,
    }
    if tdx is not None:
        tcb["tdxtcbcomponents"] = [{"svn": c} for c in tdx]
    out: dict[str, Any] = {"tcb": tcb, "tcbDate": date, "tcbStatus": status}
    if advisories:
        out["advisoryIDs"] = list(advisories)
    return out


def sgx_tcb_info(fmspc: bytes, levels: list[dict[str, Any]], tcb_id: str = "SGX") -> dict[str, Any]:
    return {
        "id": tcb_id,
        "version": 3,
        "issueDate": _ts(ISSUE),
        "nextUpdate": _ts(NEXT),
        "fmspc": fmspc.hex().upper(),
        "pceId": "0000",
        "tcbType": 0,
        "tcbEvaluationDataNumber": 17,
        "tcbLevels": levels,
    }


def qe_identity_json(levels: list[dict[str, Any]], qe_id: str = "QE") -> dict[str, Any]:
    return {
        "id": qe_id,
        "version": 2,
        "issueDate": _ts(ISSUE),
        "nextUpdate": _ts(NEXT),
        "tcbEvaluationDataNumber": 17,
        "miscselect": "00000000",
        "miscselectMask": "FFFFFFFF",
        "attributes": "11000000000000000000000000000000",
        "attributesMask": "FBFFFFFFFFFFFFFF0000000000000000",
        "mrsigner": QE_MRSIGNER.hex().upper(),
        "isvprodid": 1,
        "tcbLevels": [
            {
                "tcb": {"isvsvn": lv["isvsvn"]},
                "tcbDate": "2024-11-13T00:00:00Z",
                "tcbStatus": lv["status"],
                **({"advisoryIDs": lv["advisories"]} if "advisories" in lv else {}),
            }
            for lv in levels
        ],
    }
