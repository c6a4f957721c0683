"""The `veil` subcommands (see `veil.cli`), and what they share."""

from __future__ import annotations

import argparse

__all__ = ["add_collateral_source_arguments", "error_line"]


def error_line(exc: BaseException) -> str:
    """`exc` as the one line a command prints: ``PATH: reason`` for file errors."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc)


def add_collateral_source_arguments(parser: argparse.ArgumentParser) -> None:
    """``--pccs-url``, ``--kds-url`` and ``--snp-product``: where a process that serves its own
    evidence (``veil serve``, ``veil broker``) fetches the collateral that goes with it."""
    from veil.attestation.collateral_source import INTEL_PCS_URL
    from veil.attestation.kds import AMD_KDS_URL

    parser.add_argument(
        "--pccs-url",
        default=INTEL_PCS_URL,
        help="where SGX/TDX collateral is fetched: Intel PCS (default) or your PCCS",
    )
    parser.add_argument(
        "--kds-url",
        default=AMD_KDS_URL,
        help="where SEV-SNP collateral (VCEK, ASK/ARK chain, CRL) is fetched: AMD KDS "
        "(default) or a mirror",
    )
    parser.add_argument(
        "--snp-product",
        choices=("Milan", "Genoa", "Turin"),
        help="SEV-SNP product, needed only to fetch a VCEK for a version 2 report (later "
        "reports name their CPU)",
    )
