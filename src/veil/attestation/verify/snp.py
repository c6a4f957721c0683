"""Verification of AMD SEV-SNP attestation reports: signature, VCEK/VLEK chain, TCB, chip ID.

References: AMD SEV-SNP Firmware ABI specification (report layout, signature format,
TCB_VERSION) and AMD's Versioned Chip/Loaded Endorsement Key specification (KDS: certificate
chain ARK → ASK/ASVK → VCEK/VLEK, certificate extensions under OID 1.3.6.1.4.1.3704.1).

Trust comes from the ARKs of the `TrustStore` only. ASK/ASVK intermediates may come with the
collateral; AMD's public intermediates are embedded as a fallback (pinned below, and in any
case they must verify under the pinned ARK, so embedding them grants no trust). A self-signed
certificate in the collateral (an ARK) is never used.

This module returns facts (`SnpVerdict`); measurement and debug decisions belong to
`veil.attestation.policy`.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache
from importlib import resources
from types import MappingProxyType
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import NameOID

from veil.attestation.abi.snp import SigningKey, SnpReport, SnpTcb
from veil.attestation.trust import TrustStore
from veil.attestation.verify.x509util import (
    Window,
    cert_window,
    check_signature_bit_string,
    check_window,
    load_crl,
    malformed_x509_as_typed,
)
from veil.errors import (
    ChainError,
    CollateralError,
    MalformedEvidenceError,
    RevokedError,
    SignatureError,
    TcbError,
)

__all__ = [
    "AMD_INTERMEDIATE_FINGERPRINTS",
    "PRODUCTS",
    "SnpCollateral",
    "SnpVerdict",
    "check_amd_crl",
    "load_amd_intermediate",
    "load_certificate",
    "product_from_cpuid",
    "snp_collateral_from_certificates",
    "snp_collateral_from_map",
    "verify_endorsement_chain",
    "verify_snp_report",
]

PRODUCTS = ("Milan", "Genoa", "Turin")

# SHA-256 of the DER of AMD's public intermediates, as served by the AMD KDS
# (provenance: tests/testdata/attestation-vectors/README.md, roots/amd/).
AMD_INTERMEDIATE_FINGERPRINTS: Mapping[str, str] = MappingProxyType(
    {
        "amd_ask_milan.pem": "67d303bd3905fd38db8b20e0793699870e7fa612eaad5dec358293fd8c0bac1b",
        "amd_asvk_milan.pem": "c5e081f59b7efab1fe2f8b505e159704e72f29cab7ef7cf628a05a42439082f5",
        "amd_ask_genoa.pem": "5464738c1546aed5f2cecf1dc98c5c960a92e8913238a61711bc90ec6e828521",
        "amd_asvk_genoa.pem": "197e610743a917d6b9bb982a5a9226ccc0a15b611be0619e626aca9151457372",
        "amd_ask_turin.pem": "5b77ef5fe7a7a004fd9032668fba9d0fda22f88c4442069a479636a6ae3b3185",
        "amd_asvk_turin.pem": "104e10a8bd060a3c20a434261a57d0588fd65a88915b4f65b08bdecaf8df1a3c",
    }
)

# KDS specification, "VCEK Certificate Extensions" (prefix 1.3.6.1.4.1.3704.1).
_OID_STRUCT_VERSION = "1.3.6.1.4.1.3704.1.1"
_OID_PRODUCT_NAME = "1.3.6.1.4.1.3704.1.2"
_OID_BL_SPL = "1.3.6.1.4.1.3704.1.3.1"
_OID_TEE_SPL = "1.3.6.1.4.1.3704.1.3.2"
_OID_SNP_SPL = "1.3.6.1.4.1.3704.1.3.3"
_OID_SPL_4_TO_7 = tuple(f"1.3.6.1.4.1.3704.1.3.{i}" for i in range(4, 8))
_OID_UCODE_SPL = "1.3.6.1.4.1.3704.1.3.8"
_OID_FMC_SPL = "1.3.6.1.4.1.3704.1.3.9"
_OID_HWID = "1.3.6.1.4.1.3704.1.4"
_OID_CSP_ID = "1.3.6.1.4.1.3704.1.5"

# AMD signs ASK/ASVK/VCEK/VLEK with RSASSA-PSS, SHA-384, MGF1-SHA-384, 48-byte salt.
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)

# cryptography warns on the serial number 0 that AMD's KDS puts in VCEK/VLEK certificates;
# RFC 5280 forbids it but the certificates are genuine and signed. Only this warning is silenced.
# (warnings.catch_warnings is process-wide before Python 3.14; racing threads can at worst leave
# this one harmless warning filtered.) Should cryptography start refusing such certificates, the
# loader fails with a MalformedEvidenceError naming the certificate.
_SERIAL_WARNING = r"Parsed a serial number which wasn't positive"

_KEY_NAMES = {SigningKey.VCEK: "VCEK", SigningKey.VLEK: "VLEK"}


@dataclass(frozen=True, slots=True)
class SnpCollateral:
    """What a verifier needs beside an SNP report.

    Attributes:
        endorsement_key: the VCEK or VLEK certificate, DER.
        intermediates_pem: optional PEM with the ASK and/or ASVK (an ARK in it is ignored).
            Without it, AMD's public intermediates embedded in veil are used.
        crl: optional AMD CRL for the product (DER or PEM), as the KDS serves it at
            ``/vcek/v1/{product}/crl`` or ``/vlek/v1/{product}/crl``: issued and signed
            (RSASSA-PSS SHA-384) by the ARK. When given, it is verified and the ASK/ASVK and
            the VCEK/VLEK must not be on it. Whether its absence is acceptable is the
            policy's decision (`SnpPolicy.require_crl`).
    """

    endorsement_key: bytes
    intermediates_pem: str | None = None
    crl: bytes | None = None

    def __repr__(self) -> str:
        chain = "yes" if self.intermediates_pem else "no"
        crl = "yes" if self.crl else "no"
        return (
            f"SnpCollateral(endorsement_key={len(self.endorsement_key)} bytes, "
            f"chain={chain}, crl={crl})"
        )


@dataclass(frozen=True, slots=True)
class SnpVerdict:
    """Facts established by `verify_snp_report`.

    Attributes:
        product: "Milan", "Genoa" or "Turin".
        signing_key: "VCEK" or "VLEK".
        reported_tcb: the report's REPORTED_TCB, equal to the certificate's TCB.
        chip_id_checked: false for a VLEK or a report whose chip ID the firmware masked.
        csp_id: the cloud provider named in a VLEK, else None.
        crl_checked: true when an AMD CRL was given, verified, and lists neither the ASK/ASVK
            nor the VCEK/VLEK; false when none was given.
        valid_from, valid_until: the intersection of the chain's validity windows and, when a
            CRL was given, its thisUpdate … nextUpdate.
    """

    product: str
    signing_key: str
    reported_tcb: SnpTcb
    chip_id_checked: bool
    csp_id: str | None
    valid_from: datetime
    valid_until: datetime
    crl_checked: bool = False


def load_certificate(data: bytes, what: str) -> x509.Certificate:
    """Load one DER or PEM certificate; a parse failure, or a signature BIT STRING with unused
    bits, is a `MalformedEvidenceError`."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=_SERIAL_WARNING, category=CryptographyDeprecationWarning
            )
            if data.lstrip().startswith(b"-----BEGIN"):
                cert = x509.load_pem_x509_certificate(data)
            else:
                cert = x509.load_der_x509_certificate(data)
    except (ValueError, x509.InvalidVersion, UnsupportedAlgorithm) as exc:
        raise MalformedEvidenceError(f"{what}: not a valid X.509 certificate ({exc})") from None
    check_signature_bit_string(cert.public_bytes(Encoding.DER), what)
    return cert


