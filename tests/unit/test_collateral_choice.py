"""`veil.client.collateral`: which collateral a client verifies with, without a server."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from veil.attestation.kds import snp_collateral_to_map
from veil.attestation.verify.snp import SnpCollateral
from veil.client.collateral import CollateralServices, check_choice, own_collateral
from veil.errors import AttestationError, EvidenceUnavailableError
from veil.testing.amd_pki import AmdPki

NOW = datetime(2026, 3, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def milan() -> AmdPki:
    return AmdPki("Milan", now=NOW, seed=b"client collateral")


def never() -> Mapping[str, object]:
    raise AssertionError("the server's collateral was not needed")


def test_server_choice_returns_what_the_server_served() -> None:
    served = {"vcek": b"x"}
    assert own_collateral("server", b"", lambda: served) is served


@pytest.mark.parametrize("choice", ["pccs", "./bundle", 3, None])
def test_unknown_choices_are_refused(choice: object) -> None:
    with pytest.raises(ValueError, match="expected 'server'"):
        check_choice(choice)


def test_vlek_report_takes_the_key_from_the_server_and_the_rest_from_kds(milan: AmdPki) -> None:
    chip = milan.chip(vlek_csp_id="csp")
    report = chip.report(bytes(64), measurement=bytes(48))
    asked: list[str] = []

    def kds(url: str) -> tuple[bytes, Mapping[str, str]]:
        asked.append(url)
        if url.endswith("/vlek/v1/Milan/cert_chain"):
            return milan.chain_pem(vlek=True).encode(), {}
        if url.endswith("/vlek/v1/Milan/crl"):
            return milan.crl(NOW), {}
        raise AssertionError(url)

    served = snp_collateral_to_map(chip.collateral(NOW, with_crl=False))
    got = own_collateral(CollateralServices(kds_url="https://kds", get=kds), report, lambda: served)
    assert isinstance(got, SnpCollateral)
    assert got.endorsement_key == chip.endorsement_key.der
    assert got.crl is not None
    assert len(asked) == 2


def test_a_getter_failure_is_unavailability(milan: AmdPki) -> None:
    report = milan.chip().report(bytes(64), measurement=bytes(48))

    def down(url: str) -> tuple[bytes, Mapping[str, str]]:
        raise httpx.ConnectError("refused")

    with pytest.raises(EvidenceUnavailableError, match="ConnectError"):
        own_collateral(CollateralServices(get=down), report, never)


def test_bundle_with_no_key_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(AttestationError, match="collateral directory"):
        own_collateral(tmp_path, b"", never)
