"""Collateral for real SGX and TDX quotes, fetched from Intel PCS or a caching service (PCCS).

A server inside a TEE serves its quote together with the collateral a client needs to check it
(BlindAI 0.6's ``GET /collateral``). The quote itself names what to fetch: the FMSPC and the
issuing PCK CA come from the PCK certificate embedded in its certification data. Nothing fetched
here is trusted by the server; the client verifies every item against the pinned Intel root.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import httpx
from cryptography.x509.oid import NameOID

from veil.attestation.abi.dcap import parse_quote
from veil.attestation.collateral_source import (
    INTEL_PCS_URL,
    HttpGet,
    collateral_from_pcs,
    collateral_to_blindai_map,
)
from veil.attestation.verify.x509util import load_pem_chain, parse_pck_extensions
from veil.errors import CollateralError
from veil.providers.base import CollateralFetcher

__all__ = ["httpx_getter", "pck_ca_kind", "pcs_collateral_fetcher"]

# The issuer common names of Intel's two PCK CAs (PCK certificate and CRL profile spec).
_PCK_CA_KINDS = {
    "Intel SGX PCK Processor CA": "processor",
    "Intel SGX PCK Platform CA": "platform",
}


def httpx_getter(timeout: float = 10.0) -> HttpGet:
    """An HTTP GET for `collateral_from_pcs`: raises on any non-2xx answer."""

    def get(url: str) -> tuple[bytes, Mapping[str, str]]:
        response = httpx.get(url, timeout=timeout, follow_redirects=False)
        response.raise_for_status()
        return response.content, dict(response.headers)

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
        quote = parse_quote(quote_bytes)
        if quote.pck_chain_pem is None:
            raise CollateralError(
                "quote certification data: got no PCK certificate chain, expected type 5"
            )
        pck_chain = load_pem_chain(quote.pck_chain_pem, "quote PCK chain")
        leaf = pck_chain[0]
        issuer_cn = leaf.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
        ca = pck_ca_kind(str(issuer_cn[0].value) if issuer_cn else "")
        collateral = collateral_from_pcs(
            parse_pck_extensions(leaf).fmspc,
            ca,
            tdx=quote.is_tdx,
            get=getter,
            base_url=base_url,
        )
        # The PCK chain travels with the collateral too, for clients that read it from there.
        with_chain = replace(collateral, pck_certificate_chain=quote.pck_chain_pem.decode("ascii"))
        return collateral_to_blindai_map(with_chain)

    return fetch
