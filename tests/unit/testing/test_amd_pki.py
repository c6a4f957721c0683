"""The AMD-shaped test PKI: VCEK/VLEK reports of every product verify with veil's production
verifier, and each rejection path (revocation, expiry, foreign ARK, forged signature, TCB
mismatch, debug, VMPL, chip ID) fails as it should."""

from __future__ import annotations

import warnings
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.utils import CryptographyDeprecationWarning

from veil.attestation.abi.snp import SnpTcb, parse_snp_report
from veil.attestation.policy import Policy, SnpPolicy
from veil.attestation.trust import TrustStore
from veil.attestation.verifier import verify_evidence
from veil.errors import (
    ChainError,
    CollateralError,
    ExpiredError,
    PolicyError,
    RevokedError,
    SignatureError,
    TcbError,
)
from veil.testing.amd_pki import CRL_LIFETIME, DEFAULT_TCB, AmdPki, derive_p384_key, tcb_raw
from veil.testing.intel_pki import IntelPki

NOW = datetime(2026, 3, 1, 12, tzinfo=UTC)
MEASUREMENT = bytes([0x4D]) * 48
REPORT_DATA = bytes(range(64))
_VECTORS = Path(__file__).parents[2] / "testdata/attestation-vectors/sev-snp/virtee-milan-vcek"
_INTEL_ROOT = IntelPki(now=NOW, seed=b"amd tests").root


@pytest.fixture(scope="module", params=["Milan", "Genoa", "Turin"])
def pki(request: pytest.FixtureRequest) -> AmdPki:
    return AmdPki(request.param, now=NOW, seed=b"test_amd_pki")


def _policy(pki: AmdPki) -> Policy:
    # Genoa and Turin have no default minimum TCB in veil: name the chip's own.
    return Policy(sev_snp=SnpPolicy(measurement=(MEASUREMENT,), min_tcb=DEFAULT_TCB[pki.product]))


def _trust(pki: AmdPki) -> TrustStore:
    return TrustStore(intel_root=_INTEL_ROOT, amd_arks={pki.product: pki.ark})


@pytest.mark.parametrize("version", [2, 3, 5])
def test_vcek_report_verifies(pki: AmdPki, version: int) -> None:
    chip = pki.chip()
    report = chip.report(REPORT_DATA, measurement=MEASUREMENT, version=version)
    claims = verify_evidence(
        report, chip.collateral(NOW), policy=_policy(pki), trust=_trust(pki), now=NOW
    )
    assert claims.report_data == REPORT_DATA
    assert claims.measurements["measurement"] == MEASUREMENT
    parsed = parse_snp_report(report)
    assert parsed.version == version
    assert parsed.vmpl == 0
    if version >= 3:
        assert parsed.cpuid_fam_id is not None


def test_vlek_report_verifies(pki: AmdPki) -> None:
    chip = pki.chip(vlek_csp_id="example-cloud")
    report = chip.report(REPORT_DATA, measurement=MEASUREMENT)
    claims = verify_evidence(
        report, chip.collateral(NOW), policy=_policy(pki), trust=_trust(pki), now=NOW
    )
    assert claims.details["signing_key"] == "VLEK"
    assert not any(parse_snp_report(report).chip_id)


def test_vcek_extensions_follow_the_kds_spec(pki: AmdPki) -> None:
    chip = pki.chip()
    cert = chip.endorsement_key.certificate
    oids = {e.oid.dotted_string: e.value for e in cert.extensions}
    hwid = oids["1.3.6.1.4.1.3704.1.4"]
    assert isinstance(hwid, x509.UnrecognizedExtension)
    assert hwid.value == chip.hwid
    assert len(chip.hwid) == (8 if pki.product == "Turin" else 64)
    assert ("1.3.6.1.4.1.3704.1.3.9" in oids) == (pki.product == "Turin")
    assert cert.signature_algorithm_oid == x509.SignatureAlgorithmOID.RSASSA_PSS
    names = [
        c.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
        for c in (cert, pki.ask, pki.ark)
    ]
    assert names == ["SEV-VCEK", f"SEV-{pki.product}", f"ARK-{pki.product}"]


def test_vcek_extensions_are_laid_out_as_amds() -> None:
    # AMD's own Milan VCEK (provenance: tests/testdata/attestation-vectors/README.md); its
    # serial number 0 makes cryptography warn on parsing.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        real = x509.load_der_x509_certificate((_VECTORS / "vcek_milan.der").read_bytes())
    ours = AmdPki("Milan", now=NOW, seed=b"test_amd_pki").chip().endorsement_key.certificate

    def layout(cert: x509.Certificate) -> list[tuple[str, int]]:
        # OID and DER tag of each extension value (INTEGER 02, IA5String 16, raw hwID bytes).
        values = [(e.oid.dotted_string, e.value) for e in cert.extensions]
        return [(oid, v.value[0]) for oid, v in values if isinstance(v, x509.UnrecognizedExtension)]

    assert [oid for oid, _ in layout(ours)] == [oid for oid, _ in layout(real)]
    assert [tag for _, tag in layout(ours)][:-1] == [tag for _, tag in layout(real)][:-1]
    assert ours.subject == real.subject


