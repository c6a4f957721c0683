"""The server-side PCS/PCCS fetcher: the quote names what to fetch, the client verifies it."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from test_dcap_collateral_source import FakePcs

from veil.attestation.policy import Policy
from veil.attestation.trust import TrustStore
from veil.attestation.verifier import verify_evidence
from veil.errors import CollateralError, EvidenceUnavailableError, UnsafePolicyWarning
from veil.providers.base import fetch_collateral
from veil.providers.pcs import pck_ca_kind, pcs_collateral_fetcher

TDX_SET = "tdx/dcap-qvl-tdx-v4"
TDX_NOW = datetime(2025, 7, 1, tzinfo=UTC)


def test_tdx_quote_collateral_fetched_by_fmspc_and_verifies(vectors: Path) -> None:
    folder = vectors / TDX_SET
    get = FakePcs(folder / "derived")
    quote = (folder / "tdx_quote").read_bytes()
    served = pcs_collateral_fetcher(get=get)(quote)
    assert "fmspc=" in get.urls[0]
    assert "/tdx/certification/v4/tcb" in get.urls[0]
    assert "/tdx/certification/v4/qe/identity" in get.urls[1]
    assert served["pck_certificate"].startswith("-----BEGIN CERTIFICATE-----")
    with pytest.warns(UnsafePolicyWarning):
        policy = Policy.unsafe_unpinned()
    verified = verify_evidence(
        quote, served, policy=policy, trust=TrustStore.production(), now=TDX_NOW
    )
    assert verified.tcb_status == "UpToDate"


def test_fetcher_failure_becomes_evidence_unavailable(vectors: Path) -> None:
    quote = (vectors / TDX_SET / "tdx_quote").read_bytes()

    def down(url: str) -> tuple[bytes, dict[str, str]]:
        raise OSError("connection refused by pccs.example:8081")

    with pytest.raises(EvidenceUnavailableError) as excinfo:
        fetch_collateral(pcs_collateral_fetcher(get=down), quote)
    assert "pccs.example" not in str(excinfo.value)


def test_unknown_pck_issuer_is_refused() -> None:
    assert pck_ca_kind("Intel SGX PCK Platform CA") == "platform"
    with pytest.raises(CollateralError, match="got 'Mallory CA'"):
        pck_ca_kind("Mallory CA")
