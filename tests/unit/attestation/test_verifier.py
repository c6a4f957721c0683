"""verify_evidence: platform detection, collateral dispatch, DCAP and SNP branches, grace period."""

from __future__ import annotations

import dataclasses
import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from veil.attestation.abi.snp import SnpTcb
from veil.attestation.claims import AuthenticEvidence, Platform, VerifiedEvidence
from veil.attestation.collateral_source import (
    collateral_from_dcap_qvl_json,
    collateral_to_blindai_map,
)
from veil.attestation.policy import Policy, SgxPolicy, SnpPolicy, TdxPolicy
from veil.attestation.trust import TrustStore
from veil.attestation.verifier import (
    detect_platform,
    hazmat_verify_without_policy,
    unverified_claims,
    verify_evidence,
)
from veil.attestation.verify.collateral import DcapCollateral
from veil.attestation.verify.snp import SnpCollateral
from veil.errors import (
    CollateralError,
    ExpiredError,
    HazmatWarning,
    MalformedEvidenceError,
    PolicyError,
    TcbError,
)

SGX_NOW = datetime(2025, 7, 1, tzinfo=UTC)
SGX_NOT_AFTER = datetime(2025, 7, 19, 10, 1, 18, tzinfo=UTC)  # QE identity nextUpdate
SGX_MR_ENCLAVE = bytes.fromhex("33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb")
TDX_MR_TD = bytes.fromhex(
    "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407"
    "de03ae6dc5f87f27428b2538873118b7"
)


@pytest.fixture(scope="module")
def sgx(vectors: Path) -> tuple[bytes, DcapCollateral]:
    d = vectors / "sgx/dcap-qvl-sgx-v3"
    return (d / "sgx_quote").read_bytes(), collateral_from_dcap_qvl_json(
        (d / "sgx_quote_collateral.json").read_text()
    )


@pytest.fixture(scope="module")
def tdx(vectors: Path) -> tuple[bytes, DcapCollateral]:
    d = vectors / "tdx/dcap-qvl-tdx-v4"
    return (d / "tdx_quote").read_bytes(), collateral_from_dcap_qvl_json(
        (d / "tdx_quote_collateral.json").read_text()
    )


@pytest.fixture(scope="module")
def snp(vectors: Path) -> tuple[bytes, SnpCollateral]:
    d = vectors / "sev-snp/virtee-milan-vcek"
    return (d / "derived/report_milan.bin").read_bytes(), SnpCollateral(
        (d / "vcek_milan.der").read_bytes()
    )


SGX_POLICY = Policy(
    sgx=SgxPolicy(mr_enclave=(SGX_MR_ENCLAVE,)),
    accepted_tcb_statuses=frozenset({"UpToDate", "ConfigurationAndSWHardeningNeeded"}),
    accepted_advisory_ids=frozenset({"INTEL-SA-00289", "INTEL-SA-00615"}),
)


# --- detection ---


@pytest.mark.parametrize(
    ("path", "platform"),
    [
        ("sgx/dcap-qvl-sgx-v3/sgx_quote", Platform.SGX),
        ("sgx/trustee-occlum-sgx-v3-debug/occlum_quote.dat", Platform.SGX),
        ("tdx/dcap-qvl-tdx-v4/tdx_quote", Platform.TDX),
        ("tdx/dcap-qvl-tdx-v5/tdx_quote_outdated", Platform.TDX),
        ("tdx/trustee-tdx-v4-debug/tdx_quote_4.dat", Platform.TDX),
        ("sev-snp/go-sev-guest-milan-vcek-debugpolicy/attestation.bin", Platform.SEV_SNP),
        ("sev-snp/virtee-milan-vcek/derived/report_milan.bin", Platform.SEV_SNP),
        ("sev-snp/trustee-milan-vlek-v3/test-vlek-report.bin", Platform.SEV_SNP),
    ],
)
def test_detect_platform(vectors: Path, path: str, platform: Platform) -> None:
    assert detect_platform((vectors / path).read_bytes()) is platform


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x03\x00\x02\x00",
        bytes(1184),  # version 0
        b"\x03\x00\x02\x00\x7f\x00\x00\x00" + bytes(1000),  # unknown TEE type
        b"\x02\x00\x00\x00" + bytes(100),  # SNP-like but too short
    ],
)
def test_detect_platform_refuses(data: bytes) -> None:
    with pytest.raises(MalformedEvidenceError, match="neither an Intel DCAP quote"):
        detect_platform(data)


