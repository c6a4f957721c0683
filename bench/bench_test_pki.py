"""What the test PKIs and stand-ins cost, so test authors know what to share: prints one table.

    .venv/bin/python bench/bench_test_pki.py [--rounds N]

Rows (median and max over N rounds, milliseconds):
- ``IntelPki()``: a new Intel-shaped PKI (root, two PCK CAs, TCB Signing; P-256 keys from a seed);
- ``sgx_platform()``: a PCK leaf and a quoting enclave;
- ``SGX quote v3`` / ``TDX quote v4``: one quote over fresh report data;
- ``DCAP collateral``: both CRLs, TCB info and QE identity, issued and signed;
- ``AmdPki() new seed``: ARK, ASK, ASVK (three RSA-2048 keys generated) and their certificates;
- ``AmdPki() cached seed``: the same seed again in the process (keys cached);
- ``SNP report v3`` / ``AMD CRL``: one signed report; one ARK-signed CRL;
- ``PCCS stand-in, 4 GETs``: veil's PCS fetcher for one SGX quote (a new httpx client per GET);
- ``KDS stand-in, 3 GETs``: veil's KDS client for one SNP report.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime

from veil.attestation.kds import KdsClient
from veil.providers.pcs import httpx_getter, pcs_collateral_fetcher
from veil.testing.amd_pki import AmdPki
from veil.testing.intel_pki import IntelPki
from veil.testing.services import KdsService, PccsService

NOW = datetime(2026, 3, 1, tzinfo=UTC)


def _row(label: str, rounds: int, action: Callable[[int], object]) -> None:
    times = []
    for i in range(rounds):
        start = time.perf_counter()
        action(i)
        times.append((time.perf_counter() - start) * 1000)
    print(f"| {label:<26} | {statistics.median(times):10.2f} | {max(times):10.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    rounds = parser.parse_args().rounds
    print(f"| {'operation':<26} | {'median ms':>10} | {'max ms':>10} |")
    print(f"|{'-' * 28}|{'-' * 12}|{'-' * 12}|")
    _row("IntelPki()", rounds, lambda i: IntelPki(now=NOW, seed=b"bench %d" % i))
    pki = IntelPki(now=NOW, seed=b"bench")
    _row("sgx_platform()", rounds, lambda i: pki.sgx_platform(label=f"bench {i}"))
    sgx, tdx = pki.sgx_platform(), pki.tdx_platform()
    _row("SGX quote v3", rounds, lambda i: sgx.quote(b"%d" % i, mr_enclave=bytes(32)))
    _row("TDX quote v4", rounds, lambda i: tdx.quote(b"%d" % i, mr_td=bytes(48)))
    _row("DCAP collateral", rounds, lambda i: sgx.collateral(NOW))
    _row("AmdPki() new seed", rounds, lambda i: AmdPki("Milan", now=NOW, seed=b"new %d" % i))
    _row("AmdPki() cached seed", rounds, lambda i: AmdPki("Milan", now=NOW, seed=b"new 0"))
    amd = AmdPki("Milan", now=NOW, seed=b"new 0")
    chip = amd.chip()
    _row("SNP report v3", rounds, lambda i: chip.report(b"%d" % i, measurement=bytes(48)))
    _row("AMD CRL", rounds, lambda i: amd.crl(NOW))
    quote = sgx.quote(b"bench", mr_enclave=bytes(32))
    report = chip.report(b"bench", measurement=bytes(48))
    with (
        PccsService(pki, [sgx], clock=lambda: NOW) as pccs,
        KdsService(amd, clock=lambda: NOW) as kds,
    ):
        fetch = pcs_collateral_fetcher(pccs.url, get=httpx_getter())
        _row("PCCS stand-in, 4 GETs", rounds, lambda i: fetch(quote))
        client = KdsClient(kds.url, get=httpx_getter())
        _row("KDS stand-in, 3 GETs", rounds, lambda i: client.collateral(report))


if __name__ == "__main__":
    main()
