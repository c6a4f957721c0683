"""Resource limits: what one request, one key and the whole server may consume.

Every breach raises an `ApiError` built by `veil.errors.api_error_for_status`, so the server's one
error-to-status mapping applies, with a message naming the limit and its value::

    413 request body exceeds max_request_bytes=67108864
    422 tensor 'input' has 20000000 elements, exceeds max_tensor_elements=16777216
    429 rate limit exceeded: requests_per_second=500.0 (burst 1000) for this key

413 is for sizes of bodies, models and storage; 422 for tensors that do not fit the limits; 429 for
a key over its rate; 503 with ``Retry-After`` when the request queue is full; 400 for malformed
input. The defaults keep a 24 GiB machine alive under hostile load: at most
`max_concurrent_requests` requests each holding at most `max_request_bytes` of body and their
tensors, and at most `max_queued_bytes` of bodies waiting for them.

Busy is not an error: a request beyond what runs at once waits in a bounded queue
(`AdmissionQueue`), and a key over its rate is delayed up to ``max_rate_delay_s``
(`RateLimiter.reserve`); only a full queue or a longer delay is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, fields

from veil.errors import ApiError, ServiceUnavailableError, api_error_for_status

__all__ = [
    "LOAD_RATIO_FLOOR_BYTES",
    "AdmissionQueue",
    "Limits",
    "RateLimiter",
    "iter_body_limited",
    "limit_error",
    "read_body_limited",
]

_MiB = 1 << 20
_GiB = 1 << 30
# Below this, a model's loaded cost is never refused for its ratio to the bytes uploaded.
LOAD_RATIO_FLOOR_BYTES = 64 * _MiB


def limit_error(status: int, message: str) -> ApiError:
    """The typed error for a breached limit (413 / 422 / 429 / 400)."""
    return api_error_for_status(status, message)


@dataclass(frozen=True, slots=True)
class Limits:
    """Server resource limits. Sizes are bytes, times seconds.

    Attributes:
        max_request_bytes: body of a run/predict request (413).
        max_json_request_bytes: the JSON of an Open Inference Protocol request (413); parsed
            JSON takes several times its size in memory, so this is lower than the above.
        max_upload_bytes: body of a model upload request (413).
        max_model_bytes: a decoded ONNX model (413).
        max_total_stored_bytes: all stored models together (413).
        models_memory_budget_bytes: what the models loaded at once may cost together (each
            model's measured loaded size, `LoadedModel.cost`); loading another past it evicts
            the least recently used models no request is using, which load again from the
            sealed store on their next use. The default equals `max_total_stored_bytes`'s, so
            a server whose stored models fit the storage limit keeps them all loaded.
        max_tensor_bytes: one input or output tensor's data (422).
        max_tensor_elements: elements of one tensor, and the largest single dimension, so a
            zero-size tensor cannot carry absurd dimensions either (422).
        max_tensor_rank: dimensions of one tensor (422; numpy itself stops at 64).
        max_inputs: tensors in one request (422).
        max_initializer_bytes: one ONNX initializer / constant, by its declared shape (422).
        max_initializers_total_bytes: all initializers of a model, by declared shape (422).
        request_timeout_s: wall time of one inference (the server answers 503 or 504 past it),
            and the longest a request waits in the queue (503 with ``Retry-After`` past it).
        max_concurrent_requests: requests processed at once (decoding, waiting in their
            model's batcher, running); sized to fill one batch of 32.
        max_queued_requests: requests waiting for one of those slots; one more is refused with
            503 and ``Retry-After``.
        max_queued_bytes: request bodies waiting in the queue, together (503 past it).
        retry_after_s: the ``Retry-After`` a full queue answers with.
        requests_per_second: sustained request rate per API key.
        burst: requests a key may send at once before the rate applies.
        max_rate_delay_s: a request over its key's rate waits until the rate allows it, at
            most this long; a longer wait is refused at once with 429.
        max_tracked_keys: rate-limiter buckets kept in memory (least recently used dropped).
        anonymous_requests_per_second: sustained rate of requests with no key (public models
            only) per client address (429).
        anonymous_burst: requests with no key one address may send at once.
        anonymous_budget_per_second: sustained rate of requests with no key from all addresses
            together: the global anonymous budget (429), so many addresses cannot take the
            server from key holders.
        anonymous_budget_burst: requests with no key all addresses may send at once.

    Connections (`veil.server.connections`; a breach closes the connection, or answers 408):
        header_read_timeout_s: a connection silent this long after it opens is closed, and so
            is one whose request headers are not complete this long after their first byte.
        body_read_timeout_s: longest wait for the next piece of a request body the server is
            reading (408, then the connection is closed).
        keep_alive_timeout_s: an idle connection between two requests is closed after this.
        tls_handshake_timeout_s: a TLS handshake not finished by then is aborted.
        max_header_bytes: request line and headers of one request (431, then closed).
        max_connections: open connections on all three ports together, TLS handshakes
            included; sized down at start to fit under the open-file limit.
        max_connections_per_client: open connections from one client address.

    Model admission and isolation (`veil.server.admission`, `veil.server.models`):
        max_graph_nodes: nodes of a model once local functions are expanded and subgraphs
            counted, what ONNX Runtime would build (422).
        max_model_memory_bytes: resident memory a model may cost once loaded, measured in the
            admission child process, which cannot grow its address space much past it (413).
            Storage quota counts this measured size.
        max_load_ratio: what a model may cost loaded (declared tensor sizes, then measured) per
            byte uploaded, above a floor of `LOAD_RATIO_FLOOR_BYTES`: a few bytes of sparse
            tensor must not become a gigabyte (413).
        admission_cpu_s: CPU seconds the admission child may burn (422 past it).
        admission_timeout_s: wall time of one admission; the child is then killed (422).
        max_concurrent_runs: ONNX Runtime runs at once, across models (each model runs one at a
            time), so one slow model leaves the others their own threads.
        demote_runs_after_s: an ONNX Runtime run longer than this is demoted to the lowest CPU
            priority with its session's worker threads, and its model's later runs from their
            start: one long operator, which cannot be interrupted, no longer takes the cores
            from the other models (`veil.server.demotion`).
    """

    max_request_bytes: int = 64 * _MiB
    max_json_request_bytes: int = 16 * _MiB
    max_upload_bytes: int = 1 * _GiB
    max_model_bytes: int = 1 * _GiB
    max_total_stored_bytes: int = 8 * _GiB
    models_memory_budget_bytes: int = 8 * _GiB
    max_tensor_bytes: int = 64 * _MiB
    max_tensor_elements: int = 16 * _MiB
    max_tensor_rank: int = 32
    max_inputs: int = 64
    max_initializer_bytes: int = 1 * _GiB
    max_initializers_total_bytes: int = 1 * _GiB
    request_timeout_s: float = 60.0
    max_concurrent_requests: int = 32
    max_queued_requests: int = 256
    max_queued_bytes: int = 256 * _MiB
    retry_after_s: float = 1.0
    # One service key drives a whole application: 64 clients of a small model on 2 cores make
    # a few hundred requests a second, which must be slowed at most, not refused.
    requests_per_second: float = 500.0
    burst: int = 1000
    max_rate_delay_s: float = 1.0
    max_tracked_keys: int = 10_000
    anonymous_requests_per_second: float = 2.0
    anonymous_burst: int = 10
    anonymous_budget_per_second: float = 20.0
    anonymous_budget_burst: int = 100
    # --- connections (veil.server.connections) ---
    header_read_timeout_s: float = 10.0
    body_read_timeout_s: float = 20.0
    keep_alive_timeout_s: float = 75.0
    tls_handshake_timeout_s: float = 10.0
    max_header_bytes: int = 16 * 1024
    max_connections: int = 4096
    max_connections_per_client: int = 256
    # --- model admission and isolation (veil.server.admission, veil.server.models) ---
    max_graph_nodes: int = 500_000
    max_model_memory_bytes: int = 2 * _GiB
    max_load_ratio: float = 16.0
    admission_cpu_s: float = 120.0
    admission_timeout_s: float = 300.0
    max_concurrent_runs: int = 4
    demote_runs_after_s: float = 0.25

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not (isinstance(value, int | float) and value > 0 and math.isfinite(value)):
                raise ValueError(f"{f.name}: got {value!r}, expected a positive number")

    # --- checks: each raises the typed error, naming the limit -------------------------------

    def check_request_bytes(self, n: int) -> None:
        if n > self.max_request_bytes:
            raise limit_error(
                413, f"request body exceeds max_request_bytes={self.max_request_bytes}"
            )

    def check_upload_bytes(self, n: int) -> None:
        if n > self.max_upload_bytes:
            raise limit_error(413, f"upload body exceeds max_upload_bytes={self.max_upload_bytes}")

    def check_model_bytes(self, n: int) -> None:
        if n > self.max_model_bytes:
            raise limit_error(
                413, f"model of {n} bytes exceeds max_model_bytes={self.max_model_bytes}"
            )

    def check_storage(self, stored_bytes: int, new_bytes: int) -> None:
        """Refuse a model of `new_bytes` when `stored_bytes` are already stored."""
        if stored_bytes + new_bytes > self.max_total_stored_bytes:
            raise limit_error(
                413,
                # Other tenants' usage is theirs: the message names only this model.
                f"storing this model of {new_bytes} bytes exceeds the server's storage limit",
            )

    def check_load_ratio(self, loaded: int, model_bytes: int, *, what: str) -> None:
        """Refuse a model of `model_bytes` whose `what` is `loaded` bytes, past the ratio."""
        allowed = max(LOAD_RATIO_FLOOR_BYTES, math.floor(self.max_load_ratio * model_bytes))
        if loaded > allowed:
            raise limit_error(
                413,
                f"invalid ONNX model: {what} {loaded} bytes from a model of {model_bytes} bytes, "
                f"exceeds max_load_ratio={self.max_load_ratio:g} "
                f"(above {LOAD_RATIO_FLOOR_BYTES} bytes)",
            )

    def check_inputs(self, count: int) -> None:
        if count > self.max_inputs:
            raise limit_error(422, f"{count} input tensors exceed max_inputs={self.max_inputs}")

    def check_tensor(self, shape: Sequence[int], itemsize: int, name: str = "") -> None:
        """Check a tensor's declared shape before allocating it (negative dims are 400)."""
        label = f"tensor {name!r}" if name else "tensor"
        if len(shape) > self.max_tensor_rank:
            raise limit_error(
                422,
                f"{label} has {len(shape)} dimensions, "
                f"exceeds max_tensor_rank={self.max_tensor_rank}",
            )
        if any(d < 0 for d in shape):
            raise limit_error(400, f"{label} shape {list(shape)}: dimensions must be >= 0")
        if any(d > self.max_tensor_elements for d in shape):
            raise limit_error(
                422,
                f"{label} shape {list(shape)}: a dimension exceeds "
                f"max_tensor_elements={self.max_tensor_elements}",
            )
        elements = math.prod(shape)
        if elements > self.max_tensor_elements:
            raise limit_error(
                422,
                f"{label} has {elements} elements, "
                f"exceeds max_tensor_elements={self.max_tensor_elements}",
            )
        nbytes = elements * itemsize
        if nbytes > self.max_tensor_bytes:
            raise limit_error(
                422, f"{label} has {nbytes} bytes, exceeds max_tensor_bytes={self.max_tensor_bytes}"
            )


class RateLimiter:
    """Token bucket per key: `rate` tokens a second, up to `burst` saved up.

    `now` is injected (monotonic seconds). Thread-safe. Memory is bounded: past `max_keys`
    buckets, the least recently used one is forgotten (it restarts full, which only errs on the
    side of letting a long-idle key through).
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        now: Callable[[], float] = time.monotonic,
        max_keys: int = 10_000,
    ) -> None:
        if rate <= 0 or burst < 1 or max_keys < 1:
            raise ValueError("rate, burst and max_keys must be positive")
        self._rate = float(rate)
        self._burst = float(burst)
        self._now = now
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def from_limits(
        cls, limits: Limits, *, now: Callable[[], float] = time.monotonic
    ) -> RateLimiter:
        return cls(
            limits.requests_per_second, limits.burst, now=now, max_keys=limits.max_tracked_keys
        )

    def reserve(self, key: str, cost: float = 1.0, *, max_delay: float = 0.0) -> float:
        """Take `cost` tokens from `key`'s bucket and return how long to wait before going on.

        The bucket may go into debt by what it refills in `max_delay` seconds: a request over
        the rate is delayed until its tokens would have arrived, so a key is slowed to its
        rate rather than refused. Waits run in arrival order because each takes its tokens
        now.

        Raises:
            RateLimitError: (429) the wait would exceed `max_delay`; nothing is taken.
        """
        t = self._now()
        with self._lock:
            tokens, last = self._buckets.pop(key, (self._burst, t))
            tokens = min(self._burst, tokens + max(0.0, t - last) * self._rate)
            wait = max(0.0, (cost - tokens) / self._rate)
            ok = wait <= max_delay
            if ok:
                tokens -= cost
            self._buckets[key] = (tokens, t)
            while len(self._buckets) > self._max_keys:
                self._buckets.popitem(last=False)
        if not ok:
            raise limit_error(
                429,
                f"rate limit exceeded: requests_per_second={self._rate:g} "
                f"(burst {self._burst:g}) for this key",
            )
        return wait

    def try_acquire(self, key: str, cost: float = 1.0) -> bool:
        """Take `cost` tokens from `key`'s bucket; False (and nothing taken) if too few."""
        try:
            self.reserve(key, cost)
        except ApiError:
            return False
        return True


class AdmissionQueue:
    """At most `limit` requests in progress; the next ones wait, in arrival order, in a queue
    bounded in requests and in body bytes; only a full queue refuses (503 + ``Retry-After``).

    A queued request holds only its body (counted in `max_queued_bytes`), never a slot: slots
    are what the batcher and ONNX Runtime work through. A request waits at most `max_wait_s`.
    A slot given back goes straight to the oldest waiter, so a burst cannot overtake the
    queue. Single event loop: no lock, no await between a check and its update. Use
    ``async with queue.slot(nbytes): ...`` or `acquire` / `release`.
    """

    def __init__(
        self,
        limit: int,
        *,
        max_queued: int,
        max_queued_bytes: int,
        retry_after_s: float,
        max_wait_s: float,
    ) -> None:
        if limit < 1 or max_queued < 0 or max_queued_bytes < 0:
            raise ValueError(
                f"limit {limit}, max_queued {max_queued}, max_queued_bytes {max_queued_bytes}: "
                "expected limit >= 1 and no negative bound"
            )
        self._limit = limit
        self._max_queued = max_queued
        self._max_queued_bytes = max_queued_bytes
        self._retry_after = retry_after_s
        self._max_wait = max_wait_s
        self._active = 0
        self._waiters: deque[tuple[asyncio.Future[None], int]] = deque()
        self._queued_bytes = 0
        self.refused = 0
        """Requests refused with 503 since the queue was made (full, or waited too long)."""

    @classmethod
    def from_limits(cls, limits: Limits) -> AdmissionQueue:
        return cls(
            limits.max_concurrent_requests,
            max_queued=limits.max_queued_requests,
            max_queued_bytes=limits.max_queued_bytes,
            retry_after_s=limits.retry_after_s,
            max_wait_s=limits.request_timeout_s,
        )

    @property
    def active(self) -> int:
        """Requests holding a slot."""
        return self._active

    @property
    def queued(self) -> int:
        """Requests waiting for a slot."""
        return len(self._waiters)

    @property
    def queued_bytes(self) -> int:
        """Body bytes of the requests waiting."""
        return self._queued_bytes

    def _busy(self, why: str) -> ServiceUnavailableError:
        self.refused += 1
        return ServiceUnavailableError(503, f"server busy: {why}", retry_after=self._retry_after)

    async def acquire(self, nbytes: int = 0) -> None:
        """Take a slot, waiting in the queue if none is free; every success needs a `release`.

        Raises:
            ServiceUnavailableError: (503, with ``retry_after``) the queue is full (in requests
                or in bytes), or no slot came free within `max_wait_s`.
        """
        if self._active < self._limit and not self._waiters:
            self._active += 1
            return
        if len(self._waiters) >= self._max_queued:
            raise self._busy(f"max_queued_requests={self._max_queued} requests waiting")
        if self._queued_bytes + nbytes > self._max_queued_bytes:
            raise self._busy(f"max_queued_bytes={self._max_queued_bytes} of requests waiting")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (waiter, nbytes)
        self._waiters.append(entry)
        self._queued_bytes += nbytes
        try:
            async with asyncio.timeout(self._max_wait):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                # `release` handed this request a slot just as it gave up: pass it on.
                self.release()
            else:
                waiter.cancel()
                if entry in self._waiters:  # `release` may have dropped it already, cancelled
                    self._waiters.remove(entry)
                    self._queued_bytes -= nbytes
            if isinstance(exc, TimeoutError):
                raise self._busy(
                    f"no request slot free within request_timeout_s={self._max_wait:g}"
                ) from None
            raise

    def release(self) -> None:
        """Give a slot back: to the oldest waiter if there is one."""
        while self._waiters:
            waiter, nbytes = self._waiters.popleft()
            self._queued_bytes -= nbytes
            if not waiter.done():
                waiter.set_result(None)  # the slot changes hands: `active` stays
                return
        self._active -= 1

    @contextlib.asynccontextmanager
    async def slot(self, nbytes: int = 0) -> AsyncIterator[None]:
        await self.acquire(nbytes)
        try:
            yield
        finally:
            self.release()


def _declared_too_large(content_length: str | None, max_bytes: int) -> bool:
    if content_length is None:
        return False
    try:
        return int(content_length) > max_bytes
    except ValueError:
        return False


async def iter_body_limited(
    stream: AsyncIterable[bytes],
    max_bytes: int,
    *,
    limit_name: str = "max_request_bytes",
    content_length: str | None = None,
) -> AsyncIterator[bytes]:
    """Yield the chunks of a request body, raising 413 as soon as more than `max_bytes` arrived.

    `stream` is e.g. Starlette's ``request.stream()``. A `content_length` header value above the
    limit is refused before reading; a smaller one is not trusted: the count of bytes actually
    received is what is enforced.
    """
    message = f"request body exceeds {limit_name}={max_bytes}"
    if _declared_too_large(content_length, max_bytes):
        raise limit_error(413, message)
    total = 0
    async for chunk in stream:
        total += len(chunk)
        if total > max_bytes:
            raise limit_error(413, message)
        if chunk:
            yield chunk


async def read_body_limited(
    stream: AsyncIterable[bytes],
    max_bytes: int,
    *,
    limit_name: str = "max_request_bytes",
    content_length: str | None = None,
) -> bytes:
    """Read a whole request body, holding at most `max_bytes` (plus one chunk) in memory.

    Example (Starlette)::

        body = await read_body_limited(
            request.stream(), limits.max_request_bytes,
            content_length=request.headers.get("content-length"),
        )
    """
    parts: list[bytes] = []
    async for chunk in iter_body_limited(
        stream, max_bytes, limit_name=limit_name, content_length=content_length
    ):
        parts.append(chunk)
    return b"".join(parts)
