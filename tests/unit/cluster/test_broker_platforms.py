"""`veil broker` where the platform has no sealing key (emulated TDX), its secrets from a peer or
new, and its offer's collateral kept fresh (issue 14: the broker's remaining gaps)."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.testclient import TestClient

from veil.attestation.policy import Policy, TdxPolicy
from veil.attestation.trust import TrustStore
from veil.cli import build_parser
from veil.cluster.broker import Offer, broker_app, from_peers, new_cluster
from veil.cluster.exchange import (
    JoinKey,
    broker_report_data,
    join_request,
    verifier,
    verify_join,
    verify_offer,
)
from veil.commands import broker as broker_command
from veil.errors import ExpiredError, HazmatWarning, PolicyError
from veil.providers.base import EvidenceProvider
from veil.server.config import ServerConfig
from veil.server.runner import collateral_keeper, make_provider
from veil.testing.intel_pki import IntelPki
from veil.testing.services import PccsService
from veil.testing.state import EmulatedState

T0 = datetime(2026, 6, 1, 12, tzinfo=UTC)
SEED = hashlib.sha256(b"veil broker platforms").digest()
MR_TD = hashlib.sha384(b"emulated broker td").digest()
POLICY = Policy(tdx=TdxPolicy(mr_td=(MR_TD,)))


@dataclass
class Tdx:
    """An emulated TDX machine, the PCCS stand-in for its PKI, and a clock tests move."""

    pki: IntelPki
    pccs: PccsService
    now: list[datetime]

    def clock(self) -> datetime:
        return self.now[0]

    def trust(self) -> TrustStore:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", HazmatWarning)
            return TrustStore.hazmat_test_roots(intel_root=self.pki.root)

    def config(self, data_dir: Path) -> ServerConfig:
        return ServerConfig(data_dir=data_dir, platform="tdx", pccs_url=self.pccs.url)

    def provider(self, data_dir: Path, measurement: bytes = MR_TD) -> EvidenceProvider:
        devices = EmulatedState(platform="tdx", seed=SEED, now=T0, measurement=measurement)
        return make_provider(self.config(data_dir), fs=devices.devices(), clock=self.clock)


@pytest.fixture(scope="module")
def tdx() -> Iterator[Tdx]:
    pki = IntelPki(now=T0, seed=SEED)
    now = [T0]
    with PccsService(pki, [pki.tdx_platform()], clock=lambda: now[0]) as pccs:
        yield Tdx(pki, pccs, now)


@pytest.fixture(autouse=True)
def _reset_clock(tdx: Tdx) -> None:
    tdx.now[0] = T0


def _run_broker(tmp_path: Path, provider: EvidenceProvider, *flags: str) -> int:
    args = build_parser().parse_args(["broker", "--data-dir", str(tmp_path / "b"), *flags])
    return broker_command.run(args, provider_factory=lambda _config: provider)


def test_a_tdx_broker_without_a_mode_is_refused_and_names_the_ways_out(
    tmp_path: Path, tdx: Tdx, capsys: pytest.CaptureFixture[str]
) -> None:
    provider = tdx.provider(tmp_path)
    assert _run_broker(tmp_path, provider, "--platform", "tdx") == 2
    err = capsys.readouterr().err
    assert "got platform tdx, which has no sealing key" in err
    assert "--peer URL" in err
    assert "--new-cluster" in err
    assert not (tmp_path / "b" / "broker.sealed").exists()


def test_an_unanswered_peer_is_refused_without_new_cluster(
    tmp_path: Path, tdx: Tdx, capsys: pytest.CaptureFixture[str]
) -> None:
    # Bound, never listening: connections are refused and no other process can take the port.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        port = silent.getsockname()[1]
        flags = ("--platform", "tdx", "--peer", f"http://127.0.0.1:{port}", "--peer-wait", "0.2")
        assert _run_broker(tmp_path, tdx.provider(tmp_path), *flags) == 2
    assert f"--peer: got no answer from http://127.0.0.1:{port}" in capsys.readouterr().err


def test_rotation_of_secrets_held_in_memory_is_refused(
    tmp_path: Path, tdx: Tdx, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = ("--platform", "tdx", "--new-cluster", "--rotate")
    assert _run_broker(tmp_path, tdx.provider(tmp_path), *flags) == 2
    assert "--rotate: got it with --peer or --new-cluster" in capsys.readouterr().err


def _through(client: TestClient) -> httpx.MockTransport:
    """A transport that hands each request to the app behind `client` (in this process)."""

    def handle(request: httpx.Request) -> httpx.Response:
        answer = client.request(request.method, request.url.path, content=request.read())
        return httpx.Response(answer.status_code, content=answer.content)

    return httpx.MockTransport(handle)


def test_a_restarting_broker_gets_the_cluster_secrets_from_a_live_peer(
    tmp_path: Path, tdx: Tdx
) -> None:
    provider = tdx.provider(tmp_path / "peer")
    peer = new_cluster()
    evidence = provider.evidence(broker_report_data(peer.key))
    keeper = collateral_keeper(tdx.config(tmp_path / "peer"), provider, evidence, clock=tdx.clock)
    verify = verifier(tdx.trust(), tdx.clock)
    app = broker_app(peer, Offer.of(peer.key, evidence, keeper), POLICY, verify)
    with TestClient(app, base_url="http://peer") as client:
        got = from_peers(
            ["http://peer"],
            tdx.provider(tmp_path / "restarted"),
            POLICY,
            verify,
            wait_s=1,
            transport=_through(client),
        )
    assert got is not None
    assert got.secrets.identity.certificate_der == peer.secrets.identity.certificate_der
    assert got.secrets.store_key == peer.secrets.store_key
    assert got.key.public != peer.key.public  # its own broker key, never at rest


def test_a_peer_of_another_build_is_an_error_not_a_reason_for_a_new_cluster(
    tmp_path: Path, tdx: Tdx
) -> None:
    other = tdx.provider(tmp_path / "peer", measurement=hashlib.sha384(b"other").digest())
    peer = new_cluster()
    evidence = other.evidence(broker_report_data(peer.key))
    keeper = collateral_keeper(tdx.config(tmp_path / "peer"), other, evidence, clock=tdx.clock)
    verify = verifier(tdx.trust(), tdx.clock)
    app = broker_app(peer, Offer.of(peer.key, evidence, keeper), POLICY, verify)
    refused = pytest.raises(PolicyError, match="mr_td")
    with TestClient(app, base_url="http://peer") as client, refused:
        from_peers(
            ["http://peer"],
            tdx.provider(tmp_path / "restarted"),
            POLICY,
            verify,
            wait_s=1,
            transport=_through(client),
        )


@contextmanager
def _serving(app: Starlette) -> Iterator[str]:
    """`app` on a free loopback port from a thread; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def test_the_peer_policy_is_what_a_peer_must_satisfy(
    tmp_path: Path, tdx: Tdx, capsys: pytest.CaptureFixture[str]
) -> None:
    provider = tdx.provider(tmp_path / "peer")
    peer = new_cluster()
    evidence = provider.evidence(broker_report_data(peer.key))
    keeper = collateral_keeper(tdx.config(tmp_path / "peer"), provider, evidence, clock=tdx.clock)
    app = broker_app(
        peer, Offer.of(peer.key, evidence, keeper), POLICY, verifier(tdx.trust(), tdx.clock)
    )
    other = hashlib.sha384(b"the build the operator admits").hexdigest()
    policy = tmp_path / "peer-policy.toml"
    policy.write_text(f'[tdx]\nmr_td = ["{other}"]\n')
    flags = ["--platform", "tdx", "--data-dir", str(tmp_path / "b"), "--new-cluster"]
    # An address no interface has (TEST-NET-3): were the policy ignored, the broker would fail
    # to bind instead of serving forever, and the assertions below would say so.
    flags += ["--host", "203.0.113.1"]
    with _serving(app) as url:
        flags += ["--peer", url, "--peer-policy", str(policy)]
        args = build_parser().parse_args(["broker", *flags])
        status = broker_command.run(
            args,
            provider_factory=lambda _config: tdx.provider(tmp_path / "b"),
            trust=tdx.trust(),
            clock=tdx.clock,
        )
    assert status == 2  # refused by the peer policy: not a new cluster despite --new-cluster
    err = capsys.readouterr().err
    assert f"mr_td: got {MR_TD.hex()}" in err
    assert "NEW cluster" not in err


