"""Findings of the verifier review, each pinned by a test that failed before its fix."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from dcap_fake import NOW, FakeDcap, _cert, pem
from snp_fake import NOW as SNP_NOW
from snp_fake import FakeAmd, build_report, tcb

from veil.attestation.abi.dcap import Quote, parse_quote
from veil.attestation.abi.snp import SnpTcb, parse_snp_report
from veil.attestation.collateral_source import collateral_from_dcap_qvl_json
from veil.attestation.policy import Policy, SgxPolicy, SnpPolicy
from veil.attestation.trust import TrustStore
from veil.attestation.verifier import verify_evidence
from veil.attestation.verify.collateral import DcapCollateral
from veil.attestation.verify.dcap import hazmat_verify_quote_signatures, verify_dcap_quote
from veil.attestation.verify.snp import SnpCollateral, verify_snp_report
from veil.attestation.verify.x509util import check_signature_bit_string
from veil.errors import (
    ChainError,
    ExpiredError,
    HazmatWarning,
    MalformedEvidenceError,
    TcbError,
)

SNP = "sev-snp/virtee-milan-vcek"
SGX = "sgx/dcap-qvl-sgx-v3"
SGX_AT = datetime(2025, 7, 1, tzinfo=UTC)


def _bit_string_at(der: bytes) -> int:
    """Offset of the unused-bits octet of the signatureValue of a certificate or CRL."""

    def header(pos: int) -> tuple[int, int]:
        length, start = der[pos + 1], pos + 2
        if length & 0x80:
            n = length & 0x7F
            length, start = int.from_bytes(der[start : start + n], "big"), start + n
        return start, length

    pos, _ = header(0)
    for _ in range(2):
        start, length = header(pos)
        pos = start + length
    start, _ = header(pos)
    return start


def _with_unused_bits(der: bytes, bits: int = 1) -> bytes:
    out = bytearray(der)
    out[_bit_string_at(der)] = bits
    return bytes(out)


def _sgx_vector(vectors: Path) -> tuple[Quote, DcapCollateral]:
    collateral = (vectors / SGX / "sgx_quote_collateral.json").read_text()
    return parse_quote((vectors / SGX / "sgx_quote").read_bytes()), collateral_from_dcap_qvl_json(
        collateral
    )


# --- DER malleability: a signature BIT STRING with unused bits ---


def test_vcek_with_unused_signature_bits_refused(vectors: Path) -> None:
    d = vectors / SNP
    report = parse_snp_report(bytes.fromhex((d / "report_milan.hex").read_text()))
    vcek = (d / "vcek_milan.der").read_bytes()
    check_signature_bit_string(vcek, "VCEK")
    # The padding bit is zero, so cryptography reads the same signature and it verifies:
    # a second encoding of a signed certificate, which an independent verifier rejects.
    with pytest.raises(MalformedEvidenceError, match="unused bits got 1, expected 0"):
        verify_snp_report(
            report,
            SnpCollateral(_with_unused_bits(vcek)),
            trust=TrustStore.production(),
            now=datetime(2025, 1, 1, tzinfo=UTC),
        )


def test_crl_with_unused_signature_bits_refused(vectors: Path) -> None:
    collateral = collateral_from_dcap_qvl_json(
        (vectors / SGX / "sgx_quote_collateral.json").read_text()
    )
    quote = parse_quote((vectors / SGX / "sgx_quote").read_bytes())
    verify_dcap_quote(quote, collateral, trust=TrustStore.production(), now=SGX_AT)
    damaged = dataclasses.replace(collateral, pck_crl=_with_unused_bits(collateral.pck_crl))
    with pytest.raises(MalformedEvidenceError, match="PCK CRL: signature BIT STRING unused bits"):
        verify_dcap_quote(quote, damaged, trust=TrustStore.production(), now=SGX_AT)


def test_issuer_chain_with_unused_signature_bits_refused() -> None:
    fake = FakeDcap()
    signer = fake.certs["tcb"]
    while signer.signature[-1] & 1:
        # A padding bit must be zero for cryptography to load the damaged encoding at all.
        signer = _cert(
            "Test SGX TCB Signing",
            fake.keys["tcb"],
            fake.certs["root"],
            fake.keys["root"],
            ca=False,
        )
    fake.certs["tcb"] = signer
    collateral = fake.collateral()
    bad = x509.load_der_x509_certificate(_with_unused_bits(signer.public_bytes(Encoding.DER)))
    damaged = dataclasses.replace(collateral, tcb_info_issuer_chain=pem(bad, fake.certs["root"]))
    verify_dcap_quote(parse_quote(fake.quote()), collateral, trust=fake.trust, now=NOW)
    with pytest.raises(MalformedEvidenceError, match="TCB info issuer chain: signature BIT"):
        verify_dcap_quote(parse_quote(fake.quote()), damaged, trust=fake.trust, now=NOW)


# --- errors from lazily parsed fields end in the hierarchy ---


def test_duplicate_extension_in_vcek_is_typed(vectors: Path) -> None:
    d = vectors / SNP
    report = parse_snp_report(bytes.fromhex((d / "report_milan.hex").read_text()))
    vcek = bytearray((d / "vcek_milan.der").read_bytes())
    # Turn the teeSPL OID (…3704.1.3.2) into a second blSPL (…3704.1.3.1): the certificate
    # loads, and cryptography raises ValueError("duplicate extension") on first access.
    tee = bytes.fromhex("2b060104019c78010302")
    at = bytes(vcek).index(tee)
    vcek[at + len(tee) - 1] = 0x01
    with pytest.raises(MalformedEvidenceError, match="malformed certificate or CRL"):
        verify_snp_report(
            report,
            SnpCollateral(bytes(vcek)),
            trust=TrustStore.production(),
            now=datetime(2025, 1, 1, tzinfo=UTC),
        )


def test_unknown_signature_hash_in_vcek_is_typed(vectors: Path) -> None:
    d = vectors / SNP
    report = parse_snp_report(bytes.fromhex((d / "report_milan.hex").read_text()))
    vcek = bytearray((d / "vcek_milan.der").read_bytes())
    # The outer signatureAlgorithm's RSASSA-PSS hashAlgorithm (SHA-384, 2.16.840.1.101.3.4.2.2)
    # becomes an unknown OID: cryptography raises UnsupportedAlgorithm when it is read.
    sha384 = bytes.fromhex("0609608648016503040202")
    hits = [i for i in range(len(vcek)) if bytes(vcek[i : i + len(sha384)]) == sha384]
    vcek[hits[-2] + len(sha384) - 1] = 0x7F
    with pytest.raises(MalformedEvidenceError, match="not recognized"):
        verify_snp_report(
            report,
            SnpCollateral(bytes(vcek)),
            trust=TrustStore.production(),
            now=datetime(2025, 1, 1, tzinfo=UTC),
        )


# --- the grace period excuses stale collateral, never an expired certificate ---


def _sgx_policy(grace: timedelta) -> Policy:
    return Policy(sgx=SgxPolicy(mr_enclave=(b"\xaa" * 32,)), collateral_grace_period=grace)


def test_grace_excuses_a_stale_pck_crl() -> None:
    fake = FakeDcap()
    stale = fake.collateral(crl_window=(NOW - timedelta(days=30), NOW - timedelta(hours=1)))
    quote = fake.quote()
    with pytest.raises(ExpiredError, match="PCK CRL: expired"):
        verify_evidence(quote, stale, policy=_sgx_policy(timedelta(0)), trust=fake.trust, now=NOW)
    claims = verify_evidence(
        quote, stale, policy=_sgx_policy(timedelta(hours=2)), trust=fake.trust, now=NOW
    )
    assert claims.valid_until == NOW - timedelta(hours=1)


def test_grace_never_excuses_an_expired_pck_certificate() -> None:
    fake = FakeDcap()
    fake.certs["leaf"] = _cert(
        "Test SGX PCK Certificate",
        fake.keys["leaf"],
        fake.certs["ca"],
        fake.keys["ca"],
        ca=False,
        extra=fake.certs["leaf"].extensions[1].value,
        not_after=NOW - timedelta(hours=1),
    )
    policy = _sgx_policy(timedelta(days=30))
    # Before the fix the whole verification re-ran at now - grace and passed.
    with pytest.raises(ExpiredError, match="PCK chain certificate 0"):
        verify_evidence(fake.quote(), fake.collateral(), policy=policy, trust=fake.trust, now=NOW)


# --- the TCB info / QE identity signer is Intel's TCB Signing certificate ---


def test_tcb_info_signed_under_a_pck_ca_refused(vectors: Path) -> None:
    collateral = collateral_from_dcap_qvl_json(
        (vectors / SGX / "sgx_quote_collateral.json").read_text()
    )
    quote = parse_quote((vectors / SGX / "sgx_quote").read_bytes())
    # The PCK Processor CA also chains to the Intel root; it is not the TCB signer.
    damaged = dataclasses.replace(collateral, tcb_info_issuer_chain=collateral.pck_crl_issuer_chain)
    with pytest.raises(
        ChainError,
        match=r"TCB info signer: got '.*Intel SGX PCK Processor CA.*', "
        r"expected CN='Intel SGX TCB Signing'",
    ):
        verify_dcap_quote(quote, damaged, trust=TrustStore.production(), now=SGX_AT)


def test_tcb_signer_under_a_test_root_is_named_tcb_signing() -> None:
    fake = FakeDcap()
    collateral = dataclasses.replace(
        fake.collateral(), tcb_info_issuer_chain=pem(fake.certs["ca"], fake.certs["root"])
    )
    with pytest.raises(ChainError, match=r"TCB info signer: got 'CN=Test SGX PCK Processor CA"):
        verify_dcap_quote(parse_quote(fake.quote()), collateral, trust=fake.trust, now=NOW)


def test_tcb_signer_must_sit_directly_under_the_root() -> None:
    fake = FakeDcap()
    deep = _cert(
        "Test SGX TCB Signing", fake.keys["tcb"], fake.certs["ca"], fake.keys["ca"], ca=False
    )
    collateral = dataclasses.replace(
        fake.collateral(), qe_identity_issuer_chain=pem(deep, fake.certs["ca"], fake.certs["root"])
    )
    with pytest.raises(ChainError, match="QE identity issuer chain: got 2 certificate"):
        verify_dcap_quote(parse_quote(fake.quote()), collateral, trust=fake.trust, now=NOW)
    ca_signer = _cert(
        "Test SGX TCB Signing", fake.keys["tcb"], fake.certs["root"], fake.keys["root"], ca=True
    )
    collateral = dataclasses.replace(
        fake.collateral(), tcb_info_issuer_chain=pem(ca_signer, fake.certs["root"])
    )
    with pytest.raises(ChainError, match="TCB info signer: got a CA certificate"):
        verify_dcap_quote(parse_quote(fake.quote()), collateral, trust=fake.trust, now=NOW)


# --- hazmat entry points warn ---


def test_hazmat_quote_signatures_warns() -> None:
    fake = FakeDcap()
    with pytest.warns(HazmatWarning, match="no CRL, TCB info or QE identity"):
        hazmat_verify_quote_signatures(parse_quote(fake.quote()), trust=fake.trust, now=NOW)


# --- SEV-SNP TCB consistency ---


@pytest.mark.parametrize(
    ("committed", "current", "message"),
    [
        (tcb(3, 0, 7, 115), tcb(3, 0, 8, 115), "snp: reported 8, committed 7, current 8"),
        (
            tcb(3, 0, 8, 115),
            tcb(3, 0, 8, 114),
            "microcode: reported 115, committed 115, current 114",
        ),
    ],
)
def test_snp_tcb_inconsistency_refused(committed: int, current: int, message: str) -> None:
    amd = FakeAmd("Milan")
    report = build_report(committed_tcb=committed, current_tcb=current, key=amd.leaf_key)
    with pytest.raises(TcbError, match=message):
        verify_snp_report(
            parse_snp_report(report),
            SnpCollateral(amd.endorsement_key(), amd.chain_pem()),
            trust=amd.trust(),
            now=SNP_NOW,
        )


def test_snp_newer_committed_and_current_accepted() -> None:
    amd = FakeAmd("Milan")
    report = build_report(
        committed_tcb=tcb(3, 0, 9, 116), current_tcb=tcb(4, 0, 9, 117), key=amd.leaf_key
    )
    policy = Policy(
        sev_snp=SnpPolicy(measurement=(bytes([0xAB]) * 48,), min_tcb=SnpTcb(3, 0, 8, 115))
    )
    claims = verify_evidence(
        report,
        SnpCollateral(amd.endorsement_key(), amd.chain_pem()),
        policy=policy,
        trust=amd.trust(),
        now=SNP_NOW,
    )
    assert claims.tcb_status == "MeetsMinimum"
