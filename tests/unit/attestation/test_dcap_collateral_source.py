"""Collateral loaders: dcap-qvl JSON, a directory, BlindAI's map, Intel PCS via a fake getter."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote as urlquote

import pytest
from cryptography import x509

from veil.attestation.abi.dcap import parse_quote
from veil.attestation.collateral_source import (
    INTEL_PCS_URL,
    collateral_from_blindai_map,
    collateral_from_dcap_qvl_json,
    collateral_from_directory,
    collateral_from_pcs,
    collateral_to_blindai_map,
    extract_signed_json,
)
from veil.attestation.trust import TrustStore
from veil.attestation.verify.collateral import DcapCollateral
from veil.attestation.verify.dcap import verify_dcap_quote
from veil.errors import CollateralError, MalformedEvidenceError

SETS = {
    "sgx": ("sgx/dcap-qvl-sgx-v3", "sgx_quote", "sgx_quote_collateral.json"),
    "tdx4": ("tdx/dcap-qvl-tdx-v4", "tdx_quote", "tdx_quote_collateral.json"),
    "tdx5": ("tdx/dcap-qvl-tdx-v5", "tdx_quote_outdated", "tdx_quote_outdated_collateral.json"),
}
NOW = dt.datetime(2025, 7, 1, tzinfo=dt.UTC)


def qvl(vectors: Path, key: str) -> DcapCollateral:
    folder, _, coll = SETS[key]
    return collateral_from_dcap_qvl_json((vectors / folder / coll).read_bytes())


@pytest.mark.parametrize("key", list(SETS))
def test_dcap_qvl_json_equals_directory(vectors: Path, key: str) -> None:
    from_json = qvl(vectors, key)
    from_dir = collateral_from_directory(vectors / SETS[key][0] / "derived")
    assert from_json.pck_certificate_chain is None
    assert from_dir.pck_certificate_chain is not None
    assert dataclasses.replace(from_dir, pck_certificate_chain=None) == from_json
    assert from_json.tcb_info.startswith('{"id":')
    assert len(from_json.tcb_info_signature) == 64


def test_directory_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CollateralError, match="missing"):
        collateral_from_directory(tmp_path)


@pytest.mark.parametrize("data", ["[]", "{", '{"pck_crl_issuer_chain": 1}'])
def test_dcap_qvl_json_bad(data: str) -> None:
    with pytest.raises(MalformedEvidenceError):
        collateral_from_dcap_qvl_json(data)


def _certs(pem: str | None) -> list[x509.Certificate]:
    assert pem is not None
    return x509.load_pem_x509_certificates(pem.encode())


@pytest.mark.parametrize("key", list(SETS))
def test_blindai_round_trip(vectors: Path, key: str) -> None:
    c = collateral_from_directory(vectors / SETS[key][0] / "derived")
    m = collateral_to_blindai_map(c)
    assert set(m) == {
        "version",
        "pck_certificate",
        "pck_crl_issuer_chain",
        "pck_signing_chain",
        "root_ca_crl",
        "pck_crl",
        "tcb_info",
        "tcb_info_issuer_chain",
        "qe_identity",
        "qe_identity_issuer_chain",
    }
    assert all(isinstance(v, str) for k, v in m.items() if k != "version")
    assert m["root_ca_crl"].startswith("-----BEGIN X509 CRL-----")
    json.loads(m["tcb_info"])  # a PCS body again
    back = collateral_from_blindai_map(m)
    assert _certs(back.pck_certificate_chain) == _certs(c.pck_certificate_chain)
    assert dataclasses.replace(back, pck_certificate_chain=None, root_ca_crl=b"", pck_crl=b"") == (
        dataclasses.replace(c, pck_certificate_chain=None, root_ca_crl=b"", pck_crl=b"")
    )
    assert x509.load_pem_x509_crl(back.pck_crl) == x509.load_der_x509_crl(c.pck_crl)
    # Without a PCK chain the map carries empty strings, and reads back as None.
    empty = collateral_from_blindai_map(collateral_to_blindai_map(qvl(vectors, key)))
    assert empty.pck_certificate_chain is None


def test_blindai_map_verifies(vectors: Path) -> None:
    folder, quote_file, _ = SETS["sgx"]
    c = collateral_from_directory(vectors / folder / "derived")
    m = collateral_to_blindai_map(c)
    # CRLs in the other accepted forms, and the PCS bodies pretty-printed as a server might send.
    m["root_ca_crl"] = c.root_ca_crl.hex()
    m["pck_crl"] = c.pck_crl.decode("latin-1")
    m["tcb_info"] = (
        f'{{\n  "signature" : "{c.tcb_info_signature.hex()}",\n  "tcbInfo" :  {c.tcb_info}\n}}\n'
    )
    back = collateral_from_blindai_map(m)
    assert back.tcb_info == c.tcb_info
    assert back.root_ca_crl == c.root_ca_crl
    quote = parse_quote((vectors / folder / quote_file).read_bytes())
    verdict = verify_dcap_quote(quote, back, trust=TrustStore.production(), now=NOW)
    assert verdict.tcb_status == "ConfigurationAndSWHardeningNeeded"


def test_blindai_map_bad(vectors: Path) -> None:
    m = collateral_to_blindai_map(qvl(vectors, "sgx"))
    for key, value in [("version", "3"), ("version", True), ("tcb_info", 5), ("pck_crl", "zz")]:
        with pytest.raises(MalformedEvidenceError):
            collateral_from_blindai_map({**m, key: value})
    without = dict(m)
    del without["qe_identity"]
    with pytest.raises(MalformedEvidenceError, match="qe_identity"):
        collateral_from_blindai_map(without)


def test_extract_signed_json_exact_span() -> None:
    inner = '{"a" : "x}\\"{", "b":[1,{"c":2}] , "n": null}'
    body = (
        f'{{"other": {{"tcbInfo": 1}}, "n": -1.5e3, "t": true, "tcbInfo" :{inner},'
        f' "signature":"{"ab" * 64}"}}'
    )
    text, sig = extract_signed_json(body, "tcbInfo", "t")
    assert text == inner
    assert sig == bytes.fromhex("ab" * 64)
    assert extract_signed_json(body.encode(), "tcbInfo", "t") == (text, sig)


@pytest.mark.parametrize(
    "body",
    [
        "not json",
        '{"tcbInfo": {}}',
        '{"signature": "00"}',
        '{"tcbInfo": [], "signature": "00"}',
        '{"tcbInfo": {}, "signature": "zz"}',
        '{"tcbInfo": {}, "signature": 5}',
        '{"tcbInfo": {"a":1}, "tcbInfo": {"a":2}, "signature": "00"}',
        "[1]",
    ],
)
def test_extract_signed_json_bad(body: str) -> None:
    with pytest.raises(MalformedEvidenceError):
        extract_signed_json(body, "tcbInfo", "t")


class FakePcs:
    """Serves the vectors' derived files the way Intel PCS v4 does."""

    def __init__(self, derived: Path, *, base: str = INTEL_PCS_URL, drop: str = "") -> None:
        self.derived = derived
        self.base = base
        self.drop = drop
        self.urls: list[str] = []

    def _chain(self, name: str) -> str:
        return urlquote((self.derived / name).read_text(), safe="")

    def __call__(self, url: str) -> tuple[bytes, Mapping[str, str]]:
        self.urls.append(url)
        d = self.derived
        headers: dict[str, str]
        if "/certification/v4/tcb?fmspc=" in url:
            body, headers = (
                (d / "tcb_info.json").read_bytes(),
                {"tcb-info-issuer-chain": self._chain("tcb_info_issuer_chain.pem")},
            )
        elif url.endswith("/qe/identity"):
            body, headers = (
                (d / "qe_identity.json").read_bytes(),
                {"SGX-Enclave-Identity-Issuer-Chain": self._chain("qe_identity_issuer_chain.pem")},
            )
        elif "/pckcrl?" in url:
            body, headers = (
                (d / "pck_crl.der").read_bytes(),
                {"SGX-PCK-CRL-Issuer-Chain": self._chain("pck_crl_issuer_chain.pem")},
            )
        elif url.endswith(("IntelSGXRootCA.der", "/rootcacrl")):
            # A PCCS answers with hex text; Intel's certificate site with DER.
            raw = (d / "root_ca_crl.der").read_bytes()
            body, headers = (raw.hex().encode() if "rootcacrl" in url else raw), {}
        else:
            raise AssertionError(f"unexpected URL {url}")
        return body, {k: v for k, v in headers.items() if k.lower() != self.drop.lower()}