def test_a_month_old_broker_serves_refreshed_collateral_and_still_verifies_joins(
    tmp_path: Path, tdx: Tdx
) -> None:
    provider = tdx.provider(tmp_path / "broker")
    state = new_cluster()
    evidence = provider.evidence(broker_report_data(state.key))
    keeper = collateral_keeper(tdx.config(tmp_path / "broker"), provider, evidence, clock=tdx.clock)
    offer = Offer.of(state.key, evidence, keeper)
    first = offer.encoded()
    assert offer.encoded() is first  # encoded once per collateral copy

    tdx.now[0] = T0 + timedelta(days=31)  # Intel's collateral lives 30 days
    verify = verifier(tdx.trust(), tdx.clock)
    with pytest.raises(ExpiredError):
        verify_offer(first, POLICY, verify)
    assert keeper.refresh_if_due()
    assert verify_offer(offer.encoded(), POLICY, verify) == state.key.public

    # And it appraises a replica joining now, whose collateral is fetched now.
    replica = tdx.provider(tmp_path / "replica")
    request = join_request(replica, JoinKey.generate(), state.key.public)
    _, verified = verify_join(request, state.key, POLICY, verify)
    assert verified.measurements["mr_td"] == MR_TD


def test_the_production_commands_have_no_test_roots_option(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for command in ("broker", "serve"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--hazmat-test-roots", "roots.pem"])
        assert "unrecognized arguments: --hazmat-test-roots" in capsys.readouterr().err


def test_an_address_it_cannot_listen_on_is_one_line_and_leaks_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = ["--platform", "simulated", "--new-cluster", "--host", "203.0.113.1"]
    args = build_parser().parse_args(["broker", "--data-dir", str(tmp_path), *flags])
    assert broker_command.run(args) == 2  # an unclosed socket would fail here as a warning
    assert "cannot listen on 203.0.113.1:9930" in capsys.readouterr().err
