"""The collateral lifecycle of the production server on emulated devices, in process, with the
loopback PCCS and KDS stand-ins (`veil.testing.services`) and injected clocks.

The server's state comes from `prepare_state` exactly as `veil serve` builds it (same provider,
same collateral fetcher and cache); routes are driven through Starlette's test client so the
server's clock can jump 31 days. What a client does with the served collateral is
`verify_evidence` at the client's own (injected) time: `veil.connect`'s step 3.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from inprocess import listening
from starlette.testclient import TestClient

import veil
from veil.attestation.policy import Policy, SnpPolicy, TdxPolicy
from veil.attestation.trust import TrustStore
from veil.attestation.verifier import verify_evidence
from veil.errors import (
    ChainError,
    EvidenceUnavailableError,
    ExpiredError,
    HazmatWarning,
    SignatureError,
)
from veil.server.app import ServerState, build_apps
from veil.server.config import ServerConfig
from veil.server.runner import make_provider, prepare_state
from veil.server.store import ModelStore
from veil.testing.amd_pki import AmdPki
from veil.testing.devices import EmulatedDevices, EmulatedTsm
from veil.testing.intel_pki import IntelPki
from veil.testing.services import KdsService, PccsService
from veil.tls import TlsIdentity

pytestmark = pytest.mark.slow

START = datetime(2026, 3, 1, 12, tzinfo=UTC)
SEED = hashlib.sha256(b"veil collateral lifecycle").digest()
MR_TD = hashlib.sha384(b"lifecycle td").digest()
SNP_MEASUREMENT = hashlib.sha384(b"lifecycle guest").digest()


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def hazmat(**roots: Any) -> TrustStore:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HazmatWarning)
        return TrustStore.hazmat_test_roots(**roots)


# --- TDX: PCCS stand-in, 31 days ------------------------------------------------------------


@pytest.fixture(scope="module")
def intel() -> IntelPki:
    return IntelPki(now=START - timedelta(days=1), seed=SEED)


@pytest.fixture
def pccs(intel: IntelPki, clock: Clock) -> Iterator[PccsService]:
    with PccsService(intel, [intel.tdx_platform()], clock=clock) as service:
        yield service


def tdx_server(tmp_path: Path, intel: IntelPki, pccs_url: str, clock: Clock) -> ServerState:
    return tdx_server_and_identity(tmp_path, intel, pccs_url, clock)[0]


def tdx_server_and_identity(
    tmp_path: Path, intel: IntelPki, pccs_url: str, clock: Clock
) -> tuple[ServerState, TlsIdentity]:
    tdx = intel.tdx_platform()
    devices = EmulatedDevices(tsm=EmulatedTsm(quote_signer=lambda rd: tdx.quote(rd, mr_td=MR_TD)))
    config = ServerConfig(tmp_path / "data", platform="tdx", pccs_url=pccs_url, unsealed_store=True)
    provider = make_provider(config, fs=devices, clock=clock)
    return prepare_state(
        config, store=ModelStore(tmp_path / "models"), provider=provider, clock=clock
    )


def get(state: ServerState, path: str) -> tuple[int, Any]:
    unattested, _, _ = build_apps(state)
    with TestClient(unattested) as http:
        response = http.get(path)
    return response.status_code, cbor2.loads(response.content)


def tdx_client_accepts(state: ServerState, intel: IntelPki, at: datetime) -> None:
    _, served = get(state, "/collateral")
    policy = Policy(tdx=TdxPolicy(mr_td=(MR_TD,)))
    verify_evidence(
        state.keys.current.quote, served, policy=policy, trust=hazmat(intel_root=intel.root), now=at
    )


def test_tdx_server_31_days_on_is_still_accepted(
    tmp_path: Path, intel: IntelPki, pccs: PccsService, clock: Clock
) -> None:
    state = tdx_server(tmp_path, intel, pccs.url, clock)
    tdx_client_accepts(state, intel, clock())
    first = get(state, "/collateral")[1]
    for _ in range(31):  # the server's clock and the PCCS's move together, a day at a time
        clock.now += timedelta(days=1)
        state.collateral.refresh_if_due()
    assert get(state, "/collateral")[1] != first
    tdx_client_accepts(state, intel, clock())
    status, health = get(state, "/healthz")
    assert (status, health["status"], health["simulated"]) == (200, "ok", False)


def test_veil_connect_31_days_on(
    tmp_path: Path, intel: IntelPki, pccs: PccsService, clock: Clock
) -> None:
    state, identity = tdx_server_and_identity(tmp_path, intel, pccs.url, clock)
    policy = Policy(tdx=TdxPolicy(mr_td=(MR_TD,)))
    trust = hazmat(intel_root=intel.root)
    with listening(state, identity) as ports:
        with veil.connect("127.0.0.1", policy=policy, trust=trust, now=clock(), **ports):
            pass
        clock.now += timedelta(days=31)
        # Before the refresh: the copy fetched at start has expired for a client at that time.
        with pytest.raises(ExpiredError):
            veil.connect("127.0.0.1", policy=policy, trust=trust, now=clock(), **ports)
        assert state.collateral.refresh_if_due()  # what the background task does
        with veil.connect("127.0.0.1", policy=policy, trust=trust, now=clock(), **ports) as c:
            assert c.verified.tcb_status == "UpToDate"


def test_tdx_pccs_gone_is_degraded_before_clients_refuse(
    tmp_path: Path, intel: IntelPki, pccs: PccsService, clock: Clock
) -> None:
    state = tdx_server(tmp_path, intel, pccs.url, clock)
    expires = state.collateral.status().expires
    assert expires is not None
    pccs.down = True
    clock.now += timedelta(days=2)
    assert not state.collateral.refresh_if_due()
    status, health = get(state, "/healthz")
    assert (status, health["status"]) == (200, "degraded")
    assert health["collateral"]["last_error"] == "EvidenceUnavailableError"
    tdx_client_accepts(state, intel, expires - timedelta(seconds=1))  # still accepted
    clock.now = expires + timedelta(seconds=1)
    assert get(state, "/healthz")[0] == 503
    with pytest.raises(ExpiredError):
        tdx_client_accepts(state, intel, clock())


def test_tdx_restart_with_pccs_down_serves_the_cache(
    tmp_path: Path, intel: IntelPki, pccs: PccsService, clock: Clock
) -> None:
    tdx_server(tmp_path, intel, pccs.url, clock)
    pccs.down = True
    clock.now += timedelta(days=3)
    restarted = tdx_server(tmp_path, intel, pccs.url, clock)
    tdx_client_accepts(restarted, intel, clock())
    # It knows the copy is old: a refresh is due, it fails, /healthz says so.
    restarted.collateral.refresh_if_due()
    assert get(restarted, "/healthz")[1]["status"] == "degraded"


@pytest.mark.parametrize("fault", ["not_found", "stale", "down"])
def test_tdx_first_start_without_usable_pccs_refuses(
    tmp_path: Path, intel: IntelPki, pccs: PccsService, clock: Clock, fault: str
) -> None:
    if fault == "not_found":
        pccs.faults.not_found = True
    elif fault == "stale":
        pccs.faults.stale = timedelta(days=31)  # items that expired a day ago
    else:
        pccs.down = True
    with pytest.raises(EvidenceUnavailableError, match="no cached copy valid"):
        tdx_server(tmp_path, intel, pccs.url, clock)


# --- SEV-SNP: KDS stand-in, no certificate table from the host ------------------------------


@pytest.fixture(scope="module")
def genoa() -> AmdPki:
    return AmdPki("Genoa", now=START - timedelta(days=1), seed=SEED)


def snp_server(
    tmp_path: Path,
    genoa: AmdPki,
    kds_url: str,
    clock: Clock,
    *,
    version: int = 3,
    product: str | None = None,
) -> ServerState:
    chip = genoa.chip()
    devices = EmulatedDevices(
        tsm=EmulatedTsm(
            snp_signer=lambda rd, vmpl: chip.report(
                rd, measurement=SNP_MEASUREMENT, vmpl=vmpl, version=version
            )
        )
    )
    config = ServerConfig(
        tmp_path / "data",
        platform="sev-snp",
        kds_url=kds_url,
        unsealed_store=True,
        snp_product=product,
    )
    provider = make_provider(config, fs=devices, clock=clock)
    state, _ = prepare_state(
        config, store=ModelStore(tmp_path / "models"), provider=provider, clock=clock
    )
    return state


def test_snp_guest_without_host_certificates_gets_its_vcek_from_kds(
    tmp_path: Path, genoa: AmdPki, clock: Clock
) -> None:
    with KdsService(genoa, clock=clock) as kds:
        state = snp_server(tmp_path, genoa, kds.url, clock)
        assert any(path.startswith("/vcek/v1/Genoa/") for path in kds.requests)
    _, served = get(state, "/collateral")
    assert set(served) == {"vcek", "cert_chain", "crl"}
    policy = Policy(
        sev_snp=SnpPolicy(
            measurement=(SNP_MEASUREMENT,), min_tcb=genoa.chip().tcb, require_crl=True
        )
    )
    trust = hazmat(amd_arks={"Genoa": genoa.ark})
    verify_evidence(state.keys.current.quote, served, policy=policy, trust=trust, now=clock())


def test_snp_kds_down_and_no_cache_refuses_to_start(
    tmp_path: Path, genoa: AmdPki, clock: Clock
) -> None:
    with KdsService(genoa, clock=clock) as kds:
        kds.down = True
        with pytest.raises(EvidenceUnavailableError) as info:
            snp_server(tmp_path, genoa, kds.url, clock)
    message = str(info.value)
    assert "AMD KDS VCEK: ConnectError" in message
    assert "no cached copy valid" in message


def test_snp_kds_down_after_a_first_start_serves_the_cache(
    tmp_path: Path, genoa: AmdPki, clock: Clock
) -> None:
    with KdsService(genoa, clock=clock) as kds:
        first = get(snp_server(tmp_path, genoa, kds.url, clock), "/collateral")[1]
        kds.down = True
        clock.now += timedelta(hours=1)
        again = snp_server(tmp_path, genoa, kds.url, clock)
    assert get(again, "/collateral")[1] == first


def test_snp_foreign_kds_answer_refuses_to_start(
    tmp_path: Path, genoa: AmdPki, clock: Clock
) -> None:
    with KdsService(genoa, clock=clock) as kds:
        kds.faults.foreign = True
        # The foreign PKI's VCEK has the same shape: the server cannot tell, the client can.
        state = snp_server(tmp_path, genoa, kds.url, clock)
    _, served = get(state, "/collateral")
    policy = Policy(sev_snp=SnpPolicy(measurement=(SNP_MEASUREMENT,), min_tcb=genoa.chip().tcb))
    trust = hazmat(amd_arks={"Genoa": genoa.ark})
    with pytest.raises((ChainError, SignatureError)):
        verify_evidence(state.keys.current.quote, served, policy=policy, trust=trust, now=clock())


def snp_server_with_host_certificates(
    tmp_path: Path, genoa: AmdPki, kds_url: str, clock: Clock, *, version: int = 3
) -> ServerState:
    chip = genoa.chip()
    der = {"vcek": chip.endorsement_key.der}
    for name, cert in (("ask", genoa.ask), ("ark", genoa.ark)):
        der[name] = cert.public_bytes(Encoding.DER)
    devices = EmulatedDevices(
        tsm=EmulatedTsm(
            snp_signer=lambda rd, vmpl: chip.report(
                rd, measurement=SNP_MEASUREMENT, vmpl=vmpl, version=version
            ),
            host_certificates=der,
        )
    )
    config = ServerConfig(
        tmp_path / "data", platform="sev-snp", kds_url=kds_url, unsealed_store=True
    )
    provider = make_provider(config, fs=devices, clock=clock)
    state, _ = prepare_state(
        config, store=ModelStore(tmp_path / "models"), provider=provider, clock=clock
    )
    return state


@pytest.mark.parametrize("version", [2, 3])
def test_snp_host_certificates_are_completed_with_the_kds_crl(
    tmp_path: Path, genoa: AmdPki, clock: Clock, version: int
) -> None:
    with KdsService(genoa, clock=clock) as kds:
        state = snp_server_with_host_certificates(tmp_path, genoa, kds.url, clock, version=version)
        # Only the chain and CRL were asked for: the key came from the host (a v2 report's
        # product from the key's productName).
        assert sorted(kds.requests) == ["/vcek/v1/Genoa/cert_chain", "/vcek/v1/Genoa/crl"]
    _, served = get(state, "/collateral")
    assert set(served) == {"vcek", "cert_chain", "crl"}
    policy = Policy(
        sev_snp=SnpPolicy(
            measurement=(SNP_MEASUREMENT,), min_tcb=genoa.chip().tcb, require_crl=True
        )
    )
    trust = hazmat(amd_arks={"Genoa": genoa.ark})
    verify_evidence(state.keys.current.quote, served, policy=policy, trust=trust, now=clock())
    assert get(state, "/healthz")[1]["status"] == "ok"


def test_snp_host_certificates_with_kds_down_start_degraded(
    tmp_path: Path, genoa: AmdPki, clock: Clock
) -> None:
    with KdsService(genoa, clock=clock) as kds:
        kds.down = True
        state = snp_server_with_host_certificates(tmp_path, genoa, kds.url, clock)
    _, served = get(state, "/collateral")
    assert "crl" not in served  # the host's copy: clients that require the CRL refuse it
    status, health = get(state, "/healthz")
    assert (status, health["status"]) == (200, "degraded")


def test_snp_v2_report_fetches_with_the_configured_product(
    tmp_path: Path, genoa: AmdPki, clock: Clock
) -> None:
    with KdsService(genoa, clock=clock) as kds:
        with pytest.raises(EvidenceUnavailableError, match="give the product"):
            snp_server(tmp_path / "a", genoa, kds.url, clock, version=2)
        state = snp_server(tmp_path / "b", genoa, kds.url, clock, version=2, product="Genoa")
    assert "vcek" in get(state, "/collateral")[1]
