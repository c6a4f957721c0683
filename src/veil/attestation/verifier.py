"""The one entry point that turns evidence bytes into `VerifiedEvidence`, or raises.

Every client (SDK, CLI, tests) calls `verify_evidence`. It detects the platform from the bytes,
parses (`abi`), verifies signatures, chains and collateral (`verify`), and applies the user's
`Policy`. Nothing of the evidence is returned unless all of that passed.

Example::

    from datetime import UTC, datetime
    from veil.attestation.policy import Policy, SnpPolicy
    from veil.attestation.verifier import verify_evidence
    from veil.attestation.verify.snp import SnpCollateral

    claims = verify_evidence(
        report_bytes,
        SnpCollateral(endorsement_key=vcek_der),
        policy=Policy(sev_snp=SnpPolicy(measurement=(expected_measurement,))),
        now=datetime(2025, 1, 1, tzinfo=UTC),
    )
    claims.report_data  # bound by the TEE; veil puts SHA-256(TLS certificate) in [:32]
"""

from __future__ import annotations

import struct
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any

from veil.attestation.abi.dcap import TEE_TYPE_SGX, TEE_TYPE_TDX, Quote, parse_quote
from veil.attestation.abi.sgx import SgxReportBody
from veil.attestation.abi.snp import SNP_REPORT_SIZE, SnpReport, SnpTcb, parse_snp_report
from veil.attestation.abi.tdx import TdReportBody
from veil.attestation.claims import AuthenticEvidence, Platform, VerifiedEvidence
from veil.attestation.collateral_source import collateral_from_blindai_map
from veil.attestation.policy import (
    AMD_MINIMUM_TCB_AS_OF,
    Policy,
    SnpMinimumTcb,
    minimum_snp_tcb,
    snp_tcb_status,
)
from veil.attestation.trust import TrustStore
from veil.attestation.verify.collateral import DcapCollateral
from veil.attestation.verify.dcap import DcapVerdict, verify_dcap_quote
from veil.attestation.verify.snp import (
    SnpCollateral,
    SnpVerdict,
    product_from_cpuid,
    snp_collateral_from_map,
    verify_snp_report,
)
from veil.errors import CollateralError, HazmatWarning, MalformedEvidenceError

__all__ = [
    "UnverifiedClaims",
    "detect_platform",
    "hazmat_verify_without_policy",
    "unverified_claims",
    "verify_evidence",
]

_DCAP_VERSIONS = (3, 4, 5)
_DCAP_ECDSA_P256 = 2

Collateral = DcapCollateral | SnpCollateral | Mapping[str, Any] | None


def detect_platform(evidence: bytes) -> Platform:
    """Tell which TEE produced `evidence` from its header.

    An Intel DCAP quote starts with version (3, 4 or 5), attestation key type 2 and the TEE
    type (0 = SGX, 0x81 = TDX). Otherwise a 1184-byte blob whose 32-bit version is 2 or more
    is an AMD SEV-SNP report. Nothing is verified here.

    Raises:
        MalformedEvidenceError: neither.
    """
    if len(evidence) >= 8:
        version, key_type, tee_type = struct.unpack_from("<HHI", evidence)
        if version in _DCAP_VERSIONS and key_type == _DCAP_ECDSA_P256:
            if tee_type == TEE_TYPE_SGX:
                return Platform.SGX
            if tee_type == TEE_TYPE_TDX:
                return Platform.TDX
    if len(evidence) == SNP_REPORT_SIZE and struct.unpack_from("<I", evidence)[0] >= 2:
        return Platform.SEV_SNP
    raise MalformedEvidenceError(
        f"evidence: {len(evidence)} bytes that are neither an Intel DCAP quote (SGX v3/v4, "
        f"TDX v4/v5) nor a {SNP_REPORT_SIZE}-byte AMD SEV-SNP report"
    )


# --- claims (shared by the verified and the unverified view) ---


