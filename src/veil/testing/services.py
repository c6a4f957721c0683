"""Loopback stand-ins for Intel PCS/PCCS v4 and AMD KDS, over the test PKIs, with fault knobs.

Each service is a small threaded HTTP server on ``127.0.0.1`` (port 0: the OS picks one), started
and stopped as a context manager, answering the public API's paths with the test PKI's items:

- `PccsService` (Intel "Provisioning Certification Service API v4", as PCS and PCCS serve it):
  ``/sgx/certification/v4/pckcrl?ca=platform|processor&encoding=der|pem`` (issuer chain in
  ``SGX-PCK-CRL-Issuer-Chain``), ``/{sgx,tdx}/certification/v4/tcb?fmspc=`` (``{"tcbInfo": …,
  "signature": hex}``, chain in ``TCB-Info-Issuer-Chain``), ``/{sgx,tdx}/certification/v4/
  qe/identity`` (``{"enclaveIdentity": …}``, chain in ``SGX-Enclave-Identity-Issuer-Chain``),
  and the root CA CRL at PCCS's ``/sgx/certification/v4/rootcacrl`` and Intel's
  ``/IntelSGXRootCA.der``. Issuer chains are URL-encoded PEM, as Intel sends them.
- `KdsService` (AMD "VCEK Certificate and KDS Interface Specification"):
  ``/vcek/v1/{product}/{hwid}?blSPL=&teeSPL=&snpSPL=&ucodeSPL=`` (+ ``fmcSPL`` on Turin) → VCEK
  DER, ``/{vcek,vlek}/v1/{product}/cert_chain`` → PEM ASK/ASVK then ARK,
  ``/{vcek,vlek}/v1/{product}/crl`` → the ARK-signed CRL, DER.

Fault knobs a test flips at run time (see `Faults`): `down` (connections refused), `delay`
(seconds before each answer), `not_found` (404 for everything), `missing` (404 for some paths),
`stale` (items issued that long before the service clock: past 30 days Intel's items are
expired, past 7 days AMD's CRL), `foreign` (items signed by another PKI of the same shape).
The clock is injected; every request is counted by path. Nothing here validates like the real
services beyond what tests need.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import parse_qs, quote, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from veil.attestation.abi.snp import SnpTcb
from veil.testing.amd_pki import AmdPki
from veil.testing.intel_pki import DcapPlatform, IntelPki

__all__ = ["Faults", "KdsService", "LoopbackService", "PccsService", "Response"]

Clock = Callable[[], datetime]


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Response:
    """One HTTP answer."""

    status: int
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)


def _error(status: int, message: str) -> Response:
    return Response(status, message.encode(), {"Content-Type": "text/plain"})


@dataclass
class Faults:
    """What a service does wrong, flipped by tests while it runs.

    Attributes:
        delay: seconds to wait before answering each request.
        not_found: answer 404 to every request.
        missing: paths (without query) answered 404, e.g. only the TCB info.
        stale: issue items this long before the service clock (0 = fresh; negative: items
            from the future, as a service whose clock runs ahead would issue them).
        foreign: sign items with another PKI of the same shape (an untrusted root).
    """

    delay: float = 0.0
    not_found: bool = False
    missing: set[str] = field(default_factory=set)
    stale: timedelta = timedelta(0)
    foreign: bool = False


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, port: int, service: LoopbackService) -> None:
        self.service = service
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(("127.0.0.1", port), _Handler)

    def handle_error(self, request: object, client_address: object) -> None:
        # A client that timed out or a connection ended by `down` leaves mid-answer: expected.
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)  # type: ignore[arg-type]

    def close_connections(self) -> None:
        # Kept-alive connections outlive the listening socket; "down" must end them too.
        with self.connections_lock:
            connections = list(self.connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: without TCP_NODELAY a kept-alive client waits
    # for the delayed ACK (about 40 ms) on every request.
    disable_nagle_algorithm = True

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def do_GET(self) -> None:
        response = self.server.service._answer(self.path)
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        self.wfile.write(response.body)

    def log_message(self, format: str, *args: object) -> None:
        # Request lines would land on stderr of every test; the counter records them instead.
        return


class LoopbackService:
    """A threaded HTTP server on 127.0.0.1 that a test starts, breaks and stops.

    Subclasses implement `handle`. Use as a context manager::

        with PccsService(pki, [platform]) as pccs:
            fetch(pccs.url)
            pccs.faults.delay = 5.0
            pccs.down = True   # connections refused until set back to False
    """

    def __init__(self, *, clock: Clock = _utc_now) -> None:
        self.clock = clock
        self.faults = Faults()
        self.requests: Counter[str] = Counter()
        self.request_log: list[str] = []
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._port = 0

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        if self._server is not None:
            return
        server = _Server(self._port, self)
        self._port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"{type(self).__name__}:{self._port}",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
            server.close_connections()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> LoopbackService:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``; stable across `down` flips."""
        if self._port == 0:
            raise RuntimeError("service not started")
        return f"http://127.0.0.1:{self._port}"

    @property
    def down(self) -> bool:
        """True while the listening socket is closed: clients get "connection refused"."""
        return self._server is None

    @down.setter
    def down(self, value: bool) -> None:
        if value:
            self.stop()
        else:
            self.start()

    def now(self) -> datetime:
        """The service clock minus the `stale` fault: when items are issued."""
        return self.clock() - self.faults.stale

    @property
    def total_requests(self) -> int:
        with self._lock:
            return sum(self.requests.values())

    # --- requests -------------------------------------------------------------------------------

    def _answer(self, raw_path: str) -> Response:
        parts = urlsplit(raw_path)
        with self._lock:
            self.requests[parts.path] += 1
            self.request_log.append(raw_path)
        faults = self.faults
        if faults.delay > 0:
            time.sleep(faults.delay)
        if faults.not_found or parts.path in faults.missing:
            return _error(404, "not found (fault injected)")
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        try:
            return self.handle(parts.path, query)
        except Exception as exc:  # a bug in a stand-in must answer, not hang the client
            return _error(500, f"{type(exc).__name__}")

    def handle(self, path: str, query: Mapping[str, str]) -> Response:
        raise NotImplementedError


