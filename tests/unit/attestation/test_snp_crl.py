"""AMD's CRL in SEV-SNP appraisal: ARK-signed, current, and naming no certificate of the chain."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from snp_fake import NOW, FakeAmd, _rsa_key, build_report, make_crl

from veil.attestation.abi.snp import SnpTcb, parse_snp_report
from veil.attestation.claims import Platform
from veil.attestation.policy import Policy, SnpPolicy
from veil.attestation.verifier import verify_evidence
from veil.attestation.verify.snp import (
    SnpCollateral,
    SnpVerdict,
    snp_collateral_from_certificates,
    snp_collateral_from_map,
    verify_snp_report,
)
from veil.errors import (
    CollateralError,
    ExpiredError,
    MalformedEvidenceError,
    RevokedError,
    SignatureError,
)


@pytest.fixture(scope="module")
def amd() -> FakeAmd:
    return FakeAmd("Milan")


@pytest.fixture(scope="module")
def vcek(amd: FakeAmd) -> bytes:
    return amd.endorsement_key()


@pytest.fixture(scope="module")
def report(amd: FakeAmd) -> bytes:
    return build_report(key=amd.leaf_key)


def run(
    amd: FakeAmd,
    report: bytes,
    key: bytes,
    crl: bytes | None,
    *,
    now: datetime = NOW,
    grace: timedelta = timedelta(0),
) -> SnpVerdict:
    return verify_snp_report(
        parse_snp_report(report),
        SnpCollateral(key, amd.chain_pem(), crl),
        trust=amd.trust(),
        now=now,
        collateral_grace=grace,
    )


def test_clean_crl_is_checked_and_bounds_the_validity(
    amd: FakeAmd, report: bytes, vcek: bytes
) -> None:
    crl = make_crl(amd, [12345])
    verdict = run(amd, report, vcek, crl)
    assert verdict.crl_checked
    assert verdict.valid_until == NOW + timedelta(days=7)


def test_without_crl_nothing_is_claimed(amd: FakeAmd, report: bytes, vcek: bytes) -> None:
    assert not run(amd, report, vcek, None).crl_checked


def test_revoked_vcek_refused(amd: FakeAmd, report: bytes, vcek: bytes) -> None:
    crl = make_crl(amd, [amd.serial(vcek)])
    with pytest.raises(RevokedError, match=r"VCEK \(SEV-VCEK\): serial [0-9a-f]+ is on AMD's CRL"):
        run(amd, report, vcek, crl)


def test_revoked_ask_refused(amd: FakeAmd, report: bytes, vcek: bytes) -> None:
    crl = make_crl(amd, [amd.ask.serial_number])
    with pytest.raises(RevokedError, match=r"SEV-Milan \(SEV-Milan\): serial"):
        run(amd, report, vcek, crl)


def test_revoked_asvk_and_vlek_refused(amd: FakeAmd) -> None:
    vlek = amd.endorsement_key(vlek=True)
    report = build_report(signing_key=1, key=amd.leaf_key)
    assert run(amd, report, vlek, make_crl(amd)).crl_checked
    with pytest.raises(RevokedError, match=r"SEV-VLEK-Milan"):
        run(amd, report, vlek, make_crl(amd, [amd.asvk.serial_number]))
    with pytest.raises(RevokedError, match=r"VLEK \(SEV-VLEK\)"):
        run(amd, report, vlek, make_crl(amd, [amd.serial(vlek)]))


def test_crl_signed_by_another_key_refused(amd: FakeAmd, report: bytes, vcek: bytes) -> None:
    crl = make_crl(amd, signer=_rsa_key(2))
    with pytest.raises(SignatureError, match="AMD CRL: signature by the ARK does not verify"):
        run(amd, report, vcek, crl)


def test_crl_with_pkcs1_signature_refused(amd: FakeAmd, report: bytes, vcek: bytes) -> None:
    with pytest.raises(SignatureError, match="expected RSASSA-PSS with SHA-384"):
        run(amd, report, vcek, make_crl(amd, pss=False))


def test_crl_of_another_issuer_refused(amd: FakeAmd, report: bytes, vcek: bytes) -> None:
    issuer = r"AMD CRL: issuer got '.*CN=SEV-Milan', expected '.*CN=ARK-Milan'"
    with pytest.raises(CollateralError, match=issuer):
        run(amd, report, vcek, make_crl(amd, issuer="SEV-Milan"))


def test_crl_window_edges(amd: FakeAmd, report: bytes, vcek: bytes) -> None:
    next_update = NOW + timedelta(days=1)
    crl = make_crl(amd, this_update=NOW, next_update=next_update)
    assert run(amd, report, vcek, crl, now=next_update).crl_checked
    with pytest.raises(ExpiredError, match="AMD CRL: expired"):
        run(amd, report, vcek, crl, now=next_update + timedelta(seconds=1))
    with pytest.raises(ExpiredError, match="AMD CRL: not valid yet"):
        run(amd, report, vcek, crl, now=NOW - timedelta(seconds=1))


def test_grace_excuses_a_stale_crl_only(amd: FakeAmd, report: bytes, vcek: bytes) -> None:
    stale = make_crl(amd, this_update=NOW - timedelta(days=9), next_update=NOW - timedelta(days=2))
    assert run(amd, report, vcek, stale, grace=timedelta(days=3)).crl_checked
    with pytest.raises(ExpiredError, match="AMD CRL: expired"):
        run(amd, report, vcek, stale, grace=timedelta(days=1))
    # The grace period never excuses a certificate: an expired VCEK stays refused.
    expired_vcek = amd.endorsement_key(not_after=NOW - timedelta(hours=1))
    with pytest.raises(ExpiredError, match="VCEK"):
        run(amd, report, expired_vcek, make_crl(amd), grace=timedelta(days=30))


@pytest.mark.parametrize(
    "damage", [b"", b"\x30\x03\x02\x01\x00", b"-----BEGIN X509 CRL-----\nAA\n"]
)
def test_malformed_crl_is_typed(amd: FakeAmd, report: bytes, vcek: bytes, damage: bytes) -> None:
    with pytest.raises(MalformedEvidenceError, match="AMD CRL"):
        run(amd, report, vcek, damage)


def test_crl_with_flipped_version_is_typed(amd: FakeAmd, report: bytes, vcek: bytes) -> None:
    crl = bytearray(make_crl(amd, [1]))
    # TBSCertList starts with version INTEGER 1 (v2): 02 01 01 a few bytes in.
    at = crl.index(b"\x02\x01\x01")
    crl[at + 2] = 0x05
    with pytest.raises(MalformedEvidenceError, match="AMD CRL"):
        run(amd, report, vcek, bytes(crl))


def test_crl_from_map_and_files(amd: FakeAmd, vcek: bytes) -> None:
    crl = make_crl(amd)
    assert snp_collateral_from_map({"vcek": vcek, "crl": crl}).crl == crl
    pem = x509.load_der_x509_crl(crl).public_bytes(Encoding.PEM)
    assert snp_collateral_from_map({"vcek": vcek, "crl": pem.decode()}).crl == pem
    files = snp_collateral_from_certificates([vcek, amd.chain_pem().encode(), crl])
    assert files.crl == crl
    with pytest.raises(CollateralError, match="got 2 CRLs, expected at most 1"):
        snp_collateral_from_certificates([vcek, crl, pem])
    with pytest.raises(MalformedEvidenceError):
        snp_collateral_from_map({"vcek": vcek, "crl": 5})


def _policy(**kw: object) -> Policy:
    # The fake PKI's TCB (3, 0, 8, 115) is pinned: this test is about the CRL.
    return Policy(
        sev_snp=SnpPolicy(measurement=(bytes([0xAB]) * 48,), min_tcb=SnpTcb(3, 0, 8, 115), **kw)  # type: ignore[arg-type]
    )


def test_policy_require_crl(amd: FakeAmd, report: bytes, vcek: bytes) -> None:
    with_crl = SnpCollateral(vcek, amd.chain_pem(), make_crl(amd))
    without = SnpCollateral(vcek, amd.chain_pem())
    strict = _policy(require_crl=True)
    claims = verify_evidence(report, with_crl, policy=strict, trust=amd.trust(), now=NOW)
    assert claims.platform is Platform.SEV_SNP
    assert claims.details["amd_crl_checked"] == 1
    lenient = verify_evidence(report, without, policy=_policy(), trust=amd.trust(), now=NOW)
    assert lenient.details["amd_crl_checked"] == 0
    with pytest.raises(CollateralError, match=r"AMD CRL: got none .*sev_snp.require_crl"):
        verify_evidence(report, without, policy=strict, trust=amd.trust(), now=NOW)
    toml = Policy.from_toml(f'[sev_snp]\nmeasurement = ["{"ab" * 48}"]\nrequire_crl = true\n')
    assert toml.sev_snp is not None
    assert toml.sev_snp.require_crl
