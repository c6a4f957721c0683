"""The server's collateral lifecycle: cache, refresh before expiry, fallback, `/healthz`.

The simulated platform's PKI stands in for Intel PCS here (its `collateral_map` issues fresh
30-day collateral at its injected clock); every path runs the production keeper unchanged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import cbor2
import pytest
from starlette.testclient import TestClient

from veil.attestation.claims import Platform
from veil.attestation.policy import Policy, SgxPolicy
from veil.attestation.trust import TrustStore
from veil.attestation.verifier import verify_evidence
from veil.errors import CollateralError, EvidenceUnavailableError, ExpiredError
from veil.providers.measurement import simulated_measurement
from veil.providers.simulated import SimulatedSgxProvider
from veil.server.app import ServerState, build_apps
from veil.server.collateral import (
    CACHE_DIRNAME,
    CollateralKeeper,
    RefreshSettings,
    collateral_expiry,
    collateral_identity,
    keep_collateral_fresh,
)
from veil.server.config import ServerConfig
from veil.server.runner import prepare_state
from veil.server.store import ModelStore

START = datetime(2026, 3, 1, 12, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


class Service:
    """A collateral service built on the simulated PKI, with a `down` knob and a call count."""

    def __init__(self, platform: SimulatedSgxProvider) -> None:
        self.platform = platform
        self.down = False
        self.stale: Mapping[str, Any] | None = None
        self.calls = 0

    def __call__(self, quote: bytes) -> Mapping[str, Any]:
        self.calls += 1
        if self.down:
            raise ConnectionRefusedError("service down")
        if self.stale is not None:
            return self.stale
        return self.platform.collateral_map()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def platform(tmp_path: Path, clock: Clock) -> SimulatedSgxProvider:
    return SimulatedSgxProvider(tmp_path / "platform", clock=clock)


@pytest.fixture
def quote(platform: SimulatedSgxProvider) -> bytes:
    return platform.quote(bytes(64))


def keeper(tmp_path: Path, service: Service, clock: Clock) -> CollateralKeeper:
    return CollateralKeeper(tmp_path / "data", service, clock=clock)


def client_accepts(quote: bytes, collateral: Mapping[str, Any], at: datetime) -> None:
    """What `veil.connect` does in its step 3, at an injected time."""
    policy = Policy(sgx=SgxPolicy(mr_enclave=(simulated_measurement(),)))
    verify_evidence(quote, collateral, policy=policy, trust=TrustStore.simulated_only(), now=at)


# --- start: cache, service, fallback ---


def test_first_start_fetches_and_caches(
    tmp_path: Path, clock: Clock, platform: SimulatedSgxProvider, quote: bytes
) -> None:
    service = Service(platform)
    k = keeper(tmp_path, service, clock)
    served = k.fetcher(quote)
    assert service.calls == 1
    assert (tmp_path / "data" / CACHE_DIRNAME / f"{collateral_identity(quote)}.cbor").is_file()
    k.adopt(quote, served)
    assert k.status().state == "ok"
    assert k.status().expires == collateral_expiry(served, Platform.SGX)
    client_accepts(quote, cbor2.loads(k.encoded()), clock())


def test_restart_uses_the_cache_without_asking_the_service(
    tmp_path: Path, clock: Clock, platform: SimulatedSgxProvider, quote: bytes
) -> None:
    service = Service(platform)
    first = keeper(tmp_path, service, clock).fetcher(quote)
    clock.advance(timedelta(hours=1))
    # A restarted server has a fresh TLS key, hence another quote: same platform, same cache.
    again = platform.quote(b"\x01" * 64)
    assert keeper(tmp_path, service, clock).fetcher(again) == first
    assert service.calls == 1


def test_service_down_at_start_falls_back_to_a_valid_cache(
    tmp_path: Path, clock: Clock, platform: SimulatedSgxProvider, quote: bytes
) -> None:
    service = Service(platform)
    cached = keeper(tmp_path, service, clock).fetcher(quote)
    clock.advance(timedelta(days=2))  # due for the daily refresh
    service.down = True
    k = keeper(tmp_path, service, clock)
    assert k.fetcher(quote) == cached
    k.adopt(quote, cached)
    status = k.status()
    assert (status.state, status.last_error) == ("degraded", "ConnectionRefusedError")
    # The server's own keeper adopts what the provider got: the cached copy, due for refresh.
    served_by = keeper(tmp_path, service, clock)
    served_by.adopt(quote, cached)
    due = served_by.next_refresh()
    assert due is not None
    assert due <= clock()


def test_service_down_and_no_cache_refuses_to_start(
    tmp_path: Path, clock: Clock, platform: SimulatedSgxProvider, quote: bytes
) -> None:
    service = Service(platform)
    service.down = True
    with pytest.raises(EvidenceUnavailableError, match="no cached copy valid at"):
        keeper(tmp_path, service, clock).fetcher(quote)


def test_expired_cache_is_not_served(
    tmp_path: Path, clock: Clock, platform: SimulatedSgxProvider, quote: bytes
) -> None:
    service = Service(platform)
    keeper(tmp_path, service, clock).fetcher(quote)
    clock.advance(timedelta(days=31))
    service.down = True
    with pytest.raises(EvidenceUnavailableError, match="no cached copy"):
        keeper(tmp_path, service, clock).fetcher(quote)


def test_cache_for_another_platform_is_not_served(
    tmp_path: Path, clock: Clock, platform: SimulatedSgxProvider, quote: bytes
) -> None:
    service = Service(platform)
    keeper(tmp_path, service, clock).fetcher(quote)
    path = tmp_path / "data" / CACHE_DIRNAME / f"{collateral_identity(quote)}.cbor"
    record = cbor2.loads(path.read_bytes())
    record["identity"] = "tdx-00806f050000-00000000"
    path.write_bytes(cbor2.dumps(record))
    service.down = True
    with pytest.raises(EvidenceUnavailableError, match="no cached copy"):
        keeper(tmp_path, service, clock).fetcher(quote)


def test_garbage_cache_is_ignored_and_refetched(
    tmp_path: Path, clock: Clock, platform: SimulatedSgxProvider, quote: bytes
) -> None:
    service = Service(platform)
    cache = tmp_path / "data" / CACHE_DIRNAME
    cache.mkdir(parents=True)
    (cache / f"{collateral_identity(quote)}.cbor").write_bytes(b"\xff not cbor")
    keeper(tmp_path, service, clock).fetcher(quote)
    assert service.calls == 1


def test_stale_answer_from_the_service_is_refused(
    tmp_path: Path, clock: Clock, platform: SimulatedSgxProvider, quote: bytes
) -> None:
    service = Service(platform)
    service.stale = platform.collateral_map()
    clock.advance(timedelta(days=31))
    with pytest.raises(EvidenceUnavailableError, match="before now") as info:
        keeper(tmp_path, service, clock).fetcher(quote)
    assert isinstance(info.value.__cause__, CollateralError)


def test_refresh_settings_must_be_positive() -> None:
    with pytest.raises(ValueError, match="margin: got 0:00:00"):
        RefreshSettings(margin=timedelta(0))


# --- a running server's state: /collateral and /healthz over 31+ days ---


def _server(tmp_path: Path, clock: Clock, service: Service | None = None) -> ServerState:
    config = ServerConfig(tmp_path / "data", platform="simulated")
    platform = SimulatedSgxProvider(tmp_path / "data", clock=clock)
    state, _ = prepare_state(
        config,
        store=ModelStore(tmp_path / "models"),
        provider=platform,
        clock=clock,
    )
    if service is None:
        return state
    # The same server, refreshing from a service that can go down.
    k = CollateralKeeper(tmp_path / "data", None, clock=clock, source=service)
    k.adopt(state.keys.current.quote, state.collateral.current())
    return replace(state, collateral=k)


def _get(app: Any, path: str) -> tuple[int, Any]:
    with TestClient(app) as http:
        response = http.get(path)
    return response.status_code, cbor2.loads(response.content)


def test_a_server_31_days_on_is_still_accepted(tmp_path: Path, clock: Clock) -> None:
    state = _server(tmp_path, clock)
    unattested, _, _ = build_apps(state)
    _, first = _get(unattested, "/collateral")
    client_accepts(state.keys.current.quote, first, clock())
    for _ in range(31):  # the background task's work, one day at a time
        clock.advance(timedelta(days=1))
        state.collateral.refresh_if_due()
    with pytest.raises(ExpiredError):
        client_accepts(state.keys.current.quote, first, clock())
    _, served = _get(unattested, "/collateral")
    assert served != first  # changed without a restart
    client_accepts(state.keys.current.quote, served, clock())
    status, health = _get(unattested, "/healthz")
    assert (status, health["status"], health["simulated"]) == (200, "ok", True)


def test_service_gone_is_degraded_before_clients_refuse(tmp_path: Path, clock: Clock) -> None:
    service = Service(SimulatedSgxProvider(tmp_path / "data", clock=clock))
    service.down = True
    state = _server(tmp_path, clock, service)
    unattested, _, _ = build_apps(state)
    _, served = _get(unattested, "/collateral")
    expires = state.collateral.status().expires
    clock.advance(timedelta(days=2))
    assert not state.collateral.refresh_if_due()
    _, health = _get(unattested, "/healthz")
    assert health["status"] == "degraded"
    assert health["collateral"]["last_error"] == "ConnectionRefusedError"
    # Degraded, and clients still accept: the operator has until `expires` to act.
    client_accepts(state.keys.current.quote, served, clock())
    clock.now = expires - timedelta(seconds=1)
    client_accepts(state.keys.current.quote, served, clock())
    assert _get(unattested, "/healthz")[1]["status"] == "degraded"
    clock.now = expires + timedelta(seconds=1)
    status, health = _get(unattested, "/healthz")
    assert (status, health["status"]) == (503, "failing")
    with pytest.raises(ExpiredError):
        client_accepts(state.keys.current.quote, served, clock())
    # The service comes back: the next due refresh heals it.
    service.down = False
    clock.advance(RefreshSettings().retry)
    assert state.collateral.refresh_if_due()
    assert _get(unattested, "/healthz")[1]["status"] == "ok"


def test_json_readiness_follows_the_collateral(tmp_path: Path, clock: Clock) -> None:
    # /readyz (plain port) and OIP's /v2/health/ready (attested port) turn 503 exactly when
    # clients would refuse the served collateral; /livez stays 200.
    service = Service(SimulatedSgxProvider(tmp_path / "data", clock=clock))
    service.down = True
    state = _server(tmp_path, clock, service)
    unattested, attested, _ = build_apps(state)
    expires = state.collateral.status().expires
    clock.advance(timedelta(days=2))
    assert not state.collateral.refresh_if_due()

    def ready() -> tuple[int, Any, int, Any]:
        with TestClient(unattested) as plain, TestClient(attested) as oip:
            first, second = plain.get("/readyz"), oip.get("/v2/health/ready")
            assert plain.get("/livez").json() == {"live": True}
        return first.status_code, first.json(), second.status_code, second.json()

    status, body, oip_status, oip_body = ready()
    assert (status, body["ready"], body["collateral"]["state"]) == (200, True, "degraded")
    assert (oip_status, oip_body) == (200, {"ready": True})
    clock.now = expires + timedelta(seconds=1)
    status, body, oip_status, oip_body = ready()
    assert (status, body["ready"], body["collateral"]["state"]) == (503, False, "failing")
    assert (oip_status, oip_body) == (503, {"ready": False})


def test_failed_refresh_waits_the_retry_delay(tmp_path: Path, clock: Clock) -> None:
    service = Service(SimulatedSgxProvider(tmp_path / "data", clock=clock))
    service.down = True
    state = _server(tmp_path, clock, service)
    clock.advance(timedelta(days=2))
    state.collateral.refresh_if_due()
    state.collateral.refresh_if_due()
    assert service.calls == 1
    clock.advance(RefreshSettings().retry)
    state.collateral.refresh_if_due()
    assert service.calls == 2


def test_background_task_refreshes(tmp_path: Path, clock: Clock) -> None:
    state = _server(tmp_path, clock)
    before = state.collateral.encoded()
    clock.advance(timedelta(days=2))

    async def run() -> None:
        task = asyncio.create_task(keep_collateral_fresh(state.collateral, poll_s=0.01))
        for _ in range(500):
            await asyncio.sleep(0.01)
            if state.collateral.encoded() != before:
                break
        task.cancel()

    asyncio.run(run())
    assert state.collateral.encoded() != before


def test_unwritable_cache_costs_only_the_restart_fallback(
    tmp_path: Path,
    clock: Clock,
    platform: SimulatedSgxProvider,
    quote: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / CACHE_DIRNAME).write_text("a file where the cache directory goes")
    service = Service(platform)
    with caplog.at_level("WARNING", logger="veil.server.collateral"):
        served = keeper(tmp_path, service, clock).fetcher(quote)
    client_accepts(quote, served, clock())
    assert "collateral cache not written: FileExistsError" in caplog.text


def test_collateral_that_cannot_be_dated_is_reported_failing(
    tmp_path: Path, clock: Clock, quote: bytes
) -> None:
    k = CollateralKeeper(tmp_path, None, clock=clock)
    k.adopt(quote, {"version": 3})
    assert k.status().state == "failing"
    assert k.next_refresh() is None  # nothing to refresh from
    assert cbor2.loads(k.encoded()) == {"version": 3}