def _pem_crl(der: bytes) -> bytes:
    return x509.load_der_x509_crl(der).public_bytes(Encoding.PEM)


def _signed_body(key: str, text: str, signature: bytes) -> bytes:
    # Built by concatenation so the signed text travels byte for byte, as Intel's does.
    return f'{{"{key}":{text},"signature":"{signature.hex()}"}}'.encode()


class PccsService(LoopbackService):
    """Intel PCS/PCCS v4 over an `IntelPki` and the platforms registered with it.

    Args:
        pki: the PKI whose CAs, TCB Signing key and CRLs answer.
        platforms: SGX and TDX platforms whose TCB info (by FMSPC) and QE identity are served.
        clock: the service's time; items are issued at ``clock() - faults.stale``.
    """

    def __init__(
        self, pki: IntelPki, platforms: Iterable[DcapPlatform], *, clock: Clock = _utc_now
    ) -> None:
        super().__init__(clock=clock)
        self.pki = pki
        self.platforms: list[DcapPlatform] = list(platforms)
        self._foreign: IntelPki | None = None

    def __enter__(self) -> PccsService:
        self.start()
        return self

    def _signer(self) -> IntelPki:
        if not self.faults.foreign:
            return self.pki
        if self._foreign is None:
            self._foreign = IntelPki(now=self.clock(), seed=self.pki.seed + b"/foreign")
        return self._foreign

    def _platform(self, tee: str, fmspc: str | None) -> DcapPlatform | None:
        for platform in self.platforms:
            if platform.tee != tee.upper():
                continue
            if fmspc is None or platform.pck.fmspc.hex().upper() == fmspc.upper():
                return platform
        return None

    def handle(self, path: str, query: Mapping[str, str]) -> Response:
        signer, now = self._signer(), self.now()
        if path in ("/sgx/certification/v4/rootcacrl", "/IntelSGXRootCA.der"):
            return Response(200, signer.root_crl(now), {"Content-Type": "application/pkix-crl"})
        if path == "/sgx/certification/v4/pckcrl":
            ca = query.get("ca", "").lower()
            if ca not in ("platform", "processor"):
                return _error(400, "ca: expected platform or processor")
            encoding = query.get("encoding", "pem").lower()
            if encoding not in ("pem", "der"):
                return _error(400, "encoding: expected pem or der")
            der = signer.pck_crl(ca, now)  # type: ignore[arg-type]
            body, kind = (
                (der, "application/pkix-crl")
                if encoding == "der"
                else (_pem_crl(der), "application/x-pem-file")
            )
            chain = signer.pck_crl_issuer_chain(ca)  # type: ignore[arg-type]
            return Response(
                200, body, {"Content-Type": kind, "SGX-PCK-CRL-Issuer-Chain": quote(chain)}
            )
        for tee in ("sgx", "tdx"):
            if path == f"/{tee}/certification/v4/tcb":
                fmspc = query.get("fmspc")
                if not fmspc:
                    return _error(400, "fmspc: missing")
                platform = self._platform(tee, fmspc)
                if platform is None:
                    return _error(404, "no TCB info for this FMSPC")
                text, signature = signer.sign_json(platform.tcb_info(now))
                return Response(
                    200,
                    _signed_body("tcbInfo", text, signature),
                    {
                        "Content-Type": "application/json",
                        "TCB-Info-Issuer-Chain": quote(signer.tcb_signing_chain),
                    },
                )
            if path == f"/{tee}/certification/v4/qe/identity":
                platform = self._platform(tee, None)
                if platform is None:
                    return _error(404, f"no {tee.upper()} platform registered")
                text, signature = signer.sign_json(platform.qe_identity(now))
                return Response(
                    200,
                    _signed_body("enclaveIdentity", text, signature),
                    {
                        "Content-Type": "application/json",
                        "SGX-Enclave-Identity-Issuer-Chain": quote(signer.tcb_signing_chain),
                    },
                )
        return _error(404, "unknown path")


