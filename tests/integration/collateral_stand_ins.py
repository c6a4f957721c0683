"""Loopback collateral services for the emulated platforms' tests: a PCCS (Intel PCS API v4 paths)
serving an `IntelPki`'s collateral and an AMD KDS serving an `AmdPki`'s VCEKs, chain and CRL.
Collateral is issued at the time given; revocations show on the next CRL."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, urlsplit

from veil.attestation.abi.snp import SnpTcb
from veil.testing.amd_pki import AmdPki
from veil.testing.intel_pki import DcapPlatform, IntelPki

Answer = tuple[bytes, dict[str, str]] | None


def _pccs_answer(
    pki: IntelPki, platforms: dict[str, DcapPlatform], now: datetime, path: str, query: str
) -> Answer:
    params = {k: v[0] for k, v in parse_qs(query).items()}
    tee, _, rest = path.strip("/").partition("/certification/v4/")
    platform = platforms.get(tee)
    if platform is None:
        return None
    if rest == "tcb":
        text, signature = pki.sign_json(platform.tcb_info(now))
        body = f'{{"tcbInfo":{text},"signature":"{signature.hex()}"}}'
        return body.encode(), {"TCB-Info-Issuer-Chain": quote(pki.tcb_signing_chain)}
    if rest == "qe/identity":
        text, signature = pki.sign_json(platform.qe_identity(now))
        body = f'{{"enclaveIdentity":{text},"signature":"{signature.hex()}"}}'
        return body.encode(), {"SGX-Enclave-Identity-Issuer-Chain": quote(pki.tcb_signing_chain)}
    if rest == "pckcrl" and params.get("ca") in ("platform", "processor"):
        ca = "platform" if params["ca"] == "platform" else "processor"
        chain = quote(pki.pck_crl_issuer_chain(ca))
        return pki.pck_crl(ca, now), {"SGX-PCK-CRL-Issuer-Chain": chain}
    if rest == "rootcacrl":
        return pki.root_crl(now), {}
    return None


def _kds_answer(pki: AmdPki, now: datetime, path: str, query: str) -> Answer:
    parts = path.strip("/").split("/")
    if len(parts) != 4 or parts[:2] != ["vcek", "v1"] or parts[2] != pki.product:
        return None
    if parts[3] == "cert_chain":
        return pki.chain_pem().encode(), {}
    if parts[3] == "crl":
        return pki.crl(now), {}
    spl = {k: int(v[0]) for k, v in parse_qs(query).items()}
    tcb = SnpTcb(
        bootloader=spl["blSPL"],
        tee=spl["teeSPL"],
        snp=spl["snpSPL"],
        microcode=spl["ucodeSPL"],
        fmc=spl.get("fmcSPL"),
    )
    return pki.vcek(bytes.fromhex(parts[3]), tcb).der, {}


@contextmanager
def _serve(answer: Callable[[str, str], Answer]) -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urlsplit(self.path)
            found = answer(url.path, url.query)
            if found is None:
                self.send_error(404)
                return
            body, headers = found
            self.send_response(200)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@contextmanager
def serve_pccs(pki: IntelPki, *, now: datetime) -> Iterator[str]:
    """A PCCS for `pki`'s default SGX and TDX platforms; yields its base URL."""
    platforms: dict[str, DcapPlatform] = {"sgx": pki.sgx_platform(), "tdx": pki.tdx_platform()}
    with _serve(lambda path, query: _pccs_answer(pki, platforms, now, path, query)) as url:
        yield url


@contextmanager
def serve_kds(pki: AmdPki, *, now: datetime) -> Iterator[str]:
    """An AMD KDS for `pki`'s product (VCEKs, cert_chain, crl); yields its base URL."""
    with _serve(lambda path, query: _kds_answer(pki, now, path, query)) as url:
        yield url
