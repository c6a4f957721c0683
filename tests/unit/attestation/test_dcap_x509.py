"""Chains to a pinned root, CRL handling and the PCK certificate's SGX extension."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from dcap_fake import (
    END,
    NOW,
    SGX,
    START,
    FakeDcap,
    _cert,
    _pair,
    _tlv,
    crl,
    pem,
    sgx_extension_der,
)

from veil.attestation.verify.x509util import (
    check_not_revoked,
    ecdsa_p256_public_key,
    load_crl,
    load_pem_chain,
    parse_pck_extensions,
    verify_chain,
    verify_crl,
    verify_ecdsa_raw,
)
from veil.errors import (
    ChainError,
    CollateralError,
    ExpiredError,
    MalformedEvidenceError,
    RevokedError,
    SignatureError,
)


@pytest.fixture(scope="module")
def fake() -> FakeDcap:
    return FakeDcap()


def test_chain_with_and_without_root(fake: FakeDcap) -> None:
    c = fake.certs
    full, window = verify_chain([c["leaf"], c["ca"], c["root"]], c["root"], NOW, "t")
    assert full[-1] == c["root"]
    assert len(full) == 3
    assert (window.not_before, window.not_after) == (START, END)
    full2, _ = verify_chain([c["leaf"], c["ca"]], c["root"], NOW, "t")
    assert full2 == full


def test_chain_errors(fake: FakeDcap) -> None:
    c, k = fake.certs, fake.keys
    other = FakeDcap()
    with pytest.raises(ChainError, match="empty"):
        verify_chain([], c["root"], NOW, "t")
    with pytest.raises(ChainError, match="pinned"):
        verify_chain([c["leaf"], c["ca"], c["root"]], other.certs["root"], NOW, "t")
    with pytest.raises(ChainError, match="issuer"):
        verify_chain([c["leaf"], c["root"]], c["root"], NOW, "t")
    # A leaf posing as a CA.
    under_leaf = _cert("child", k["att"], c["leaf"], k["leaf"], ca=False)
    with pytest.raises(ChainError, match="ca got False"):
        verify_chain([under_leaf, c["leaf"], c["ca"]], c["root"], NOW, "t")
    with pytest.raises(ExpiredError, match="not valid yet"):
        verify_chain([c["leaf"], c["ca"]], c["root"], START - dt.timedelta(seconds=1), "t")
    with pytest.raises(ExpiredError, match="expired"):
        verify_chain([c["leaf"], c["ca"]], c["root"], END + dt.timedelta(seconds=1), "t")


def test_issuer_without_basic_constraints(fake: FakeDcap) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(x509.Name.from_rfc4514_string("CN=no bc"))
        .issuer_name(fake.certs["root"].subject)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(START)
        .not_valid_after(END)
        .sign(fake.keys["root"], hashes.SHA256())
    )
    leaf = _cert("leaf", fake.keys["att"], ca, key, ca=False)
    with pytest.raises(ChainError, match="basicConstraints"):
        verify_chain([leaf, ca], fake.certs["root"], NOW, "t")


def test_crl_checks(fake: FakeDcap) -> None:
    c, k = fake.certs, fake.keys
    good = load_crl(crl(c["ca"], k["ca"], [c["leaf"].serial_number]), "crl")
    window = verify_crl(good, c["ca"], NOW, "crl")
    assert window.not_before < NOW < window.not_after
    with pytest.raises(RevokedError, match="revoked"):
        check_not_revoked(c["leaf"], good, "leaf")
    with pytest.raises(CollateralError, match="CRL issuer"):
        check_not_revoked(c["ca"], good, "ca")
    with pytest.raises(CollateralError, match="issuer"):
        verify_crl(good, c["root"], NOW, "crl")
    forged = load_crl(crl(c["ca"], k["root"]), "crl")
    with pytest.raises(SignatureError):
        verify_crl(forged, c["ca"], NOW, "crl")
    with pytest.raises(ExpiredError):
        verify_crl(good, c["ca"], NOW + dt.timedelta(days=365), "crl")
    check_not_revoked(c["ca"], load_crl(crl(c["root"], k["root"]), "root"), "ca")


def test_crl_encodings(fake: FakeDcap) -> None:
    der = crl(fake.certs["ca"], fake.keys["ca"])
    pem_crl = x509.load_der_x509_crl(der).public_bytes(Encoding.PEM)
    for form in (der, pem_crl, der.hex().encode()):
        assert load_crl(form, "crl").public_bytes(Encoding.DER) == der
    for bad in (b"zz", b"\x30\x03abc", b"-----BEGIN X509 CRL-----\nxx\n-----END X509 CRL-----"):
        with pytest.raises(MalformedEvidenceError):
            load_crl(bad, "crl")


def test_pem_chain_loading(fake: FakeDcap) -> None:
    assert len(load_pem_chain(pem(fake.certs["leaf"], fake.certs["ca"]), "c")) == 2
    with pytest.raises(MalformedEvidenceError):
        load_pem_chain(b"garbage", "c")


def test_pck_extensions(fake: FakeDcap) -> None:
    ext = parse_pck_extensions(fake.certs["leaf"])
    assert ext.tcb_components == fake.components
    assert ext.pcesvn == 13
    assert ext.fmspc == fake.fmspc
    assert ext.pce_id == b"\0\0"
    assert ext.cpusvn == bytes(fake.components)
    assert ext.sgx_type == 0
    assert len(ext.ppid) == 16
    with pytest.raises(MalformedEvidenceError, match="missing"):
        parse_pck_extensions(fake.certs["ca"])


@pytest.mark.parametrize(
    "der",
    [
        b"\x30\x05\x30\x03\x06\x01",  # truncated
        b"\x04\x00",  # not a sequence
        b"\x30\x84\xff\xff\xff\xff",  # length beyond data
        b"\x30\x04\x30\x02\x06\x00",  # empty OID, no value
        b"\x30\x03\x04\x01\x00",  # member not a SEQUENCE
        b"\x30\x80\x00\x00",  # indefinite length
        b"\x30",  # no length
        _tlv(0x30, _pair(f"{SGX}.1", _tlv(0x04, b"x"))),  # TCB etc. missing
        _tlv(0x30, _pair(f"{SGX}.1", _tlv(0x04, b"x")) * 2),  # duplicate
        _tlv(0x30, _pair(f"{SGX}.2", _tlv(0x02, b"\x01"))),  # TCB not a SEQUENCE
        sgx_extension_der([1] * 16, 1, b"\x00" * 5),  # FMSPC too short
        b"\x30\x00\x30\x00",  # two top-level items
    ],
)
def test_pck_extension_garbage(fake: FakeDcap, der: bytes) -> None:
    ext = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.2.840.113741.1.13.1"), der)
    cert = _cert("leaf", fake.keys["leaf"], fake.certs["ca"], fake.keys["ca"], ca=False, extra=ext)
    with pytest.raises(MalformedEvidenceError):
        parse_pck_extensions(cert)


def test_raw_ecdsa(fake: FakeDcap) -> None:
    from dcap_fake import raw_sig

    key = fake.keys["att"]
    sig = raw_sig(key, b"msg")
    verify_ecdsa_raw(key.public_key(), sig, b"msg", "m")
    with pytest.raises(SignatureError):
        verify_ecdsa_raw(key.public_key(), sig, b"msh", "m")
    with pytest.raises(SignatureError, match="64"):
        verify_ecdsa_raw(key.public_key(), sig[:63], b"msg", "m")
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    with pytest.raises(SignatureError, match="P-256"):
        verify_ecdsa_raw(p384, sig, b"msg", "m")
    with pytest.raises(SignatureError, match="point"):
        ecdsa_p256_public_key(b"\x01" * 64, "k")
    with pytest.raises(MalformedEvidenceError):
        ecdsa_p256_public_key(b"\x01" * 63, "k")


def test_reissued_root_same_key_accepted(fake: FakeDcap) -> None:
    c, k = fake.certs, fake.keys
    again = _cert("Test SGX Root CA", k["root"], None, k["root"], ca=True)
    assert again.public_bytes(Encoding.DER) != c["root"].public_bytes(Encoding.DER)
    full, _ = verify_chain([c["leaf"], c["ca"], again], c["root"], NOW, "t")
    assert full[-1] == c["root"]


def test_pck_extension_not_unrecognized(fake: FakeDcap) -> None:
    # A certificate that carries the SGX OID is handled as raw bytes by cryptography; any other
    # decoded type would be a surprise and is refused, as is a non-CA leaf missing it.
    ext = x509.UnrecognizedExtension(
        x509.ObjectIdentifier(SGX), sgx_extension_der([1] * 16, 1, b"\0" * 6)
    )
    cert = _cert("leaf", fake.keys["leaf"], fake.certs["ca"], fake.keys["ca"], ca=False, extra=ext)
    assert parse_pck_extensions(cert).pcesvn == 1
