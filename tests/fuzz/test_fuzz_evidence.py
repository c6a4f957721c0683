"""Evidence parsers on hostile bytes: only MalformedEvidenceError, never IndexError/struct.error."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from fuzz_mutations import mutated
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.errors import MalformedEvidenceError

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
