"""Verification of Intel DCAP quotes (SGX v3, TDX v4/v5) against collateral and a pinned root.

`verify_dcap_quote` checks signatures, chains, CRLs and collateral and returns facts (TCB status,
advisories, validity window) in a `DcapVerdict`. It judges nothing about measurements or debug
mode: that is the policy's job. Spec references: Intel "SGX ECDSA Quote Library API" (quote v3),
"Intel TDX DCAP Quote Generation Library and Quote Verification Library" (quote v4/v5),
"SGX PCK Certificate and CRL Profile", and the PCS API v4 (TCB info v3, enclave identity v2).
"""

from __future__ import annotations

import hashlib
import hmac
import warnings
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from veil.attestation.abi.dcap import INTEL_QE_VENDOR_ID, Quote
from veil.attestation.abi.tdx import TdReportBody
from veil.attestation.trust import TrustStore, load_embedded_root
from veil.attestation.verify import tcb as tcbmod
from veil.attestation.verify.collateral import DcapCollateral
from veil.attestation.verify.x509util import (
    PckExtensions,
    Window,
    check_not_revoked,
    check_window,
    ecdsa_p256_public_key,
    load_crl,
    load_pem_chain,
    malformed_x509_as_typed,
    parse_pck_extensions,
    verify_chain,
    verify_crl,
    verify_ecdsa_raw,
)
from veil.errors import ChainError, CollateralError, HazmatWarning, SignatureError

__all__ = ["DcapVerdict", "hazmat_verify_quote_signatures", "verify_dcap_quote"]


@dataclass(frozen=True, slots=True)
class DcapVerdict:
    """What the collateral says about a quote whose every signature and chain verified.

    Attributes:
        tcb_status: Intel's combined status ("UpToDate", "SWHardeningNeeded",
            "ConfigurationNeeded", "ConfigurationAndSWHardeningNeeded", "OutOfDate",
            "OutOfDateConfigurationNeeded").
        advisory_ids: INTEL-SA advisories of the matched platform, TDX module and QE levels.
        valid_from, valid_until: the intersection of every certificate, CRL and collateral window.
        fmspc: the platform family from the PCK certificate.
        tcb_evaluation_data_number: from the TCB info.
        qe_tcb_status: the QE's own status from the QE identity.
        platform_tcb_status: the status of the matched TCB level before convergence.
        tdx_module_tcb_status: the TDX module identity level's status, or None.
        tcb_date: the matched TCB level's date.
        pck: the PCK certificate's SGX extension (TCB components, PCESVN, PCE-ID, SGX type).
    """

    tcb_status: str
    advisory_ids: tuple[str, ...]
    valid_from: datetime
    valid_until: datetime
    fmspc: bytes
    tcb_evaluation_data_number: int
    qe_tcb_status: str
    platform_tcb_status: str
    tdx_module_tcb_status: str | None
    tcb_date: datetime
    pck: PckExtensions


def _require_aware(now: datetime) -> None:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime (UTC)")


def _pck_chain(
    quote: Quote, fallback: str | None, trust: TrustStore, now: datetime
) -> tuple[list[x509.Certificate], Window]:
    pem: bytes | str | None = quote.pck_chain_pem if quote.pck_chain_pem is not None else fallback
    if pem is None:
        raise CollateralError(
            f"PCK certificate chain: got certification data type "
            f"{quote.certification_data_type} and none in the collateral, expected one"
        )
    chain, window = verify_chain(
        load_pem_chain(pem, "PCK chain"), trust.intel_root, now, "PCK chain"
    )
    if len(chain) != 3:
        raise ChainError(f"PCK chain: got {len(chain)} certificates, expected 3 (leaf, CA, root)")
    return chain, window