@dataclass(frozen=True, slots=True)
class UnverifiedClaims:
    """What evidence CLAIMS, read without any verification. For display and diagnosis only:
    never base a trust decision on it; use `verify_evidence`."""

    platform: Platform
    report_data: bytes
    measurements: Mapping[str, bytes]
    debug: bool
    details: Mapping[str, int | bytes | str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "measurements", MappingProxyType(dict(self.measurements)))
        object.__setattr__(self, "details", MappingProxyType(dict(self.details)))


def _quote_claims(quote: Quote) -> UnverifiedClaims:
    body = quote.body
    details: dict[str, int | bytes | str] = {"quote_version": quote.version}
    if isinstance(body, SgxReportBody):
        details |= {
            "isv_prod_id": body.isv_prod_id,
            "isv_svn": body.isv_svn,
            "attributes": body.attributes,
            "miscselect": body.miscselect,
            "config_svn": body.config_svn,
            "cpu_svn": body.cpu_svn,
        }
        return UnverifiedClaims(
            platform=Platform.SGX,
            report_data=body.report_data,
            measurements={"mr_enclave": body.mr_enclave, "mr_signer": body.mr_signer},
            debug=body.debug,
            details=details,
        )
    if not isinstance(body, TdReportBody):  # pragma: no cover - parse_quote returns one of two
        raise MalformedEvidenceError("quote: unknown body type")
    details |= {
        "td_attributes": body.td_attributes,
        "xfam": body.xfam,
        "tee_tcb_svn": body.tee_tcb_svn,
        "seam_attributes": body.seam_attributes,
    }
    measurements = {
        "mr_td": body.mr_td,
        "mr_seam": body.mr_seam,
        "rtmr0": body.rtmr0,
        "rtmr1": body.rtmr1,
        "rtmr2": body.rtmr2,
        "rtmr3": body.rtmr3,
        "mr_config_id": body.mr_config_id,
        "mr_owner": body.mr_owner,
        "mr_owner_config": body.mr_owner_config,
    }
    return UnverifiedClaims(
        platform=Platform.TDX,
        report_data=body.report_data,
        measurements=measurements,
        debug=body.debug,
        details=details,
    )


def _tcb_details(tcb: SnpTcb) -> dict[str, int | bytes | str]:
    return {f"tcb_{name}": value for name, value in tcb.components().items()}


def _snp_claims(report: SnpReport, product: str | None) -> UnverifiedClaims:
    details: dict[str, int | bytes | str] = {
        "report_version": report.version,
        "guest_svn": report.guest_svn,
        "guest_policy": report.policy.raw,
        "vmpl": report.vmpl,
        "platform_info": report.platform_info,
        "family_id": report.family_id,
        "image_id": report.image_id,
        "report_id": report.report_id,
        "chip_id": report.chip_id,
        "reported_tcb": report.reported_tcb,
        "current_tcb": report.current_tcb,
        "committed_tcb": report.committed_tcb,
        "launch_tcb": report.launch_tcb,
        "signing_key": {0: "VCEK", 1: "VLEK"}.get(report.signing_key, "none"),
        "firmware": f"{report.current_major}.{report.current_minor}.{report.current_build}",
    }
    if product is not None:
        details["product"] = product
        details |= _tcb_details(SnpTcb.from_raw(report.reported_tcb, turin=product == "Turin"))
    return UnverifiedClaims(
        platform=Platform.SEV_SNP,
        report_data=report.report_data,
        measurements={
            "measurement": report.measurement,
            "host_data": report.host_data,
            "id_key_digest": report.id_key_digest,
            "author_key_digest": report.author_key_digest,
        },
        debug=report.debug,
        details=details,
    )


def unverified_claims(evidence: bytes) -> UnverifiedClaims:
    """Parse `evidence` and return what it claims, WITHOUT verifying anything.

    For showing why evidence was rejected. The SNP TCB components are decoded only when a
    version 3+ report names its CPU (the layout depends on the product).

    Raises:
        MalformedEvidenceError: the bytes do not parse.
    """
    platform = detect_platform(evidence)
    if platform is Platform.SEV_SNP:
        report = parse_snp_report(evidence)
        product = None
        if report.cpuid_fam_id is not None and report.cpuid_mod_id is not None:
            product = product_from_cpuid(report.cpuid_fam_id, report.cpuid_mod_id)
        return _snp_claims(report, product)
    return _quote_claims(parse_quote(evidence))


