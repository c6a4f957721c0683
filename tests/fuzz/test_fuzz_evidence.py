"""Evidence parsers and verifiers on hostile bytes: only typed errors (MalformedEvidenceError for
parsers, any AttestationError for verifiers), never IndexError/struct.error/ValueError."""

from __future__ import annotations

import base64
import contextlib
import re
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from fuzz_mutations import mutated
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.attestation.abi.dcap import Quote
from veil.attestation.abi.snp import SnpReport
from veil.attestation.collateral_source import collateral_from_dcap_qvl_json
from veil.attestation.trust import TrustStore
from veil.attestation.verify.collateral import DcapCollateral
from veil.attestation.verify.dcap import verify_dcap_quote
from veil.attestation.verify.snp import SnpCollateral, verify_snp_report
from veil.errors import AttestationError, MalformedEvidenceError

dcap = pytest.importorskip("veil.attestation.abi.dcap")
snp = pytest.importorskip("veil.attestation.abi.snp")

_QUOTES = [
    "sgx/dcap-qvl-sgx-v3/sgx_quote",
    "sgx/trustee-occlum-sgx-v3-debug/occlum_quote.dat",
    "tdx/dcap-qvl-tdx-v4/tdx_quote",
    "tdx/dcap-qvl-tdx-v5/tdx_quote_outdated",
    "tdx/trustee-tdx-v4-debug/tdx_quote_4.dat",
]
_SNP_REPORTS = [
    "sev-snp/go-sev-guest-milan-vcek-debugpolicy/attestation.bin",
    "sev-snp/trustee-milan-vlek-v3/test-vlek-report.bin",
    "sev-snp/virtee-milan-vcek/derived/report_milan.bin",
]


@pytest.fixture(scope="module")
def quotes(vectors: Path) -> list[bytes]:
    return [(vectors / p).read_bytes() for p in _QUOTES]


@pytest.fixture(scope="module")
def snp_reports(vectors: Path) -> list[bytes]:
    return [(vectors / p).read_bytes() for p in _SNP_REPORTS]


def _parse_quote(data: bytes) -> None:
    with contextlib.suppress(MalformedEvidenceError):
        dcap.parse_quote(data)


def _parse_snp(data: bytes) -> None:
    with contextlib.suppress(MalformedEvidenceError):
        snp.parse_snp_report(data)


def test_real_vectors_parse(quotes: list[bytes], snp_reports: list[bytes]) -> None:
    # The seeds of the mutation tests are valid: mutations start from deep inside the parsers.
    for q in quotes:
        dcap.parse_quote(q)
    for r in snp_reports:
        snp.parse_snp_report(r)


@settings(parent=settings.get_profile("veil-fuzz"))
@given(data=st.binary(max_size=6000))
def test_parse_quote_arbitrary_bytes(data: bytes) -> None:
    _parse_quote(data)


@settings(parent=settings.get_profile("veil-fuzz"))
@given(
    header=st.sampled_from(
        [
            b"\x03\x00\x02\x00\x00\x00\x00\x00",
            b"\x04\x00\x02\x00\x81\x00\x00\x00",
            b"\x05\x00\x02\x00\x81\x00\x00\x00",
        ]
    ),
    rest=st.binary(max_size=6000),
)
def test_parse_quote_valid_header_random_rest(header: bytes, rest: bytes) -> None:
    _parse_quote(header + rest)


@settings(parent=settings.get_profile("veil-fuzz"))
@given(data=st.data())
def test_parse_quote_mutated_real_quotes(quotes: list[bytes], data: st.DataObject) -> None:
    _parse_quote(data.draw(mutated(quotes)))


@settings(parent=settings.get_profile("veil-fuzz"))
@given(data=st.binary(min_size=1184, max_size=1184) | st.binary(max_size=1300))
def test_parse_snp_arbitrary_bytes(data: bytes) -> None:
    _parse_snp(data)


@settings(parent=settings.get_profile("veil-fuzz"))
@given(data=st.data())
def test_parse_snp_mutated_real_reports(snp_reports: list[bytes], data: st.DataObject) -> None:
    _parse_snp(data.draw(mutated(snp_reports)))