def test_tcb_layout_round_trips(pki: AmdPki) -> None:
    turin = pki.product == "Turin"
    tcb = SnpTcb(bootloader=9, tee=1, snp=22, microcode=213, fmc=4 if turin else None)
    assert SnpTcb.from_raw(tcb_raw(tcb), turin=turin) == tcb


def test_revoked_vcek_and_ask_are_reported_revoked() -> None:
    pki = AmdPki("Milan", now=NOW, seed=b"revocation")
    chip = pki.chip()
    report = chip.report(REPORT_DATA, measurement=MEASUREMENT)
    pki.revoke(chip.endorsement_key.serial_number)
    crl = x509.load_der_x509_crl(pki.crl(NOW))
    assert crl.get_revoked_certificate_by_serial_number(chip.endorsement_key.serial_number)
    with pytest.raises(RevokedError, match="VCEK"):
        verify_evidence(
            report, chip.collateral(NOW), policy=_policy(pki), trust=_trust(pki), now=NOW
        )
    pki.unrevoke(chip.endorsement_key.serial_number)
    pki.revoke(pki.ask.serial_number)
    with pytest.raises(RevokedError, match="SEV-Milan"):
        verify_evidence(
            report, chip.collateral(NOW), policy=_policy(pki), trust=_trust(pki), now=NOW
        )
    pki.unrevoke(pki.ask.serial_number)
    verify_evidence(report, chip.collateral(NOW), policy=_policy(pki), trust=_trust(pki), now=NOW)


def test_crl_expires_after_its_lifetime() -> None:
    pki = AmdPki("Genoa", now=NOW, seed=b"crl clock")
    chip = pki.chip()
    report = chip.report(REPORT_DATA, measurement=MEASUREMENT)
    collateral = chip.collateral(NOW)
    next_update = x509.load_der_x509_crl(collateral.crl or b"").next_update_utc
    assert next_update == NOW - timedelta(hours=1) + CRL_LIFETIME
    verify_evidence(report, collateral, policy=_policy(pki), trust=_trust(pki), now=next_update)
    with pytest.raises(ExpiredError, match="CRL"):
        verify_evidence(
            report,
            collateral,
            policy=_policy(pki),
            trust=_trust(pki),
            now=next_update + timedelta(seconds=1),
        )


def test_foreign_ark_is_refused(pki: AmdPki) -> None:
    foreign = AmdPki(pki.product, now=NOW, seed=b"someone else")
    chip = pki.chip()
    report = chip.report(REPORT_DATA, measurement=MEASUREMENT)
    with pytest.raises(ChainError):
        verify_evidence(
            report, chip.collateral(NOW), policy=_policy(pki), trust=_trust(foreign), now=NOW
        )


def test_forged_signature_is_refused(pki: AmdPki) -> None:
    chip = pki.chip()
    forged = chip.report(
        REPORT_DATA, measurement=MEASUREMENT, signing_key=derive_p384_key(b"x", "forger")
    )
    with pytest.raises(SignatureError):
        verify_evidence(
            forged, chip.collateral(NOW), policy=_policy(pki), trust=_trust(pki), now=NOW
        )


def test_reported_tcb_other_than_the_vcek_is_refused(pki: AmdPki) -> None:
    chip = pki.chip()
    newer = replace(chip.tcb, snp=chip.tcb.snp + 1)
    report = chip.report(REPORT_DATA, measurement=MEASUREMENT, reported_tcb=newer)
    with pytest.raises(TcbError, match="REPORTED_TCB"):
        verify_evidence(
            report, chip.collateral(NOW), policy=_policy(pki), trust=_trust(pki), now=NOW
        )


def test_chip_id_other_than_the_hwid_is_refused() -> None:
    pki = AmdPki("Milan", now=NOW, seed=b"chip id")
    chip = pki.chip()
    other = pki.chip(chip_id=bytes(range(64)))
    report = other.report(
        REPORT_DATA, measurement=MEASUREMENT, signing_key=chip.endorsement_key.key
    )
    with pytest.raises(CollateralError, match="chip_id"):
        verify_evidence(
            report, chip.collateral(NOW), policy=_policy(pki), trust=_trust(pki), now=NOW
        )


def test_debug_guest_is_refused_by_the_default_policy(pki: AmdPki) -> None:
    chip = pki.chip()
    report = chip.report(REPORT_DATA, measurement=MEASUREMENT, debug=True)
    assert parse_snp_report(report).policy.debug
    with pytest.raises(PolicyError, match="debug"):
        verify_evidence(
            report, chip.collateral(NOW), policy=_policy(pki), trust=_trust(pki), now=NOW
        )


