"""`veil broker` and `veil serve --join` on emulated TDX and SEV-SNP (issue 14, the broker's gaps).

Real processes through the test bed's launcher (`python -m veil.testing.emulated`): the production
providers read emulated configfs-tsm devices, collateral comes from the PCCS and KDS stand-ins,
and broker and replicas appraise each other under the test PKIs' roots (``--hazmat-test-roots``).
A client verifies the replica without simulation, under the same test roots.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from broker_process import BrokerProcess, start_broker
from cryptography.hazmat.primitives.serialization import Encoding
from onnx_models import identity_model
from server_process import VeilServer, start_server

import veil
from veil.attestation.policy import AMD_MINIMUM_TCB, Policy, SnpPolicy, TdxPolicy
from veil.attestation.trust import TrustStore
from veil.errors import HazmatWarning
from veil.testing.amd_pki import AmdPki
from veil.testing.intel_pki import IntelPki
from veil.testing.services import KdsService, PccsService
from veil.testing.state import EmulatedState

pytestmark = pytest.mark.slow

NOW = datetime.now(UTC)
SEED = hashlib.sha256(b"veil emulated cluster").digest()
MEASUREMENT = {
    "tdx": hashlib.sha384(b"emulated cluster td").digest(),
    "sev-snp": hashlib.sha384(b"emulated cluster guest").digest(),
}
LAUNCHER = "veil.testing.emulated"


@dataclass
class Bed:
    """The test PKIs, their collateral services, a roots file, and one state dir per platform."""

    intel: IntelPki
    amd: AmdPki
    pccs: PccsService
    kds: KdsService
    roots: Path
    states: dict[str, Path]

    def trust(self) -> TrustStore:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", HazmatWarning)
            return TrustStore.hazmat_test_roots(
                intel_root=self.intel.root, amd_arks={self.amd.product: self.amd.ark}
            )

    def flags(self, platform: str, *, test_roots: bool = True) -> list[str]:
        flags = ["--emulated-state", str(self.states[platform]), "--platform", platform]
        flags += ["--pccs-url", self.pccs.url, "--kds-url", self.kds.url]
        return [*flags, "--hazmat-test-roots", str(self.roots)] if test_roots else flags

    def broker(self, root: Path, platform: str, *extra: str) -> BrokerProcess:
        return start_broker(
            root / "data", root / "logs", *self.flags(platform), *extra, module=LAUNCHER
        )

    def replica(self, root: Path, platform: str, broker: BrokerProcess) -> VeilServer:
        flags = [*self.flags(platform), "--no-auth", "--join", broker.url]
        return start_server(root / "data", root / "logs", *flags, module=LAUNCHER)


def policy_for(platform: str) -> Policy:
    if platform == "tdx":
        return Policy(tdx=TdxPolicy(mr_td=(MEASUREMENT["tdx"],)))
    return Policy(sev_snp=SnpPolicy(measurement=(MEASUREMENT["sev-snp"],)))


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    root = tmp_path_factory.mktemp("emulated-cluster")
    intel = IntelPki(now=NOW, seed=SEED)
    amd = AmdPki("Milan", now=NOW, seed=SEED)
    roots = root / "test-roots.pem"
    roots.write_bytes(b"".join(c.public_bytes(Encoding.PEM) for c in (intel.root, amd.ark)))
    states = {
        platform: EmulatedState(
            platform=platform,
            seed=SEED,
            now=NOW,
            measurement=MEASUREMENT[platform],
            # patched to AMD's published minimum, which the default policy requires
            snp_tcb=AMD_MINIMUM_TCB["Milan"] if platform == "sev-snp" else None,
        ).write(root / platform)
        for platform in MEASUREMENT
    }
    with PccsService(intel, [intel.tdx_platform()]) as pccs, KdsService(amd) as kds:
        yield Bed(intel, amd, pccs, kds, roots, states)


def _attested_certificate(bed: Bed, platform: str, replica: VeilServer) -> str:
    """The replica verified without simulation (test roots only); its certificate's digest."""
    with veil.connect(
        "127.0.0.1", policy=policy_for(platform), trust=bed.trust(), **replica.ports
    ) as client:
        assert not client.verified.simulated
        model = identity_model("float32")
        x = np.arange(6, dtype=np.float32).reshape(2, 3)
        client.upload_model(model, model_id="identity")  # sealed with the cluster's store key
        np.testing.assert_array_equal(client.predict("identity", x).output[0].as_numpy(), x)
        return hashlib.sha256(client.certificate_der).hexdigest()


@pytest.mark.parametrize("platform", ["tdx", "sev-snp"])
def test_a_new_cluster_broker_and_a_replica_on_an_emulated_platform(
    tmp_path: Path, bed: Bed, platform: str
) -> None:
    broker = bed.broker(tmp_path / "broker", platform, "--new-cluster")
    try:
        assert "--new-cluster" in broker.stderr()
        assert "HAZMAT" in broker.stderr()
        replica = bed.replica(tmp_path / "replica", platform, broker)
        try:
            assert _attested_certificate(bed, platform, replica) == broker.certificate_sha256
            assert "accepted" in broker.stderr()
        finally:
            assert replica.stop() == 0, replica.stderr()[-3000:]
    finally:
        broker.stop()
    assert not (tmp_path / "broker" / "data" / "broker.sealed").exists()  # nothing at rest


def test_the_cluster_outlives_its_first_broker_through_a_peer(tmp_path: Path, bed: Bed) -> None:
    first = bed.broker(tmp_path / "first", "tdx", "--new-cluster")
    second = None
    try:
        second = bed.broker(tmp_path / "second", "tdx", "--peer", first.url, "--new-cluster")
        assert second.certificate_sha256 == first.certificate_sha256
        assert "accepted" in first.stderr()  # released to the peer as to a replica
        assert "NEW cluster" not in second.stderr()
    finally:
        first.stop()
    assert second is not None
    try:
        replica = bed.replica(tmp_path / "replica", "tdx", second)
        try:
            assert _attested_certificate(bed, "tdx", replica) == first.certificate_sha256
        finally:
            replica.stop()
    finally:
        second.stop()


def test_a_replica_under_the_vendor_roots_does_not_join_a_test_pki_broker(
    tmp_path: Path, bed: Bed
) -> None:
    broker = bed.broker(tmp_path / "broker", "tdx", "--new-cluster")
    try:
        flags = [*bed.flags("tdx", test_roots=False), "--join", broker.url, "--no-auth"]
        command = [sys.executable, "-m", LAUNCHER, "serve", "--data-dir", str(tmp_path / "r")]
        ports = ["--attested-port", "0", "--unattested-port", "0", "--management-port", "0"]
        result = subprocess.run(
            [*command, *flags, *ports],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        broker.stop()
    assert result.returncode == 2, result.stderr[-3000:]
    assert "PCK chain: root got" in result.stderr  # the broker's offer, under Intel's real root
    assert "accepted" not in broker.stderr()