def _load_pem_certificates(pem: str | bytes, what: str) -> list[x509.Certificate]:
    data = pem.encode() if isinstance(pem, str) else pem
    blocks = re.findall(
        rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", data, flags=re.DOTALL
    )
    if not blocks:
        raise MalformedEvidenceError(f"{what}: no PEM certificate found")
    return [load_certificate(block, what) for block in blocks]


@cache
def load_amd_intermediate(name: str) -> x509.Certificate:
    """Load an embedded AMD ASK/ASVK (e.g. ``amd_asvk_milan.pem``), checking its fingerprint."""
    expected = AMD_INTERMEDIATE_FINGERPRINTS[name]
    pem = resources.files("veil.attestation.verify.roots").joinpath(name).read_bytes()
    cert = load_certificate(pem, name)
    got = hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()
    if got != expected:
        raise ChainError(
            f"embedded intermediate {name}: fingerprint got {got}, expected {expected}"
        )
    return cert


def _common_name(name: x509.Name) -> str:
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


def _intermediate_cn(product: str, signing_key: int) -> str:
    return f"SEV-VLEK-{product}" if signing_key == SigningKey.VLEK else f"SEV-{product}"


def product_from_cpuid(family: int, model: int) -> str | None:
    """The SEV product of a CPUID family/model, per AMD's KDS "Determining the Product Name"."""
    if family == 0x19:
        if model <= 0x0F:
            return "Milan"
        if 0x10 <= model <= 0x1F or 0xA0 <= model <= 0xAF:
            return "Genoa"
    if family == 0x1A and model <= 0x1F:
        return "Turin"
    return None


