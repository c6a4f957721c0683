"""``veil collateral fetch``: fetch the collateral of a piece of evidence into an offline bundle.

The bundle is a directory that ``veil verify-evidence EVIDENCE --collateral DIR`` and
``veil.connect(..., collateral=DIR)`` read: Intel PCS/PCCS items for an SGX or TDX quote, or the
VCEK, ASK/ARK chain and CRL from AMD KDS for an SEV-SNP report. Nothing is verified here.

Exit status: 0 written, 1 the service's answer was refused (foreign, malformed, stale-shaped),
2 usage or I/O (unreadable evidence, service down or 404, unwritable directory).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from veil.attestation.abi.snp import parse_snp_report
from veil.attestation.claims import Platform
from veil.attestation.collateral_source import INTEL_PCS_URL, HttpGet, collateral_to_directory
from veil.attestation.kds import AMD_KDS_URL, KdsClient, report_product
from veil.attestation.verifier import detect_platform
from veil.attestation.verify.collateral import DcapCollateral
from veil.attestation.verify.snp import PRODUCTS, SnpCollateral
from veil.commands.verify_evidence import read_evidence
from veil.errors import AttestationError, EvidenceUnavailableError, MalformedEvidenceError

__all__ = ["fetch_bundle", "register"]


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "collateral",
        help="fetch collateral for evidence into an offline bundle",
        description="Collateral bundles for offline verification.",
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    fetch = verbs.add_parser(
        "fetch",
        help="fetch the collateral of an SGX/TDX quote or SEV-SNP report into a directory",
        description=(
            "Fetch what verifying EVIDENCE needs (Intel PCS/PCCS for SGX and TDX, AMD KDS for "
            "SEV-SNP) into DIR, for 'veil verify-evidence EVIDENCE --collateral DIR'. Exit "
            "status 0 written, 1 answer refused, 2 usage or I/O error."
        ),
    )
    fetch.add_argument("evidence", type=Path, metavar="EVIDENCE")
    fetch.add_argument("--out", type=Path, required=True, metavar="DIR", help="bundle directory")
    fetch.add_argument(
        "--pccs-url", default=INTEL_PCS_URL, help="Intel PCS (default) or a PCCS root URL"
    )
    fetch.add_argument("--kds-url", default=AMD_KDS_URL, help="AMD KDS (default) or a mirror")
    fetch.add_argument(
        "--product",
        choices=PRODUCTS,
        help="SEV-SNP product, for version 2 reports (later ones name their CPU)",
    )
    fetch.add_argument(
        "--timeout", type=float, default=10.0, metavar="S", help="per request (default 10)"
    )
    fetch.set_defaults(handler=_fetch)


def fetch_bundle(
    evidence: bytes,
    out: Path,
    *,
    get: HttpGet,
    pccs_url: str = INTEL_PCS_URL,
    kds_url: str = AMD_KDS_URL,
    product: str | None = None,
) -> tuple[Platform, list[str]]:
    """Fetch the collateral of `evidence` and write it under `out`; returns the file names.

    Raises:
        MalformedEvidenceError: not SGX/TDX/SEV-SNP evidence.
        EvidenceUnavailableError: a service failed.
        AttestationError: a service answered something that is not what was asked for.
        OSError: `out` cannot be written.
    """
    from veil.providers.pcs import pcs_collateral_for_quote

    platform = detect_platform(evidence)
    collateral: DcapCollateral | SnpCollateral
    if platform is Platform.SEV_SNP:
        collateral = KdsClient(kds_url, get=get).collateral(evidence, product=product)
    else:
        collateral = pcs_collateral_for_quote(evidence, get=get, base_url=pccs_url)
    return platform, collateral_to_directory(collateral, out)


def _fetch(args: argparse.Namespace) -> int:
    from veil.providers.pcs import httpx_getter

    prog = "veil collateral fetch"
    try:
        evidence = read_evidence(args.evidence)
        if detect_platform(evidence) is Platform.SEV_SNP:
            # Which product a report is for is the user's to say when it does not: usage.
            report_product(parse_snp_report(evidence), args.product)
    except (OSError, AttestationError) as exc:
        print(f"{prog}: {_one_line(exc)}", file=sys.stderr)
        return 2
    try:
        platform, files = fetch_bundle(
            evidence,
            args.out,
            get=httpx_getter(args.timeout),
            pccs_url=args.pccs_url,
            kds_url=args.kds_url,
            product=args.product,
        )
    except (OSError, MalformedEvidenceError, EvidenceUnavailableError) as exc:
        print(f"{prog}: {_one_line(exc)}", file=sys.stderr)
        return 2
    except AttestationError as exc:
        print(f"{prog}: refused: {_one_line(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:
        # The getter's own errors (HTTP status, connection, time-out): the type and status only,
        # since the text may carry a credential-bearing URL.
        response = getattr(exc, "response", None)
        status = getattr(response, "status_code", None)
        detail = f"HTTP status {status}" if isinstance(status, int) else type(exc).__name__
        print(f"{prog}: collateral service failed: {detail}", file=sys.stderr)
        return 2
    print(f"{platform.value}: wrote {', '.join(files)} to {args.out}")
    return 0


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
