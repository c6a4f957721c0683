"""`veil.connect(..., collateral=...)`: the server's (default), the client's own from PCCS, or an
offline bundle from `veil collateral fetch`; against the production server on an emulated TDX
machine (`veil.testing.emulated`) and a loopback PCCS stand-in."""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cbor2
import httpx
import pytest
from server_process import VeilServer, start_server

import veil
from veil.attestation.collateral_source import collateral_from_blindai_map, collateral_to_directory
from veil.attestation.policy import Policy, TdxPolicy
from veil.attestation.trust import TrustStore
from veil.cli import main
from veil.errors import HazmatWarning
from veil.testing.intel_pki import IntelPki
from veil.testing.services import PccsService
from veil.testing.state import EmulatedState

pytestmark = pytest.mark.slow

NOW = datetime.now(UTC)
SEED = hashlib.sha256(b"veil client collateral").digest()
MR_TD = hashlib.sha384(b"client collateral td").digest()
POLICY = Policy(tdx=TdxPolicy(mr_td=(MR_TD,)))


@pytest.fixture(scope="module")
def intel() -> IntelPki:
    return IntelPki(now=NOW, seed=SEED)


@pytest.fixture(scope="module")
def trust(intel: IntelPki) -> TrustStore:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HazmatWarning)
        return TrustStore.hazmat_test_roots(intel_root=intel.root)


@pytest.fixture(scope="module")
def pccs(intel: IntelPki) -> Iterator[PccsService]:
    with PccsService(intel, [intel.tdx_platform(label="tdx")]) as service:
        yield service


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, pccs: PccsService) -> Iterator[VeilServer]:
    root = tmp_path_factory.mktemp("client-collateral")
    state = EmulatedState(platform="tdx", seed=SEED, now=NOW, measurement=MR_TD)
    running = start_server(
        root / "data",
        root / "log",
        "--emulated-state",
        str(state.write(root / "state")),
        "--platform",
        "tdx",
        "--pccs-url",
        pccs.url,
        "--unsealed-store",
        module="veil.testing.emulated",
    )
    yield running
    assert running.stop() == 0, running.stderr()[-3000:]


def connect(server: VeilServer, trust: TrustStore, **kwargs: object) -> veil.Connection:
    return veil.connect(
        "127.0.0.1",
        policy=POLICY,
        trust=trust,
        **server.ports,
        **kwargs,  # type: ignore[arg-type]
    )


def served_quote(server: VeilServer) -> bytes:
    response = httpx.get(f"http://127.0.0.1:{server.unattested_port}/quote")
    quote: bytes = cbor2.loads(response.content)
    return quote


def test_default_takes_the_servers_collateral(server: VeilServer, trust: TrustStore) -> None:
    with connect(server, trust) as client:
        assert client.verified.tcb_status == "UpToDate"


def test_client_fetches_its_own_from_pccs(
    server: VeilServer, trust: TrustStore, pccs: PccsService
) -> None:
    before = pccs.total_requests
    with connect(server, trust, collateral=veil.CollateralServices(pccs_url=pccs.url)) as client:
        assert not client.verified.simulated
    assert pccs.total_requests == before + 4  # TCB info, QE identity, PCK CRL, root CA CRL


def test_client_own_collateral_with_pccs_down_is_unavailable(
    server: VeilServer, trust: TrustStore, pccs: PccsService
) -> None:
    pccs.down = True
    try:
        with pytest.raises(veil.EvidenceUnavailableError, match="ConnectError"):
            connect(server, trust, collateral=veil.CollateralServices(pccs_url=pccs.url))
    finally:
        pccs.down = False


def test_client_own_collateral_from_a_foreign_pccs_is_refused(
    server: VeilServer, trust: TrustStore, pccs: PccsService
) -> None:
    pccs.faults.foreign = True
    try:
        # Same names, other keys: the first signature checked against the pinned root fails.
        with pytest.raises((veil.ChainError, veil.SignatureError)):
            connect(server, trust, collateral=veil.CollateralServices(pccs_url=pccs.url))
    finally:
        pccs.faults.foreign = False


def test_offline_bundle_from_the_cli(
    server: VeilServer, trust: TrustStore, pccs: PccsService, tmp_path: Path
) -> None:
    evidence = tmp_path / "quote.bin"
    evidence.write_bytes(served_quote(server))
    bundle = tmp_path / "bundle"
    argv = ["collateral", "fetch", str(evidence), "--out", str(bundle), "--pccs-url", pccs.url]
    assert main(argv) == 0
    with connect(server, trust, collateral=bundle) as client:
        assert client.verified.report_data[:32] == hashlib.sha256(client.certificate_der).digest()
    # The bundle's CRLs and TCB info expire like any collateral: 31 days on, refused.
    with pytest.raises(veil.ExpiredError):
        connect(server, trust, collateral=bundle, now=NOW + timedelta(days=31))


def test_bundle_for_another_platform_is_refused(
    server: VeilServer, trust: TrustStore, tmp_path: Path
) -> None:
    from veil.testing.amd_pki import AmdPki

    chip = AmdPki("Milan", now=NOW, seed=SEED).chip()
    collateral_to_directory(chip.collateral(NOW), tmp_path)
    with pytest.raises(veil.CollateralError, match="expected Intel DCAP"):
        connect(server, trust, collateral=tmp_path)


def test_missing_bundle_directory_is_refused(
    server: VeilServer, trust: TrustStore, tmp_path: Path
) -> None:
    with pytest.raises(veil.CollateralError, match="not a directory"):
        connect(server, trust, collateral=tmp_path / "nope")


def test_unknown_choice_is_refused_before_any_traffic(trust: TrustStore) -> None:
    # Port 9 (discard) is never contacted: the choice is checked first.
    with pytest.raises(ValueError, match="expected 'server', a CollateralServices"):
        veil.connect("127.0.0.1", policy=POLICY, trust=trust, collateral="pccs")


def test_bundle_written_from_the_servers_collateral_round_trips(
    server: VeilServer, trust: TrustStore, tmp_path: Path
) -> None:
    response = httpx.get(f"http://127.0.0.1:{server.unattested_port}/collateral")
    collateral_to_directory(collateral_from_blindai_map(cbor2.loads(response.content)), tmp_path)
    with connect(server, trust, collateral=tmp_path) as client:
        assert client.verified.tcb_status == "UpToDate"
