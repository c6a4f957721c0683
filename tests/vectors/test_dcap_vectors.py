"""Intel DCAP verification on the real SGX/TDX vectors (see the vectors' README for provenance)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from veil.attestation.abi.dcap import Quote, parse_quote
from veil.attestation.abi.tdx import TdReportBody
from veil.attestation.collateral_source import (
    collateral_from_dcap_qvl_json,
    collateral_from_directory,
)
from veil.attestation.trust import TrustStore
from veil.attestation.verify.collateral import DcapCollateral
from veil.attestation.verify.dcap import (
    DcapVerdict,
    hazmat_verify_quote_signatures,
    verify_dcap_quote,
)
from veil.errors import (
    ChainError,
    CollateralError,
    ExpiredError,
    MalformedEvidenceError,
    SignatureError,
    TcbError,
)

# hazmat_verify_quote_signatures warns on every call (asserted in its own test below).
pytestmark = pytest.mark.filterwarnings("ignore::veil.errors.HazmatWarning")

UTC = dt.UTC
SECOND = dt.timedelta(seconds=1)


def t(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


@dataclasses.dataclass(frozen=True)
class FullSet:
    name: str
    quote: str
    collateral: str
    now: dt.datetime
    window: tuple[dt.datetime, dt.datetime]


SGX_V3 = FullSet(
    "sgx/dcap-qvl-sgx-v3",
    "sgx_quote",
    "sgx_quote_collateral.json",
    t("2025-07-01T00:00:00Z"),
    (t("2025-06-19T10:56:11Z"), t("2025-07-19T10:01:18Z")),
)
TDX_V4 = FullSet(
    "tdx/dcap-qvl-tdx-v4",
    "tdx_quote",
    "tdx_quote_collateral.json",
    t("2025-07-01T00:00:00Z"),
    (t("2025-06-19T10:32:27Z"), t("2025-07-19T10:00:35Z")),
)
TDX_V5 = FullSet(
    "tdx/dcap-qvl-tdx-v5",
    "tdx_quote_outdated",
    "tdx_quote_outdated_collateral.json",
    t("2026-03-01T00:00:00Z"),
    (t("2026-02-18T10:58:51Z"), t("2026-03-20T10:41:15Z")),
)
FULL_SETS = [SGX_V3, TDX_V4, TDX_V5]
ACCEPTED_SETS = [SGX_V3, TDX_V4]


@pytest.fixture(scope="module")
def trust() -> TrustStore:
    return TrustStore.production()


def load(vectors: Path, s: FullSet) -> tuple[bytes, DcapCollateral]:
    raw = (vectors / s.name / s.quote).read_bytes()
    coll = collateral_from_dcap_qvl_json((vectors / s.name / s.collateral).read_text())
    return raw, coll


def verify(raw: bytes, coll: DcapCollateral, trust: TrustStore, now: dt.datetime) -> DcapVerdict:
    return verify_dcap_quote(parse_quote(raw), coll, trust=trust, now=now)


# --- expected results at the suggested time ------------------------------------------------------


def test_sgx_v3_accepted_with_status(vectors: Path, trust: TrustStore) -> None:
    raw, coll = load(vectors, SGX_V3)
    verdict = verify(raw, coll, trust, SGX_V3.now)
    assert verdict.tcb_status == "ConfigurationAndSWHardeningNeeded"
    assert verdict.advisory_ids == ("INTEL-SA-00289", "INTEL-SA-00615")
    assert verdict.qe_tcb_status == "UpToDate"
    assert verdict.fmspc == bytes.fromhex("00A067110000")
    assert verdict.tcb_evaluation_data_number == 17
    assert verdict.tcb_date == t("2024-03-13T00:00:00Z")
    assert (verdict.valid_from, verdict.valid_until) == SGX_V3.window
    assert verdict.pck.pcesvn == 13
    assert verdict.pck.tcb_components[:6] == (11, 11, 2, 2, 255, 1)


def test_tdx_v4_accepted_up_to_date(vectors: Path, trust: TrustStore) -> None:
    raw, coll = load(vectors, TDX_V4)
    verdict = verify(raw, coll, trust, TDX_V4.now)
    assert verdict.tcb_status == "UpToDate"
    assert verdict.advisory_ids == ()
    assert verdict.qe_tcb_status == "UpToDate"
    assert verdict.tdx_module_tcb_status == "UpToDate"
    assert verdict.fmspc == bytes.fromhex("B0C06F000000")
    assert (verdict.valid_from, verdict.valid_until) == TDX_V4.window


def test_tdx_v5_signatures_ok_but_no_tcb_level(vectors: Path, trust: TrustStore) -> None:
    raw, coll = load(vectors, TDX_V5)
    quote = parse_quote(raw)
    # Every signature and the chain are fine ...
    ext = hazmat_verify_quote_signatures(quote, trust=trust, now=TDX_V5.now)
    assert ext.tcb_components[7] == 3
    # ... but component 8 is below every TCB level: a failure, never a status.
    with pytest.raises(TcbError, match="no matching TCB level"):
        verify_dcap_quote(quote, coll, trust=trust, now=TDX_V5.now)


def test_directory_form_gives_same_verdict(vectors: Path, trust: TrustStore) -> None:
    for s in ACCEPTED_SETS:
        raw, coll = load(vectors, s)
        from_dir = collateral_from_directory(vectors / s.name / "derived")
        assert verify(raw, from_dir, trust, s.now) == verify(raw, coll, trust, s.now)


def test_debug_sgx_quote_signatures_and_chain(vectors: Path, trust: TrustStore) -> None:
    raw = (vectors / "sgx/trustee-occlum-sgx-v3-debug/occlum_quote.dat").read_bytes()
    quote = parse_quote(raw)
    assert quote.body.debug is True
    assert quote.body.report_data.rstrip(b"\0") == b"test"
    ext = hazmat_verify_quote_signatures(quote, trust=trust, now=t("2025-06-01T00:00:00Z"))
    assert ext.fmspc == bytes.fromhex("00606A000000")
    # Collateral of another platform (Processor CA CRL, other FMSPC) is refused.
    _, coll = load(vectors, SGX_V3)
    with pytest.raises(CollateralError):
        verify_dcap_quote(quote, coll, trust=trust, now=SGX_V3.now)
    bad = bytearray(raw)
    bad[48 + 64] ^= 1  # MRENCLAVE
    with pytest.raises(SignatureError):
        hazmat_verify_quote_signatures(parse_quote(bytes(bad)), trust=trust, now=SGX_V3.now)


def test_debug_tdx_quote_signatures_and_chain(vectors: Path, trust: TrustStore) -> None:
    raw = (vectors / "tdx/trustee-tdx-v4-debug/tdx_quote_4.dat").read_bytes()
    quote = parse_quote(raw)
    assert isinstance(quote.body, TdReportBody)
    assert quote.body.debug is True
    assert quote.body.tee_tcb_svn[1] == 0
    ext = hazmat_verify_quote_signatures(quote, trust=trust, now=t("2025-06-01T00:00:00Z"))
    assert ext.fmspc == bytes.fromhex("50806F000000")
    _, coll = load(vectors, TDX_V4)
    with pytest.raises(CollateralError, match="fmspc"):
        verify_dcap_quote(quote, coll, trust=trust, now=TDX_V4.now)
    bad = bytearray(raw)
    bad[48 + 136] ^= 1  # MRTD
    with pytest.raises(SignatureError):
        hazmat_verify_quote_signatures(parse_quote(bytes(bad)), trust=trust, now=TDX_V4.now)


def test_production_quotes_are_not_debug(vectors: Path) -> None:
    for s in FULL_SETS:
        raw, _ = load(vectors, s)
        assert parse_quote(raw).body.debug is False


# --- validity windows --------------------------------------------------------------------------


@pytest.mark.parametrize("s", ACCEPTED_SETS, ids=lambda s: s.name)
def test_window_edges_accepted(vectors: Path, trust: TrustStore, s: FullSet) -> None:
    raw, coll = load(vectors, s)
    verify(raw, coll, trust, s.window[0])
    verify(raw, coll, trust, s.window[1])


@pytest.mark.parametrize("s", FULL_SETS, ids=lambda s: s.name)
def test_one_second_outside_window_expired(vectors: Path, trust: TrustStore, s: FullSet) -> None:
    raw, coll = load(vectors, s)
    with pytest.raises(ExpiredError, match="not valid yet"):
        verify(raw, coll, trust, s.window[0] - SECOND)
    with pytest.raises(ExpiredError, match="expired"):
        verify(raw, coll, trust, s.window[1] + SECOND)


def test_v5_inside_window_reaches_tcb(vectors: Path, trust: TrustStore) -> None:
    raw, coll = load(vectors, TDX_V5)
    for now in TDX_V5.window:
        with pytest.raises(TcbError):
            verify(raw, coll, trust, now)


def test_naive_now_refused(vectors: Path, trust: TrustStore) -> None:
    raw, coll = load(vectors, SGX_V3)
    with pytest.raises(ValueError, match="timezone"):
        verify(raw, coll, trust, dt.datetime(2025, 7, 1))


# --- one-byte mutations of every signed field ---------------------------------------------------


def flip(data: bytes, offset: int) -> bytes:
    out = bytearray(data)
    out[offset] ^= 0x01
    return bytes(out)


def quote_offsets(raw: bytes, quote: Quote) -> dict[str, int]:
    body_start = 48 + (6 if quote.version == 5 else 0)
    report_data = 320 if not quote.is_tdx else 520
    sig = len(quote.signed_bytes) + 4
    qe_report = raw.index(quote.qe_report.raw, sig)
    return {
        "header.qe_vendor_id": 12,
        "header.user_data": 30,
        "body.measurement": body_start + (64 if not quote.is_tdx else 136),
        "body.report_data": body_start + report_data,
        "quote signature": sig + 10,
        "attestation key": sig + 64 + 10,
        "QE report": qe_report + 64,
        "QE report data": qe_report + 320,
        "QE report signature": qe_report + 384 + 10,
        "QE auth data": qe_report + 384 + 64 + 2,
    }


@pytest.mark.parametrize("s", ACCEPTED_SETS, ids=lambda s: s.name)
@pytest.mark.parametrize(
    "field",
    [
        "header.qe_vendor_id",
        "header.user_data",
        "body.measurement",
        "body.report_data",
        "quote signature",
        "attestation key",
        "QE report",
        "QE report data",
        "QE report signature",
        "QE auth data",
    ],
)
def test_quote_field_mutation_is_signature_error(
    vectors: Path, trust: TrustStore, s: FullSet, field: str
) -> None:
    raw, coll = load(vectors, s)
    quote = parse_quote(raw)
    assert len(quote.qe_auth_data) > 0
    bad = flip(raw, quote_offsets(raw, quote)[field])
    with pytest.raises(SignatureError):
        verify(bad, coll, trust, s.now)


def mutate_cert_signature(pem_block: bytes) -> bytes:
    """Flip the last byte of a certificate's DER (inside its signature), same PEM length."""
    cert = x509.load_pem_x509_certificate(pem_block)
    der = bytearray(cert.public_bytes(Encoding.DER))
    der[-1] ^= 0x01
    new = x509.load_der_x509_certificate(bytes(der)).public_bytes(Encoding.PEM)
    assert len(new) == len(pem_block.strip()) + 1 or len(new) == len(pem_block)
    return new