# --- AMD certificate extensions (tiny DER reader: INTEGER, IA5String, OCTET STRING) ---


def _der_value(raw: bytes, tag: int, what: str) -> bytes:
    if len(raw) < 2 or raw[0] != tag:
        raise MalformedEvidenceError(f"certificate extension {what}: bad DER encoding")
    length = raw[1]
    offset = 2
    if length & 0x80:
        count = length & 0x7F
        if count not in (1, 2) or len(raw) < 2 + count:
            raise MalformedEvidenceError(f"certificate extension {what}: bad DER length")
        length = int.from_bytes(raw[2 : 2 + count], "big")
        offset = 2 + count
    if len(raw) != offset + length:
        raise MalformedEvidenceError(f"certificate extension {what}: bad DER length")
    return raw[offset:]


@dataclass(frozen=True, slots=True)
class _KeyExtensions:
    product_name: str
    spl: dict[str, int]
    reserved_spl: tuple[int, ...]
    hwid: bytes | None
    csp_id: str | None


def _read_extensions(cert: x509.Certificate) -> _KeyExtensions:
    raw: dict[str, bytes] = {}
    for ext in cert.extensions:
        if isinstance(ext.value, x509.UnrecognizedExtension):
            raw[ext.oid.dotted_string] = ext.value.value

    def integer(oid: str, what: str, *, required: bool = True) -> int | None:
        if oid not in raw:
            if required:
                raise CollateralError(
                    f"endorsement key certificate: extension {what} ({oid}) missing"
                )
            return None
        value = int.from_bytes(_der_value(raw[oid], 0x02, what), "big", signed=True)
        if not 0 <= value <= 0xFF:
            raise MalformedEvidenceError(
                f"certificate extension {what}: got {value}, expected 0..255"
            )
        return value

    def text(oid: str, what: str) -> str | None:
        if oid not in raw:
            return None
        try:
            return _der_value(raw[oid], 0x16, what).decode("ascii")
        except UnicodeDecodeError:
            raise MalformedEvidenceError(f"certificate extension {what}: not ASCII") from None

    integer(_OID_STRUCT_VERSION, "structVersion")
    product_name = text(_OID_PRODUCT_NAME, "productName")
    if product_name is None:
        raise CollateralError("endorsement key certificate: extension productName missing")
    spl = {
        "bootloader": integer(_OID_BL_SPL, "blSPL"),
        "tee": integer(_OID_TEE_SPL, "teeSPL"),
        "snp": integer(_OID_SNP_SPL, "snpSPL"),
        "microcode": integer(_OID_UCODE_SPL, "ucodeSPL"),
        "fmc": integer(_OID_FMC_SPL, "fmcSPL", required=False),
    }
    reserved = tuple(integer(oid, "spl", required=False) or 0 for oid in _OID_SPL_4_TO_7)
    hwid: bytes | None = None
    if _OID_HWID in raw:
        value = raw[_OID_HWID]
        # AMD encodes hwID as the raw chip-ID bytes; accept an OCTET STRING wrapper too.
        hwid = value if len(value) in (8, 64) else _der_value(value, 0x04, "hwID")
        if len(hwid) not in (8, 64):
            raise MalformedEvidenceError(
                f"certificate extension hwID: got {len(hwid)} bytes, expected 64 (or 8 on Turin)"
            )
    return _KeyExtensions(
        product_name=product_name,
        spl={k: v for k, v in spl.items() if v is not None},
        reserved_spl=reserved,
        hwid=hwid,
        csp_id=text(_OID_CSP_ID, "cspId"),
    )


