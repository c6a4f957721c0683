"""SEV-SNP verification on a generated PKI: the paths no real vector reaches."""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from snp_fake import CHIP_ID, NOT_AFTER, NOW, FakeAmd, build_report, der_int, ext, make_cert, tcb

from veil.attestation.abi.snp import SigningKey, SnpTcb, parse_snp_report
from veil.attestation.verify.snp import (
    SnpCollateral,
    SnpVerdict,
    _der_value,
    product_from_cpuid,
    snp_collateral_from_map,
    verify_snp_report,
)
from veil.errors import (
    ChainError,
    CollateralError,
    ExpiredError,
    MalformedEvidenceError,
    SignatureError,
    TcbError,
)


@pytest.fixture(scope="module")
def milan() -> FakeAmd:
    return FakeAmd("Milan")


def run(amd: FakeAmd, report: bytes, key: bytes, chain: str | None = "") -> SnpVerdict:
    return verify_snp_report(
        parse_snp_report(report),
        SnpCollateral(key, amd.chain_pem() if chain == "" else chain),
        trust=amd.trust(),
        now=NOW,
    )


def test_fake_vcek_accepted(milan: FakeAmd) -> None:
    verdict = run(milan, build_report(key=milan.leaf_key), milan.endorsement_key())
    assert verdict.product == "Milan"
    assert verdict.chip_id_checked
    assert verdict.reported_tcb == SnpTcb(3, 0, 8, 115)
    assert verdict.valid_until == NOT_AFTER


def test_fake_chain_required_when_product_has_no_real_intermediate(milan: FakeAmd) -> None:
    # Without a chain the embedded (real) AMD ASK is used; it does not chain to the fake ARK.
    with pytest.raises(ChainError, match=r"SEV-Milan: issuer got 'CN=ARK-Milan,O=Advanced Micro"):
        run(milan, build_report(key=milan.leaf_key), milan.endorsement_key(), chain=None)


def test_tcb_mismatch_with_valid_signature(milan: FakeAmd) -> None:
    report = build_report(reported_tcb=tcb(3, 0, 9, 115), key=milan.leaf_key)
    with pytest.raises(TcbError, match="snp: got 9, certificate 8"):
        run(milan, report, milan.endorsement_key())


def test_reserved_tcb_bytes_follow_certificate_spl4_to_7(milan: FakeAmd) -> None:
    report = build_report(reported_tcb=tcb(3, 0, 8, 115) | (5 << 16), key=milan.leaf_key)
    with pytest.raises(TcbError, match="reserved bytes: got 05000000, certificate 00000000"):
        run(milan, report, milan.endorsement_key())
    key = milan.endorsement_key(spl={"1": 3, "2": 0, "3": 8, "8": 115, "4": 5})
    assert run(milan, report, key).reported_tcb.snp == 8


def test_missing_spl_extension(milan: FakeAmd) -> None:
    key = milan.endorsement_key(spl={"1": 3, "2": 0, "8": 115})
    with pytest.raises(
        CollateralError, match=r"extension snpSPL \(1\.3\.6\.1\.4\.1\.3704\.1\.3\.3\)"
    ):
        run(milan, build_report(key=milan.leaf_key), key)


def test_spl_out_of_range(milan: FakeAmd) -> None:
    key = milan.endorsement_key(spl={"1": 300, "2": 0, "3": 8, "8": 115})
    with pytest.raises(MalformedEvidenceError, match=r"blSPL: got 300, expected 0\.\.255"):
        run(milan, build_report(key=milan.leaf_key), key)


def test_masked_chip_id_skips_the_chip_check(milan: FakeAmd) -> None:
    report = build_report(mask_chip=True, key=milan.leaf_key)
    assert not run(milan, report, milan.endorsement_key()).chip_id_checked


def test_chip_id_mismatch_with_valid_signature(milan: FakeAmd) -> None:
    report = build_report(chip_id=bytes(64), key=milan.leaf_key)
    with pytest.raises(CollateralError, match=r"chip_id: got 0000.*VCEK hwID 000102"):
        run(milan, report, milan.endorsement_key())


