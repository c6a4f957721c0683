"""The evidence-provider contract: what `veil serve` asks of the TEE it runs in.

A provider turns 64 bytes of report data into platform evidence (a quote or report) plus the
collateral a client needs to verify it, and hands out the platform's sealing key. Providers only
*produce* evidence; they never judge it. Verification lives in `veil.attestation`.

Report data: callers pass at most 64 bytes. Shorter values are zero-padded on the right to 64
bytes (the same thing the Linux configfs-tsm and Gramine interfaces do with a short write), so a
32-byte SHA-256 digest lands in the first half and the second half is zero. Longer values are
refused, never truncated: truncation would silently drop part of what the caller wanted bound.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable

from veil.attestation.claims import Platform
from veil.errors import EvidenceUnavailableError, VeilError

__all__ = [
    "REPORT_DATA_SIZE",
    "CollateralFetcher",
    "Evidence",
    "EvidenceProvider",
    "fetch_collateral",
    "pad_report_data",
]

REPORT_DATA_SIZE = 64

# Takes the raw quote and returns the BlindAI-shaped collateral map for it (Intel PCS/PCCS, or an
# offline bundle). Injected because a TEE guest usually has no business holding HTTP credentials.
CollateralFetcher = Callable[[bytes], Mapping[str, Any]]


@dataclass(frozen=True, slots=True)
class Evidence:
    """Evidence from a TEE and the collateral needed to verify it.

    Attributes:
        quote: the raw evidence bytes (SGX/TDX quote, SEV-SNP attestation report).
        collateral: the CBOR-serialisable map served on ``GET /collateral``. For SGX and TDX it
            is BlindAI 0.6's collateral map (``version``, ``pck_certificate``,
            ``pck_crl_issuer_chain``,
            ``pck_signing_chain``, ``root_ca_crl``, ``pck_crl``, ``tcb_info``,
            ``tcb_info_issuer_chain``, ``qe_identity``, ``qe_identity_issuer_chain``; str values,
            CRLs as PEM, ``tcb_info``/``qe_identity`` as full PCS response JSON). For SEV-SNP it is
            ``{"vcek": <DER bytes>}`` plus ``"cert_chain"`` (PEM ASK then ARK) when known.
    """

    quote: bytes
    collateral: Mapping[str, Any]

    def __post_init__(self) -> None:
        object.__setattr__(self, "collateral", MappingProxyType(dict(self.collateral)))

    def __repr__(self) -> str:
        return (
            f"Evidence(quote=<{len(self.quote)} bytes>, collateral_keys={sorted(self.collateral)})"
        )


@runtime_checkable
class EvidenceProvider(Protocol):
    """A source of evidence inside (or, when `simulated`, pretending to be inside) a TEE."""

    @property
    def platform(self) -> Platform:
        """The TEE this provider's evidence comes from."""
        ...

    @property
    def simulated(self) -> bool:
        """True when no TEE is involved: evidence is signed by veil's public simulated root."""
        ...

    def evidence(self, report_data: bytes) -> Evidence:
        """Fresh evidence binding `report_data` (at most 64 bytes, zero-padded to 64).

        Raises:
            EvidenceUnavailableError: the platform could not produce evidence or collateral.
            ValueError: `report_data` is longer than 64 bytes.
        """
        ...

    def sealing_key(self) -> bytes:
        """A 32-byte AES key from the platform's sealing facility, stable across restarts.

        Raises:
            EvidenceUnavailableError: the platform offers no sealing key to this process.
        """
        ...


def pad_report_data(report_data: bytes) -> bytes:
    """Return `report_data` zero-padded to 64 bytes; refuse anything longer or not bytes."""
    if not isinstance(report_data, bytes | bytearray | memoryview):
        raise TypeError(f"report_data: got {type(report_data).__name__}, expected bytes")
    data = bytes(report_data)
    if len(data) > REPORT_DATA_SIZE:
        raise ValueError(f"report_data: got {len(data)} bytes, expected at most {REPORT_DATA_SIZE}")
    return data.ljust(REPORT_DATA_SIZE, b"\0")


def fetch_collateral(fetcher: CollateralFetcher, quote: bytes) -> Mapping[str, Any]:
    """Call an injected fetcher; a failure of its own (network, PCCS down) becomes unavailability.

    veil errors pass through unchanged; anything else is wrapped so the server reports one
    typed error ("evidence unavailable") instead of crashing on an arbitrary exception. Only the
    exception's type is quoted: its text may hold a PCS URL or credential. The cause stays chained.
    """
    try:
        collateral = fetcher(quote)
    except VeilError:
        raise
    except Exception as exc:
        raise EvidenceUnavailableError(
            f"collateral fetcher failed with {type(exc).__name__}"
        ) from exc
    if not isinstance(collateral, Mapping):
        raise EvidenceUnavailableError(
            f"collateral fetcher: got {type(collateral).__name__}, expected a mapping"
        )
    return collateral