# --- verification ---


def _snp_collateral(collateral: Collateral) -> SnpCollateral:
    if isinstance(collateral, SnpCollateral):
        return collateral
    if isinstance(collateral, DcapCollateral):
        raise CollateralError("collateral: got Intel DCAP collateral, expected SEV-SNP (VCEK/VLEK)")
    if collateral is None:
        raise CollateralError("collateral missing: an SEV-SNP report needs its VCEK or VLEK")
    return snp_collateral_from_map(collateral)


def _dcap_collateral(collateral: Collateral, platform: Platform) -> DcapCollateral:
    if isinstance(collateral, DcapCollateral):
        return collateral
    if isinstance(collateral, SnpCollateral):
        raise CollateralError(
            f"collateral: got SEV-SNP collateral, expected Intel DCAP for {platform.value}"
        )
    if collateral is None:
        raise CollateralError(
            f"collateral missing: a {platform.value} quote needs TCB info, QE identity and CRLs"
        )
    return collateral_from_blindai_map(collateral)


def verify_evidence(
    evidence: bytes,
    collateral: Collateral,
    *,
    policy: Policy,
    trust: TrustStore | None = None,
    now: datetime | None = None,
) -> VerifiedEvidence:
    """Verify TEE evidence and check it against `policy`.

    Steps:

    1. Detect the platform from the bytes (`detect_platform`) and parse them.
    2. Verify: SGX/TDX with `verify_dcap_quote` (quote and QE signatures, PCK chain to the
       pinned Intel root, CRLs, TCB info, QE identity, TCB status); SEV-SNP with
       `verify_snp_report` (VCEK/VLEK chain to the pinned ARK, AMD CRL when given, TCB
       consistency, chip ID, signature). With a policy grace period, a CRL, TCB info or QE
       identity whose nextUpdate passed less than that long ago passes; certificates never do.
    3. Build the claims from the verified structures; for SEV-SNP, decide the TCB status
       against the policy's minimum for the product (`AMD_MINIMUM_TCB` by default).
    4. `policy.validate` them (measurements, debug, attributes, TCB status); only then
       return a `VerifiedEvidence`.

    Args:
        evidence: raw quote or report bytes.
        collateral: `DcapCollateral` (SGX/TDX), `SnpCollateral` (SEV-SNP), or the CBOR map a
            veil/BlindAI server serves (BlindAI collateral map; ``{"vcek"|"vlek", "cert_chain"}``).
        policy: what to accept.
        trust: the roots; `TrustStore.production()` by default. A simulated store marks the
            result ``simulated``.
        now: verification time, timezone-aware; the current time by default.

    Raises:
        MalformedEvidenceError, SignatureError, ChainError, RevokedError, CollateralError,
        ExpiredError, TcbError, PolicyError: the first check that failed.
    """
    # Steps 1-3.
    snp_min_tcb = policy.sev_snp.min_tcb if policy.sev_snp is not None else None
    authentic = _verify(
        evidence,
        collateral,
        trust=trust,
        now=now,
        collateral_grace_period=policy.collateral_grace_period,
        snp_min_tcb=snp_min_tcb,
    )
    # Step 4: the user's policy.
    policy.validate(authentic)
    return VerifiedEvidence(
        platform=authentic.platform,
        report_data=authentic.report_data,
        measurements=authentic.measurements,
        debug=authentic.debug,
        tcb_status=authentic.tcb_status,
        advisory_ids=authentic.advisory_ids,
        valid_from=authentic.valid_from,
        valid_until=authentic.valid_until,
        simulated=authentic.simulated,
        details=authentic.details,
    )