def pem_blocks(text: bytes) -> list[bytes]:
    end = b"-----END CERTIFICATE-----"
    out = []
    pos = 0
    while (start := text.find(b"-----BEGIN CERTIFICATE-----", pos)) >= 0:
        stop = text.index(end, start) + len(end)
        out.append(text[start:stop])
        pos = stop
    return out


def replace_block(text: bytes, index: int) -> bytes:
    block = pem_blocks(text)[index]
    new = mutate_cert_signature(block + b"\n").rstrip(b"\n")
    assert len(new) == len(block)
    return text.replace(block, new)


@pytest.mark.parametrize("s", ACCEPTED_SETS, ids=lambda s: s.name)
@pytest.mark.parametrize("index", [0, 1, 2], ids=["leaf", "ca", "root"])
def test_pck_chain_certificate_mutation_is_chain_error(
    vectors: Path, trust: TrustStore, s: FullSet, index: int
) -> None:
    raw, coll = load(vectors, s)
    bad = replace_block(raw, index)
    assert len(bad) == len(raw)
    with pytest.raises(ChainError):
        verify(bad, coll, trust, s.now)


def _mutate_text(text: str) -> str:
    i = len(text) // 2
    return text[:i] + ("0" if text[i] != "0" else "1") + text[i + 1 :]


