"""Collateral for real evidence: Intel PCS or a caching service (PCCS) for SGX and TDX quotes,
AMD KDS for SEV-SNP reports.

A server inside a TEE serves its quote together with the collateral a client needs to check it
(BlindAI 0.6's ``GET /collateral``). The evidence itself names what to fetch: for DCAP the FMSPC
and the issuing PCK CA come from the PCK certificate embedded in its certification data; for
SEV-SNP the product, CHIP_ID and REPORTED_TCB select the VCEK. Nothing fetched here is trusted by
the server; the client verifies every item against the pinned Intel or AMD root.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import httpx
from cryptography.x509.oid import NameOID

from veil.attestation.abi.dcap import parse_quote
from veil.attestation.claims import Platform
from veil.attestation.collateral_source import (
    INTEL_PCS_URL,
    HttpGet,
    collateral_from_pcs,
    collateral_to_blindai_map,
)
from veil.attestation.kds import AMD_KDS_URL, KdsClient, snp_collateral_to_map
from veil.attestation.verifier import detect_platform
from veil.attestation.verify.collateral import DcapCollateral
from veil.attestation.verify.x509util import load_pem_chain, parse_pck_extensions
from veil.errors import CollateralError
from veil.providers.base import CollateralFetcher, fetch_collateral

__all__ = [
    "DEFAULT_MAX_RESPONSE_BYTES",
    "DEFAULT_TIMEOUT_S",
    "collateral_fetcher",
    "httpx_getter",
    "kds_collateral_fetcher",
    "pck_ca_kind",
    "pcs_collateral_fetcher",
    "pcs_collateral_for_quote",
]

# Intel's largest item (a PCK CRL) is well under 1 MiB; the bound keeps a broken or hostile
# service from filling the TEE's memory.
DEFAULT_MAX_RESPONSE_BYTES = 4 << 20
DEFAULT_TIMEOUT_S = 10.0

# The issuer common names of Intel's two PCK CAs (PCK certificate and CRL profile spec).
_PCK_CA_KINDS = {
    "Intel SGX PCK Processor CA": "processor",
    "Intel SGX PCK Platform CA": "platform",
}


def httpx_getter(
    timeout: float = DEFAULT_TIMEOUT_S, *, max_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
) -> HttpGet:
    """An HTTP GET for the collateral services: raises on any non-2xx answer.

    Args:
        timeout: seconds allowed to connect and between bytes read.
        max_bytes: the largest body read; a longer one raises `CollateralError` unread.
    """

    def get(url: str) -> tuple[bytes, Mapping[str, str]]:
        with httpx.stream("GET", url, timeout=timeout, follow_redirects=False) as response:
            response.raise_for_status()
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                raise CollateralError(
                    f"collateral service answer: got {declared} bytes, expected at most {max_bytes}"
                )
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > max_bytes:
                    raise CollateralError(f"collateral service answer: more than {max_bytes} bytes")
            return bytes(body), dict(response.headers)

    return get


def pck_ca_kind(issuer_common_name: str) -> str:
    """Map a PCK certificate's issuer CN to the ``ca`` parameter of the PCS CRL API."""
    try:
        return _PCK_CA_KINDS[issuer_common_name]
    except KeyError:
        expected = " or ".join(repr(name) for name in _PCK_CA_KINDS)
        raise CollateralError(
            f"PCK issuer: got {issuer_common_name!r}, expected {expected}"
        ) from None


def pcs_collateral_fetcher(
    base_url: str = INTEL_PCS_URL, *, get: HttpGet | None = None
) -> CollateralFetcher:
    """Build a fetcher that turns a quote into BlindAI's collateral map, from PCS or a PCCS.

    Args:
        base_url: Intel PCS (the default) or a PCCS root URL, e.g. ``https://pccs.local:8081``.
        get: the HTTP getter; defaults to httpx with a 10 s time-out. Injected in tests.
    """
    getter = get if get is not None else httpx_getter()

    def fetch(quote_bytes: bytes) -> Mapping[str, Any]:
        return collateral_to_blindai_map(
            pcs_collateral_for_quote(quote_bytes, get=getter, base_url=base_url)
        )

    return fetch


def pcs_collateral_for_quote(
    quote_bytes: bytes, *, get: HttpGet, base_url: str = INTEL_PCS_URL
) -> DcapCollateral:
    """Fetch the collateral of an SGX or TDX quote; the quote's PCK certificate names the FMSPC
    and the PCK CA. The PCK chain is included, for clients that read it from the collateral.

    Raises:
        CollateralError: the quote embeds no PCK chain, or its issuer is not an Intel PCK CA.
    """
    quote = parse_quote(quote_bytes)
    if quote.pck_chain_pem is None:
        raise CollateralError(
            "quote certification data: got no PCK certificate chain, expected type 5"
        )
    leaf = load_pem_chain(quote.pck_chain_pem, "quote PCK chain")[0]
    issuer_cn = leaf.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    collateral = collateral_from_pcs(
        parse_pck_extensions(leaf).fmspc,
        pck_ca_kind(str(issuer_cn[0].value) if issuer_cn else ""),
        tdx=quote.is_tdx,
        get=get,
        base_url=base_url,
    )
    return replace(collateral, pck_certificate_chain=quote.pck_chain_pem.decode("ascii"))


def kds_collateral_fetcher(
    base_url: str = AMD_KDS_URL,
    *,
    get: HttpGet | None = None,
    product: str | None = None,
    endorsement_key: bytes | None = None,
) -> CollateralFetcher:
    """Build a fetcher that turns an SEV-SNP report into ``{"vcek"|"vlek", "cert_chain", "crl"}``.

    Args:
        base_url: AMD KDS (the default) or a mirror of it.
        get: the HTTP getter; defaults to `httpx_getter`.
        product: for version 2 reports, which carry no CPUID ("Milan", "Genoa", "Turin").
        endorsement_key: the VCEK or VLEK (DER) the host supplied; then only the chain and
            the CRL are fetched.
    """
    kds = KdsClient(base_url, get=get if get is not None else httpx_getter())

    def fetch(report: bytes) -> Mapping[str, Any]:
        return snp_collateral_to_map(
            kds.collateral(report, product=product, endorsement_key=endorsement_key)
        )

    return fetch


def collateral_fetcher(
    *,
    pccs_url: str = INTEL_PCS_URL,
    kds_url: str = AMD_KDS_URL,
    get: HttpGet | None = None,
    product: str | None = None,
) -> CollateralFetcher:
    """One fetcher for any evidence: Intel PCS/PCCS for SGX and TDX quotes, AMD KDS for SEV-SNP.

    Args:
        pccs_url: Intel PCS or a PCCS root URL.
        kds_url: AMD KDS or a mirror.
        get: the HTTP getter shared by both; defaults to `httpx_getter`.
        product: the SEV-SNP product for version 2 reports.
    """
    getter = get if get is not None else httpx_getter()
    intel = pcs_collateral_fetcher(pccs_url, get=getter)
    amd = kds_collateral_fetcher(kds_url, get=getter, product=product)

    def fetch(evidence: bytes) -> Mapping[str, Any]:
        chosen = amd if detect_platform(evidence) is Platform.SEV_SNP else intel
        return fetch_collateral(chosen, evidence)

    return fetch