# --- chain ---


def _check_signed_by(cert: x509.Certificate, issuer: x509.Certificate, what: str) -> None:
    """RSASSA-PSS SHA-384 signature of `issuer` over `cert`'s TBS (KDS spec)."""
    if cert.issuer != issuer.subject:
        raise ChainError(
            f"{what}: issuer got {cert.issuer.rfc4514_string()!r}, "
            f"expected {issuer.subject.rfc4514_string()!r}"
        )
    key = issuer.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise ChainError(f"{what}: issuer key is not RSA")
    if cert.signature_algorithm_oid != x509.SignatureAlgorithmOID.RSASSA_PSS or not isinstance(
        cert.signature_hash_algorithm, hashes.SHA384
    ):
        raise ChainError(f"{what}: signature algorithm is not RSASSA-PSS with SHA-384")
    try:
        key.verify(cert.signature, cert.tbs_certificate_bytes, _PSS, hashes.SHA384())
    except InvalidSignature:
        raise ChainError(
            f"{what}: signature by {_common_name(issuer.subject)!r} does not verify"
        ) from None


def _check_validity(cert: x509.Certificate, what: str, now: datetime) -> None:
    check_window(cert_window(cert), now, f"{what} ({_common_name(cert.subject)})")


def verify_endorsement_chain(
    key_cert: x509.Certificate,
    intermediate: x509.Certificate,
    ark: x509.Certificate,
    *,
    product: str,
    signing_key: int,
    now: datetime,
) -> tuple[datetime, datetime]:
    """Check ARK → ASK/ASVK → VCEK/VLEK and return the chain's validity window.

    A VCEK must be issued by the ASK ("SEV-<product>"), a VLEK by the ASVK
    ("SEV-VLEK-<product>"). `ark` must come from the trust store.

    Raises:
        ChainError: wrong intermediate, wrong issuer, or a signature that does not verify.
        ExpiredError: a certificate is outside its validity window at `now`.
    """
    kind = _KEY_NAMES[signing_key]
    expected_cn = _intermediate_cn(product, signing_key)
    got_cn = _common_name(intermediate.subject)
    if got_cn != expected_cn:
        raise ChainError(
            f"{kind} intermediate: got {got_cn!r}, expected {expected_cn!r} "
            f"({'ASVK' if signing_key == SigningKey.VLEK else 'ASK'})"
        )
    _check_signed_by(intermediate, ark, got_cn)
    _check_signed_by(key_cert, intermediate, kind)
    chain = ((ark, "ARK"), (intermediate, got_cn), (key_cert, kind))
    for cert, what in chain:
        _check_validity(cert, what, now)
    return (
        max(cert.not_valid_before_utc for cert, _ in chain),
        min(cert.not_valid_after_utc for cert, _ in chain),
    )


