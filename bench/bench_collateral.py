"""Collateral lifecycle costs against the loopback PCCS and KDS stand-ins: prints one table.

    .venv/bin/python bench/bench_collateral.py [--rounds N]

Rows (median and max over N rounds, milliseconds):
- ``tdx start: fetch``: a server's first collateral for a TDX quote (4 PCCS requests, parse, date,
  write the cache);
- ``tdx start: cache``: the same after a restart (cache read, parse, date; no request);
- ``tdx refresh``: a due refresh while serving;
- ``snp start: fetch``: VCEK, ASK/ARK chain and CRL from KDS for an SEV-SNP report;
- ``/collateral``: one GET of the served copy through the app (Starlette test client);
- ``/healthz``: one GET of the health map.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from starlette.testclient import TestClient

from veil.providers.pcs import collateral_fetcher
from veil.server.app import build_apps
from veil.server.collateral import CollateralKeeper
from veil.server.config import ServerConfig
from veil.server.runner import make_provider, prepare_state
from veil.server.store import ModelStore
from veil.testing.amd_pki import AmdPki
from veil.testing.devices import EmulatedDevices, EmulatedTsm
from veil.testing.intel_pki import IntelPki
from veil.testing.services import KdsService, PccsService

NOW = datetime(2026, 3, 1, tzinfo=UTC)


def timed(action: Callable[[], object], rounds: int) -> tuple[float, float]:
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        action()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples), max(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    rounds = parser.parse_args().rounds
    warnings.simplefilter("ignore")
    clock = [NOW]

    def now() -> datetime:
        return clock[0]

    intel = IntelPki(now=NOW - timedelta(days=1), seed=b"bench")
    tdx = intel.tdx_platform()
    quote = tdx.quote(bytes(64), mr_td=bytes(48))
    amd = AmdPki("Genoa", now=NOW - timedelta(days=1), seed=b"bench")
    report = amd.chip().report(bytes(64), measurement=bytes(48))
    rows: list[tuple[str, float, float]] = []
    with (
        PccsService(intel, [tdx], clock=now) as pccs,
        KdsService(amd, clock=now) as kds,
        tempfile.TemporaryDirectory() as tmp,
    ):
        fetch = collateral_fetcher(pccs_url=pccs.url, kds_url=kds.url)
        counter = iter(range(10**6))

        def fresh_start() -> None:
            CollateralKeeper(Path(tmp) / f"f{next(counter)}", fetch, clock=now).fetcher(quote)

        rows.append(("tdx start: fetch", *timed(fresh_start, rounds)))
        cached = CollateralKeeper(Path(tmp) / "cached", fetch, clock=now)
        cached.fetcher(quote)
        rows.append(
            (
                "tdx start: cache",
                *timed(
                    lambda: CollateralKeeper(Path(tmp) / "cached", fetch, clock=now).fetcher(quote),
                    rounds,
                ),
            )
        )
        cached.adopt(quote, cached.current())
        rows.append(("tdx refresh", *timed(cached.refresh, rounds)))

        def snp_start() -> None:
            CollateralKeeper(Path(tmp) / f"s{next(counter)}", fetch, clock=now).fetcher(report)

        rows.append(("snp start: fetch", *timed(snp_start, rounds)))

        devices = EmulatedDevices(
            tsm=EmulatedTsm(quote_signer=lambda rd: tdx.quote(rd, mr_td=bytes(48)))
        )
        tdx_config = ServerConfig(
            Path(tmp) / "server", platform="tdx", pccs_url=pccs.url, unsealed_store=True
        )
        state, _ = prepare_state(
            tdx_config,
            store=ModelStore(Path(tmp) / "models"),
            provider=make_provider(tdx_config, fs=devices, clock=now),
            clock=now,
        )
        with TestClient(build_apps(state)[0]) as http:
            rows.append(("/collateral", *timed(lambda: http.get("/collateral"), rounds)))
            rows.append(("/healthz", *timed(lambda: http.get("/healthz"), rounds)))
    print(f"{'what':<20}{'median ms':>12}{'max ms':>10}   ({rounds} rounds)")
    for name, median, worst in rows:
        print(f"{name:<20}{median:>12.2f}{worst:>10.2f}")


if __name__ == "__main__":
    main()
