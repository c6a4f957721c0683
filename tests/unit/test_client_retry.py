"""The client's retry of busy refusals: only when the server says when, bounded, backing off."""

from __future__ import annotations

import pytest

from veil.client.connection import _retry_after, busy_retry_delay


def test_no_retry_without_retry_after_or_past_the_count() -> None:
    assert busy_retry_delay(0, None, retries=4, max_delay=4.0) is None  # e.g. a broken state
    assert busy_retry_delay(4, 1.0, retries=4, max_delay=4.0) is None
    assert busy_retry_delay(0, 1.0, retries=0, max_delay=4.0) is None


@pytest.mark.parametrize(
    ("attempt", "low", "high"),
    [(0, 0.5, 1.0), (1, 1.0, 2.0), (2, 1.5, 3.0), (3, 1.5, 3.0)],  # doubled, capped at 3 s
)
def test_backoff_doubles_is_capped_and_jittered(attempt: int, low: float, high: float) -> None:
    delays = [busy_retry_delay(attempt, 1.0, retries=10, max_delay=3.0) for _ in range(200)]
    assert all(d is not None and low <= d <= high for d in delays)
    assert len(set(delays)) > 1  # spread, so that refused clients do not return together


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("1", 1.0), (" 2 ", 2.0), (None, None), ("-1", None), ("soon", None), ("9999999", None)],
)
def test_retry_after_header(header: str | None, seconds: float | None) -> None:
    # HTTP dates and nonsense are not retried: only a plain, short number of seconds.
    assert _retry_after(header) == seconds


def test_failover_backoff_doubles_from_a_tenth_of_a_second_and_is_capped() -> None:
    from veil.client.connection import failover_delay

    for attempt, high in ((0, 0.1), (1, 0.2), (3, 0.8), (10, 2.0)):
        delays = [failover_delay(attempt) for _ in range(100)]
        assert all(high / 2 <= d <= high for d in delays)