# --- verification on hostile certificates, CRLs and issuer chains (mutations of real vectors) ---
# Every outcome must be a typed AttestationError: cryptography parses lazily, so damage deep in a
# certificate surfaces as ValueError / InvalidVersion / UnsupportedAlgorithm unless veil maps it.

_SNP_AT = datetime(2025, 1, 1, tzinfo=UTC)
_SGX_AT = datetime(2025, 7, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def virtee(vectors: Path) -> tuple[SnpReport, bytes, bytes]:
    d = vectors / "sev-snp/virtee-milan-vcek"
    report = snp.parse_snp_report(bytes.fromhex((d / "report_milan.hex").read_text()))
    return report, (d / "vcek_milan.der").read_bytes(), (d / "cert_chain_milan").read_bytes()


@pytest.fixture(scope="module")
def sgx(vectors: Path) -> tuple[Quote, DcapCollateral]:
    d = vectors / "sgx/dcap-qvl-sgx-v3"
    quote = dcap.parse_quote((d / "sgx_quote").read_bytes())
    return quote, collateral_from_dcap_qvl_json((d / "sgx_quote_collateral.json").read_text())


def _only_attestation_errors(call: Callable[[], object]) -> None:
    with contextlib.suppress(AttestationError):
        call()


def _pem_bodies(pem: bytes) -> list[bytes]:
    # Mutate the DER inside PEM blocks, where a flip reaches the parser instead of base64.
    return [
        x509.load_pem_x509_certificate(block).public_bytes(Encoding.DER)
        for block in re.findall(
            rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", pem, flags=re.DOTALL
        )
    ]


def _as_pem(der: bytes) -> bytes:
    return (
        b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(der) + b"-----END CERTIFICATE-----\n"
    )


@settings(parent=settings.get_profile("veil-fuzz"))
@given(data=st.data())
def test_snp_verify_mutated_vcek(
    virtee: tuple[SnpReport, bytes, bytes], data: st.DataObject
) -> None:
    report, vcek, chain = virtee
    key = data.draw(mutated([vcek]))
    _only_attestation_errors(
        lambda: verify_snp_report(
            report,
            SnpCollateral(key, chain.decode()),
            trust=TrustStore.production(),
            now=_SNP_AT,
        )
    )


@settings(parent=settings.get_profile("veil-fuzz"))
@given(data=st.data())
def test_snp_verify_mutated_chain_and_crl(
    virtee: tuple[SnpReport, bytes, bytes], data: st.DataObject
) -> None:
    report, vcek, chain = virtee
    ask_der = data.draw(mutated(_pem_bodies(chain)))
    crl = data.draw(st.none() | mutated([vcek, ask_der]))
    _only_attestation_errors(
        lambda: verify_snp_report(
            report,
            SnpCollateral(vcek, _as_pem(ask_der).decode(), crl),
            trust=TrustStore.production(),
            now=_SNP_AT,
        )
    )


@settings(parent=settings.get_profile("veil-fuzz"))
@given(data=st.data(), item=st.sampled_from(["root_ca_crl", "pck_crl"]))
def test_dcap_verify_mutated_crls(
    sgx: tuple[Quote, DcapCollateral], data: st.DataObject, item: str
) -> None:
    quote, collateral = sgx
    damaged = replace(collateral, **{item: data.draw(mutated([getattr(collateral, item)]))})
    _only_attestation_errors(
        lambda: verify_dcap_quote(quote, damaged, trust=TrustStore.production(), now=_SGX_AT)
    )


@settings(parent=settings.get_profile("veil-fuzz"))
@given(
    data=st.data(),
    item=st.sampled_from(
        ["pck_crl_issuer_chain", "tcb_info_issuer_chain", "qe_identity_issuer_chain"]
    ),
)
def test_dcap_verify_mutated_issuer_chains(
    sgx: tuple[Quote, DcapCollateral], data: st.DataObject, item: str
) -> None:
    quote, collateral = sgx
    certs = _pem_bodies(getattr(collateral, item).encode())
    at = data.draw(st.integers(0, len(certs) - 1))
    certs[at] = data.draw(mutated([certs[at]]))
    chain = b"".join(_as_pem(c) for c in certs).decode()
    damaged = replace(collateral, **{item: chain})
    _only_attestation_errors(
        lambda: verify_dcap_quote(quote, damaged, trust=TrustStore.production(), now=_SGX_AT)
    )
