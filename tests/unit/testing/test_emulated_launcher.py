"""Hazmat options live in the test bed's launcher, not in the production `veil serve`."""

from __future__ import annotations

from dataclasses import fields
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from veil.attestation.trust import TrustStore
from veil.cli import build_parser
from veil.errors import HazmatWarning
from veil.server.config import ServerConfig
from veil.testing.amd_pki import AmdPki
from veil.testing.emulated import hazmat_test_trust
from veil.testing.intel_pki import IntelPki

NOW = datetime(2026, 6, 1, tzinfo=UTC)


def test_production_serve_has_no_tamper_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["serve", "--hazmat-test-tamper-certificate"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --hazmat-test-tamper-certificate" in capsys.readouterr().err
    assert not any("hazmat" in f.name for f in fields(ServerConfig))


def test_test_roots_file_names_the_intel_root_and_each_ark_by_product(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    intel = IntelPki(now=NOW, seed=b"launcher roots")
    amd = AmdPki("Genoa", now=NOW, seed=b"launcher roots")
    pem = tmp_path / "roots.pem"
    pem.write_bytes(b"".join(c.public_bytes(Encoding.PEM) for c in (amd.ark, intel.root)))
    with pytest.warns(HazmatWarning):
        trust = hazmat_test_trust(pem)
    assert trust.hazmat_test
    assert trust.intel_root == intel.root
    assert dict(trust.amd_arks) == {"Genoa": amd.ark}
    assert "HAZMAT: --hazmat-test-roots roots.pem" in capsys.readouterr().err


def test_the_simulated_root_is_refused_as_a_test_root(tmp_path: Path) -> None:
    pem = tmp_path / "roots.pem"
    pem.write_bytes(TrustStore.simulated_only().intel_root.public_bytes(Encoding.PEM))
    with pytest.raises(ValueError, match="simulated root"):
        hazmat_test_trust(pem)
