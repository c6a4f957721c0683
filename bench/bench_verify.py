"""Evidence verification benchmark: time to verify each platform's real evidence with collateral.

    .venv/bin/python bench/bench_verify.py [--iterations 50] [--vectors DIR] [--json out.json]

Each case runs `veil.attestation.verifier.verify_evidence` (detect, parse, every signature, chain,
CRL and collateral check, policy) on a vector set of tests/testdata/attestation-vectors at the set's
suggested time, with a policy pinning the set's own measurement. "map" cases pass the collateral
as the CBOR map a server serves, so its decoding is included. Prints min / median / p90 in ms.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from veil.attestation.collateral_source import (
    collateral_from_dcap_qvl_json,
    collateral_to_blindai_map,
)
from veil.attestation.policy import Policy, SgxPolicy, SnpPolicy, TdxPolicy
from veil.attestation.trust import TrustStore
from veil.attestation.verifier import unverified_claims, verify_evidence
from veil.attestation.verify.snp import SnpCollateral

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VECTORS = REPO / "tests" / "testdata" / "attestation-vectors"


@dataclass(frozen=True)
class Case:
    name: str
    evidence: bytes
    collateral: Any
    policy: Policy
    now: datetime


def _cases(v: Path) -> list[Case]:
    july = datetime(2025, 7, 1, tzinfo=UTC)
    sgx_quote = (v / "sgx/dcap-qvl-sgx-v3/sgx_quote").read_bytes()
    sgx_coll = collateral_from_dcap_qvl_json(
        (v / "sgx/dcap-qvl-sgx-v3/sgx_quote_collateral.json").read_text()
    )
    sgx_policy = Policy(
        sgx=SgxPolicy(mr_enclave=(unverified_claims(sgx_quote).measurements["mr_enclave"],)),
        accepted_tcb_statuses=frozenset({"ConfigurationAndSWHardeningNeeded"}),
    )
    tdx_quote = (v / "tdx/dcap-qvl-tdx-v4/tdx_quote").read_bytes()
    tdx_coll = collateral_from_dcap_qvl_json(
        (v / "tdx/dcap-qvl-tdx-v4/tdx_quote_collateral.json").read_text()
    )
    tdx_policy = Policy(tdx=TdxPolicy(mr_td=(unverified_claims(tdx_quote).measurements["mr_td"],)))

    def snp_case(name: str, report: Path, key: Path, chain: Path | None, now: datetime) -> Case:
        raw = bytes.fromhex(report.read_text()) if report.suffix == ".hex" else report.read_bytes()
        measurement = unverified_claims(raw).measurements["measurement"]
        return Case(
            name,
            raw,
            SnpCollateral(key.read_bytes(), chain.read_text() if chain else None),
            Policy(sev_snp=SnpPolicy(measurement=(measurement,))),
            now,
        )

    snp = v / "sev-snp"
    return [
        Case("sgx v3 (DcapCollateral)", sgx_quote, sgx_coll, sgx_policy, july),
        Case(
            "sgx v3 (BlindAI map)", sgx_quote, collateral_to_blindai_map(sgx_coll), sgx_policy, july
        ),
        Case("tdx v4 (DcapCollateral)", tdx_quote, tdx_coll, tdx_policy, july),
        Case(
            "tdx v4 (BlindAI map)", tdx_quote, collateral_to_blindai_map(tdx_coll), tdx_policy, july
        ),
        snp_case(
            "sev-snp v2 VCEK (embedded ASK)",
            snp / "virtee-milan-vcek/report_milan.hex",
            snp / "virtee-milan-vcek/vcek_milan.der",
            None,
            datetime(2025, 1, 1, tzinfo=UTC),
        ),
        snp_case(
            "sev-snp v3 VLEK (chain given)",
            snp / "trustee-milan-vlek-v3/test-vlek-report.bin",
            snp / "trustee-milan-vlek-v3/test-vlek.der",
            snp / "trustee-milan-vlek-v3/milan_ask_ark_asvk.pem",
            datetime(2025, 6, 1, tzinfo=UTC),
        ),
    ]


def _time(fn: Callable[[], object], iterations: int) -> list[float]:
    fn()  # warm-up: imports, caches
    samples = []
    for _ in range(iterations):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--vectors", type=Path, default=DEFAULT_VECTORS)
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    args = parser.parse_args()

    trust = TrustStore.production()
    rows: list[dict[str, Any]] = []
    for case in _cases(args.vectors):
        for label, trust_arg in (("", trust), (" [default trust]", None)):
            samples = _time(
                lambda c=case, t=trust_arg: verify_evidence(  # type: ignore[misc]
                    c.evidence, c.collateral, policy=c.policy, trust=t, now=c.now
                ),
                args.iterations,
            )
            samples.sort()
            rows.append(
                {
                    "case": case.name + label,
                    "n": len(samples),
                    "min_ms": samples[0],
                    "median_ms": statistics.median(samples),
                    "p90_ms": samples[int(0.9 * (len(samples) - 1))],
                }
            )

    width = max(len(r["case"]) for r in rows)
    print(f"{'case':<{width}}  {'n':>4}  {'min ms':>8}  {'median ms':>9}  {'p90 ms':>8}")
    for r in rows:
        print(
            f"{r['case']:<{width}}  {r['n']:>4}  {r['min_ms']:>8.2f}  "
            f"{r['median_ms']:>9.2f}  {r['p90_ms']:>8.2f}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