def check_amd_crl(
    crl_data: bytes,
    ark: x509.Certificate,
    certs: Iterable[tuple[x509.Certificate, str]],
    *,
    now: datetime,
    grace: timedelta = timedelta(0),
) -> tuple[datetime, datetime]:
    """Verify AMD's ARK-issued CRL and refuse any of `certs` whose serial it lists.

    The KDS serves one CRL per product and key kind, signed by the ARK with RSASSA-PSS SHA-384
    (KDS spec, "CRL"); it is the one revocation list of that chain, so the ASK/ASVK and the
    VCEK/VLEK are both looked up in it. `grace` excuses a nextUpdate that passed less than that
    long ago (a stale list, never an expired certificate).

    Returns:
        thisUpdate and nextUpdate.

    Raises:
        MalformedEvidenceError: not a CRL.
        CollateralError: issued by another name, or without nextUpdate.
        SignatureError: the ARK's signature does not verify.
        ExpiredError: `now` is outside thisUpdate … nextUpdate (+ `grace`).
        RevokedError: a certificate of the chain is listed.
    """
    crl = load_crl(crl_data, "AMD CRL")
    try:
        if crl.issuer != ark.subject:
            raise CollateralError(
                f"AMD CRL: issuer got {crl.issuer.rfc4514_string()!r}, "
                f"expected {ark.subject.rfc4514_string()!r}"
            )
        key = ark.public_key()
        if not isinstance(key, rsa.RSAPublicKey):
            raise ChainError("AMD CRL: ARK key is not RSA")
        algorithm = crl.signature_algorithm_oid
        if algorithm != x509.SignatureAlgorithmOID.RSASSA_PSS or not isinstance(
            crl.signature_hash_algorithm, hashes.SHA384
        ):
            raise SignatureError(
                f"AMD CRL: signature algorithm got {algorithm.dotted_string}, "
                "expected RSASSA-PSS with SHA-384"
            )
        try:
            key.verify(crl.signature, crl.tbs_certlist_bytes, _PSS, hashes.SHA384())
        except InvalidSignature:
            raise SignatureError("AMD CRL: signature by the ARK does not verify") from None
        this_update, next_update = crl.last_update_utc, crl.next_update_utc
        if next_update is None:
            raise CollateralError("AMD CRL: nextUpdate missing")
        check_window(Window(this_update, next_update), now, "AMD CRL", grace=grace)
        for cert, what in certs:
            if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
                raise RevokedError(
                    f"{what} ({_common_name(cert.subject)}): serial {cert.serial_number:x} "
                    "is on AMD's CRL"
                )
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        # cryptography parses CRL fields lazily: a damaged field surfaces here.
        raise MalformedEvidenceError(f"AMD CRL: malformed ({exc})") from None
    return this_update, next_update


def _pick_intermediate(
    collateral: SnpCollateral, product: str, signing_key: int
) -> x509.Certificate:
    expected_cn = _intermediate_cn(product, signing_key)
    if collateral.intermediates_pem:
        for cert in _load_pem_certificates(collateral.intermediates_pem, "certificate chain"):
            # A self-signed certificate is an ARK: trust comes from the trust store only.
            if cert.issuer == cert.subject:
                continue
            if _common_name(cert.subject) == expected_cn:
                return cert
    suffix = "asvk" if signing_key == SigningKey.VLEK else "ask"
    return load_amd_intermediate(f"amd_{suffix}_{product.lower()}.pem")


# --- the verifier ---


