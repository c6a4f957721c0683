"""Limits: each breach is a typed error with the right status, naming the limit and its value."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable

import pytest

from veil.errors import BadRequestError, RateLimitError, ServiceUnavailableError
from veil.server.limits import (
    AdmissionQueue,
    Limits,
    RateLimiter,
    iter_body_limited,
    read_body_limited,
)


async def _stream(
    chunks: Iterable[bytes], consumed: list[int] | None = None
) -> AsyncIterator[bytes]:
    for c in chunks:
        if consumed is not None:
            consumed.append(len(c))
        yield c
        await asyncio.sleep(0)


def test_defaults_fit_24_gib() -> None:
    lim = Limits()
    worst = lim.max_concurrent_requests * (lim.max_request_bytes + 2 * lim.max_tensor_bytes)
    # Requests in progress with their tensors, and the bodies waiting in the queue, leave
    # two thirds of 24 GiB to the models.
    assert worst + lim.max_queued_bytes < 8 << 30
    assert lim.max_request_bytes == 64 << 20


def test_limits_reject_nonsense() -> None:
    with pytest.raises(ValueError, match="max_inputs: got 0"):
        Limits(max_inputs=0)
    with pytest.raises(ValueError, match="request_timeout_s"):
        Limits(request_timeout_s=float("inf"))


@pytest.mark.parametrize(
    ("call", "status", "message"),
    [
        (lambda lim: lim.check_request_bytes(11), 413, "request body exceeds max_request_bytes=10"),
        (lambda lim: lim.check_upload_bytes(11), 413, "upload body exceeds max_upload_bytes=10"),
        (lambda lim: lim.check_model_bytes(11), 413, "exceeds max_model_bytes=10"),
        (lambda lim: lim.check_storage(5, 6), 413, "model of 6 bytes exceeds the server's storage"),
        (lambda lim: lim.check_inputs(11), 422, "11 input tensors exceed max_inputs=10"),
        (
            lambda lim: lim.check_tensor([3, 4], 1, "x"),
            422,
            "'x' has 12 elements, exceeds max_tensor_elements=10",
        ),
        (lambda lim: lim.check_tensor([2, 2], 4), 422, "16 bytes, exceeds max_tensor_bytes=10"),
        (lambda lim: lim.check_tensor([2, -1], 4), 400, "dimensions must be >= 0"),
        (
            lambda lim: lim.check_tensor([0, 11], 4),
            422,
            "a dimension exceeds max_tensor_elements=10",
        ),
        (lambda lim: lim.check_tensor([1] * 4, 1), 422, "4 dimensions, exceeds max_tensor_rank=3"),
    ],
)
def test_each_breach(call: object, status: int, message: str) -> None:
    lim = Limits(
        max_request_bytes=10,
        max_upload_bytes=10,
        max_model_bytes=10,
        max_total_stored_bytes=10,
        max_inputs=10,
        max_tensor_elements=10,
        max_tensor_bytes=10,
        max_tensor_rank=3,
    )
    with pytest.raises(BadRequestError) as info:
        call(lim)  # type: ignore[operator]
    assert info.value.status == status
    assert message in info.value.message


def test_at_the_limit_passes() -> None:
    lim = Limits(max_request_bytes=10, max_inputs=2, max_tensor_elements=4, max_tensor_bytes=16)
    lim.check_request_bytes(10)
    lim.check_inputs(2)
    lim.check_tensor([2, 2], 4)
    lim.check_tensor([0, 4], 4)  # empty tensor
    lim.check_tensor([1] * 32, 4)  # default max rank


def test_rate_limiter_token_bucket() -> None:
    t = [0.0]
    rl = RateLimiter(rate=2.0, burst=3, now=lambda: t[0])
    assert [rl.try_acquire("a") for _ in range(4)] == [True, True, True, False]
    assert rl.try_acquire("b")  # buckets are per key
    t[0] += 0.5  # one token back
    assert rl.try_acquire("a")
    assert not rl.try_acquire("a")
    t[0] += 100.0  # refills only up to the burst
    assert [rl.try_acquire("a") for _ in range(4)] == [True, True, True, False]
    with pytest.raises(RateLimitError) as info:
        rl.reserve("a")
    assert info.value.status == 429
    assert "requests_per_second=2 (burst 3)" in info.value.message


def test_rate_limiter_delays_within_its_bound_then_refuses() -> None:
    t = [0.0]
    rl = RateLimiter(rate=10.0, burst=2, now=lambda: t[0])
    assert rl.reserve("a", max_delay=0.25) == 0.0
    assert rl.reserve("a", max_delay=0.25) == 0.0
    # Over the rate: each next request waits for its own token, in arrival order.
    assert rl.reserve("a", max_delay=0.25) == pytest.approx(0.1)
    assert rl.reserve("a", max_delay=0.25) == pytest.approx(0.2)
    # The next would wait 0.3 s > 0.25 s: refused, and nothing is taken for it.
    with pytest.raises(RateLimitError, match="requests_per_second=10 "):
        rl.reserve("a", max_delay=0.25)
    assert rl.reserve("b", max_delay=0.25) == 0.0  # other keys are not slowed
    t[0] += 0.1  # one token back: the wait shrinks by as much
    assert rl.reserve("a", max_delay=0.25) == pytest.approx(0.2)


def test_rate_limiter_bounded_memory() -> None:
    rl = RateLimiter(rate=1.0, burst=1, now=lambda: 0.0, max_keys=3)
    for k in "abcde":
        assert rl.try_acquire(k)
    assert len(rl._buckets) == 3
    assert not rl.try_acquire("e")  # recent keys are remembered
    assert rl.try_acquire("a")  # forgotten: starts full again


def test_rate_limiter_from_limits() -> None:
    rl = RateLimiter.from_limits(Limits(requests_per_second=1.0, burst=2), now=lambda: 0.0)
    assert [rl.try_acquire("k") for _ in range(3)] == [True, True, False]


def _queue(
    limit: int = 1, max_queued: int = 2, max_bytes: int = 100, wait: float = 5.0
) -> AdmissionQueue:
    return AdmissionQueue(
        limit, max_queued=max_queued, max_queued_bytes=max_bytes, retry_after_s=2.0, max_wait_s=wait
    )


def test_admission_queue_waits_in_order_then_refuses_when_full() -> None:
    async def main() -> None:
        q = _queue(limit=1, max_queued=2)
        order: list[str] = []
        await q.acquire()  # runs at once

        async def waiter(name: str) -> None:
            await q.acquire(10)
            order.append(name)

        tasks = [asyncio.create_task(waiter(n)) for n in "ab"]
        while q.queued < 2:
            await asyncio.sleep(0)
        assert (q.active, q.queued, q.queued_bytes) == (1, 2, 20)
        # A third waiter does not fit: 503, saying when to come back.
        with pytest.raises(ServiceUnavailableError) as info:
            await q.acquire(10)
        assert info.value.status == 503
        assert info.value.retry_after == 2.0
        assert info.value.message == "server busy: max_queued_requests=2 requests waiting"
        assert q.refused == 1
        q.release()  # the slot goes to the oldest waiter; `active` stays 1
        await asyncio.sleep(0)
        assert order == ["a"]
        assert (q.active, q.queued, q.queued_bytes) == (1, 1, 10)
        q.release()
        await asyncio.gather(*tasks)
        assert order == ["a", "b"]
        q.release()
        assert (q.active, q.queued, q.queued_bytes) == (0, 0, 0)

    asyncio.run(main())


def test_admission_queue_bounded_in_bytes() -> None:
    async def main() -> None:
        q = _queue(limit=1, max_queued=10, max_bytes=100)
        await q.acquire()
        first = asyncio.create_task(q.acquire(60))
        while q.queued < 1:
            await asyncio.sleep(0)
        with pytest.raises(ServiceUnavailableError, match="max_queued_bytes=100 "):
            await q.acquire(41)
        second = asyncio.create_task(q.acquire(40))  # exactly fits
        while q.queued < 2:
            await asyncio.sleep(0)
        assert q.queued_bytes == 100
        q.release()
        q.release()
        await asyncio.gather(first, second)
        assert (q.active, q.queued_bytes) == (1, 0)

    asyncio.run(main())


def test_admission_queue_wait_is_bounded_and_cancel_leaves_no_trace() -> None:
    async def main() -> None:
        q = _queue(limit=1, max_queued=4, wait=0.05)
        await q.acquire()
        with pytest.raises(ServiceUnavailableError, match=r"request_timeout_s=0\.05") as info:
            await q.acquire(5)
        assert info.value.retry_after == 2.0
        assert (q.queued, q.queued_bytes) == (0, 0)
        # A waiter whose client went away leaves the queue and takes no slot.
        gone = asyncio.create_task(q.acquire(7))
        while q.queued < 1:
            await asyncio.sleep(0)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert (q.queued, q.queued_bytes) == (0, 0)
        q.release()
        assert q.active == 0

    asyncio.run(main())


def test_admission_queue_slot_released_on_failure() -> None:
    async def main() -> None:
        q = _queue(limit=2)
        async with q.slot():
            assert q.active == 1
        with pytest.raises(ZeroDivisionError):
            async with q.slot():
                _ = 1 / 0
        assert q.active == 0

    asyncio.run(main())


def test_admission_queue_from_limits() -> None:
    q = AdmissionQueue.from_limits(Limits())
    assert (q.active, q.queued) == (0, 0)
    with pytest.raises(ValueError, match="expected limit >= 1"):
        AdmissionQueue(0, max_queued=1, max_queued_bytes=1, retry_after_s=1, max_wait_s=1)


def test_read_body_limited() -> None:
    async def main() -> None:
        assert await read_body_limited(_stream([b"ab", b"", b"cd"]), 4) == b"abcd"
        # Content-Length is never trusted: a small declared length does not lift the limit,
        # and reading stops at the first chunk past it (the rest is never pulled).
        consumed: list[int] = []
        endless = (b"x" * 1000 for _ in range(10**6))
        with pytest.raises(BadRequestError) as info:
            await read_body_limited(_stream(endless, consumed), 2500, content_length="3")
        assert info.value.status == 413
        assert info.value.message == "request body exceeds max_request_bytes=2500"
        assert sum(consumed) == 3000
        # A declared length above the limit is refused before reading anything.
        consumed.clear()
        with pytest.raises(BadRequestError, match="max_upload_bytes=5"):
            await read_body_limited(
                _stream([b"x"], consumed), 5, limit_name="max_upload_bytes", content_length="6"
            )
        assert consumed == []
        # A garbage Content-Length is ignored, the real count still applies.
        assert await read_body_limited(_stream([b"abc"]), 5, content_length="zz") == b"abc"

    asyncio.run(main())


def test_iter_body_limited_streams() -> None:
    async def main() -> list[bytes]:
        return [c async for c in iter_body_limited(_stream([b"a", b"bc"]), 3)]

    assert asyncio.run(main()) == [b"a", b"bc"]


def test_with_starlette_request() -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from veil.errors import ApiError

    async def run(request: Request) -> Response:
        try:
            body = await read_body_limited(
                request.stream(), 8, content_length=request.headers.get("content-length")
            )
        except ApiError as exc:
            return Response(exc.message, status_code=exc.status)
        return Response(body)

    app = Starlette(routes=[Route("/run", run, methods=["POST"])])
    with TestClient(app) as client:
        assert client.post("/run", content=b"12345678").content == b"12345678"
        r = client.post("/run", content=b"123456789")
        assert r.status_code == 413
        assert r.text == "request body exceeds max_request_bytes=8"
        # chunked, no Content-Length at all
        r = client.post("/run", content=iter([b"1234", b"5678", b"9"]))
        assert r.status_code == 413