# --- collateral dispatch ---


def test_missing_collateral(
    sgx: tuple[bytes, DcapCollateral], snp: tuple[bytes, SnpCollateral]
) -> None:
    with pytest.raises(CollateralError, match="collateral missing: a sgx quote"):
        verify_evidence(sgx[0], None, policy=SGX_POLICY, now=SGX_NOW)
    with pytest.raises(CollateralError, match="collateral missing: an SEV-SNP report"):
        verify_evidence(snp[0], None, policy=SGX_POLICY, now=SGX_NOW)


def test_collateral_for_another_platform(
    sgx: tuple[bytes, DcapCollateral], snp: tuple[bytes, SnpCollateral]
) -> None:
    with pytest.raises(CollateralError, match="got SEV-SNP collateral"):
        verify_evidence(sgx[0], snp[1], policy=SGX_POLICY, now=SGX_NOW)
    with pytest.raises(CollateralError, match="got Intel DCAP collateral"):
        verify_evidence(snp[0], sgx[1], policy=SGX_POLICY, now=SGX_NOW)


def test_naive_time_refused(sgx: tuple[bytes, DcapCollateral]) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        verify_evidence(sgx[0], sgx[1], policy=SGX_POLICY, now=datetime(2025, 7, 1))


# --- the DCAP branch ---


def test_sgx_accepted_with_named_status(sgx: tuple[bytes, DcapCollateral]) -> None:
    claims = verify_evidence(sgx[0], sgx[1], policy=SGX_POLICY, now=SGX_NOW)
    assert claims.platform is Platform.SGX
    assert claims.measurements["mr_enclave"] == SGX_MR_ENCLAVE
    assert claims.report_data.startswith(b"Hello, world!\x00")
    assert claims.tcb_status == "ConfigurationAndSWHardeningNeeded"
    assert claims.advisory_ids == ("INTEL-SA-00289", "INTEL-SA-00615")
    assert not claims.debug
    assert claims.details["isv_prod_id"] == 0
    assert claims.details["fmspc"] == bytes.fromhex("00A067110000")
    assert claims.details["tcb_evaluation_data_number"] == 17
    assert claims.details["qe_tcb_status"] == "UpToDate"
    assert claims.valid_until == SGX_NOT_AFTER


def test_sgx_default_status_refused(sgx: tuple[bytes, DcapCollateral]) -> None:
    strict = Policy(sgx=SgxPolicy(mr_enclave=(SGX_MR_ENCLAVE,)))
    with pytest.raises(TcbError, match="tcb_status: got ConfigurationAndSWHardeningNeeded"):
        verify_evidence(sgx[0], sgx[1], policy=strict, now=SGX_NOW)


def test_sgx_blindai_map_collateral(sgx: tuple[bytes, DcapCollateral]) -> None:
    claims = verify_evidence(
        sgx[0], collateral_to_blindai_map(sgx[1]), policy=SGX_POLICY, now=SGX_NOW
    )
    assert claims.tcb_status == "ConfigurationAndSWHardeningNeeded"


def test_sgx_wrong_measurement(sgx: tuple[bytes, DcapCollateral]) -> None:
    wrong = dataclasses.replace(SGX_POLICY, sgx=SgxPolicy(mr_enclave=(bytes(32),)))
    with pytest.raises(PolicyError, match=f"mr_enclave: got {SGX_MR_ENCLAVE.hex()}, expected"):
        verify_evidence(sgx[0], sgx[1], policy=wrong, now=SGX_NOW)