def verify_snp_report(
    report: SnpReport,
    collateral: SnpCollateral,
    *,
    trust: TrustStore,
    now: datetime,
    collateral_grace: timedelta = timedelta(0),
) -> SnpVerdict:
    """Verify an SEV-SNP report against its VCEK/VLEK and AMD's pinned roots.

    Steps (AMD SEV-SNP ABI spec and KDS spec):

    1. The report names its signing key (SIGNING_KEY: VCEK or VLEK); an unsigned report fails.
    2. The VCEK/VLEK certificate is of that kind (VCEK: hwID extension, VLEK: cspId).
    3. The product (Milan, Genoa, Turin) comes from the certificate's productName; a version 3+
       report's CPUID family/model must name the same product.
    4. The ARK for that product comes from the trust store only.
    5. Chain: ASK (VCEK) or ASVK (VLEK) signed by the ARK, the VCEK/VLEK signed by it, all
       RSASSA-PSS SHA-384, all valid at `now` (no grace: a certificate is never excused).
       5b. With a CRL in the collateral: signed by the ARK, current (nextUpdate may be
       `collateral_grace` past), and listing neither the ASK/ASVK nor the VCEK/VLEK.
    6. REPORTED_TCB equals the TCB in the certificate's SPL extensions, and
       REPORTED_TCB <= COMMITTED_TCB <= CURRENT_TCB component by component.
    7. For a VCEK, CHIP_ID equals the certificate's hwID (skipped for a VLEK, which has no
       hwID, and when the firmware masked the chip ID).
    8. The report signature (ECDSA P-384, SHA-384 over bytes 0x000..0x29F) verifies with the
       VCEK/VLEK public key.

    Args:
        report: the parsed report.
        collateral: the VCEK/VLEK certificate, optional intermediates and optional CRL.
        trust: the trust store; only its `amd_arks` are used.
        now: verification time (timezone-aware).
        collateral_grace: how long after its nextUpdate the CRL is still accepted.

    Raises:
        SignatureError, ChainError, RevokedError, ExpiredError, CollateralError, TcbError,
        MalformedEvidenceError: as each step fails.
        ValueError: `now` is naive.
    """
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")
    with malformed_x509_as_typed("SEV-SNP collateral"):
        return _verify_snp_report(
            report, collateral, trust=trust, now=now, collateral_grace=collateral_grace
        )


