"""Hypothesis settings for the fuzz tests: bounded, derandomized so CI runs are reproducible.

Set ``VEIL_FUZZ_EXAMPLES`` to run more examples locally (e.g. 20000 for a long fuzzing session).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "veil-fuzz",
    max_examples=int(os.environ.get("VEIL_FUZZ_EXAMPLES", "150")),
    deadline=None,
    derandomize=os.environ.get("VEIL_FUZZ_EXAMPLES") is None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)