def test_sgx_expiry_and_grace(sgx: tuple[bytes, DcapCollateral]) -> None:
    later = SGX_NOT_AFTER + timedelta(seconds=1)
    verify_evidence(sgx[0], sgx[1], policy=SGX_POLICY, now=SGX_NOT_AFTER)
    with pytest.raises(ExpiredError):
        verify_evidence(sgx[0], sgx[1], policy=SGX_POLICY, now=later)
    grace = dataclasses.replace(SGX_POLICY, collateral_grace_period=timedelta(days=1))
    claims = verify_evidence(sgx[0], sgx[1], policy=grace, now=later)
    assert claims.valid_until == SGX_NOT_AFTER
    with pytest.raises(ExpiredError):
        verify_evidence(sgx[0], sgx[1], policy=grace, now=later + timedelta(days=1))


def test_sgx_min_evaluation_data_number(sgx: tuple[bytes, DcapCollateral]) -> None:
    fresh = dataclasses.replace(SGX_POLICY, min_tcb_evaluation_data_number=18)
    with pytest.raises(TcbError, match="tcb_evaluation_data_number: got 17, expected >= 18"):
        verify_evidence(sgx[0], sgx[1], policy=fresh, now=SGX_NOW)


def test_tdx_accepted(tdx: tuple[bytes, DcapCollateral]) -> None:
    policy = Policy(
        tdx=TdxPolicy(
            mr_td=(TDX_MR_TD,),
            rtmr3=bytes(48),
            td_attributes=bytes.fromhex("0000001000000000"),
            xfam=bytes.fromhex("e702060000000000"),
        )
    )
    claims = verify_evidence(tdx[0], tdx[1], policy=policy, now=SGX_NOW)
    assert claims.platform is Platform.TDX
    assert claims.tcb_status == "UpToDate"
    assert claims.measurements["rtmr0"].hex().startswith("44c0197b")
    assert claims.details["td_attributes"] == bytes.fromhex("0000001000000000")


def test_tdx_with_sgx_collateral_fails(
    tdx: tuple[bytes, DcapCollateral], sgx: tuple[bytes, DcapCollateral]
) -> None:
    policy = Policy(tdx=TdxPolicy(mr_td=(TDX_MR_TD,)))
    with pytest.raises(CollateralError):
        verify_evidence(tdx[0], sgx[1], policy=policy, now=SGX_NOW)


def test_tdx_v5_no_matching_tcb_level(vectors: Path) -> None:
    d = vectors / "tdx/dcap-qvl-tdx-v5"
    collateral = collateral_from_dcap_qvl_json(
        (d / "tdx_quote_outdated_collateral.json").read_text()
    )
    policy = Policy(tdx=TdxPolicy(mr_td=(bytes(48),)))
    with pytest.raises(TcbError, match="no matching TCB level"):
        verify_evidence(
            (d / "tdx_quote_outdated").read_bytes(),
            collateral,
            policy=policy,
            now=datetime(2026, 3, 1, tzinfo=UTC),
        )


# --- the SNP branch and the hazmat split ---


def test_snp_through_verifier(snp: tuple[bytes, SnpCollateral]) -> None:
    at = datetime(2025, 1, 1, tzinfo=UTC)
    with pytest.warns(HazmatWarning, match="NO policy was applied"):
        authentic = hazmat_verify_without_policy(snp[0], snp[1], now=at)
    # Authentic, not verified: the type says no policy passed.
    assert isinstance(authentic, AuthenticEvidence)
    assert not isinstance(authentic, VerifiedEvidence)
    assert authentic.platform is Platform.SEV_SNP
    assert authentic.details["product"] == "Milan"
    assert authentic.details["guest_policy"] == 0x30000
    assert authentic.details["vmpl"] == 0
    # The virtee report (2023: bootloader 3, SNP 8, microcode 115) is below AMD's minimum.
    assert authentic.tcb_status == "BelowMinimum"
    assert authentic.details["tcb_minimum"] == "bootloader 4, tee 0, snp 24, microcode 219"
    measurement = authentic.measurements["measurement"]
    default = Policy(sev_snp=SnpPolicy(measurement=(measurement,)))
    with pytest.raises(TcbError, match=r"reported_tcb.snp: got 8, expected >= 24"):
        verify_evidence(snp[0], snp[1], policy=default, now=at)
    # A policy that pins the vector's own level accepts it, and says on what grounds.
    pinned = Policy(sev_snp=SnpPolicy(measurement=(measurement,), min_tcb=SnpTcb(3, 0, 8, 115)))
    claims = verify_evidence(snp[0], snp[1], policy=pinned, now=at)
    assert isinstance(claims, VerifiedEvidence)
    assert claims.tcb_status == "MeetsMinimum"
    assert claims.details["tcb_minimum_source"] == "policy"
    assert claims.measurements == authentic.measurements


