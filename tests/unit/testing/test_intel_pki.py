"""The Intel-shaped test PKI: every artefact verifies with veil's production verifier, and each
rejection path (revocation, expiry, foreign root, tampering, TCB, debug) fails as it should."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509

from veil.attestation.abi.dcap import parse_quote
from veil.attestation.policy import Policy, SgxPolicy, TdxPolicy
from veil.attestation.trust import TrustStore
from veil.attestation.verifier import verify_evidence
from veil.attestation.verify.tcb import QeIdentity, TcbInfo
from veil.attestation.verify.x509util import parse_pck_extensions
from veil.errors import (
    ChainError,
    ExpiredError,
    PolicyError,
    RevokedError,
    SignatureError,
    TcbError,
)
from veil.testing.dcap_quote import td_report_body
from veil.testing.intel_pki import COLLATERAL_LIFETIME, IntelPki

NOW = datetime(2026, 3, 1, 12, tzinfo=UTC)
MR_ENCLAVE = bytes([0x5E]) * 32
MR_TD = bytes([0x7D]) * 48
REPORT_DATA = bytes(range(64))


@pytest.fixture(scope="module")
def pki() -> IntelPki:
    return IntelPki(now=NOW, seed=b"test_intel_pki")


def _trust(pki: IntelPki) -> TrustStore:
    return TrustStore(intel_root=pki.root)


def _sgx_policy(**kwargs: object) -> Policy:
    return Policy(sgx=SgxPolicy(mr_enclave=(MR_ENCLAVE,)), **kwargs)  # type: ignore[arg-type]


def _tdx_policy(**kwargs: object) -> Policy:
    return Policy(tdx=TdxPolicy(mr_td=(MR_TD,)), **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("ca", ["platform", "processor"])
def test_sgx_quote_verifies(pki: IntelPki, ca: str) -> None:
    sgx = pki.sgx_platform(ca=ca, label=f"sgx-{ca}")  # type: ignore[arg-type]
    quote = sgx.quote(REPORT_DATA, mr_enclave=MR_ENCLAVE)
    claims = verify_evidence(
        quote, sgx.collateral(NOW), policy=_sgx_policy(), trust=_trust(pki), now=NOW
    )
    assert claims.platform.value == "sgx"
    assert claims.report_data == REPORT_DATA
    assert claims.tcb_status == "UpToDate"
    parsed = parse_quote(quote)
    assert parsed.version == 3
    assert parsed.certification_data_type == 5


def test_tdx_quote_verifies(pki: IntelPki) -> None:
    tdx = pki.tdx_platform()
    quote = tdx.quote(REPORT_DATA, mr_td=MR_TD)
    claims = verify_evidence(
        quote, tdx.collateral(NOW), policy=_tdx_policy(), trust=_trust(pki), now=NOW
    )
    assert claims.platform.value == "tdx"
    assert claims.report_data == REPORT_DATA
    assert parse_quote(quote).version == 4


def test_tdx_quote_v5_with_a_td15_body_verifies(pki: IntelPki) -> None:
    tdx = pki.tdx_platform(label="td15")
    quote = tdx.quote(REPORT_DATA, mr_td=MR_TD, version=5)
    parsed = parse_quote(quote)
    assert parsed.version == 5
    assert parsed.body_type == 3
    claims = verify_evidence(
        quote, tdx.collateral(NOW), policy=_tdx_policy(), trust=_trust(pki), now=NOW
    )
    assert claims.report_data == REPORT_DATA
    v5_td10 = tdx.qe.tdx_quote(tdx.report_body(REPORT_DATA, mr_td=MR_TD), version=5)
    assert parse_quote(v5_td10).body_type == 2
    verify_evidence(v5_td10, tdx.collateral(NOW), policy=_tdx_policy(), trust=_trust(pki), now=NOW)
    with pytest.raises(ValueError, match="version"):
        tdx.qe.tdx_quote(tdx.report_body(REPORT_DATA, mr_td=MR_TD), version=3)
    with pytest.raises(ValueError, match="TD report body"):
        tdx.qe.tdx_quote(tdx.report_body(REPORT_DATA, mr_td=MR_TD, td15=True), version=4)


def test_tdx_module_major_zero_verifies(pki: IntelPki) -> None:
    tdx = pki.tdx_platform(tee_tcb_svn=bytes([3, 0, 3]) + bytes(13), label="tdx-major0")
    info = TcbInfo.from_json(pki.sign_json(tdx.tcb_info(NOW))[0])
    assert info.tdx_module_identities == ()
    quote = tdx.quote(REPORT_DATA, mr_td=MR_TD)
    verify_evidence(quote, tdx.collateral(NOW), policy=_tdx_policy(), trust=_trust(pki), now=NOW)


def test_pck_carries_the_sgx_extensions(pki: IntelPki) -> None:
    sgx = pki.sgx_platform(
        fmspc=bytes.fromhex("00A06F000000"), component_svns=(7,) * 16, pce_svn=9, label="ext"
    )
    ext = parse_pck_extensions(sgx.pck.leaf.certificate)
    assert ext.fmspc == bytes.fromhex("00A06F000000")
    assert ext.tcb_components == (7,) * 16
    assert ext.pcesvn == 9
    subjects = [
        c.subject.rfc4514_string()
        for c in (sgx.pck.leaf.certificate, sgx.pck.ca_certificate, pki.root)
    ]
    assert subjects == [
        "C=US,ST=CA,L=Santa Clara,O=Intel Corporation,CN=Intel SGX PCK Certificate",
        "C=US,ST=CA,L=Santa Clara,O=Intel Corporation,CN=Intel SGX PCK Platform CA",
        "C=US,ST=CA,L=Santa Clara,O=Intel Corporation,CN=Intel SGX Root CA",
    ]
    assert "CN=Intel SGX TCB Signing" in pki.tcb_signing.certificate.subject.rfc4514_string()


@pytest.mark.parametrize("status", ["SWHardeningNeeded", "OutOfDate", "ConfigurationNeeded"])
def test_tcb_status_is_what_the_tcb_info_says(pki: IntelPki, status: str) -> None:
    sgx = pki.sgx_platform(tcb_status=status, advisory_ids=("INTEL-SA-00615",), label=status)
    quote = sgx.quote(REPORT_DATA, mr_enclave=MR_ENCLAVE)
    policy = _sgx_policy(accepted_tcb_statuses=frozenset({status}))
    claims = verify_evidence(quote, sgx.collateral(NOW), policy=policy, trust=_trust(pki), now=NOW)
    assert claims.tcb_status == status
    assert "INTEL-SA-00615" in claims.advisory_ids
    with pytest.raises(TcbError, match=status):
        verify_evidence(
            quote, sgx.collateral(NOW), policy=_sgx_policy(), trust=_trust(pki), now=NOW
        )


def test_tdx_module_status_converges(pki: IntelPki) -> None:
    tdx = pki.tdx_platform(module_tcb_status="OutOfDate", label="tdx-module-old")
    quote = tdx.quote(REPORT_DATA, mr_td=MR_TD)
    policy = _tdx_policy(accepted_tcb_statuses=frozenset({"OutOfDate"}))
    claims = verify_evidence(quote, tdx.collateral(NOW), policy=policy, trust=_trust(pki), now=NOW)
    assert claims.tcb_status == "OutOfDate"


def test_collateral_lives_thirty_days_from_the_injected_clock(pki: IntelPki) -> None:
    sgx = pki.sgx_platform(label="clock")
    quote = sgx.quote(REPORT_DATA, mr_enclave=MR_ENCLAVE)
    collateral = sgx.collateral(NOW)
    info = TcbInfo.from_json(collateral.tcb_info)
    identity = QeIdentity.from_json(collateral.qe_identity)
    assert info.next_update - info.issue_date == COLLATERAL_LIFETIME
    assert identity.next_update - identity.issue_date == COLLATERAL_LIFETIME
    crl = x509.load_der_x509_crl(collateral.pck_crl)
    assert crl.next_update_utc == info.next_update
    last_valid = info.next_update
    verify_evidence(quote, collateral, policy=_sgx_policy(), trust=_trust(pki), now=last_valid)
    with pytest.raises(ExpiredError):
        verify_evidence(
            quote,
            collateral,
            policy=_sgx_policy(),
            trust=_trust(pki),
            now=last_valid + timedelta(seconds=1),
        )
    # Re-issued at the later time, the same platform is accepted again.
    later = NOW + timedelta(days=31)
    verify_evidence(
        quote, sgx.collateral(later), policy=_sgx_policy(), trust=_trust(pki), now=later
    )


def test_revoked_pck_is_reported_revoked() -> None:
    pki = IntelPki(now=NOW, seed=b"revocation")
    sgx = pki.sgx_platform()
    quote = sgx.quote(REPORT_DATA, mr_enclave=MR_ENCLAVE)
    pki.revoke(sgx.pck.leaf.serial_number)
    crl = x509.load_der_x509_crl(pki.pck_crl("platform", NOW))
    assert crl.get_revoked_certificate_by_serial_number(sgx.pck.leaf.serial_number) is not None
    with pytest.raises(RevokedError, match="PCK leaf"):
        verify_evidence(
            quote, sgx.collateral(NOW), policy=_sgx_policy(), trust=_trust(pki), now=NOW
        )
    pki.unrevoke(sgx.pck.leaf.serial_number)
    verify_evidence(quote, sgx.collateral(NOW), policy=_sgx_policy(), trust=_trust(pki), now=NOW)


def test_revoked_pck_ca_is_reported_revoked() -> None:
    pki = IntelPki(now=NOW, seed=b"ca-revocation")
    tdx = pki.tdx_platform(ca="processor")
    pki.revoke(pki.ca("processor").serial_number)
    quote = tdx.quote(REPORT_DATA, mr_td=MR_TD)
    with pytest.raises(RevokedError, match="PCK CA"):
        verify_evidence(
            quote, tdx.collateral(NOW), policy=_tdx_policy(), trust=_trust(pki), now=NOW
        )


def test_foreign_root_is_refused(pki: IntelPki) -> None:
    foreign = IntelPki(now=NOW, seed=b"someone else")
    sgx = pki.sgx_platform(label="foreign")
    quote = sgx.quote(REPORT_DATA, mr_enclave=MR_ENCLAVE)
    with pytest.raises(ChainError):
        verify_evidence(
            quote, sgx.collateral(NOW), policy=_sgx_policy(), trust=_trust(foreign), now=NOW
        )


def test_tampered_quote_fails_its_signature(pki: IntelPki) -> None:
    sgx = pki.sgx_platform(label="tamper")
    quote = bytearray(sgx.quote(REPORT_DATA, mr_enclave=MR_ENCLAVE))
    quote[48 + 320] ^= 1  # first byte of REPORTDATA
    with pytest.raises(SignatureError, match="quote"):
        verify_evidence(
            bytes(quote), sgx.collateral(NOW), policy=_sgx_policy(), trust=_trust(pki), now=NOW
        )


def test_debug_enclave_is_refused_by_the_default_policy(pki: IntelPki) -> None:
    sgx = pki.sgx_platform(label="debug")
    quote = sgx.quote(REPORT_DATA, mr_enclave=MR_ENCLAVE, debug=True)
    with pytest.raises(PolicyError, match="debug"):
        verify_evidence(
            quote, sgx.collateral(NOW), policy=_sgx_policy(), trust=_trust(pki), now=NOW
        )
    tdx = pki.tdx_platform(label="debug-td")
    with pytest.raises(PolicyError, match="debug"):
        verify_evidence(
            tdx.quote(REPORT_DATA, mr_td=MR_TD, debug=True),
            tdx.collateral(NOW),
            policy=_tdx_policy(),
            trust=_trust(pki),
            now=NOW,
        )


def test_tcb_below_every_level_is_refused(pki: IntelPki) -> None:
    sgx = pki.sgx_platform(component_svns=(0,) * 16, pce_svn=0, label="ancient")
    info = sgx.tcb_info(NOW)
    # A TCB info for a newer platform of the same FMSPC: the old PCK matches no level.
    info["tcbLevels"] = pki.sgx_platform(label="modern").tcb_levels(NOW)
    text, signature = pki.sign_json(info)
    collateral = sgx.collateral(NOW)
    mismatched = replace(collateral, tcb_info=text, tcb_info_signature=signature)
    with pytest.raises(TcbError, match="no matching TCB level"):
        verify_evidence(
            sgx.quote(REPORT_DATA, mr_enclave=MR_ENCLAVE),
            mismatched,
            policy=_sgx_policy(),
            trust=_trust(pki),
            now=NOW,
        )


def test_same_seed_same_pki() -> None:
    a = IntelPki(now=NOW, seed=b"same")
    b = IntelPki(now=NOW, seed=b"same")
    # ECDSA signatures are randomised; everything they sign is the same.
    assert a.root.tbs_certificate_bytes == b.root.tbs_certificate_bytes
    pa, pb = a.sgx_platform(), b.sgx_platform()
    assert pa.pck.leaf.serial_number == pb.pck.leaf.serial_number
    assert pa.qe.attestation_public_key == pb.qe.attestation_public_key
    assert IntelPki(now=NOW).root.public_key() != a.root.public_key()


def test_naive_clock_is_refused() -> None:
    with pytest.raises(ValueError, match="naive"):
        IntelPki(now=datetime(2026, 1, 1))


def test_bad_sizes_are_refused(pki: IntelPki) -> None:
    sgx = pki.sgx_platform(label="sizes")
    tdx = pki.tdx_platform(label="sizes-td")
    with pytest.raises(ValueError, match="report_data"):
        sgx.quote(bytes(65), mr_enclave=MR_ENCLAVE)
    with pytest.raises(ValueError, match="SGX report body"):
        sgx.quote(REPORT_DATA, mr_enclave=bytes(31))
    with pytest.raises(ValueError, match="SGX report body"):
        sgx.qe.sgx_quote(bytes(100))
    with pytest.raises(ValueError, match="TD report body"):
        sgx.qe.tdx_quote(bytes(100))
    with pytest.raises(ValueError, match="TD report body"):
        tdx.quote(REPORT_DATA, mr_td=bytes(32))
    with pytest.raises(ValueError, match="rtmrs"):
        tdx.quote(REPORT_DATA, mr_td=MR_TD, rtmrs=(bytes(48),))
    with pytest.raises(ValueError, match="both"):
        td_report_body(
            report_data=REPORT_DATA, mr_td=MR_TD, tee_tcb_svn=bytes(16), tee_tcb_svn2=bytes(16)
        )
    with pytest.raises(ValueError, match="648"):
        td_report_body(
            report_data=REPORT_DATA,
            mr_td=MR_TD,
            tee_tcb_svn=bytes(16),
            tee_tcb_svn2=bytes(16),
            mr_servicetd=bytes(8),
        )
    with pytest.raises(ValueError, match="tee_tcb_svn"):
        pki.tdx_platform(tee_tcb_svn=bytes(15), label="short")
    with pytest.raises(ValueError, match="mr_signer_seam"):
        pki.tdx_platform(mr_signer_seam=bytes(32), label="short-seam")


def test_platforms_and_chains(pki: IntelPki) -> None:
    sgx = pki.sgx_platform(label="listed")
    assert pki.platforms()["listed"] == sgx.pck
    collateral = sgx.collateral(NOW, with_pck_chain=False)
    assert collateral.pck_certificate_chain is None
    assert collateral.pck_crl_issuer_chain == pki.pck_crl_issuer_chain("platform")
    chain = x509.load_pem_x509_certificates(sgx.pck.chain_pem.encode())
    assert [c.serial_number for c in chain] == [
        sgx.pck.leaf.serial_number,
        pki.ca("platform").serial_number,
        pki.root.serial_number,
    ]
    # A TDX TCB info body without a module of its own gets Intel's all-zero module signer.
    info = pki.tcb_info(NOW, tee="TDX", fmspc=bytes(6), pce_id=bytes(2), tcb_levels=[])
    assert info["tdxModule"]["mrsigner"] == "00" * 48
    assert info["tdxModuleIdentities"] == []