def _verify_quote_crypto(quote: Quote, pck_leaf: x509.Certificate) -> None:
    # QE report signed by the PCK key (SGX ECDSA quote spec, "Quote Signature Data Structure").
    verify_ecdsa_raw(
        pck_leaf.public_key(), quote.qe_report_signature, quote.qe_report.raw, "QE report"
    )
    # QE report data binds the attestation key: SHA-256(attestation key ‖ QE auth data) ‖ 0*32.
    expected = hashlib.sha256(quote.attestation_key + quote.qe_auth_data).digest()
    got = quote.qe_report.report_data
    if not hmac.compare_digest(got[:32], expected) or any(got[32:]):
        raise SignatureError(
            f"QE report data: got {got.hex()}, expected {expected.hex()} followed by zeros"
        )
    key = ecdsa_p256_public_key(quote.attestation_key, "attestation key")
    verify_ecdsa_raw(key, quote.signature, quote.signed_bytes, "quote")


def hazmat_verify_quote_signatures(
    quote: Quote, *, trust: TrustStore, now: datetime, pck_chain_pem: str | None = None
) -> PckExtensions:
    """Check only the PCK chain (no CRL), the QE report signature and binding, and the quote
    signature. Not a verdict: revocation, TCB and QE identity are NOT checked.

    Use it to inspect evidence for which no collateral is at hand; never to accept evidence.
    Returns the PCK certificate's SGX extension.
    """
    warnings.warn(
        "hazmat_verify_quote_signatures: no CRL, TCB info or QE identity was checked",
        HazmatWarning,
        stacklevel=2,
    )
    _require_aware(now)
    with malformed_x509_as_typed("PCK chain"):
        chain, _ = _pck_chain(quote, pck_chain_pem, trust, now)
        ext = parse_pck_extensions(chain[0])
        _verify_quote_crypto(quote, chain[0])
    return ext


# Intel signs TCB info and QE identities with one certificate issued directly by the root
# (PCS API v4, "TCB-Info-Issuer-Chain": TCB Signing certificate + Root CA).
INTEL_TCB_SIGNING_CN = "Intel SGX TCB Signing"


def _require_tcb_signer(chain: list[x509.Certificate], trust: TrustStore, what: str) -> None:
    """The signer must be Intel's TCB Signing identity, not any certificate under the root
    (a PCK CA is one too). Under veil's test and simulated roots, whose signers are named
    after their PKI, the name must end in "TCB Signing"; the shape is checked alike."""
    if len(chain) != 2:
        raise ChainError(
            f"{what} issuer chain: got {len(chain) - 1} certificate(s) below the root, "
            "expected the TCB Signing certificate issued directly by the root"
        )
    signer = chain[0]
    attrs = signer.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = str(attrs[0].value) if len(attrs) == 1 else ""
    production = trust.intel_root == load_embedded_root("intel_sgx_root_ca.pem")
    if cn != INTEL_TCB_SIGNING_CN if production else not cn.endswith("TCB Signing"):
        raise ChainError(
            f"{what} signer: got {signer.subject.rfc4514_string()!r}, "
            f"expected CN={INTEL_TCB_SIGNING_CN!r}"
        )
    try:
        bc = signer.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return
    if bc.ca:
        raise ChainError(f"{what} signer: got a CA certificate, expected an end entity")


def _verify_signed_json(
    text: str,
    signature: bytes,
    issuer_chain_pem: str,
    trust: TrustStore,
    root_crl: x509.CertificateRevocationList,
    now: datetime,
    what: str,
) -> Window:
    chain, window = verify_chain(
        load_pem_chain(issuer_chain_pem, f"{what} issuer chain"),
        trust.intel_root,
        now,
        f"{what} issuer chain",
    )
    _require_tcb_signer(chain, trust, what)
    for cert in chain[:-1]:
        check_not_revoked(cert, root_crl, f"{what} issuer chain")
    # The signature covers the exact JSON text as published; it is never re-serialised.
    verify_ecdsa_raw(chain[0].public_key(), signature, text.encode("utf-8"), what)
    return window


