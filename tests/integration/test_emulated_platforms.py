"""The production `veil serve` on emulated SGX, TDX and SEV-SNP hardware, verified by a client
WITHOUT simulation=True: only the trust roots differ from a real deployment (hazmat test roots).

Each platform shares one server across its tests (module-scoped); rejection paths that need
different evidence (debug, revoked) start their own.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cbor2
import httpx
import numpy as np
import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from onnx_models import identity_model
from server_process import VeilServer, start_server

import veil
from veil.attestation.policy import AMD_MINIMUM_TCB, Policy, SgxPolicy, SnpPolicy, TdxPolicy
from veil.attestation.trust import TrustStore
from veil.errors import HazmatWarning
from veil.testing.amd_pki import AmdPki
from veil.testing.intel_pki import IntelPki
from veil.testing.services import KdsService, PccsService
from veil.testing.state import EmulatedState

pytestmark = pytest.mark.slow

NOW = datetime.now(UTC)
SEED = hashlib.sha256(b"veil emulated platforms").digest()
MEASUREMENT = {
    "sgx": hashlib.sha256(b"emulated enclave").digest(),
    "tdx": hashlib.sha384(b"emulated td").digest(),
    "sev-snp": hashlib.sha384(b"emulated guest").digest(),
}
PLATFORMS = ("sgx", "tdx", "sev-snp")
# An SNP machine patched to AMD's published minimum (the default policy refuses older ones).
SNP_TCB = AMD_MINIMUM_TCB["Milan"]
# How long each platform's collateral lives: Intel's TCB info, QE identity and PCK CRL 30 days,
# the AMD CRL a week (amd_pki.CRL_LIFETIME).
STALE_AFTER = {"sgx": timedelta(days=31), "tdx": timedelta(days=31), "sev-snp": timedelta(days=8)}


@dataclass
class Pkis:
    """The test PKIs of one module, and the loopback services that publish their collateral."""

    intel: IntelPki
    amd: AmdPki
    pccs: PccsService
    kds: KdsService

    def trust(self, intel: IntelPki | None = None, amd: AmdPki | None = None) -> TrustStore:
        amd = amd or self.amd
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", HazmatWarning)
            return TrustStore.hazmat_test_roots(
                intel_root=(intel or self.intel).root, amd_arks={amd.product: amd.ark}
            )


def policy_for(platform: str, measurement: bytes) -> Policy:
    if platform == "sgx":
        return Policy(sgx=SgxPolicy(mr_enclave=(measurement,)))
    if platform == "tdx":
        return Policy(tdx=TdxPolicy(mr_td=(measurement,)))
    # The default minimum TCB (AMD's table) applies: the emulated chip is patched to it.
    return Policy(sev_snp=SnpPolicy(measurement=(measurement,)))


@dataclass
class Bed:
    """One emulated machine running `veil serve`, and what a client needs to trust it."""

    platform: str
    server: VeilServer
    trust: TrustStore

    def connect(self, **kwargs: object) -> veil.Connection:
        kwargs.setdefault("policy", policy_for(self.platform, MEASUREMENT[self.platform]))
        kwargs.setdefault("trust", self.trust)
        return veil.connect("127.0.0.1", **self.server.ports, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def pkis() -> Iterator[Pkis]:
    intel = IntelPki(now=NOW, seed=SEED)
    amd = AmdPki("Milan", now=NOW, seed=SEED)
    platforms = [intel.sgx_platform(), intel.tdx_platform()]
    with PccsService(intel, platforms) as pccs, KdsService(amd) as kds:
        yield Pkis(intel, amd, pccs, kds)


def start_bed(root: Path, platform: str, pkis: Pkis, **state: object) -> Bed:
    if platform == "sev-snp":
        state.setdefault("snp_tcb", SNP_TCB)
    state_dir = EmulatedState(
        platform=platform,
        seed=SEED,
        now=NOW,
        measurement=MEASUREMENT[platform],
        **state,  # type: ignore[arg-type]
    ).write(root / "state")
    extra = ["--emulated-state", str(state_dir), "--platform", platform]
    extra += ["--pccs-url", pkis.pccs.url, "--kds-url", pkis.kds.url]
    if platform != "sgx":
        extra.append("--unsealed-store")  # configfs-tsm guests have no sealing key
    server = start_server(root / "data", root / "log", *extra, module="veil.testing.emulated")
    return Bed(platform, server, pkis.trust())


@pytest.fixture(scope="module", params=PLATFORMS)
def bed(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, pkis: Pkis
) -> Iterator[Bed]:
    """One server per platform; the SNP host supplies no certificates, so KDS is asked."""
    platform: str = request.param
    running = start_bed(tmp_path_factory.mktemp(f"emulated-{platform}"), platform, pkis)
    yield running
    assert running.server.stop() == 0, running.server.stderr()[-3000:]


def test_upload_predict_delete_without_simulation(bed: Bed) -> None:
    model = identity_model("float32")
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    with bed.connect() as client:
        assert not client.verified.simulated
        assert client.verified.report_data[:32] == hashlib.sha256(client.certificate_der).digest()
        client.upload_model(model, model_id="identity")
        np.testing.assert_array_equal(client.predict("identity", x).output[0].as_numpy(), x)
        client.delete_model("identity")
        assert [m.model_id for m in client.list_models()] == []


def test_server_is_not_mock(bed: Bed) -> None:
    assert "INSECURE" not in bed.server.ready_line
    assert f"platform={bed.platform}" in bed.server.ready_line


def test_production_trust_refuses_the_test_roots(bed: Bed) -> None:
    with pytest.raises(veil.ChainError):
        bed.connect(trust=TrustStore.production())


def test_foreign_root_is_refused(bed: Bed, pkis: Pkis) -> None:
    foreign = pkis.trust(
        intel=IntelPki(now=NOW, seed=b"someone else"),
        amd=AmdPki("Milan", now=NOW, seed=b"someone else"),
    )
    with pytest.raises(veil.ChainError):
        bed.connect(trust=foreign)


def test_wrong_measurement_is_refused(bed: Bed) -> None:
    other = bytes(len(MEASUREMENT[bed.platform]))
    with pytest.raises(veil.PolicyError, match="got"):
        bed.connect(policy=policy_for(bed.platform, other))


def test_stale_collateral_is_refused(bed: Bed) -> None:
    # The collateral the server fetched at start has expired by then (the PKI's certificates,
    # issued for years, have not).
    with pytest.raises(veil.ExpiredError):
        bed.connect(now=datetime.now(UTC) + STALE_AFTER[bed.platform])


def test_simulation_flag_does_not_accept_the_test_roots(bed: Bed) -> None:
    # simulation=True trusts only veil's simulated root: real-format evidence under another
    # root still fails its chain.
    with pytest.raises(veil.ChainError):
        veil.connect("127.0.0.1", simulation=True, **bed.server.ports)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_debug_guest_is_refused(platform: str, tmp_path: Path, pkis: Pkis) -> None:
    debug = start_bed(tmp_path, platform, pkis, debug=True)
    try:
        with pytest.raises(veil.PolicyError, match="debug"):
            debug.connect()
    finally:
        debug.server.stop()


def test_revoked_pck_is_refused(tmp_path: Path, pkis: Pkis) -> None:
    label = "sgx-revoked"
    pkis.intel.revoke(pkis.intel.sgx_platform(label=label).pck.leaf.serial_number)
    revoked = start_bed(tmp_path, "sgx", pkis, label=label)
    try:
        with pytest.raises(veil.RevokedError):
            revoked.connect()
    finally:
        revoked.server.stop()


def test_revoked_vcek_is_refused(tmp_path: Path, pkis: Pkis) -> None:
    chip_id = bytes([7]) * 64
    pkis.amd.revoke(pkis.amd.chip(chip_id=chip_id, tcb=SNP_TCB).endorsement_key.serial_number)
    revoked = start_bed(tmp_path, "sev-snp", pkis, chip_id=chip_id)
    try:
        with pytest.raises(veil.RevokedError):
            revoked.connect()
    finally:
        revoked.server.stop()


def test_snp_host_certificate_table(tmp_path: Path, pkis: Pkis) -> None:
    # The host hands VCEK, ASK and ARK to the guest with each report (auxblob): no KDS needed.
    chip = pkis.amd.chip(tcb=SNP_TCB)
    table = {
        "vcek": chip.endorsement_key.der,
        "ask": pkis.amd.ask.public_bytes(Encoding.DER),
        "ark": pkis.amd.ark.public_bytes(Encoding.DER),
    }
    host = start_bed(tmp_path, "sev-snp", pkis, host_certificates=table)
    try:
        with host.connect() as client:
            assert client.verified.measurements["measurement"] == MEASUREMENT["sev-snp"]
        port = host.server.unattested_port
        served = cbor2.loads(httpx.get(f"http://127.0.0.1:{port}/collateral").content)
        assert sorted(served) == ["cert_chain", "crl", "vcek"]
    finally:
        host.server.stop()


def test_snp_guest_with_kds_down_and_no_cache_does_not_start(tmp_path: Path, pkis: Pkis) -> None:
    state_dir = EmulatedState(
        platform="sev-snp", seed=SEED, now=NOW, measurement=MEASUREMENT["sev-snp"]
    ).write(tmp_path / "state")
    command = [sys.executable, "-m", "veil.testing.emulated", "serve"]
    command += ["--emulated-state", str(state_dir), "--platform", "sev-snp", "--unsealed-store"]
    command += ["--kds-url", pkis.kds.url, "--data-dir", str(tmp_path / "data")]
    command += ["--unattested-port", "0", "--attested-port", "0", "--management-port", "0"]
    pkis.kds.down = True
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    finally:
        pkis.kds.down = False
    assert result.returncode == 2, result.stderr[-2000:]
    assert "no cached copy" in result.stderr
    assert "serving on" not in result.stdout


def test_snp_host_certificate_table_with_a_vlek(tmp_path: Path, pkis: Pkis) -> None:
    # A cloud host signs with a VLEK (issued by the ASVK) and hands it over in the table.
    chip = pkis.amd.chip(tcb=SNP_TCB, vlek_csp_id="veil-test-csp")
    table = {
        "vlek": chip.endorsement_key.der,
        "ask": pkis.amd.asvk.public_bytes(Encoding.DER),
        "ark": pkis.amd.ark.public_bytes(Encoding.DER),
    }
    host = start_bed(
        tmp_path, "sev-snp", pkis, host_certificates=table, vlek_csp_id="veil-test-csp"
    )
    try:
        with host.connect() as client:
            assert client.verified.measurements["measurement"] == MEASUREMENT["sev-snp"]
        port = host.server.unattested_port
        served = cbor2.loads(httpx.get(f"http://127.0.0.1:{port}/collateral").content)
        assert sorted(served) == ["cert_chain", "crl", "vlek"]
    finally:
        host.server.stop()
