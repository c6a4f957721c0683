"""`veil collateral fetch` over loopback HTTP, and `veil verify-evidence --collateral DIR`.

SGX and TDX use real quotes with their recorded Intel collateral (tests/testdata, see its
README), served the way PCS v4 serves them; the bundle then verifies under Intel's real root.
SEV-SNP uses the AMD-shaped test PKI (`veil.testing.amd_pki`) behind a KDS-shaped server.
"""

from __future__ import annotations

import json
import socket
import threading
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar
from urllib.parse import quote as urlquote

import pytest

from veil.attestation.abi.snp import SnpTcb
from veil.attestation.collateral_source import load_collateral_directory
from veil.attestation.trust import TrustStore
from veil.attestation.verifier import hazmat_verify_without_policy
from veil.attestation.verify.snp import SnpCollateral
from veil.cli import main
from veil.errors import ChainError, ExpiredError, HazmatWarning, SignatureError
from veil.testing.amd_pki import AmdPki
from veil.testing.services import KdsService

AT = "2025-07-01T00:00:00Z"
NOW = datetime(2026, 3, 1, tzinfo=UTC)
Routes = dict[str, tuple[int, bytes, dict[str, str]]]


class _Handler(BaseHTTPRequestHandler):
    routes: ClassVar[Routes] = {}

    def do_GET(self) -> None:
        status, body, headers = self.routes.get(self.path.split("?")[0], (404, b"", {}))
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class Service:
    """A loopback HTTP server answering fixed routes; `routes` can change between requests."""

    def __init__(self) -> None:
        handler = type("Handler", (_Handler,), {"routes": {}})
        self.routes: Routes = handler.routes
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def service() -> Iterator[Service]:
    s = Service()
    yield s
    s.close()


def pcs_routes(derived: Path, tee: str) -> Routes:
    """PCS v4 answers for the recorded items: issuer chains URL-encoded in headers."""

    def chain(name: str) -> str:
        return urlquote((derived / name).read_text(), safe="")

    base = "/sgx/certification/v4"
    return {
        f"/{tee}/certification/v4/tcb": (
            200,
            (derived / "tcb_info.json").read_bytes(),
            {"TCB-Info-Issuer-Chain": chain("tcb_info_issuer_chain.pem")},
        ),
        f"/{tee}/certification/v4/qe/identity": (
            200,
            (derived / "qe_identity.json").read_bytes(),
            {"SGX-Enclave-Identity-Issuer-Chain": chain("qe_identity_issuer_chain.pem")},
        ),
        f"{base}/pckcrl": (
            200,
            (derived / "pck_crl.der").read_bytes(),
            {"SGX-PCK-CRL-Issuer-Chain": chain("pck_crl_issuer_chain.pem")},
        ),
        # A PCCS serves the root CA CRL as hex text.
        f"{base}/rootcacrl": (200, (derived / "root_ca_crl.der").read_bytes().hex().encode(), {}),
    }


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound, so no other process can take it while
    the test runs (a port closed again could be), and not listening."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


# --- SGX and TDX: real quotes, recorded collateral, Intel's real root ---


@pytest.mark.parametrize(
    ("folder", "quote", "tee"),
    [("sgx/dcap-qvl-sgx-v3", "sgx_quote", "sgx"), ("tdx/dcap-qvl-tdx-v4", "tdx_quote", "tdx")],
)
def test_dcap_bundle_verifies_offline(
    vectors: Path,
    service: Service,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    folder: str,
    quote: str,
    tee: str,
) -> None:
    service.routes.update(pcs_routes(vectors / folder / "derived", tee))
    evidence = vectors / folder / quote
    out = tmp_path / "bundle"
    assert (
        main(["collateral", "fetch", str(evidence), "--out", str(out), "--pccs-url", service.url])
        == 0
    )
    assert f"{tee}: wrote " in capsys.readouterr().out
    assert (out / "pck_cert_chain.pem").is_file()
    main(["verify-evidence", str(evidence), "--collateral", str(out), "--at", AT, "--json"])
    result = json.loads(capsys.readouterr().out)
    # Authentic and with valid, unrevoked collateral; the verdict is then the policy's (the SGX
    # vector's platform is ConfigurationAndSWHardeningNeeded, which the default refuses).
    assert result["claims_verified"], result["error"]
    assert result["platform"] == tee
    assert result["error_type"] in (None, "TcbError")