def _verify_snp_report(
    report: SnpReport,
    collateral: SnpCollateral,
    *,
    trust: TrustStore,
    now: datetime,
    collateral_grace: timedelta,
) -> SnpVerdict:
    # 1. Which key signed the report (ABI spec, signer info at 0x48, bits 4:2).
    if report.signing_key not in _KEY_NAMES:
        raise SignatureError(
            f"SNP report: SIGNING_KEY got {report.signing_key}, expected 0 (VCEK) or 1 (VLEK)"
        )
    signing_key = report.signing_key
    kind = _KEY_NAMES[signing_key]

    # 2. The certificate is a VCEK or VLEK as the report says (KDS spec extensions).
    key_cert = load_certificate(collateral.endorsement_key, f"{kind} certificate")
    ext = _read_extensions(key_cert)
    cert_kind = "VLEK" if ext.csp_id is not None else "VCEK"
    if (ext.hwid is None) == (ext.csp_id is None):
        raise CollateralError(
            "endorsement key certificate: expected exactly one of hwID (VCEK) and cspId (VLEK)"
        )
    if cert_kind != kind:
        raise CollateralError(
            f"endorsement key: report is signed by the {kind} "
            f"(SIGNING_KEY {signing_key}), certificate is a {cert_kind}"
        )

    # 3. Product from productName ("Milan-B0" for a VCEK, "Milan" for a VLEK), checked
    #    against CPUID when the report carries it (version 3 and later).
    product = ext.product_name.split("-", 1)[0]
    if product not in PRODUCTS:
        raise CollateralError(
            f"endorsement key productName: got {ext.product_name!r}, "
            f"expected one of {', '.join(PRODUCTS)}"
        )
    if report.cpuid_fam_id is not None and report.cpuid_mod_id is not None:
        cpuid_product = product_from_cpuid(report.cpuid_fam_id, report.cpuid_mod_id)
        if cpuid_product != product:
            raise CollateralError(
                f"product: report CPUID family {report.cpuid_fam_id:#x} model "
                f"{report.cpuid_mod_id:#x} gives {cpuid_product}, certificate gives {product}"
            )

    # 4. The root of trust: the pinned ARK of that product. Never one from the collateral.
    ark = trust.amd_arks.get(product)
    if ark is None:
        raise ChainError(f"no pinned AMD ARK for {product} in the trust store")

    # 5. ARK → ASK/ASVK → VCEK/VLEK, signatures and validity at `now`.
    intermediate = _pick_intermediate(collateral, product, signing_key)
    valid_from, valid_until = verify_endorsement_chain(
        key_cert, intermediate, ark, product=product, signing_key=signing_key, now=now
    )

    # 5b. Revocation (KDS spec, CRL): the ARK-signed CRL, when the collateral has one.
    crl_checked = collateral.crl is not None
    if collateral.crl is not None:
        this_update, next_update = check_amd_crl(
            collateral.crl,
            ark,
            ((intermediate, _common_name(intermediate.subject)), (key_cert, kind)),
            now=now,
            grace=collateral_grace,
        )
        valid_from, valid_until = max(valid_from, this_update), min(valid_until, next_update)

    # 6. REPORTED_TCB equals the certificate's TCB (compared before the signature so that a
    #    mismatch is reported as such; both checks must pass anyway).
    turin = product == "Turin"
    tcb = SnpTcb.from_raw(report.reported_tcb, turin=turin)
    mismatches = [
        f"{name}: got {got}, certificate {ext.spl.get(name)}"
        for name, got in tcb.components().items()
        if ext.spl.get(name) != got
    ]
    reserved = tcb.reserved_bytes(report.reported_tcb)
    expected_reserved = bytes(len(reserved)) if turin else bytes(ext.reserved_spl)
    if reserved != expected_reserved:
        mismatches.append(
            f"reserved bytes: got {reserved.hex()}, certificate {expected_reserved.hex()}"
        )
    if mismatches:
        raise TcbError(
            f"SNP REPORTED_TCB differs from the {kind} certificate: " + "; ".join(mismatches)
        )

    # 6b. TCB consistency (ABI spec, "TCB_VERSION" and SNP_SET_CONFIG): the firmware never
    #     reports a TCB above what it committed, nor commits one above what runs, so
    #     REPORTED_TCB <= COMMITTED_TCB <= CURRENT_TCB in every component.
    committed = SnpTcb.from_raw(report.committed_tcb, turin=turin)
    current = SnpTcb.from_raw(report.current_tcb, turin=turin)
    inconsistent = [
        f"{name}: reported {tcb.components()[name]}, committed {committed.components()[name]}, "
        f"current {current.components()[name]}"
        for name in tcb.components()
        if not tcb.components()[name] <= committed.components()[name] <= current.components()[name]
    ]
    if inconsistent:
        raise TcbError(
            "SNP TCB: got "
            + "; ".join(inconsistent)
            + ", expected reported <= committed <= current"
        )

    # 7. CHIP_ID equals hwID (VCEK only; Turin hwIDs are the first 8 bytes of CHIP_ID).
    chip_id_checked = False
    if signing_key == SigningKey.VCEK and not report.mask_chip_key:
        hwid = ext.hwid or b""
        expected_chip = hwid + bytes(len(report.chip_id) - len(hwid))
        if report.chip_id != expected_chip:
            raise CollateralError(f"chip_id: got {report.chip_id.hex()}, VCEK hwID {hwid.hex()}")
        chip_id_checked = True

    # 8. The report signature by the VCEK/VLEK (ABI spec, ECDSA P-384 with SHA-384).
    public_key = key_cert.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
        public_key.curve, ec.SECP384R1
    ):
        raise ChainError(f"{kind} certificate: public key is not ECDSA P-384")
    try:
        signature = encode_dss_signature(report.signature_r, report.signature_s)
        public_key.verify(signature, report.signed_bytes, ec.ECDSA(hashes.SHA384()))
    except (InvalidSignature, ValueError):
        raise SignatureError(f"SNP report signature does not verify with the {kind}") from None

    return SnpVerdict(
        product=product,
        signing_key=kind,
        reported_tcb=tcb,
        chip_id_checked=chip_id_checked,
        csp_id=ext.csp_id,
        valid_from=valid_from,
        valid_until=valid_until,
        crl_checked=crl_checked,
    )