def verify_dcap_quote(
    quote: Quote,
    collateral: DcapCollateral,
    *,
    trust: TrustStore,
    now: datetime,
    collateral_grace: timedelta = timedelta(0),
) -> DcapVerdict:
    """Verify a parsed DCAP quote with its collateral; return the TCB facts.

    Args:
        quote: from `veil.attestation.abi.dcap.parse_quote`.
        collateral: the DCAP collateral for the quote's FMSPC and CA (see `collateral_source`).
        trust: the pinned roots; only ``trust.intel_root`` is used.
        now: the verification time, timezone-aware.
        collateral_grace: how long past its nextUpdate a CRL, the TCB info or the QE identity
            is still accepted. Certificates are never excused.

    Raises:
        ChainError / RevokedError: a chain does not reach the pinned root, or a cert is revoked.
        ExpiredError: a certificate, CRL or collateral item is not valid at `now`.
        SignatureError: a quote, QE report, collateral or CRL signature does not verify.
        CollateralError: collateral for another platform, FMSPC or TEE type.
        TcbError: the QE does not match its identity, or no TCB level matches.

    Example:
        >>> verdict = verify_dcap_quote(parse_quote(raw), collateral,
        ...                             trust=TrustStore.production(), now=now)  # doctest: +SKIP
        >>> verdict.tcb_status  # doctest: +SKIP
        'UpToDate'
    """
    # Steps (DCAP QVL order; "§" names the spec section each step follows):
    #  1. PCK chain (quote certification data type 5, else the collateral) to the pinned root.
    #     [SGX PCK Certificate and CRL Profile §1.3; quote spec "Certification Data"]
    #  2. Root CA CRL and PCK CRL: issuer, signature, thisUpdate/nextUpdate; revocation of every
    #     CA and of the PCK leaf. [PCK Certificate and CRL Profile §2]
    #  3. TCB info and QE identity: issuer chains to the pinned root, ECDSA over the exact JSON,
    #     issueDate/nextUpdate, FMSPC/PCE-ID equal the PCK's, id fits the TEE type.
    #     [PCS API v4 "TCB Info V3", "Enclave Identity V2"]
    #  4. QE report signature by the PCK leaf key. [quote spec "Quote Signature Data"]
    #  5. QE report data = SHA-256(attestation key ‖ QE auth data) ‖ zeros. [same]
    #  6. Quote signature over header ‖ body by the attestation key. [same]
    #  7. QE report against the QE identity (MRSIGNER, ISVPRODID, masked MISCSELECT and
    #     ATTRIBUTES) and the QE's TCB level. [QVL "Verify QE identity"]
    #  8. Platform TCB level: SGX components + PCESVN (+ TEE_TCB_SVN and TDX module identity for
    #     TDX); first match wins; converge with the module and QE statuses. [QVL TCB matching]
    #  9. Validity window: intersection of every certificate, CRL and collateral window.
    _require_aware(now)
    with malformed_x509_as_typed("DCAP collateral"):
        return _verify_dcap_quote(quote, collateral, trust, now, collateral_grace)


