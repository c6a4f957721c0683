"""Shared test fixtures: where the real attestation vectors live."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# CI and every developer checkout have the steering repo's shared/ beside the clone.
VECTORS = REPO_ROOT.parent / "shared" / "attestation-vectors"


@pytest.fixture(scope="session")
def vectors() -> Path:
    if not VECTORS.is_dir():
        pytest.fail(
            f"attestation vectors not found at {VECTORS}: ../shared must sit beside the clone"
        )
    return VECTORS
