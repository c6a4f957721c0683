"""Shared test fixtures: where the real attestation vectors live."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Real evidence from public repositories, copied in with its provenance (see its README.md).
VECTORS = REPO_ROOT / "tests" / "testdata" / "attestation-vectors"


@pytest.fixture(scope="session")
def vectors() -> Path:
    if not VECTORS.is_dir():
        pytest.fail(f"attestation vectors not found at {VECTORS}: the repository is incomplete")
    return VECTORS