def hazmat_verify_without_policy(
    evidence: bytes,
    collateral: Collateral,
    *,
    trust: TrustStore | None = None,
    now: datetime | None = None,
    collateral_grace_period: timedelta = timedelta(0),
    snp_min_tcb: SnpMinimumTcb | None = None,
) -> AuthenticEvidence:
    """Steps 1-3 of `verify_evidence`: authenticity and collateral, NO policy. Warns.

    The result is an `AuthenticEvidence`, not a `VerifiedEvidence`: it says nothing about WHAT
    runs (measurements, debug and the TCB minimum are not checked). Call `Policy.validate` on
    it before trusting it; `verify_evidence` does both. Arguments as for `verify_evidence`;
    `snp_min_tcb` is the minimum the SEV-SNP `tcb_status` is computed against
    (`AMD_MINIMUM_TCB` when None).
    """
    warnings.warn(
        "hazmat_verify_without_policy: the evidence is authentic but NO policy was applied",
        HazmatWarning,
        stacklevel=2,
    )
    return _verify(
        evidence,
        collateral,
        trust=trust,
        now=now,
        collateral_grace_period=collateral_grace_period,
        snp_min_tcb=snp_min_tcb,
    )


def _verify(
    evidence: bytes,
    collateral: Collateral,
    *,
    trust: TrustStore | None,
    now: datetime | None,
    collateral_grace_period: timedelta,
    snp_min_tcb: SnpMinimumTcb | None,
) -> AuthenticEvidence:
    # Step 1: the injected context, platform detection and parsing.
    trust = TrustStore.production() if trust is None else trust
    now = datetime.now(UTC) if now is None else now
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")
    platform = detect_platform(evidence)

    verdict: SnpVerdict | DcapVerdict
    advisories: tuple[str, ...]
    if platform is Platform.SEV_SNP:
        report = parse_snp_report(evidence)
        snp_collateral = _snp_collateral(collateral)
        # Step 2 (SEV-SNP).
        snp = verify_snp_report(
            report,
            snp_collateral,
            trust=trust,
            now=now,
            collateral_grace=collateral_grace_period,
        )
        verdict = snp
        # Step 3: claims from the verified report.
        base = _snp_claims(report, snp.product)
        details = dict(base.details)
        details["signing_key"] = snp.signing_key
        details["chip_id_checked"] = int(snp.chip_id_checked)
        details["amd_crl_checked"] = int(snp.crl_checked)
        # The TCB decision: the verified REPORTED_TCB against the minimum for the product.
        minimum = minimum_snp_tcb(snp_min_tcb, snp.product)
        details["tcb_minimum"] = "none" if minimum is None else str(minimum)
        details["tcb_minimum_source"] = (
            f"AMD bulletins as of {AMD_MINIMUM_TCB_AS_OF}" if snp_min_tcb is None else "policy"
        )
        if snp.csp_id is not None:
            details["csp_id"] = snp.csp_id
        tcb_status, advisories = snp_tcb_status(snp.reported_tcb, minimum), ()
    else:
        quote = parse_quote(evidence)
        dcap_collateral = _dcap_collateral(collateral, platform)
        # Step 2 (SGX/TDX).
        dcap = verify_dcap_quote(
            quote,
            dcap_collateral,
            trust=trust,
            now=now,
            collateral_grace=collateral_grace_period,
        )
        verdict = dcap
        # Step 3: claims from the verified quote.
        base = _quote_claims(quote)
        details = dict(base.details)
        details |= {
            "fmspc": dcap.fmspc,
            "tcb_evaluation_data_number": dcap.tcb_evaluation_data_number,
            "qe_tcb_status": dcap.qe_tcb_status,
            "platform_tcb_status": dcap.platform_tcb_status,
            "tcb_date": dcap.tcb_date.isoformat(),
        }
        if dcap.tdx_module_tcb_status is not None:
            details["tdx_module_tcb_status"] = dcap.tdx_module_tcb_status
        tcb_status, advisories = dcap.tcb_status, dcap.advisory_ids

    return AuthenticEvidence(
        platform=platform,
        report_data=base.report_data,
        measurements=base.measurements,
        debug=base.debug,
        tcb_status=tcb_status,
        advisory_ids=tuple(advisories),
        valid_from=verdict.valid_from,
        valid_until=verdict.valid_until,
        simulated=trust.simulated,
        details=details,
    )
