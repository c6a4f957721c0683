"""Where a client takes the collateral it verifies a server's evidence with.

- ``"server"`` (the default, BlindAI's way): what the server serves on ``GET /collateral``. The
  server chooses how fresh it is; the client still checks every signature, CRL and date.
- `CollateralServices`: the client fetches it itself from Intel PCS (or a PCCS) for SGX and TDX
  quotes, and from AMD KDS (or a mirror) for SEV-SNP reports, so freshness is the client's.
  A VLEK-signed SEV-SNP report still takes its VLEK from the server (KDS serves none by chip);
  the chain and CRL come from KDS.
- a directory (`pathlib.Path`): an offline bundle written by ``veil collateral fetch``.

Example::

    veil.connect(addr, policy=policy, collateral=veil.CollateralServices(pccs_url=my_pccs))
    veil.connect(addr, policy=policy, collateral=Path("bundle"))
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from veil.attestation.abi.snp import SigningKey, parse_snp_report
from veil.attestation.claims import Platform
from veil.attestation.collateral_source import INTEL_PCS_URL, HttpGet, load_collateral_directory
from veil.attestation.kds import AMD_KDS_URL, KdsClient
from veil.attestation.verifier import detect_platform
from veil.attestation.verify.collateral import DcapCollateral
from veil.attestation.verify.snp import SnpCollateral, snp_collateral_from_map
from veil.errors import CollateralError, EvidenceUnavailableError, VeilError

__all__ = ["SERVER", "CollateralChoice", "CollateralServices", "check_choice", "own_collateral"]

SERVER = "server"


@dataclass(frozen=True, slots=True)
class CollateralServices:
    """Fetch collateral from the vendors' services instead of taking the server's.

    Attributes:
        pccs_url: Intel PCS (default) or a PCCS root URL, for SGX and TDX quotes.
        kds_url: AMD KDS (default) or a mirror, for SEV-SNP reports.
        product: the SEV-SNP product ("Milan", "Genoa", "Turin") for version 2 reports, which
            do not name their CPU.
        timeout: seconds per request.
        get: the HTTP getter (default: httpx, bounded size, `timeout`); for tests.
    """

    pccs_url: str = INTEL_PCS_URL
    kds_url: str = AMD_KDS_URL
    product: str | None = None
    timeout: float = 10.0
    get: HttpGet | None = field(default=None, repr=False, compare=False)


CollateralChoice = str | CollateralServices | os.PathLike[str]


def check_choice(choice: object) -> None:
    """Refuse an unknown choice before any network traffic.

    Raises:
        ValueError: a string other than ``"server"``, or another type.
    """
    if isinstance(choice, CollateralServices | os.PathLike):
        return
    if choice != SERVER:
        raise ValueError(
            f"collateral: got {choice!r}, expected 'server', a CollateralServices or the "
            "pathlib.Path of a bundle directory"
        )


def wants_server_collateral(choice: CollateralChoice) -> bool:
    """Whether the server's ``/collateral`` is needed (a bundle needs nothing from it)."""
    return not isinstance(choice, os.PathLike)


def own_collateral(
    choice: CollateralChoice, quote: bytes, served: Callable[[], Mapping[str, Any]]
) -> DcapCollateral | SnpCollateral | Mapping[str, Any]:
    """The collateral to verify `quote` with, per `choice`; `served()` is the server's.

    Raises:
        CollateralError: a bundle directory that is missing or for another platform.
        EvidenceUnavailableError: a service failed.
        AttestationError: a service's answer is not what was asked for.
    """
    check_choice(choice)
    if isinstance(choice, os.PathLike):
        path = Path(choice)
        if not path.is_dir():
            raise CollateralError(f"collateral bundle: {path} is not a directory")
        try:
            return load_collateral_directory(path)
        except OSError as exc:
            raise CollateralError(f"collateral bundle: {exc.strerror or exc}") from None
    if not isinstance(choice, CollateralServices):
        return served()
    from veil.providers.pcs import httpx_getter, pcs_collateral_for_quote

    get = choice.get or httpx_getter(choice.timeout)
    try:
        if detect_platform(quote) is not Platform.SEV_SNP:
            return pcs_collateral_for_quote(quote, get=get, base_url=choice.pccs_url)
        report = parse_snp_report(quote)
        key = None
        if report.signing_key == SigningKey.VLEK:
            key = snp_collateral_from_map(served()).endorsement_key
        return KdsClient(choice.kds_url, get=get).collateral(
            report, product=choice.product, endorsement_key=key
        )
    except VeilError:
        raise
    except Exception as exc:
        # The getter's own failures; the type only, since the text may hold a URL.
        raise EvidenceUnavailableError(
            f"collateral service failed with {type(exc).__name__}"
        ) from exc