def _flip_last(data: bytes) -> bytes:
    return flip(data, len(data) - 1)


def _issuer_chain_mutation(value: str) -> str:
    return replace_block(value.encode(), 0).decode()


COLLATERAL_MUTATIONS: list[tuple[str, Callable[[DcapCollateral], DcapCollateral], type]] = [
    (
        "tcb_info",
        lambda c: dataclasses.replace(c, tcb_info=_mutate_text(c.tcb_info)),
        SignatureError,
    ),
    (
        "tcb_info_signature",
        lambda c: dataclasses.replace(c, tcb_info_signature=flip(c.tcb_info_signature, 5)),
        SignatureError,
    ),
    (
        "qe_identity",
        lambda c: dataclasses.replace(c, qe_identity=_mutate_text(c.qe_identity)),
        SignatureError,
    ),
    (
        "qe_identity_signature",
        lambda c: dataclasses.replace(c, qe_identity_signature=flip(c.qe_identity_signature, 40)),
        SignatureError,
    ),
    (
        "root_ca_crl",
        lambda c: dataclasses.replace(c, root_ca_crl=_flip_last(c.root_ca_crl)),
        SignatureError,
    ),
    ("pck_crl", lambda c: dataclasses.replace(c, pck_crl=_flip_last(c.pck_crl)), SignatureError),
    (
        "pck_crl_issuer_chain",
        lambda c: dataclasses.replace(
            c, pck_crl_issuer_chain=_issuer_chain_mutation(c.pck_crl_issuer_chain)
        ),
        ChainError,
    ),
    (
        "tcb_info_issuer_chain",
        lambda c: dataclasses.replace(
            c, tcb_info_issuer_chain=_issuer_chain_mutation(c.tcb_info_issuer_chain)
        ),
        ChainError,
    ),
    (
        "qe_identity_issuer_chain",
        lambda c: dataclasses.replace(
            c, qe_identity_issuer_chain=_issuer_chain_mutation(c.qe_identity_issuer_chain)
        ),
        ChainError,
    ),
]