def _verify_dcap_quote(
    quote: Quote,
    collateral: DcapCollateral,
    trust: TrustStore,
    now: datetime,
    collateral_grace: timedelta,
) -> DcapVerdict:
    root = trust.intel_root

    # Step 1: PCK chain to the pinned root.
    pck_chain, window = _pck_chain(quote, collateral.pck_certificate_chain, trust, now)
    pck_leaf, pck_ca = pck_chain[0], pck_chain[1]
    pck = parse_pck_extensions(pck_leaf)

    # Step 2: CRLs and revocation.
    root_crl = load_crl(collateral.root_ca_crl, "root CA CRL")
    window = window.intersect(
        verify_crl(root_crl, root, now, "root CA CRL", grace=collateral_grace)
    )
    crl_chain, crl_chain_window = verify_chain(
        load_pem_chain(collateral.pck_crl_issuer_chain, "PCK CRL issuer chain"),
        root,
        now,
        "PCK CRL issuer chain",
    )
    window = window.intersect(crl_chain_window)
    if crl_chain[0].public_bytes(Encoding.DER) != pck_ca.public_bytes(Encoding.DER):
        raise CollateralError(
            f"PCK CRL issuer: got {crl_chain[0].subject.rfc4514_string()}, "
            f"expected the PCK's CA {pck_ca.subject.rfc4514_string()}"
        )
    pck_crl = load_crl(collateral.pck_crl, "PCK CRL")
    window = window.intersect(verify_crl(pck_crl, pck_ca, now, "PCK CRL", grace=collateral_grace))
    check_not_revoked(pck_ca, root_crl, "PCK CA")
    check_not_revoked(pck_leaf, pck_crl, "PCK leaf")

    # Step 3: TCB info and QE identity.
    window = window.intersect(
        _verify_signed_json(
            collateral.tcb_info,
            collateral.tcb_info_signature,
            collateral.tcb_info_issuer_chain,
            trust,
            root_crl,
            now,
            "TCB info",
        )
    )
    tcb_info = tcbmod.TcbInfo.from_json(collateral.tcb_info)
    tcb_window = Window(tcb_info.issue_date, tcb_info.next_update)
    check_window(tcb_window, now, "TCB info", grace=collateral_grace)
    window = window.intersect(tcb_window)
    expected_id = "TDX" if quote.is_tdx else "SGX"
    if tcb_info.id != expected_id:
        raise CollateralError(f"TCB info id: got {tcb_info.id!r}, expected {expected_id!r}")
    if tcb_info.fmspc != pck.fmspc:
        raise CollateralError(
            f"TCB info fmspc: got {tcb_info.fmspc.hex().upper()}, "
            f"expected the PCK's {pck.fmspc.hex().upper()}"
        )
    if tcb_info.pce_id != pck.pce_id:
        raise CollateralError(
            f"TCB info pceId: got {tcb_info.pce_id.hex()}, expected the PCK's {pck.pce_id.hex()}"
        )

    window = window.intersect(
        _verify_signed_json(
            collateral.qe_identity,
            collateral.qe_identity_signature,
            collateral.qe_identity_issuer_chain,
            trust,
            root_crl,
            now,
            "QE identity",
        )
    )
    qe_identity = tcbmod.QeIdentity.from_json(collateral.qe_identity)
    qe_window = Window(qe_identity.issue_date, qe_identity.next_update)
    check_window(qe_window, now, "QE identity", grace=collateral_grace)
    window = window.intersect(qe_window)
    expected_qe = "TD_QE" if quote.is_tdx else "QE"
    if qe_identity.id != expected_qe:
        raise CollateralError(f"QE identity id: got {qe_identity.id!r}, expected {expected_qe!r}")

    # Steps 4-6: QE report signature, attestation key binding, quote signature.
    _verify_quote_crypto(quote, pck_leaf)
    if quote.qe_vendor_id != INTEL_QE_VENDOR_ID:
        raise CollateralError(
            f"QE vendor id: got {quote.qe_vendor_id.hex()}, expected {INTEL_QE_VENDOR_ID.hex()}"
        )

    # Step 7: QE identity.
    qe_level = tcbmod.match_qe_identity(quote.qe_report, qe_identity)

    # Step 8: platform TCB level, TDX module, convergence.
    tee_tcb_svn = quote.body.tee_tcb_svn if isinstance(quote.body, TdReportBody) else None
    level = tcbmod.match_tcb_level(tcb_info, pck.tcb_components, pck.pcesvn, tee_tcb_svn)
    status = level.tcb_status
    advisories = list(level.advisory_ids)
    module_status = None
    if isinstance(quote.body, TdReportBody):
        module_level = tcbmod.match_tdx_module(tcb_info, quote.body)
        if module_level is not None:
            module_status = module_level.tcb_status
            status = tcbmod.converge_status(status, module_status)
            advisories += module_level.advisory_ids
    status = tcbmod.converge_status(status, qe_level.tcb_status)
    advisories += qe_level.advisory_ids

    # Step 9: the window in which this verdict holds (every item was checked against `now`).
    return DcapVerdict(
        tcb_status=status,
        advisory_ids=tuple(dict.fromkeys(advisories)),
        valid_from=window.not_before,
        valid_until=window.not_after,
        fmspc=pck.fmspc,
        tcb_evaluation_data_number=tcb_info.tcb_evaluation_data_number,
        qe_tcb_status=qe_level.tcb_status,
        platform_tcb_status=level.tcb_status,
        tdx_module_tcb_status=module_status,
        tcb_date=level.tcb_date,
        pck=pck,
    )