def test_unsigned_report(milan: FakeAmd) -> None:
    with pytest.raises(SignatureError, match="SIGNING_KEY got 7"):
        run(milan, build_report(signing_key=SigningKey.NONE), milan.endorsement_key())


def test_signature_by_another_key(milan: FakeAmd) -> None:
    report = build_report(key=ec.generate_private_key(ec.SECP384R1()))
    with pytest.raises(SignatureError, match="does not verify with the VCEK"):
        run(milan, report, milan.endorsement_key())


def test_vcek_with_p256_key_refused(milan: FakeAmd) -> None:
    key = milan.endorsement_key(public_key=ec.generate_private_key(ec.SECP256R1()).public_key())
    with pytest.raises(ChainError, match="not ECDSA P-384"):
        run(milan, build_report(key=milan.leaf_key), key)


def test_vcek_signed_with_pkcs1_refused(milan: FakeAmd) -> None:
    key = milan.endorsement_key(pss=False)
    with pytest.raises(ChainError, match="not RSASSA-PSS with SHA-384"):
        run(milan, build_report(key=milan.leaf_key), key)


def test_vcek_expired(milan: FakeAmd) -> None:
    key = milan.endorsement_key(not_after=NOW - timedelta(seconds=1))
    with pytest.raises(ExpiredError, match=r"VCEK \(SEV-VCEK\)"):
        run(milan, build_report(key=milan.leaf_key), key)


def test_certificate_with_both_hwid_and_csp_id(milan: FakeAmd) -> None:
    both = milan.endorsement_key(extra=[ext("1.3.6.1.4.1.3704.1.5", b"\x16\x01x")])
    with pytest.raises(CollateralError, match="exactly one of hwID"):
        run(milan, build_report(key=milan.leaf_key), both)


def test_certificate_with_neither(milan: FakeAmd) -> None:
    with pytest.raises(CollateralError, match="exactly one of hwID"):
        run(milan, build_report(key=milan.leaf_key), milan.endorsement_key(hwid=None))


def test_unknown_product(milan: FakeAmd) -> None:
    key = milan.endorsement_key(product_name="Naples-B0")
    with pytest.raises(CollateralError, match="productName: got 'Naples-B0'"):
        run(milan, build_report(key=milan.leaf_key), key)


def test_cpuid_product_must_match_certificate(milan: FakeAmd) -> None:
    report = build_report(version=3, cpuid=(0x19, 0x11, 0x00), key=milan.leaf_key)
    with pytest.raises(CollateralError, match="gives Genoa, certificate gives Milan"):
        run(milan, report, milan.endorsement_key())
    ok = build_report(version=3, cpuid=(0x19, 0x01, 0x01), key=milan.leaf_key)
    assert run(milan, ok, milan.endorsement_key()).product == "Milan"


def test_vlek_on_fake_pki(milan: FakeAmd) -> None:
    report = build_report(signing_key=SigningKey.VLEK, chip_id=bytes(64), key=milan.leaf_key)
    verdict = run(milan, report, milan.endorsement_key(vlek=True))
    assert verdict.signing_key == "VLEK"
    assert verdict.csp_id == "CN=fake-csp"
    assert not verdict.chip_id_checked


def test_vlek_without_asvk_in_chain_uses_embedded_one_and_fails(milan: FakeAmd) -> None:
    report = build_report(signing_key=SigningKey.VLEK, chip_id=bytes(64), key=milan.leaf_key)
    ask_only = milan.ask.public_bytes(Encoding.PEM).decode()
    # The fake ASK is never used for a VLEK; the real ASVK does not chain to the fake ARK.
    with pytest.raises(ChainError):
        run(milan, report, milan.endorsement_key(vlek=True), chain=ask_only)


def test_intermediate_signed_by_another_root(milan: FakeAmd) -> None:
    other = FakeAmd("Milan", ark_key=milan.ask_key, ask_key=milan.ark_key)
    # Same names, but this ASK is signed by another key than the pinned ARK's.
    chain = other.ask.public_bytes(Encoding.PEM).decode()
    with pytest.raises(ChainError, match="SEV-Milan: signature by 'ARK-Milan' does not verify"):
        run(milan, build_report(key=milan.leaf_key), milan.endorsement_key(), chain=chain)


