"""Quote parsing: layouts, length fields, padding, and MalformedEvidenceError on bad input."""

from __future__ import annotations

import contextlib
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.attestation.abi.dcap import parse_quote
from veil.attestation.abi.sgx import SgxReportBody
from veil.attestation.abi.tdx import TdReportBody
from veil.errors import MalformedEvidenceError

SGX = "sgx/dcap-qvl-sgx-v3/sgx_quote"
TDX4 = "tdx/dcap-qvl-tdx-v4/tdx_quote"
TDX5 = "tdx/dcap-qvl-tdx-v5/tdx_quote_outdated"


def read(vectors: Path, name: str) -> bytes:
    return (vectors / name).read_bytes()


def test_sgx_v3_fields(vectors: Path) -> None:
    q = parse_quote(read(vectors, SGX))
    assert (q.version, q.tee_type, q.body_type) == (3, 0, 1)
    assert isinstance(q.body, SgxReportBody)
    assert q.body.mr_enclave.hex() == (
        "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"
    )
    assert q.body.mr_signer.hex() == (
        "815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6"
    )
    assert q.body.attributes.hex() == "0500000000000000e700000000000000"
    assert (q.body.isv_prod_id, q.body.isv_svn, q.body.debug) == (0, 0, False)
    assert q.body.report_data == b"Hello, world!".ljust(64, b"\0")
    assert q.qe_report.isv_svn == 10
    assert q.qe_vendor_id.hex() == "939a7233f79c4ca9940a0db3957f0607"
    assert q.certification_data_type == 5
    assert q.pck_chain_pem is not None
    assert q.pck_chain_pem.count(b"BEGIN CERTIFICATE") == 3
    assert q.signed_bytes == read(vectors, SGX)[: 48 + 384]
    assert len(q.signature) == 64
    assert len(q.attestation_key) == 64
    assert "mr_enclave=33d8" in repr(q)


def test_tdx_v4_fields_and_padding(vectors: Path) -> None:
    raw = read(vectors, TDX4)
    q = parse_quote(raw)
    assert (q.version, q.tee_type, q.body_type) == (4, 0x81, 2)
    assert isinstance(q.body, TdReportBody)
    b = q.body
    assert b.version == "1.0"
    assert b.tee_tcb_svn2 is None
    assert b.mr_servicetd is None
    assert b.mr_td.hex().startswith("91eb2b44d141d4ec")
    assert b.rtmr0.hex().startswith("44c0197b39157fdd")
    assert b.rtmr1.hex().startswith("0084452c01668329")
    assert b.rtmr2.hex().startswith("d833feef2cd94514")
    assert b.rtmr3 == bytes(48)
    assert b.mr_seam.hex().startswith("5b38e33a6487958b")
    assert b.td_attributes.hex() == "0000001000000000"
    assert not b.debug
    assert b.xfam.hex() == "e702060000000000"
    assert b.tee_tcb_svn.hex() == "06010300000000000000000000000000"
    assert b.mr_config_id == b.mr_owner == b.mr_owner_config == bytes(48)
    assert b.report_data.hex().startswith("9a9d48e7f6799642")
    assert q.qe_report.isv_svn == 6
    assert q.signed_bytes == raw[: 48 + 584]
    # 70 zero bytes after the signature data are ignored.
    sig_len = struct.unpack_from("<I", raw, 48 + 584)[0]
    assert len(raw) - (48 + 584 + 4 + sig_len) == 70
    assert "version=1.0" in repr(b)


def test_tdx_v5_body_type_3(vectors: Path) -> None:
    raw = read(vectors, TDX5)
    q = parse_quote(raw)
    assert (q.version, q.body_type) == (5, 3)
    assert isinstance(q.body, TdReportBody)
    assert q.body.version == "1.5"
    assert q.body.tee_tcb_svn2 is not None
    assert q.body.tee_tcb_svn2.hex().startswith("0d0103")
    assert q.body.mr_servicetd == bytes(48)
    assert q.body.xfam.hex() == "e718060000000000"
    # v5 signs the body descriptor too.
    assert q.signed_bytes == raw[: 48 + 6 + 648]


def _patch(raw: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(raw)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


@pytest.mark.parametrize(
    ("name", "offset", "fmt", "value", "match"),
    [
        (SGX, 0, "<H", 2, "version"),
        (SGX, 0, "<H", 6, "version"),
        (SGX, 2, "<H", 3, "attestation key type"),
        (SGX, 4, "<I", 0x81, "v3 tee type"),
        (SGX, 4, "<I", 0x7, "tee type"),
        (TDX5, 48, "<H", 4, "body type"),
        (TDX5, 48, "<H", 2, "body size"),
        (TDX5, 48, "<H", 1, "body size"),
        (TDX5, 50, "<I", 584, "body size"),
        (SGX, 48 + 384, "<I", 10**6, "signature data"),
        (SGX, 48 + 384, "<I", 100, "attestation_key"),
        (SGX, 48 + 384, "<I", 4600 - 48 - 384 - 4 - 1, "certification data size"),
        (TDX4, 48 + 584 + 4 + 128, "<H", 5, "certification data type"),
        (TDX4, 48 + 584 + 4 + 130, "<I", 10, "size"),
    ],
)
def test_inconsistent_fields(
    vectors: Path, name: str, offset: int, fmt: str, value: int, match: str
) -> None:
    with pytest.raises(MalformedEvidenceError, match=match):
        parse_quote(_patch(read(vectors, name), offset, fmt, value))


def test_v5_sgx_body_type_with_tdx_tee(vectors: Path) -> None:
    raw = read(vectors, TDX5)
    # Body type 1 with size 384 but tee type TDX.
    bad = _patch(_patch(raw, 48, "<H", 1), 50, "<I", 384)
    with pytest.raises(MalformedEvidenceError, match="does not fit"):
        parse_quote(bad)


def test_type5_without_pem(vectors: Path) -> None:
    raw = read(vectors, SGX)
    q = parse_quote(raw)
    start = len(raw) - len(q.certification_data)
    bad = raw[:start] + b"x" * len(q.certification_data)
    with pytest.raises(MalformedEvidenceError, match="no PEM"):
        parse_quote(bad)


def test_oversized_input() -> None:
    with pytest.raises(MalformedEvidenceError, match="at most"):
        parse_quote(bytes(2 << 20))


def test_body_parsers_check_length() -> None:
    with pytest.raises(MalformedEvidenceError, match="384"):
        SgxReportBody.parse(bytes(383))
    with pytest.raises(MalformedEvidenceError, match="584 or 648"):
        TdReportBody.parse(bytes(600))


def test_debug_bits() -> None:
    sgx = bytearray(384)
    sgx[48] = 0x02
    assert SgxReportBody.parse(bytes(sgx)).debug
    td = bytearray(584)
    td[120] = 0x01
    assert TdReportBody.parse(bytes(td)).debug
    assert not TdReportBody.parse(bytes(648)).debug


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=6000))
def test_random_bytes_only_malformed(data: bytes) -> None:
    with contextlib.suppress(MalformedEvidenceError):
        parse_quote(data)


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=5005), st.integers(min_value=0, max_value=255))
def test_random_byte_change_only_malformed(vectors: Path, index: int, value: int) -> None:
    raw = bytearray(read(vectors, TDX4))
    raw[index] = value
    with contextlib.suppress(MalformedEvidenceError):
        parse_quote(bytes(raw))