def test_expired_vcek_is_refused() -> None:
    pki = AmdPki("Milan", now=NOW, seed=b"vcek clock")
    chip = pki.chip()
    report = chip.report(REPORT_DATA, measurement=MEASUREMENT)
    after = chip.endorsement_key.certificate.not_valid_after_utc + timedelta(seconds=1)
    with pytest.raises(ExpiredError, match="VCEK"):
        verify_evidence(
            report, chip.collateral(after), policy=_policy(pki), trust=_trust(pki), now=after
        )


def test_same_seed_same_keys() -> None:
    a = AmdPki("Milan", now=NOW, seed=b"same")
    b = AmdPki("Milan", now=NOW, seed=b"same")
    assert a.ark.tbs_certificate_bytes == b.ark.tbs_certificate_bytes
    assert a.chip().endorsement_key.serial_number == b.chip().endorsement_key.serial_number


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="product"):
        AmdPki("Naples", now=NOW)
    pki = AmdPki("Milan", now=NOW, seed=b"args")
    with pytest.raises(ValueError, match="hwid"):
        pki.vcek(bytes(8), pki.chip().tcb)
    with pytest.raises(ValueError, match="fmc"):
        pki.vcek(bytes(64), SnpTcb(bootloader=1, tee=1, snp=1, microcode=1, fmc=1))


def test_vmpl_other_than_zero_is_refused_by_the_default_policy(pki: AmdPki) -> None:
    chip = pki.chip()
    report = chip.report(REPORT_DATA, measurement=MEASUREMENT, vmpl=2)
    assert parse_snp_report(report).vmpl == 2
    with pytest.raises(PolicyError, match="vmpl: got 2"):
        verify_evidence(
            report, chip.collateral(NOW), policy=_policy(pki), trust=_trust(pki), now=NOW
        )


def test_committed_tcb_below_reported_is_refused(pki: AmdPki) -> None:
    chip = pki.chip()
    older = replace(chip.tcb, snp=chip.tcb.snp - 1)
    report = chip.report(REPORT_DATA, measurement=MEASUREMENT, committed_tcb=older)
    assert parse_snp_report(report).committed_tcb == tcb_raw(older)
    with pytest.raises(TcbError, match="committed"):
        verify_evidence(
            report, chip.collateral(NOW), policy=_policy(pki), trust=_trust(pki), now=NOW
        )


def test_report_fields_are_where_the_abi_puts_them(pki: AmdPki) -> None:
    chip = pki.chip()
    newer = replace(chip.tcb, microcode=chip.tcb.microcode + 1)
    report = chip.report(
        REPORT_DATA,
        measurement=MEASUREMENT,
        version=5,
        guest_svn=7,
        host_data=b"\x11" * 32,
        family_id=b"\x22" * 16,
        image_id=b"\x33" * 16,
        current_tcb=newer,
        launch_tcb=newer,
        mask_chip_id=True,
        mit_vectors=(5, 6),
        platform_info=0x1,
    )
    parsed = parse_snp_report(report)
    assert (parsed.version, parsed.guest_svn, parsed.platform_info) == (5, 7, 0x1)
    assert (parsed.host_data, parsed.family_id, parsed.image_id) == (
        b"\x11" * 32,
        b"\x22" * 16,
        b"\x33" * 16,
    )
    assert parsed.current_tcb == parsed.launch_tcb == tcb_raw(newer)
    assert parsed.reported_tcb == parsed.committed_tcb == tcb_raw(chip.tcb)
    assert parsed.mask_chip_key
    assert not any(parsed.chip_id)
    assert (parsed.launch_mit_vector, parsed.current_mit_vector) == (5, 6)
    claims = verify_evidence(
        report, chip.collateral(NOW), policy=_policy(pki), trust=_trust(pki), now=NOW
    )
    assert claims.report_data == REPORT_DATA


def test_collateral_without_crl(pki: AmdPki) -> None:
    collateral = pki.chip().collateral(NOW, with_crl=False)
    assert collateral.crl is None
    assert "BEGIN CERTIFICATE" in (collateral.intermediates_pem or "")


def test_report_arguments_are_checked() -> None:
    pki = AmdPki("Milan", now=NOW, seed=b"test_amd_pki")
    chip = pki.chip()
    with pytest.raises(ValueError, match="report_data"):
        chip.report(bytes(65), measurement=MEASUREMENT)
    with pytest.raises(ValueError, match="measurement"):
        chip.report(REPORT_DATA, measurement=bytes(32))
    with pytest.raises(ValueError, match="chip_id"):
        pki.chip(chip_id=bytes(8))
    with pytest.raises(ValueError, match="naive"):
        AmdPki("Milan", now=datetime(2026, 1, 1), seed=b"test_amd_pki")