def test_expired_intermediate(milan: FakeAmd) -> None:
    old_ask = make_cert(
        "SEV-Milan",
        "ARK-Milan",
        milan.ask_key.public_key(),
        milan.ark_key,
        not_after=NOW - timedelta(days=1),
    )
    chain = old_ask.public_bytes(Encoding.PEM).decode()
    with pytest.raises(ExpiredError, match="SEV-Milan"):
        run(milan, build_report(key=milan.leaf_key), milan.endorsement_key(), chain=chain)


def test_turin_layout_and_short_hwid() -> None:
    turin = FakeAmd("Turin")
    raw_tcb = tcb(4, 1, 9, 77, fmc=2)
    spl = {"9": 2, "1": 4, "2": 1, "3": 9, "8": 77}
    key = turin.endorsement_key(spl=spl, hwid=CHIP_ID[:8])
    report = build_report(
        version=3,
        cpuid=(0x1A, 0x02, 0x01),
        reported_tcb=raw_tcb,
        chip_id=CHIP_ID[:8] + bytes(56),
        key=turin.leaf_key,
    )
    verdict = run(turin, report, key)
    assert verdict.product == "Turin"
    assert verdict.reported_tcb == SnpTcb(bootloader=4, tee=1, snp=9, microcode=77, fmc=2)
    assert verdict.chip_id_checked
    # A Turin report whose chip ID goes beyond the 8-byte hwID does not match.
    longer = build_report(
        version=3, cpuid=(0x1A, 0x02, 0x01), reported_tcb=raw_tcb, key=turin.leaf_key
    )
    with pytest.raises(CollateralError, match="chip_id"):
        run(turin, longer, key)
    # The FMC SPL is part of the comparison.
    wrong_fmc = turin.endorsement_key(spl={**spl, "9": 3}, hwid=CHIP_ID[:8])
    with pytest.raises(TcbError, match="fmc: got 2, certificate 3"):
        run(turin, report, wrong_fmc)


def test_genoa_vlek() -> None:
    genoa = FakeAmd("Genoa")
    report = build_report(
        version=3,
        cpuid=(0x19, 0xA0, 0x00),
        signing_key=SigningKey.VLEK,
        chip_id=bytes(64),
        key=genoa.leaf_key,
    )
    assert run(genoa, report, genoa.endorsement_key(vlek=True)).product == "Genoa"


@pytest.mark.parametrize(
    ("family", "model", "product"),
    [
        (0x19, 0x00, "Milan"),
        (0x19, 0x0F, "Milan"),
        (0x19, 0x10, "Genoa"),
        (0x19, 0x1F, "Genoa"),
        (0x19, 0xA0, "Genoa"),
        (0x19, 0x20, None),
        (0x1A, 0x02, "Turin"),
        (0x17, 0x31, None),
    ],
)
def test_product_from_cpuid(family: int, model: int, product: str | None) -> None:
    assert product_from_cpuid(family, model) == product


def test_collateral_map_errors() -> None:
    with pytest.raises(CollateralError, match="exactly one of 'vcek' and 'vlek'"):
        snp_collateral_from_map({})
    with pytest.raises(CollateralError, match="exactly one"):
        snp_collateral_from_map({"vcek": b"a", "vlek": b"b"})
    with pytest.raises(MalformedEvidenceError, match="vcek: got str, expected bytes"):
        snp_collateral_from_map({"vcek": "not bytes"})
    with pytest.raises(MalformedEvidenceError, match="cert_chain: got int"):
        snp_collateral_from_map({"vcek": b"x", "cert_chain": 5})
    collateral = snp_collateral_from_map({"vcek": bytearray(b"der"), "other": 1})
    assert collateral == SnpCollateral(b"der", None)
    assert "3 bytes" in repr(collateral)


