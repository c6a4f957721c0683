"""SEV-SNP verification on real reports (provenance: testdata/attestation-vectors/README.md)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.utils import CryptographyDeprecationWarning

from veil.attestation.abi.snp import SigningKey, SnpTcb, parse_snp_report
from veil.attestation.claims import Platform
from veil.attestation.policy import Policy, SnpPolicy
from veil.attestation.trust import TrustStore
from veil.attestation.verifier import verify_evidence
from veil.attestation.verify.snp import (
    SnpCollateral,
    SnpVerdict,
    load_amd_intermediate,
    load_certificate,
    snp_collateral_from_certificates,
    snp_collateral_from_map,
    verify_endorsement_chain,
    verify_snp_report,
)
from veil.errors import (
    ChainError,
    CollateralError,
    ExpiredError,
    MalformedEvidenceError,
    PolicyError,
    SignatureError,
    TcbError,
    UnsafePolicyWarning,
)

MILAN_NOW = datetime(2025, 1, 1, tzinfo=UTC)
VLEK_NOW = datetime(2025, 6, 1, tzinfo=UTC)
VLEK_NOT_BEFORE = datetime(2024, 12, 10, 22, 14, 21, tzinfo=UTC)
VLEK_NOT_AFTER = datetime(2025, 12, 10, 22, 14, 21, tzinfo=UTC)
ONE_S = timedelta(seconds=1)
VIRTEE_TCB = SnpTcb(bootloader=3, tee=0, snp=8, microcode=115)


@dataclass(frozen=True)
class Vector:
    report: bytes
    key: bytes
    chain: str | None
    now: datetime


@pytest.fixture(scope="module")
def production() -> TrustStore:
    return TrustStore.production()


@pytest.fixture(scope="module")
def virtee(vectors: Path) -> Vector:
    d = vectors / "sev-snp" / "virtee-milan-vcek"
    return Vector(
        bytes.fromhex((d / "report_milan.hex").read_text()),
        (d / "vcek_milan.der").read_bytes(),
        (d / "cert_chain_milan").read_text(),
        MILAN_NOW,
    )


@pytest.fixture(scope="module")
def debugpolicy(vectors: Path) -> Vector:
    d = vectors / "sev-snp" / "go-sev-guest-milan-vcek-debugpolicy"
    return Vector(
        (d / "attestation.bin").read_bytes(),
        (d / "vcek.testcer").read_bytes(),
        (d / "ask_ark_milan.pem").read_text(),
        MILAN_NOW,
    )


@pytest.fixture(scope="module")
def vlek(vectors: Path) -> Vector:
    d = vectors / "sev-snp" / "trustee-milan-vlek-v3"
    return Vector(
        (d / "test-vlek-report.bin").read_bytes(),
        (d / "test-vlek.der").read_bytes(),
        (d / "milan_ask_ark_asvk.pem").read_text(),
        VLEK_NOW,
    )


DEFAULT = "<the vector's own chain>"


def verify(
    v: Vector,
    trust: TrustStore,
    *,
    report: bytes | None = None,
    key: bytes | None = None,
    chain: str | None = DEFAULT,
    now: datetime | None = None,
) -> SnpVerdict:
    collateral = SnpCollateral(
        key if key is not None else v.key, v.chain if chain == DEFAULT else chain
    )
    return verify_snp_report(
        parse_snp_report(report if report is not None else v.report),
        collateral,
        trust=trust,
        now=now or v.now,
    )


def flip(data: bytes, offset: int, mask: int = 0x01) -> bytes:
    out = bytearray(data)
    out[offset] ^= mask
    return bytes(out)


# --- the three real vectors at their suggested times ---


def test_virtee_milan_vcek_accepted(virtee: Vector, production: TrustStore) -> None:
    verdict = verify(virtee, production)
    assert verdict.product == "Milan"
    assert verdict.signing_key == "VCEK"
    assert verdict.reported_tcb == SnpTcb(bootloader=3, tee=0, snp=8, microcode=115)
    assert verdict.chip_id_checked
    assert verdict.valid_from == datetime(2023, 4, 3, 19, 23, 43, tzinfo=UTC)
    assert verdict.valid_until == datetime(2030, 4, 3, 19, 23, 43, tzinfo=UTC)


def test_virtee_full_pipeline_with_pinned_measurement(virtee: Vector) -> None:
    report = parse_snp_report(virtee.report)
    # The 2023 report is below AMD's default minimum: the policy pins its own level.
    policy = Policy(
        sev_snp=SnpPolicy(measurement=(report.measurement,), vmpl=0, min_tcb=VIRTEE_TCB)
    )
    claims = verify_evidence(
        virtee.report, SnpCollateral(virtee.key), policy=policy, now=virtee.now
    )
    assert claims.tcb_status == "MeetsMinimum"
    assert claims.platform is Platform.SEV_SNP
    assert claims.measurements["measurement"].hex() == (
        "7a1e5c266c0108dbc9bb94fa926951320940915d0aafb42464bd88b579ea158d"
        "3e1a0dc39b2c60bd95b9c480cd81841f"
    )
    assert claims.report_data.hex().startswith("d447b55d197491bf")
    assert not claims.debug
    assert claims.tcb_status == "MeetsMinimum"
    assert claims.details["tcb_microcode"] == 115
    assert claims.details["chip_id_checked"] == 1
    assert not claims.simulated


def test_embedded_intermediates_used_without_chain(virtee: Vector, production: TrustStore) -> None:
    assert verify(virtee, production, chain=None).product == "Milan"


def test_debugpolicy_crypto_valid_but_debug_rejected(
    debugpolicy: Vector, production: TrustStore
) -> None:
    verdict = verify(debugpolicy, production)
    assert verdict.reported_tcb == SnpTcb(bootloader=2, tee=0, snp=5, microcode=68)
    assert verdict.chip_id_checked
    report = parse_snp_report(debugpolicy.report)
    assert report.policy.debug
    pinned = Policy(sev_snp=SnpPolicy(measurement=(report.measurement,)))
    with pytest.raises(PolicyError, match=r"debug: got True, expected False"):
        verify_evidence(
            debugpolicy.report,
            SnpCollateral(debugpolicy.key, debugpolicy.chain),
            policy=pinned,
            now=debugpolicy.now,
        )
    with pytest.warns(UnsafePolicyWarning):
        default = Policy.unsafe_unpinned()
    with pytest.raises(PolicyError, match=r"debug: got True"):
        verify_evidence(
            debugpolicy.report,
            SnpCollateral(debugpolicy.key, debugpolicy.chain),
            policy=default,
            now=debugpolicy.now,
        )


def test_vcek_serial_zero_loads_without_warning(debugpolicy: Vector) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cert = load_certificate(debugpolicy.key, "VCEK")
    assert cert.subject.rfc4514_string().startswith("CN=SEV-VCEK")
    # Our loader silences exactly cryptography's serial-number warning; the cert has serial 0.
    with pytest.warns(CryptographyDeprecationWarning, match="serial number"):
        x509.load_der_x509_certificate(debugpolicy.key)


def test_vlek_v3_accepted(vlek: Vector, production: TrustStore) -> None:
    verdict = verify(vlek, production)
    assert verdict.signing_key == "VLEK"
    assert verdict.product == "Milan"
    assert verdict.reported_tcb == SnpTcb(bootloader=4, tee=0, snp=24, microcode=217)
    assert not verdict.chip_id_checked
    assert verdict.csp_id == "CN=cc-us-east-2.amazonaws.com"
    assert (verdict.valid_from, verdict.valid_until) == (VLEK_NOT_BEFORE, VLEK_NOT_AFTER)
    report = parse_snp_report(vlek.report)
    assert (report.version, report.vmpl, report.signing_key) == (3, 1, SigningKey.VLEK)
    assert report.chip_id == bytes(64)


@pytest.mark.parametrize("now", [VLEK_NOT_BEFORE, VLEK_NOT_AFTER])
def test_vlek_valid_at_window_edges(vlek: Vector, production: TrustStore, now: datetime) -> None:
    assert verify(vlek, production, now=now).signing_key == "VLEK"


@pytest.mark.parametrize("now", [VLEK_NOT_AFTER + ONE_S, VLEK_NOT_BEFORE - ONE_S])
def test_vlek_outside_window_expired(vlek: Vector, production: TrustStore, now: datetime) -> None:
    with pytest.raises(ExpiredError, match=r"VLEK \(SEV-VLEK\): (expired|not valid yet) at"):
        verify(vlek, production, now=now)


def test_vlek_expiry_is_not_excused_by_the_collateral_grace(vlek: Vector) -> None:
    # The grace period is for stale collateral (a CRL past nextUpdate), never for an expired
    # signing certificate: one day after the VLEK's notAfter it is refused whatever the grace.
    report = parse_snp_report(vlek.report)
    later = VLEK_NOT_AFTER + timedelta(days=1)
    strict = Policy(sev_snp=SnpPolicy(measurement=(report.measurement,)))
    with pytest.raises(ExpiredError, match="2025-12-10T22:14:21"):
        verify_evidence(vlek.report, SnpCollateral(vlek.key), policy=strict, now=later)
    lenient = replace(strict, collateral_grace_period=timedelta(days=30))
    with pytest.raises(ExpiredError, match="VLEK"):
        verify_evidence(vlek.report, SnpCollateral(vlek.key), policy=lenient, now=later)


def test_vlek_against_ask_instead_of_asvk_fails(vlek: Vector, production: TrustStore) -> None:
    key = load_certificate(vlek.key, "VLEK")
    ask = load_amd_intermediate("amd_ask_milan.pem")
    asvk = load_amd_intermediate("amd_asvk_milan.pem")
    ark = production.amd_arks["Milan"]
    # The right intermediate works ...
    verify_endorsement_chain(
        key, asvk, ark, product="Milan", signing_key=SigningKey.VLEK, now=VLEK_NOW
    )
    # ... the ASK is refused for a VLEK, by name ...
    with pytest.raises(ChainError, match=r"VLEK intermediate: got 'SEV-Milan', expected"):
        verify_endorsement_chain(
            key, ask, ark, product="Milan", signing_key=SigningKey.VLEK, now=VLEK_NOW
        )
    # ... and a verifier that treats the VLEK as a VCEK (ASK) fails on the issuer.
    with pytest.raises(ChainError, match=r"VCEK: issuer got 'CN=SEV-VLEK-Milan,"):
        verify_endorsement_chain(
            key, ask, ark, product="Milan", signing_key=SigningKey.VCEK, now=VLEK_NOW
        )


def test_vlek_report_claiming_vcek_rejected(vlek: Vector, production: TrustStore) -> None:
    # signer_info 0x04 (VLEK) -> 0x00 (VCEK): the certificate is a VLEK, so it does not fit.
    with pytest.raises(CollateralError, match=r"signed by the VCEK.*certificate is a VLEK"):
        verify(vlek, production, report=flip(vlek.report, 0x48, 0x04))


def test_vcek_given_for_vlek_report_rejected(
    vlek: Vector, virtee: Vector, production: TrustStore
) -> None:
    with pytest.raises(CollateralError, match=r"signed by the VLEK.*certificate is a VCEK"):
        verify(vlek, production, key=virtee.key)


# --- one-byte mutations of the report ---

REPORT_MUTATIONS = [
    ("measurement", 0x90, SignatureError, "signature does not verify"),
    ("report_data", 0x50, SignatureError, "signature does not verify"),
    ("host_data", 0xC0, SignatureError, "signature does not verify"),
    ("policy_debug", 0x0A, SignatureError, "signature does not verify"),  # bit 19 -> 0x08 of byte 2
    ("policy_reserved_bit17", 0x0A, MalformedEvidenceError, "bit 17 got 0"),
    ("vmpl", 0x30, SignatureError, "signature does not verify"),
    ("reported_tcb_snp", 0x186, TcbError, r"snp: got 9, certificate 8"),
    ("reported_tcb_reserved", 0x183, TcbError, "reserved bytes"),
    ("current_tcb", 0x38, TcbError, r"reported 3, committed 3, current 2, expected reported <="),
    ("chip_id", 0x1A0, CollateralError, "chip_id: got d59554ec"),
    ("signature_r", 0x2A0, SignatureError, "signature does not verify"),
    ("signature_s", 0x2E8, SignatureError, "signature does not verify"),
    ("signature_reserved", 0x2A0 + 0x90, MalformedEvidenceError, "reserved bytes 0x330"),
    ("signature_algo", 0x34, MalformedEvidenceError, "signature algorithm got 0"),
    ("mbz_0x4c", 0x4C, MalformedEvidenceError, r"reserved bytes 0x04C\.\.0x04F"),
]


@pytest.mark.parametrize(
    ("field", "offset", "error", "message"),
    REPORT_MUTATIONS,
    ids=[m[0] for m in REPORT_MUTATIONS],
)
def test_report_mutation(
    virtee: Vector,
    production: TrustStore,
    field: str,
    offset: int,
    error: type[Exception],
    message: str,
) -> None:
    masks = {"policy_debug": 0x08, "policy_reserved_bit17": 0x02, "reported_tcb_snp": 0x01}
    mutated = flip(virtee.report, offset, masks.get(field, 0x01))
    with pytest.raises(error, match=message):
        verify(virtee, production, report=mutated)


def test_report_mutation_debug_through_verify_evidence(virtee: Vector) -> None:
    # Turning debug on (policy bit 19) breaks the signature; the report cannot lie about it.
    report = parse_snp_report(virtee.report)
    policy = Policy(sev_snp=SnpPolicy(measurement=(report.measurement,)))
    with pytest.raises(SignatureError):
        verify_evidence(
            flip(virtee.report, 0x0A, 0x08), SnpCollateral(virtee.key), policy=policy, now=MILAN_NOW
        )


# --- mutations of the certificates and the roots ---


def _mutate_der(der: bytes, offset_from_end: int) -> bytes:
    return flip(der, len(der) - offset_from_end)


def test_vcek_signature_mutation(virtee: Vector, production: TrustStore) -> None:
    # The last bytes of the DER are the issuer's RSA-PSS signature.
    with pytest.raises(ChainError, match=r"VCEK: signature by 'SEV-Milan' does not verify"):
        verify(virtee, production, key=_mutate_der(virtee.key, 5))


def test_vcek_tbs_mutation(virtee: Vector, production: TrustStore) -> None:
    # One byte of the hwID extension: the signed TBS changes, so the ASK signature fails
    # (the chain is checked before the chip ID is compared).
    chip_id = parse_snp_report(virtee.report).chip_id
    offset = virtee.key.index(chip_id) + 3
    with pytest.raises(ChainError, match=r"VCEK: signature by 'SEV-Milan' does not verify"):
        verify(virtee, production, key=flip(virtee.key, offset))


def test_vcek_garbage_is_malformed(virtee: Vector, production: TrustStore) -> None:
    with pytest.raises(MalformedEvidenceError, match=r"not a valid X\.509 certificate"):
        verify(virtee, production, key=virtee.key[:100])


def _pem(der: bytes) -> str:
    return load_certificate(der, "test").public_bytes(Encoding.PEM).decode()


def test_ask_signature_mutation(virtee: Vector, production: TrustStore) -> None:
    ask_der = load_amd_intermediate("amd_ask_milan.pem").public_bytes(Encoding.DER)
    chain = _pem(_mutate_der(ask_der, 7))
    with pytest.raises(ChainError, match=r"SEV-Milan: signature by 'ARK-Milan' does not verify"):
        verify(virtee, production, chain=chain)


def test_foreign_ark_rejected(virtee: Vector, production: TrustStore) -> None:
    # Pinning Genoa's ARK as "Milan": the Milan ASK does not chain to it.
    foreign = TrustStore(
        intel_root=production.intel_root, amd_arks={"Milan": production.amd_arks["Genoa"]}
    )
    with pytest.raises(ChainError, match=r"issuer got 'CN=ARK-Milan,.*', expected 'CN=ARK-Genoa,"):
        verify(virtee, foreign)


def test_same_name_foreign_ark_rejected(virtee: Vector, production: TrustStore) -> None:
    # A self-made root with ARK-Milan's exact name: names match, the signature does not.
    real = production.amd_arks["Milan"]
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    fake = (
        x509.CertificateBuilder()
        .subject_name(real.subject)
        .issuer_name(real.subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(real.not_valid_before_utc)
        .not_valid_after(real.not_valid_after_utc)
        .sign(key, hashes.SHA384())
    )
    foreign = TrustStore(intel_root=production.intel_root, amd_arks={"Milan": fake})
    with pytest.raises(ChainError, match=r"SEV-Milan: signature by 'ARK-Milan' does not verify"):
        verify(virtee, foreign)


def test_missing_ark_rejected(virtee: Vector, production: TrustStore) -> None:
    genoa_only = TrustStore(
        intel_root=production.intel_root, amd_arks={"Genoa": production.amd_arks["Genoa"]}
    )
    with pytest.raises(ChainError, match="no pinned AMD ARK for Milan"):
        verify(virtee, genoa_only)


def test_simulated_trust_store_has_no_amd_root(virtee: Vector) -> None:
    with pytest.raises(ChainError, match="no pinned AMD ARK"):
        verify(virtee, TrustStore.simulated_only())


def test_ark_in_collateral_is_ignored(virtee: Vector, production: TrustStore) -> None:
    # A chain holding another product's ARK changes nothing: roots come from the trust store.
    genoa_ark = production.amd_arks["Genoa"].public_bytes(Encoding.PEM).decode()
    assert verify(virtee, production, chain=genoa_ark + virtee.chain).product == "Milan"


def test_asvk_chain_for_vcek_falls_back_to_embedded_ask(
    virtee: Vector, vlek: Vector, production: TrustStore
) -> None:
    # The VLEK set's chain holds an ASVK and the ASK; the VCEK picks the ASK.
    assert verify(virtee, production, chain=vlek.chain).signing_key == "VCEK"


def test_tcb_mismatch_between_vectors(
    virtee: Vector, debugpolicy: Vector, production: TrustStore
) -> None:
    # The debugpolicy VCEK certifies TCB 2/0/5/68 (another chip); the virtee report has 3/0/8/115.
    with pytest.raises(
        TcbError, match=r"bootloader: got 3, certificate 2.*snp: got 8, certificate 5"
    ):
        verify(virtee, production, key=debugpolicy.key)


# --- collateral loaders on the real files ---


def test_collateral_from_map(vlek: Vector, production: TrustStore) -> None:
    collateral = snp_collateral_from_map({"vlek": vlek.key, "cert_chain": vlek.chain})
    assert collateral.intermediates_pem == vlek.chain
    verdict = verify_snp_report(
        parse_snp_report(vlek.report), collateral, trust=production, now=VLEK_NOW
    )
    assert verdict.signing_key == "VLEK"


def test_collateral_from_map_through_verify_evidence(virtee: Vector) -> None:
    report = parse_snp_report(virtee.report)
    policy = Policy(sev_snp=SnpPolicy(measurement=(report.measurement,), min_tcb=VIRTEE_TCB))
    claims = verify_evidence(
        virtee.report,
        {"vcek": virtee.key, "cert_chain": virtee.chain.encode()},
        policy=policy,
        now=MILAN_NOW,
    )
    assert claims.details["signing_key"] == "VCEK"


def test_collateral_from_certificates(debugpolicy: Vector) -> None:
    collateral = snp_collateral_from_certificates([debugpolicy.chain.encode(), debugpolicy.key])
    assert collateral.endorsement_key == debugpolicy.key
    assert collateral.intermediates_pem is not None
    assert collateral.intermediates_pem.count("BEGIN CERTIFICATE") == 2
    with pytest.raises(CollateralError, match="got 0 VCEK/VLEK certificates"):
        snp_collateral_from_certificates([debugpolicy.chain.encode()])
    with pytest.raises(CollateralError, match="got 2 VCEK/VLEK"):
        snp_collateral_from_certificates([debugpolicy.key, debugpolicy.key])
