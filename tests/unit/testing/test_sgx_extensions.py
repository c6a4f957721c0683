"""The hand-written SGX-extension DER encoder reproduces real Intel PCK certificates exactly."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from cryptography import x509

from veil.testing._sgx_extensions import SGX_EXTENSIONS_OID, encode_sgx_extensions


def _pck_from_quote(quote: bytes) -> x509.Certificate:
    (auth_len,) = struct.unpack_from("<H", quote, 436 + 576)
    start = 436 + 578 + auth_len + 6
    return x509.load_pem_x509_certificates(quote[start:])[0]


def _extension(cert: x509.Certificate) -> bytes:
    value = cert.extensions.get_extension_for_oid(SGX_EXTENSIONS_OID).value
    assert isinstance(value, x509.UnrecognizedExtension)
    return value.value


def test_processor_ca_certificate_dcap_qvl(vectors: Path) -> None:
    # Values from the README of the vector; SGX type Standard, no Platform-CA fields.
    pem = (vectors / "sgx/dcap-qvl-sgx-v3/derived/pck_cert_chain.pem").read_bytes()
    real = _extension(x509.load_pem_x509_certificates(pem)[0])
    ours = encode_sgx_extensions(
        ppid=bytes.fromhex("d04ec06d4e6d92dc90d0ad3cf5ee2ddf"),
        component_svns=(11, 11, 2, 2, 255, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
        pce_svn=13,
        cpu_svn=bytes.fromhex("0b0b0202ff0100000000000000000000"),
        pce_id=bytes(2),
        fmspc=bytes.fromhex("00a067110000"),
        platform_instance_id=None,
    )
    assert ours == real


def test_platform_ca_certificate_occlum(vectors: Path) -> None:
    quote = (vectors / "sgx/trustee-occlum-sgx-v3-debug/occlum_quote.dat").read_bytes()
    real = _extension(_pck_from_quote(quote))
    ours = encode_sgx_extensions(
        ppid=bytes.fromhex("b9c92eb5053cb158956f4e68b6d82f52"),
        component_svns=(4, 4, 3, 3, 255, 255, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
        pce_svn=11,
        cpu_svn=bytes.fromhex("04040303ffff00000000000000000000"),
        pce_id=bytes(2),
        fmspc=bytes.fromhex("00606a000000"),
        platform_instance_id=bytes.fromhex("c8c0cfb23d3dd90b06d55c0641693a7a"),
        dynamic_platform=True,
        cached_keys=True,
        smt_enabled=True,
    )
    assert ours == real


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("ppid", bytes(15), "ppid: got 15 bytes, expected 16"),
        ("fmspc", bytes(5), "fmspc: got 5 bytes, expected 6"),
        ("component_svns", (1,) * 15, "sixteen values"),
        ("component_svns", (256,) + (0,) * 15, "sixteen values"),
        ("pce_svn", 70000, "pce_svn: got 70000"),
    ],
)
def test_bad_field_sizes_are_refused(field: str, value: object, message: str) -> None:
    kwargs: dict[str, object] = {
        "ppid": bytes(16),
        "component_svns": (0,) * 16,
        "pce_svn": 0,
        "cpu_svn": bytes(16),
        "pce_id": bytes(2),
        "fmspc": bytes(6),
        "platform_instance_id": None,
        field: value,
    }
    with pytest.raises(ValueError, match=message):
        encode_sgx_extensions(**kwargs)  # type: ignore[arg-type]
