"""The client's retry of busy refusals: only when the server says when, bounded, backing off."""

from __future__ import annotations

from typing import Any

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


def _lost_upload_lookup(
    monkeypatch: pytest.MonkeyPatch, listings: list[list[tuple[str, bytes, int]]], retries: int = 4
) -> tuple[Any, list[str]]:
    """A connection whose `list_models` answers `listings` in turn (then the last again)."""
    from types import SimpleNamespace

    import veil.client.connection as connection_module
    from veil.client.connection import Connection

    monkeypatch.setattr(connection_module, "failover_delay", lambda attempt: 0.0)
    calls: list[str] = []
    connection = object.__new__(Connection)
    connection._failover_retries = retries
    connection.reattestations = 0
    connection._settings = (None, True, None, None, None, None)  # no API key: ids of no owner

    def attest() -> None:
        calls.append("attest")

    def list_models() -> list[SimpleNamespace]:
        calls.append("list")
        listing = listings.pop(0) if len(listings) > 1 else listings[0]
        return [SimpleNamespace(model_id=i, hash=h, size=s, owner=None) for i, h, s in listing]

    monkeypatch.setattr(connection, "_attest", attest)
    monkeypatch.setattr(connection, "list_models", list_models)
    return connection, calls


def test_a_lost_upload_is_looked_up_until_the_server_has_admitted_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import time

    # Not there for the first looks (still being admitted), then there: found, one attestation,
    # more looks than failover_retries since the upload's own time is not up.
    listings = [[]] * 6 + [[("m", b"h" * 32, 10)]]
    connection, calls = _lost_upload_lookup(monkeypatch, list(listings))
    found = connection._find_upload("m", b"h" * 32, 10, time.monotonic() + 60)
    assert found is not None
    assert found.model_id == "m"
    assert calls == ["attest"] + ["list"] * 7


def test_a_lost_upload_whose_id_holds_other_bytes_is_not_there(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import time

    connection, calls = _lost_upload_lookup(monkeypatch, [[("m", b"x" * 32, 10)]])
    assert connection._find_upload("m", b"h" * 32, 10, time.monotonic() + 60) is None
    assert calls == ["attest", "list"]  # answered at once: that upload was refused


def test_a_lost_upload_is_looked_up_no_longer_than_its_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import time

    connection, calls = _lost_upload_lookup(monkeypatch, [[]], retries=3)
    # The upload's time is already up: failover_retries looks, then not there.
    assert connection._find_upload("m", b"h" * 32, 10, time.monotonic()) is None
    assert calls == ["attest", "list", "list", "list"]
    connection, calls = _lost_upload_lookup(monkeypatch, [[("m", b"h" * 32, 10)]], retries=0)
    assert connection._find_upload("m", b"h" * 32, 10, time.monotonic() + 60) is None
    assert calls == []  # failover_retries=0: never


def test_a_lost_upload_is_not_looked_for_on_a_server_that_is_gone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import time

    from veil.errors import TransportError

    connection, calls = _lost_upload_lookup(monkeypatch, [[]], retries=3)

    def unreachable() -> None:
        calls.append("attest")
        raise TransportError("connection refused")

    monkeypatch.setattr(connection, "_attest", unreachable)
    # A far deadline, but the server cannot be reached: failover_retries tries, then not there.
    assert connection._find_upload("m", b"h" * 32, 10, time.monotonic() + 600) is None
    assert calls == ["attest"] * 3


def test_a_lost_upload_is_looked_for_a_bounded_time(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    import veil.client.connection as connection_module

    monkeypatch.setattr(connection_module, "LOST_UPLOAD_LOOKUP_S", 0.2)
    connection, calls = _lost_upload_lookup(monkeypatch, [[]], retries=2)
    started = time.monotonic()
    assert connection._find_upload("m", b"h" * 32, 10, time.monotonic() + 600) is None
    # Looked more than failover_retries times (the window was open), and stopped with it.
    assert calls.count("list") > 2
    assert time.monotonic() - started < 60