def test_chain_without_certificates(milan: FakeAmd) -> None:
    with pytest.raises(MalformedEvidenceError, match="no PEM certificate"):
        run(milan, build_report(key=milan.leaf_key), milan.endorsement_key(), chain="junk")


def test_der_reader() -> None:
    assert _der_value(b"\x02\x01\x05", 0x02, "x") == b"\x05"
    assert _der_value(b"\x16\x81\x03abc", 0x16, "x") == b"abc"
    assert _der_value(b"\x04\x82\x00\x01z", 0x04, "x") == b"z"
    assert der_int(217) == b"\x02\x02\x00\xd9"
    for bad in (b"", b"\x02", b"\x16\x01\x05", b"\x02\x02\x05", b"\x02\x83\x00\x00\x01\x05"):
        with pytest.raises(MalformedEvidenceError, match="bad DER"):
            _der_value(bad, 0x02, "x")


def test_missing_product_name(milan: FakeAmd) -> None:
    key = milan.endorsement_key(omit_product_name=True)
    with pytest.raises(CollateralError, match="productName missing"):
        run(milan, build_report(key=milan.leaf_key), key)


def test_non_ascii_product_name(milan: FakeAmd) -> None:
    key = milan.endorsement_key(product_name="Mil\xe4n-B0")
    with pytest.raises(MalformedEvidenceError, match="productName: not ASCII"):
        run(milan, build_report(key=milan.leaf_key), key)


def test_intermediate_with_non_rsa_key(milan: FakeAmd) -> None:
    ec_ask = make_cert(
        "SEV-Milan",
        "ARK-Milan",
        ec.generate_private_key(ec.SECP384R1()).public_key(),
        milan.ark_key,
    )
    chain = ec_ask.public_bytes(Encoding.PEM).decode()
    with pytest.raises(ChainError, match="VCEK: issuer key is not RSA"):
        run(milan, build_report(key=milan.leaf_key), milan.endorsement_key(), chain=chain)


def test_embedded_intermediate_fingerprint_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    from veil.attestation.verify import snp as snp_module

    pins = dict(snp_module.AMD_INTERMEDIATE_FINGERPRINTS)
    pins["amd_ask_milan.pem"] = "00" * 32
    monkeypatch.setattr(snp_module, "AMD_INTERMEDIATE_FINGERPRINTS", pins)
    snp_module.load_amd_intermediate.cache_clear()
    try:
        with pytest.raises(ChainError, match="fingerprint got 67d303bd"):
            snp_module.load_amd_intermediate("amd_ask_milan.pem")
    finally:
        snp_module.load_amd_intermediate.cache_clear()


def test_all_embedded_intermediates_load() -> None:
    from veil.attestation.verify.snp import AMD_INTERMEDIATE_FINGERPRINTS, load_amd_intermediate

    for name in AMD_INTERMEDIATE_FINGERPRINTS:
        cert = load_amd_intermediate(name)
        kind = "SEV-VLEK-" if "asvk" in name else "SEV-"
        product = name.removesuffix(".pem").rsplit("_", 1)[1].capitalize()
        assert cert.subject.rfc4514_string().startswith(f"CN={kind}{product},")


def test_naive_now_refused(milan: FakeAmd) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        verify_snp_report(
            parse_snp_report(build_report(key=milan.leaf_key)),
            SnpCollateral(milan.endorsement_key(), milan.chain_pem()),
            trust=milan.trust(),
            now=NOW.replace(tzinfo=None),
        )


@pytest.mark.parametrize("hwid", [bytes(10), b"\x04\x0a" + bytes(10), b"\x04\x41" + bytes(65)])
def test_hwid_of_wrong_size(milan: FakeAmd, hwid: bytes) -> None:
    with pytest.raises(MalformedEvidenceError, match="hwID"):
        run(milan, build_report(key=milan.leaf_key), milan.endorsement_key(hwid=hwid))


def test_hwid_in_octet_string_wrapper(milan: FakeAmd) -> None:
    key = milan.endorsement_key(hwid=b"\x04\x40" + CHIP_ID)
    assert run(milan, build_report(key=milan.leaf_key), key).chip_id_checked