@pytest.mark.parametrize("s", FULL_SETS, ids=lambda s: s.name)
@pytest.mark.parametrize(
    ("field", "mutate", "error"), COLLATERAL_MUTATIONS, ids=[m[0] for m in COLLATERAL_MUTATIONS]
)
def test_collateral_mutation_rejected(
    vectors: Path,
    trust: TrustStore,
    s: FullSet,
    field: str,
    mutate: Callable[[DcapCollateral], DcapCollateral],
    error: type[Exception],
) -> None:
    raw, coll = load(vectors, s)
    bad = mutate(coll)
    assert getattr(bad, field) != getattr(coll, field)
    with pytest.raises(error):
        verify(raw, bad, trust, s.now)


def test_collateral_swapped_between_tee_types(vectors: Path, trust: TrustStore) -> None:
    raw, sgx_coll = load(vectors, SGX_V3)
    _, tdx_coll = load(vectors, TDX_V4)
    mixed = dataclasses.replace(
        sgx_coll,
        tcb_info=tdx_coll.tcb_info,
        tcb_info_signature=tdx_coll.tcb_info_signature,
    )
    with pytest.raises(CollateralError, match="TCB info id"):
        verify(raw, mixed, trust, t("2025-07-01T00:00:00Z"))
    mixed_qe = dataclasses.replace(
        sgx_coll,
        qe_identity=tdx_coll.qe_identity,
        qe_identity_signature=tdx_coll.qe_identity_signature,
    )
    with pytest.raises(CollateralError, match="QE identity id"):
        verify(raw, mixed_qe, trust, t("2025-07-01T00:00:00Z"))


# --- foreign roots -----------------------------------------------------------------------------