_SPL_PARAMS = (
    ("blSPL", "bootloader"),
    ("teeSPL", "tee"),
    ("snpSPL", "snp"),
    ("ucodeSPL", "microcode"),
)


class KdsService(LoopbackService):
    """AMD KDS over one `AmdPki` per product.

    Args:
        pkis: the products served (one `AmdPki` each).
        clock: the service's time; CRLs are issued at ``clock() - faults.stale``.
    """

    def __init__(self, pkis: AmdPki | Sequence[AmdPki], *, clock: Clock = _utc_now) -> None:
        super().__init__(clock=clock)
        items = [pkis] if isinstance(pkis, AmdPki) else list(pkis)
        self.pkis: dict[str, AmdPki] = {pki.product: pki for pki in items}
        self._foreign: dict[str, AmdPki] = {}

    def __enter__(self) -> KdsService:
        self.start()
        return self

    def _pki(self, product: str) -> AmdPki | None:
        pki = self.pkis.get(product)
        if pki is None or not self.faults.foreign:
            return pki
        if product not in self._foreign:
            self._foreign[product] = AmdPki(product, now=self.clock(), seed=pki.seed + b"/foreign")
        return self._foreign[product]

    def handle(self, path: str, query: Mapping[str, str]) -> Response:
        parts = path.strip("/").split("/")
        if len(parts) != 4 or parts[0] not in ("vcek", "vlek") or parts[1] != "v1":
            return _error(404, "unknown path")
        kind, product, last = parts[0], parts[2], parts[3]
        pki = self._pki(product)
        if pki is None:
            return _error(404, f"unknown product {product}")
        vlek = kind == "vlek"
        if last == "cert_chain":
            return Response(
                200, pki.chain_pem(vlek=vlek).encode(), {"Content-Type": "application/x-pem-file"}
            )
        if last == "crl":
            return Response(200, pki.crl(self.now()), {"Content-Type": "application/pkix-crl"})
        if vlek:
            return _error(404, "VLEKs are not served by hwID")
        return self._vcek(pki, last, query)

    def _vcek(self, pki: AmdPki, hwid_hex: str, query: Mapping[str, str]) -> Response:
        turin = pki.product == "Turin"
        try:
            hwid = bytes.fromhex(hwid_hex)
        except ValueError:
            return _error(400, "hwid: not hex")
        if len(hwid) != (8 if turin else 64):
            return _error(400, "hwid: wrong length for the product")
        names = list(_SPL_PARAMS) + ([("fmcSPL", "fmc")] if turin else [])
        spl: dict[str, int] = {}
        for param, component in names:
            value = query.get(param, "")
            if not value.isdigit() or not 0 <= int(value) <= 255:
                return _error(400, f"{param}: expected 0..255")
            spl[component] = int(value)
        tcb = SnpTcb(
            bootloader=spl["bootloader"],
            tee=spl["tee"],
            snp=spl["snp"],
            microcode=spl["microcode"],
            fmc=spl.get("fmc"),
        )
        return Response(
            200, pki.vcek(hwid, tcb).der, {"Content-Type": "application/x-x509-ca-cert"}
        )
