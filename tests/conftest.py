"""Shared test fixtures: where the real attestation vectors live; Hypothesis's defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

REPO_ROOT = Path(__file__).resolve().parents[1]
# Real evidence from public repositories, copied in with its provenance (see its README.md).
VECTORS = REPO_ROOT / "tests" / "testdata" / "attestation-vectors"

# Every property test, unless it says otherwise: no per-example deadline and no "too slow"
# health check (both fail on a loaded machine, not on a wrong answer: Hypothesis's 200 ms
# deadline raises Flaky when a slow example runs faster on replay), the same examples on every
# run (a CI failure reproduces), and no example database written into the checkout.
settings.register_profile(
    "veil",
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("veil")


@pytest.fixture(scope="session")
def vectors() -> Path:
    if not VECTORS.is_dir():
        pytest.fail(f"attestation vectors not found at {VECTORS}: the repository is incomplete")
    return VECTORS