def _foreign_chain(
    subject_like: x509.Certificate,
) -> list[tuple[x509.Certificate, ec.EllipticCurvePrivateKey]]:
    """A fresh root that copies the Intel root's subject name, and an intermediate under it."""
    now = dt.datetime(2020, 1, 1, tzinfo=UTC)
    later = dt.datetime(2040, 1, 1, tzinfo=UTC)
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = (
        x509.CertificateBuilder()
        .subject_name(subject_like.subject)
        .issuer_name(subject_like.subject)
        .public_key(root_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(later)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(root_key, hashes.SHA256())
    )
    inter_key = ec.generate_private_key(ec.SECP256R1())
    inter = (
        x509.CertificateBuilder()
        .subject_name(x509.Name.from_rfc4514_string("CN=Intel SGX TCB Signing,O=Intel Corporation"))
        .issuer_name(root.subject)
        .public_key(inter_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(later)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(root_key, hashes.SHA256())
    )
    return [(inter, inter_key), (root, root_key)]


def test_foreign_root_for_tcb_info_is_chain_error(vectors: Path, trust: TrustStore) -> None:
    raw, coll = load(vectors, SGX_V3)
    chain = _foreign_chain(trust.intel_root)
    pem = b"".join(c.public_bytes(Encoding.PEM) for c, _ in chain).decode()
    with pytest.raises(ChainError, match="pinned"):
        verify(raw, dataclasses.replace(coll, tcb_info_issuer_chain=pem), trust, SGX_V3.now)
    # Without the root in the chain, the intermediate simply does not chain to the pinned key.
    leaf_only = chain[0][0].public_bytes(Encoding.PEM).decode()
    with pytest.raises(ChainError):
        verify(raw, dataclasses.replace(coll, tcb_info_issuer_chain=leaf_only), trust, SGX_V3.now)


def _with_cert_data(raw: bytes, quote: Quote, cert_type: int, data: bytes) -> bytes:
    """Rebuild an SGX v3 quote (no padding) with other certification data (unsigned bytes)."""
    assert quote.version == 3
    start = len(raw) - len(quote.certification_data) - 6
    rebuilt = raw[:start] + struct.pack("<HI", cert_type, len(data)) + data
    sig_len = len(rebuilt) - len(quote.signed_bytes) - 4
    at = len(quote.signed_bytes)
    return rebuilt[:at] + struct.pack("<I", sig_len) + rebuilt[at + 4 :]


def test_foreign_pck_chain_is_chain_error(vectors: Path, trust: TrustStore) -> None:
    raw, coll = load(vectors, SGX_V3)
    quote = parse_quote(raw)
    assert quote.pck_chain_pem is not None
    real = pem_blocks(quote.pck_chain_pem)
    (inter, _), (root, _) = _foreign_chain(trust.intel_root)
    forged = real[0] + b"\n" + real[1] + b"\n" + root.public_bytes(Encoding.PEM)
    bad = _with_cert_data(raw, quote, 5, forged)
    assert parse_quote(bad).pck_chain_pem == forged.rstrip(b"\0")
    with pytest.raises(ChainError, match="pinned"):
        verify(bad, coll, trust, SGX_V3.now)
    # A chain the attacker fully controls: the intermediate is theirs too.
    forged2 = real[0] + b"\n" + inter.public_bytes(Encoding.PEM) + root.public_bytes(Encoding.PEM)
    with pytest.raises(ChainError):
        verify(_with_cert_data(raw, quote, 5, forged2), coll, trust, SGX_V3.now)


def test_pck_chain_from_collateral_when_quote_has_none(vectors: Path, trust: TrustStore) -> None:
    raw, coll = load(vectors, SGX_V3)
    quote = parse_quote(raw)
    no_chain = _with_cert_data(raw, quote, 3, b"\x11" * 32)
    assert parse_quote(no_chain).pck_chain_pem is None
    with pytest.raises(CollateralError, match="PCK certificate chain"):
        verify(no_chain, coll, trust, SGX_V3.now)
    assert quote.pck_chain_pem is not None
    with_chain = dataclasses.replace(coll, pck_certificate_chain=quote.pck_chain_pem.decode())
    assert verify(no_chain, with_chain, trust, SGX_V3.now) == verify(raw, coll, trust, SGX_V3.now)


def test_simulated_trust_store_rejects_real_quote(vectors: Path) -> None:
    raw, coll = load(vectors, SGX_V3)
    with pytest.raises(ChainError):
        verify(raw, coll, TrustStore.simulated_only(), SGX_V3.now)


# --- truncation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "sgx/dcap-qvl-sgx-v3/sgx_quote",
        "sgx/trustee-occlum-sgx-v3-debug/occlum_quote.dat",
        "tdx/dcap-qvl-tdx-v4/tdx_quote",
        "tdx/dcap-qvl-tdx-v5/tdx_quote_outdated",
        "tdx/trustee-tdx-v4-debug/tdx_quote_4.dat",
    ],
)
def test_truncated_quotes_malformed(vectors: Path, path: str) -> None:
    raw = (vectors / path).read_bytes()
    quote = parse_quote(raw)
    end = len(quote.signed_bytes) + 4 + int.from_bytes(raw[len(quote.signed_bytes) :][:4], "little")
    # Every length that cuts into the structure, and a few past its end (padding).
    for n in range(end):
        with pytest.raises(MalformedEvidenceError):
            parse_quote(raw[:n])
    assert parse_quote(raw[:end]) == parse_quote(raw)
    assert parse_quote(raw + b"\0" * 100) == quote


@pytest.mark.parametrize(
    "path",
    [
        "sgx/trustee-occlum-sgx-v3-debug/occlum_quote.dat",
        "tdx/trustee-tdx-v4-debug/tdx_quote_4.dat",
    ],
)
def test_debug_quotes_pck_window(vectors: Path, trust: TrustStore, path: str) -> None:
    quote = parse_quote((vectors / path).read_bytes())
    assert quote.pck_chain_pem is not None
    leaf = x509.load_pem_x509_certificates(quote.pck_chain_pem)[0]
    start, end = leaf.not_valid_before_utc, leaf.not_valid_after_utc
    hazmat_verify_quote_signatures(quote, trust=trust, now=start)
    hazmat_verify_quote_signatures(quote, trust=trust, now=end)
    for now in (start - SECOND, end + SECOND):
        with pytest.raises(ExpiredError, match="PCK chain"):
            hazmat_verify_quote_signatures(quote, trust=trust, now=now)