# --- collateral loaders ---


def _as_bytes(value: Any, what: str) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise MalformedEvidenceError(
        f"SNP collateral {what}: got {type(value).__name__}, expected bytes"
    )


def snp_collateral_from_map(m: Mapping[str, Any]) -> SnpCollateral:
    """Build `SnpCollateral` from the CBOR map a veil server serves.

    Args:
        m: ``{"vcek": DER bytes}`` or ``{"vlek": DER bytes}``, optionally with
            ``"cert_chain"``: PEM (str or bytes) holding the ASK/ASVK, and ``"crl"``: AMD's
            CRL (DER bytes or PEM). Other keys are ignored.

    Raises:
        CollateralError: neither or both of "vcek" and "vlek".
        MalformedEvidenceError: a value of the wrong type.
    """
    present = [key for key in ("vcek", "vlek") if m.get(key) is not None]
    if len(present) != 1:
        raise CollateralError(
            f"SNP collateral: got keys {sorted(m)}, expected exactly one of 'vcek' and 'vlek'"
        )
    chain = m.get("cert_chain")
    if chain is not None and not isinstance(chain, str):
        chain = _as_bytes(chain, "cert_chain").decode("ascii", errors="replace")
    crl = m.get("crl")
    if isinstance(crl, str):
        crl = crl.encode("ascii", errors="replace")
    return SnpCollateral(
        endorsement_key=_as_bytes(m[present[0]], present[0]),
        intermediates_pem=chain or None,
        crl=None if crl is None else _as_bytes(crl, "crl"),
    )


def snp_collateral_from_certificates(blobs: Iterable[bytes]) -> SnpCollateral:
    """Build `SnpCollateral` from certificate files (DER or PEM, any order).

    The one certificate whose subject is "SEV-VCEK" or "SEV-VLEK" is the endorsement key; the
    others become the intermediates (an ARK among them is ignored by the verifier). A CRL (PEM
    or DER) among the blobs becomes the collateral's CRL.

    Raises:
        CollateralError: no or several VCEK/VLEK certificates, or several CRLs.
        MalformedEvidenceError: a blob that holds neither a certificate nor a CRL.
    """
    certs: list[x509.Certificate] = []
    crls: list[bytes] = []
    for blob in blobs:
        if b"-----BEGIN X509 CRL-----" in blob:
            crls.append(blob)
        elif b"-----BEGIN" in blob:
            certs.extend(_load_pem_certificates(blob, "certificate file"))
        else:
            try:
                certs.append(load_certificate(blob, "certificate file"))
            except MalformedEvidenceError:
                load_crl(blob, "certificate file")  # neither: raises MalformedEvidenceError
                crls.append(blob)
    if len(crls) > 1:
        raise CollateralError(f"SNP certificates: got {len(crls)} CRLs, expected at most 1")
    leaves = [c for c in certs if _common_name(c.subject) in ("SEV-VCEK", "SEV-VLEK")]
    if len(leaves) != 1:
        raise CollateralError(
            f"SNP certificates: got {len(leaves)} VCEK/VLEK certificates, expected 1"
        )
    others = [c for c in certs if c is not leaves[0]]
    pem = "".join(c.public_bytes(Encoding.PEM).decode("ascii") for c in others)
    return SnpCollateral(
        endorsement_key=leaves[0].public_bytes(Encoding.DER),
        intermediates_pem=pem or None,
        crl=crls[0] if crls else None,
    )