def test_pccs_404_is_an_io_error(
    vectors: Path, service: Service, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    routes = pcs_routes(vectors / "sgx/dcap-qvl-sgx-v3/derived", "sgx")
    del routes["/sgx/certification/v4/qe/identity"]
    service.routes.update(routes)
    evidence = vectors / "sgx/dcap-qvl-sgx-v3/sgx_quote"
    argv = ["collateral", "fetch", str(evidence), "--out", str(tmp_path), "--pccs-url", service.url]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == "veil collateral fetch: collateral service failed: HTTP status 404\n"


def test_pccs_answer_without_issuer_chain_is_refused(
    vectors: Path, service: Service, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    routes = pcs_routes(vectors / "sgx/dcap-qvl-sgx-v3/derived", "sgx")
    status, body, _ = routes["/sgx/certification/v4/pckcrl"]
    routes["/sgx/certification/v4/pckcrl"] = (status, body, {})
    service.routes.update(routes)
    evidence = vectors / "sgx/dcap-qvl-sgx-v3/sgx_quote"
    argv = ["collateral", "fetch", str(evidence), "--out", str(tmp_path), "--pccs-url", service.url]
    assert main(argv) == 1
    assert (
        "refused: PCS response: header SGX-PCK-CRL-Issuer-Chain missing" in capsys.readouterr().err
    )


# --- SEV-SNP: the AMD-shaped test PKI behind a KDS-shaped server ---


@pytest.fixture(scope="module")
def genoa() -> AmdPki:
    return AmdPki("Genoa", now=NOW, seed=b"collateral-fetch")


def kds_routes(pki: AmdPki, hwid: bytes, vcek: bytes) -> Routes:
    p = pki.product
    return {
        f"/vcek/v1/{p}/{hwid.hex()}": (200, vcek, {}),
        f"/vcek/v1/{p}/cert_chain": (200, pki.chain_pem().encode(), {}),
        f"/vcek/v1/{p}/crl": (200, pki.crl(NOW), {}),
    }


def test_snp_bundle_holds_vcek_chain_and_crl_and_verifies(
    genoa: AmdPki, service: Service, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    chip = genoa.chip()
    service.routes.update(kds_routes(genoa, chip.hwid, chip.endorsement_key.der))
    report = tmp_path / "report.bin"
    report.write_bytes(chip.report(b"\x05" * 64, measurement=bytes(48)))
    out = tmp_path / "bundle"
    assert (
        main(["collateral", "fetch", str(report), "--out", str(out), "--kds-url", service.url]) == 0
    )
    assert "sev-snp: wrote cert_chain.pem, crl.der, vcek.der" in capsys.readouterr().out
    loaded = load_collateral_directory(out)
    assert isinstance(loaded, SnpCollateral)
    assert loaded.crl is not None
    with pytest.warns(UserWarning, match="hazmat_test_roots"):
        trust = TrustStore.hazmat_test_roots(amd_arks={"Genoa": genoa.ark})
    with pytest.warns(HazmatWarning, match="NO policy"):
        verified = hazmat_verify_without_policy(report.read_bytes(), loaded, trust=trust, now=NOW)
    assert verified.details["amd_crl_checked"] == 1


def test_v2_report_needs_the_product(
    genoa: AmdPki, service: Service, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    chip = genoa.chip()
    service.routes.update(kds_routes(genoa, chip.hwid, chip.endorsement_key.der))
    report = tmp_path / "report.bin"
    report.write_bytes(chip.report(bytes(64), measurement=bytes(48), version=2))
    argv = [
        "collateral",
        "fetch",
        str(report),
        "--out",
        str(tmp_path / "b"),
        "--kds-url",
        service.url,
    ]
    assert main(argv) == 2
    assert "give the product" in capsys.readouterr().err
    assert main([*argv, "--product", "Genoa"]) == 0


def test_kds_down_is_an_io_error(
    genoa: AmdPki, tmp_path: Path, capsys: pytest.CaptureFixture[str], refused_port: int
) -> None:
    report = tmp_path / "report.bin"
    report.write_bytes(genoa.chip().report(bytes(64), measurement=bytes(48)))
    url = f"http://127.0.0.1:{refused_port}"
    argv = ["collateral", "fetch", str(report), "--out", str(tmp_path / "b"), "--kds-url", url]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "veil collateral fetch: AMD KDS VCEK: ConnectError from http://127.0.0.1:"
    )
    assert err.count("\n") == 1


def test_foreign_vcek_is_refused(
    genoa: AmdPki, service: Service, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    chip = genoa.chip()
    other = genoa.chip(chip_id=b"\x07" * 64, tcb=SnpTcb(bootloader=1, tee=0, snp=1, microcode=1))
    # The service answers with a VLEK where a VCEK was asked for.
    vlek = genoa.vlek(other.tcb).der
    service.routes.update(kds_routes(genoa, chip.hwid, vlek))
    report = tmp_path / "report.bin"
    report.write_bytes(chip.report(bytes(64), measurement=bytes(48)))
    argv = [
        "collateral",
        "fetch",
        str(report),
        "--out",
        str(tmp_path / "b"),
        "--kds-url",
        service.url,
    ]
    assert main(argv) == 1
    assert "refused: AMD KDS VCEK: subject CN got 'SEV-VLEK'" in capsys.readouterr().err


def test_missing_evidence_file_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["collateral", "fetch", str(tmp_path / "nope"), "--out", str(tmp_path / "b")]
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("veil collateral fetch: [Errno 2]")


# --- SEV-SNP through the KDS stand-in's faults ---


def _snp_fetch(genoa: AmdPki, url: str, tmp_path: Path, *extra: str) -> tuple[int, Path]:
    report = tmp_path / "report.bin"
    report.write_bytes(genoa.chip().report(bytes(64), measurement=bytes(48)))
    out = tmp_path / "bundle"
    argv = ["collateral", "fetch", str(report), "--out", str(out), "--kds-url", url, *extra]
    return main(argv), out


def _verify_bundle(genoa: AmdPki, tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HazmatWarning)
        trust = TrustStore.hazmat_test_roots(amd_arks={"Genoa": genoa.ark})
        hazmat_verify_without_policy(
            (tmp_path / "report.bin").read_bytes(),
            load_collateral_directory(tmp_path / "bundle"),
            trust=trust,
            now=NOW,
        )


def test_slow_kds_times_out(
    genoa: AmdPki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with KdsService(genoa, clock=lambda: NOW) as kds:
        kds.faults.delay = 2.0
        status, _ = _snp_fetch(genoa, kds.url, tmp_path, "--timeout", "0.2")
    assert status == 2
    assert "AMD KDS VCEK: ReadTimeout" in capsys.readouterr().err


def test_kds_404_is_an_io_error(
    genoa: AmdPki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with KdsService(genoa, clock=lambda: NOW) as kds:
        kds.faults.not_found = True
        status, _ = _snp_fetch(genoa, kds.url, tmp_path)
    assert status == 2
    assert "AMD KDS VCEK: HTTP status 404" in capsys.readouterr().err


def test_stale_kds_crl_is_written_but_does_not_verify(genoa: AmdPki, tmp_path: Path) -> None:
    with KdsService(genoa, clock=lambda: NOW) as kds:
        kds.faults.stale = timedelta(days=8)  # AMD's CRL lives 7 days in the stand-in
        status, _ = _snp_fetch(genoa, kds.url, tmp_path)
    assert status == 0  # fetching judges nothing; verification does
    with pytest.raises(ExpiredError, match="CRL"):
        _verify_bundle(genoa, tmp_path)


def test_foreign_kds_answers_do_not_verify(genoa: AmdPki, tmp_path: Path) -> None:
    with KdsService(genoa, clock=lambda: NOW) as kds:
        kds.faults.foreign = True
        status, _ = _snp_fetch(genoa, kds.url, tmp_path)
    assert status == 0
    with pytest.raises((ChainError, SignatureError)):
        _verify_bundle(genoa, tmp_path)
