"""The loopback PCCS and KDS stand-ins: veil's own clients fetch from them, what they fetch
verifies with the production verifier, and each fault (down, slow, 404, stale, foreign) shows."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from urllib.parse import unquote

import httpx
import pytest
from cryptography import x509

from veil.attestation.abi.snp import parse_snp_report
from veil.attestation.collateral_source import HttpGet, collateral_from_pcs
from veil.attestation.kds import KdsClient
from veil.attestation.policy import Policy, SgxPolicy, SnpPolicy, TdxPolicy
from veil.attestation.trust import TrustStore
from veil.attestation.verifier import verify_evidence
from veil.errors import (
    ChainError,
    EvidenceUnavailableError,
    ExpiredError,
    RevokedError,
    SignatureError,
)
from veil.providers.pcs import httpx_getter, pcs_collateral_fetcher
from veil.testing.amd_pki import DEFAULT_TCB, AmdPki
from veil.testing.intel_pki import IntelPki, SgxPlatform, TdxPlatform
from veil.testing.services import KdsService, PccsService

NOW = datetime(2026, 3, 1, 12, tzinfo=UTC)
MR_ENCLAVE = bytes([0x5E]) * 32
MR_TD = bytes([0x7D]) * 48
MEASUREMENT = bytes([0x4D]) * 48
REPORT_DATA = bytes(range(64))


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    # One client for the direct requests: a fresh httpx client per request costs an SSL context.
    with httpx.Client(timeout=5) as client:
        yield client


@pytest.fixture(scope="module")
def get(http: httpx.Client) -> HttpGet:
    # veil's clients take the getter as an argument; one kept-alive client makes each GET cheap
    # (`httpx_getter` itself, a new client per GET, runs in the slow-service tests).
    def fetch(url: str) -> tuple[bytes, Mapping[str, str]]:
        response = http.get(url)
        response.raise_for_status()
        return response.content, dict(response.headers)

    return fetch


@pytest.fixture(scope="module")
def intel() -> IntelPki:
    return IntelPki(now=NOW, seed=b"test_services intel")


@pytest.fixture(scope="module")
def sgx(intel: IntelPki) -> SgxPlatform:
    return intel.sgx_platform(ca="processor")


@pytest.fixture(scope="module")
def tdx(intel: IntelPki) -> TdxPlatform:
    return intel.tdx_platform()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def pccs(
    intel: IntelPki, sgx: SgxPlatform, tdx: TdxPlatform, clock: Clock
) -> Iterator[PccsService]:
    with PccsService(intel, [sgx, tdx], clock=clock) as service:
        yield service


@pytest.fixture(scope="module")
def amd() -> list[AmdPki]:
    return [AmdPki(p, now=NOW, seed=b"test_services amd") for p in ("Milan", "Turin")]


@pytest.fixture
def kds(amd: list[AmdPki], clock: Clock) -> Iterator[KdsService]:
    with KdsService(amd, clock=clock) as service:
        yield service


def _snp_policy(pki: AmdPki) -> Policy:
    return Policy(sev_snp=SnpPolicy(measurement=(MEASUREMENT,), min_tcb=DEFAULT_TCB[pki.product]))


def _intel_trust(intel: IntelPki) -> TrustStore:
    return TrustStore(intel_root=intel.root)


def _amd_trust(intel: IntelPki, amd: list[AmdPki]) -> TrustStore:
    return TrustStore(intel_root=intel.root, amd_arks={p.product: p.ark for p in amd})


# --- PCCS -----------------------------------------------------------------------------------


def test_pccs_collateral_verifies_sgx_and_tdx(
    get: HttpGet, pccs: PccsService, intel: IntelPki, sgx: SgxPlatform, tdx: TdxPlatform
) -> None:
    fetch = pcs_collateral_fetcher(pccs.url, get=get)
    sgx_quote = sgx.quote(REPORT_DATA, mr_enclave=MR_ENCLAVE)
    claims = verify_evidence(
        sgx_quote,
        fetch(sgx_quote),
        policy=Policy(sgx=SgxPolicy(mr_enclave=(MR_ENCLAVE,))),
        trust=_intel_trust(intel),
        now=NOW,
    )
    assert claims.report_data == REPORT_DATA
    td_quote = tdx.quote(REPORT_DATA, mr_td=MR_TD)
    verify_evidence(
        td_quote,
        fetch(td_quote),
        policy=Policy(tdx=TdxPolicy(mr_td=(MR_TD,))),
        trust=_intel_trust(intel),
        now=NOW,
    )
    assert pccs.requests["/sgx/certification/v4/pckcrl"] == 2
    assert pccs.requests["/tdx/certification/v4/tcb"] == 1
    assert pccs.requests["/sgx/certification/v4/rootcacrl"] == 2
    assert any(f"fmspc={tdx.pck.fmspc.hex().upper()}" in line for line in pccs.request_log)


def test_pccs_answers_each_endpoint_in_intel_form(
    http: httpx.Client, pccs: PccsService, intel: IntelPki, sgx: SgxPlatform
) -> None:
    base = pccs.url
    der = http.get(f"{base}/sgx/certification/v4/pckcrl?ca=processor&encoding=der")
    assert der.status_code == 200
    crl = x509.load_der_x509_crl(der.content)
    assert crl.issuer == intel.ca("processor").certificate.subject
    chain = unquote(der.headers["SGX-PCK-CRL-Issuer-Chain"])
    assert chain == intel.pck_crl_issuer_chain("processor")
    pem = http.get(f"{base}/sgx/certification/v4/pckcrl?ca=platform")
    assert x509.load_pem_x509_crl(pem.content).issuer == intel.ca("platform").certificate.subject
    tcb = http.get(f"{base}/sgx/certification/v4/tcb?fmspc={sgx.pck.fmspc.hex()}")
    assert tcb.json()["tcbInfo"]["fmspc"] == sgx.pck.fmspc.hex().upper()
    assert unquote(tcb.headers["TCB-Info-Issuer-Chain"]) == intel.tcb_signing_chain
    qe = http.get(f"{base}/tdx/certification/v4/qe/identity")
    assert qe.json()["enclaveIdentity"]["id"] == "TD_QE"
    assert "SGX-Enclave-Identity-Issuer-Chain" in qe.headers
    root = http.get(f"{base}/IntelSGXRootCA.der")
    assert x509.load_der_x509_crl(root.content).issuer == intel.root.subject
    assert http.get(f"{base}/sgx/certification/v4/tcb?fmspc=FFFFFFFFFFFF").status_code == 404
    assert http.get(f"{base}/sgx/certification/v4/pckcrl?ca=other").status_code == 400
    assert http.get(f"{base}/sgx/certification/v4/tcb").status_code == 400
    assert http.get(f"{base}/nothing").status_code == 404


def test_pccs_down_refuses_connections_then_comes_back(
    http: httpx.Client, pccs: PccsService, sgx: SgxPlatform
) -> None:
    url = pccs.url
    pccs.down = True
    with pytest.raises(httpx.ConnectError):
        http.get(f"{url}/sgx/certification/v4/qe/identity")
    pccs.down = False
    assert pccs.url == url
    assert http.get(f"{url}/sgx/certification/v4/qe/identity").status_code == 200


def test_pccs_slow_times_the_client_out(pccs: PccsService, sgx: SgxPlatform) -> None:
    pccs.faults.delay = 0.5
    with pytest.raises(httpx.TimeoutException):
        httpx_getter(timeout=0.1)(f"{pccs.url}/sgx/certification/v4/qe/identity")
    # The client gave up after 0.1 s; the service's thread may count the request later still.
    deadline = time.monotonic() + 30
    while not pccs.requests["/sgx/certification/v4/qe/identity"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pccs.requests["/sgx/certification/v4/qe/identity"] == 1


def test_pccs_404(get: HttpGet, pccs: PccsService, sgx: SgxPlatform) -> None:
    pccs.faults.not_found = True
    with pytest.raises(httpx.HTTPStatusError, match="404"):
        collateral_from_pcs(sgx.pck.fmspc, "processor", tdx=False, get=get, base_url=pccs.url)
    pccs.faults.not_found = False
    before = pccs.requests["/sgx/certification/v4/tcb"]
    pccs.faults.missing.add("/sgx/certification/v4/qe/identity")
    with pytest.raises(httpx.HTTPStatusError, match="404"):
        collateral_from_pcs(sgx.pck.fmspc, "processor", tdx=False, get=get, base_url=pccs.url)
    assert pccs.requests["/sgx/certification/v4/tcb"] == before + 1  # asked, then the QE 404


def test_pccs_stale_items_are_expired(
    get: HttpGet, pccs: PccsService, intel: IntelPki, sgx: SgxPlatform
) -> None:
    pccs.faults.stale = timedelta(days=31)
    quote = sgx.quote(REPORT_DATA, mr_enclave=MR_ENCLAVE)
    collateral = pcs_collateral_fetcher(pccs.url, get=get)(quote)
    with pytest.raises(ExpiredError):
        verify_evidence(
            quote,
            collateral,
            policy=Policy(sgx=SgxPolicy(mr_enclave=(MR_ENCLAVE,))),
            trust=_intel_trust(intel),
            now=NOW,
        )


def test_pccs_items_from_the_future_are_not_valid_yet(
    get: HttpGet, pccs: PccsService, intel: IntelPki, sgx: SgxPlatform
) -> None:
    pccs.faults.stale = -timedelta(days=2)
    quote = sgx.quote(REPORT_DATA, mr_enclave=MR_ENCLAVE)
    collateral = pcs_collateral_fetcher(pccs.url, get=get)(quote)
    with pytest.raises(ExpiredError):
        verify_evidence(
            quote,
            collateral,
            policy=Policy(sgx=SgxPolicy(mr_enclave=(MR_ENCLAVE,))),
            trust=_intel_trust(intel),
            now=NOW,
        )


def test_pccs_foreign_items_are_refused(
    get: HttpGet, pccs: PccsService, intel: IntelPki, sgx: SgxPlatform
) -> None:
    pccs.faults.foreign = True
    quote = sgx.quote(REPORT_DATA, mr_enclave=MR_ENCLAVE)
    collateral = pcs_collateral_fetcher(pccs.url, get=get)(quote)
    with pytest.raises((ChainError, SignatureError)):
        verify_evidence(
            quote,
            collateral,
            policy=Policy(sgx=SgxPolicy(mr_enclave=(MR_ENCLAVE,))),
            trust=_intel_trust(intel),
            now=NOW,
        )


def test_pccs_follows_its_clock_and_reports_revocation(
    get: HttpGet, intel: IntelPki, clock: Clock
) -> None:
    platform = intel.sgx_platform(label="revoked-on-pccs")
    quote = platform.quote(REPORT_DATA, mr_enclave=MR_ENCLAVE)
    policy = Policy(sgx=SgxPolicy(mr_enclave=(MR_ENCLAVE,)))
    with PccsService(intel, [platform], clock=clock) as pccs:
        fetch = pcs_collateral_fetcher(pccs.url, get=get)
        clock.now = NOW + timedelta(days=45)
        verify_evidence(
            quote, fetch(quote), policy=policy, trust=_intel_trust(intel), now=clock.now
        )
        intel.revoke(platform.pck.leaf.serial_number)
        try:
            with pytest.raises(RevokedError, match="PCK leaf"):
                verify_evidence(
                    quote, fetch(quote), policy=policy, trust=_intel_trust(intel), now=clock.now
                )
        finally:
            intel.unrevoke(platform.pck.leaf.serial_number)


# --- KDS ------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 1], ids=["Milan", "Turin"])
def test_kds_collateral_verifies(
    get: HttpGet, kds: KdsService, intel: IntelPki, amd: list[AmdPki], index: int
) -> None:
    chip = amd[index].chip()
    report = chip.report(REPORT_DATA, measurement=MEASUREMENT)
    collateral = KdsClient(kds.url, get=get).collateral(report)
    assert collateral.crl is not None
    claims = verify_evidence(
        report,
        collateral,
        policy=_snp_policy(chip.pki),
        trust=_amd_trust(intel, amd),
        now=NOW,
    )
    assert claims.report_data == REPORT_DATA
    product = amd[index].product
    assert kds.requests[f"/vcek/v1/{product}/cert_chain"] == 1
    assert kds.requests[f"/vcek/v1/{product}/crl"] == 1
    vcek_line = next(line for line in kds.request_log if "SPL=" in line)
    assert ("fmcSPL=" in vcek_line) == (product == "Turin")
    hwid = parse_snp_report(report).chip_id[: 8 if product == "Turin" else 64]
    assert f"/vcek/v1/{product}/{hwid.hex()}?" in vcek_line


def test_kds_answers_each_endpoint(http: httpx.Client, kds: KdsService, amd: list[AmdPki]) -> None:
    base = kds.url
    for kind, first in (("vcek", "SEV-Milan"), ("vlek", "SEV-VLEK-Milan")):
        chain = x509.load_pem_x509_certificates(
            http.get(f"{base}/{kind}/v1/Milan/cert_chain").content
        )
        names = [c.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value for c in chain]
        assert names == [first, "ARK-Milan"]
        crl = x509.load_der_x509_crl(http.get(f"{base}/{kind}/v1/Milan/crl").content)
        assert crl.issuer == amd[0].ark.subject
    hwid = "00" * 64
    ok = http.get(f"{base}/vcek/v1/Milan/{hwid}?blSPL=3&teeSPL=0&snpSPL=8&ucodeSPL=115")
    assert x509.load_der_x509_certificate(ok.content).issuer == amd[0].ask.subject
    assert http.get(f"{base}/vcek/v1/Milan/{hwid}?blSPL=3").status_code == 400
    turin = "00" * 8 + "?blSPL=3&teeSPL=0&snpSPL=8&ucodeSPL=115"
    assert http.get(f"{base}/vcek/v1/Turin/{turin}").status_code == 400  # no fmcSPL
    assert http.get(f"{base}/vcek/v1/Turin/{turin}&fmcSPL=1").status_code == 200
    assert http.get(f"{base}/vcek/v1/Turin/{hwid}?blSPL=3").status_code == 400
    assert http.get(f"{base}/vcek/v1/Naples/cert_chain").status_code == 404
    assert http.get(f"{base}/vlek/v1/Milan/{hwid}").status_code == 404


def test_kds_down_and_404_are_unavailable(get: HttpGet, kds: KdsService, amd: list[AmdPki]) -> None:
    report = amd[0].chip().report(REPORT_DATA, measurement=MEASUREMENT)
    client = KdsClient(kds.url, get=get)
    kds.faults.not_found = True
    with pytest.raises(EvidenceUnavailableError):
        client.collateral(report)
    kds.faults.not_found = False
    kds.down = True
    with pytest.raises(EvidenceUnavailableError):
        client.collateral(report)
    kds.down = False
    client.collateral(report)


def test_kds_slow(kds: KdsService, amd: list[AmdPki]) -> None:
    kds.faults.delay = 0.5
    with pytest.raises(EvidenceUnavailableError):
        KdsClient(kds.url, get=httpx_getter(timeout=0.1)).cert_chain("Milan")


def test_kds_stale_crl_and_foreign_chain_are_refused(
    get: HttpGet, kds: KdsService, intel: IntelPki, amd: list[AmdPki]
) -> None:
    chip = amd[0].chip()
    report = chip.report(REPORT_DATA, measurement=MEASUREMENT)
    client = KdsClient(kds.url, get=get)
    policy = _snp_policy(chip.pki)
    kds.faults.stale = timedelta(days=8)
    with pytest.raises(ExpiredError, match="CRL"):
        verify_evidence(
            report, client.collateral(report), policy=policy, trust=_amd_trust(intel, amd), now=NOW
        )
    kds.faults.stale = timedelta(0)
    kds.faults.foreign = True
    with pytest.raises(ChainError):
        verify_evidence(
            report, client.collateral(report), policy=policy, trust=_amd_trust(intel, amd), now=NOW
        )


def test_kds_reports_a_revoked_vcek(
    get: HttpGet, kds: KdsService, intel: IntelPki, amd: list[AmdPki]
) -> None:
    chip = amd[0].chip()
    report = chip.report(REPORT_DATA, measurement=MEASUREMENT)
    amd[0].revoke(chip.endorsement_key.serial_number)
    try:
        collateral = KdsClient(kds.url, get=get).collateral(report)
    finally:
        amd[0].unrevoke(chip.endorsement_key.serial_number)
    with pytest.raises(RevokedError, match="VCEK"):
        verify_evidence(
            report,
            collateral,
            policy=_snp_policy(chip.pki),
            trust=_amd_trust(intel, amd),
            now=NOW,
        )


def test_service_edges(http: httpx.Client, intel: IntelPki, sgx: SgxPlatform, clock: Clock) -> None:
    service = PccsService(intel, [sgx], clock=clock)
    with pytest.raises(RuntimeError, match="not started"):
        _ = service.url
    assert service.down
    with service:
        base = service.url
        assert (
            http.get(f"{base}/sgx/certification/v4/pckcrl?ca=platform&encoding=x").status_code
            == 400
        )
        # No TDX platform registered: no TD_QE identity to serve.
        assert http.get(f"{base}/tdx/certification/v4/qe/identity").status_code == 404
        service.platforms.append(object())  # type: ignore[arg-type]
        broken = http.get(f"{base}/tdx/certification/v4/qe/identity")
        assert broken.status_code == 500  # a bug in a stand-in answers, it does not hang
        assert service.total_requests == 3
    assert service.down


def test_kds_refuses_a_hwid_that_is_not_hex(http: httpx.Client, kds: KdsService) -> None:
    assert http.get(f"{kds.url}/vcek/v1/Milan/xyz?blSPL=1").status_code == 400