def test_default_trust_and_clock(snp: tuple[bytes, SnpCollateral]) -> None:
    # Production roots and the real clock: the virtee VCEK is valid until 2030.
    with pytest.warns(HazmatWarning):
        claims = hazmat_verify_without_policy(snp[0], snp[1])
    assert not claims.simulated


# --- unverified claims ---


def test_unverified_claims(vectors: Path) -> None:
    sgx_debug = unverified_claims(
        (vectors / "sgx/trustee-occlum-sgx-v3-debug/occlum_quote.dat").read_bytes()
    )
    assert sgx_debug.debug
    assert sgx_debug.measurements["mr_enclave"].hex().startswith("8f173e46")
    tdx_debug = unverified_claims(
        (vectors / "tdx/trustee-tdx-v4-debug/tdx_quote_4.dat").read_bytes()
    )
    assert tdx_debug.debug
    assert tdx_debug.platform is Platform.TDX
    v2 = unverified_claims(
        (vectors / "sev-snp/go-sev-guest-milan-vcek-debugpolicy/attestation.bin").read_bytes()
    )
    assert v2.debug
    assert "product" not in v2.details  # a v2 report does not name its CPU
    v3 = unverified_claims(
        (vectors / "sev-snp/trustee-milan-vlek-v3/test-vlek-report.bin").read_bytes()
    )
    assert v3.details["product"] == "Milan"
    assert v3.details["tcb_snp"] == 24


# --- simulated evidence goes through the same code ---


def test_simulated_evidence(tmp_path: Path) -> None:
    from veil.errors import ChainError, SimulationModeWarning
    from veil.providers.simulated import SimulatedSgxProvider

    with pytest.warns(SimulationModeWarning):
        provider = SimulatedSgxProvider(tmp_path)
    report_data = hashlib.sha256(b"certificate").digest() + bytes(32)
    evidence = provider.evidence(report_data)
    policy = Policy(sgx=SgxPolicy(mr_enclave=(provider.mr_enclave,)))
    claims = verify_evidence(
        evidence.quote, evidence.collateral, policy=policy, trust=TrustStore.simulated_only()
    )
    assert claims.simulated
    assert claims.report_data == report_data
    with pytest.raises(ChainError):
        verify_evidence(evidence.quote, evidence.collateral, policy=policy)


def test_simulated_debug_enclave_rejected(tmp_path: Path) -> None:
    from veil.errors import SimulationModeWarning
    from veil.providers.simulated import SimulatedSgxProvider

    with pytest.warns(SimulationModeWarning):
        provider = SimulatedSgxProvider(tmp_path, debug=True)
    evidence = provider.evidence(bytes(64))
    policy = Policy(sgx=SgxPolicy(mr_enclave=(provider.mr_enclave,)))
    trust = TrustStore.simulated_only()
    with pytest.raises(PolicyError, match="debug: got True, expected False"):
        verify_evidence(evidence.quote, evidence.collateral, policy=policy, trust=trust)
    with pytest.warns(HazmatWarning):
        claims = hazmat_verify_without_policy(evidence.quote, evidence.collateral, trust=trust)
    assert claims.debug
    assert claims.details["attributes"][0] & 0x02  # type: ignore[index]