@pytest.mark.parametrize(
    ("key", "ca", "tdx"), [("sgx", "processor", False), ("tdx4", "platform", True)]
)
def test_pcs_loader(vectors: Path, key: str, ca: str, tdx: bool) -> None:
    folder, quote_file, _ = SETS[key]
    get = FakePcs(vectors / folder / "derived")
    quote = parse_quote((vectors / folder / quote_file).read_bytes())
    expected = qvl(vectors, key)
    fmspc = bytes.fromhex(json.loads(expected.tcb_info)["fmspc"])
    c = collateral_from_pcs(fmspc, ca, tdx=tdx, get=get)
    assert c == expected
    tee = "tdx" if tdx else "sgx"
    assert get.urls[0].startswith(f"{INTEL_PCS_URL}/{tee}/certification/v4/tcb?fmspc=")
    assert get.urls[1] == f"{INTEL_PCS_URL}/{tee}/certification/v4/qe/identity"
    assert get.urls[2] == f"{INTEL_PCS_URL}/sgx/certification/v4/pckcrl?ca={ca}&encoding=der"
    assert get.urls[3].endswith("IntelSGXRootCA.der")
    verify_dcap_quote(quote, c, trust=TrustStore.production(), now=NOW)


def test_pcs_loader_pccs_and_errors(vectors: Path) -> None:
    derived = vectors / SETS["sgx"][0] / "derived"
    fmspc = bytes.fromhex("00A067110000")
    pccs = FakePcs(derived, base="https://pccs.local:8081")
    c = collateral_from_pcs(
        fmspc, "processor", tdx=False, get=pccs, base_url="https://pccs.local:8081/"
    )
    assert pccs.urls[3] == "https://pccs.local:8081/sgx/certification/v4/rootcacrl"
    assert c == qvl(vectors, "sgx")
    with pytest.raises(CollateralError, match="fmspc"):
        collateral_from_pcs(b"\0", "processor", tdx=False, get=pccs)
    with pytest.raises(CollateralError, match="PCK CA"):
        collateral_from_pcs(fmspc, "root", tdx=False, get=pccs)
    with pytest.raises(CollateralError, match="SGX-PCK-CRL-Issuer-Chain"):
        collateral_from_pcs(
            fmspc, "processor", tdx=False, get=FakePcs(derived, drop="SGX-PCK-CRL-Issuer-Chain")
        )
