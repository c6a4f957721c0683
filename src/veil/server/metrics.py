"""Prometheus metrics of `veil serve`, on ``GET /metrics`` of the unattested port.

What is counted never carries a tenant's data: no inputs, outputs, model ids or names, key ids or
client addresses appear in a metric or a label. Labels are the port (``unattested``,
``attested``, ``management``), the route as the server declares it (a path the server does not
serve is counted as ``other``, so a client cannot mint label values), the status code, and an
admission outcome. The host sees the request rate anyway; the metrics add latency, batching and
queueing, which is what an operator needs to size a deployment.

Metrics (each in the server's own registry, not the process-global one):

- ``veil_requests_total{port,route,status}`` and ``veil_request_duration_seconds{port,route}``
  (histogram), from the request log middleware;
- ``veil_requests_in_progress`` and ``veil_requests_queued`` (gauges read at scrape time from the
  admission queue); refusals of a full queue are the requests counted with status 503;
- ``veil_batch_requests`` (histogram: requests merged into one ONNX Runtime run, every model
  together);
- ``veil_model_admissions_total{outcome}`` (``loaded`` or ``refused``) and ``veil_models_loaded``;
- ``veil_model_loads_total{source}`` (``upload``, or ``store``: a model loaded from the store on
  its first use here or after its eviction) and ``veil_model_evictions_total`` (models evicted
  under ``models_memory_budget_bytes``).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
OTHER_ROUTE = "other"
# Requests per run: powers of two up to the default batch size and beyond.
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# From a null model's round trip (~1 ms) to the longest default request time-out (60 s).
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """The server's metrics and the registry they are exposed from (see the module docstring).

    Example:
        >>> m = Metrics()
        >>> m.observe_request("attested", "/run", 200, 0.004)
        >>> b'veil_requests_total{port="attested",route="/run",status="200"} 1.0' in m.render()
        True
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._requests = Counter(
            "veil_requests", "Requests answered.", ("port", "route", "status"), registry=r
        )
        self._latency = Histogram(
            "veil_request_duration_seconds",
            "Time from a request's start to its response's end.",
            ("port", "route"),
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._batch = Histogram(
            "veil_batch_requests",
            "Requests merged into one ONNX Runtime run.",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self._admissions = Counter(
            "veil_model_admissions", "Model uploads admitted or refused.", ("outcome",), registry=r
        )
        self._loads = Counter(
            "veil_model_loads", "Models loaded, by where from.", ("source",), registry=r
        )
        self._evictions = Counter(
            "veil_model_evictions", "Models evicted under the memory budget.", registry=r
        )
        self._in_progress = Gauge(
            "veil_requests_in_progress", "Requests holding a request slot.", registry=r
        )
        self._queued = Gauge("veil_requests_queued", "Requests waiting for a slot.", registry=r)
        self._models = Gauge("veil_models_loaded", "Models loaded.", registry=r)
        # Each request's counter and histogram, by (port, route, status): `labels()` checks and
        # locks on every call. Bounded: ports and routes are the server's, statuses HTTP's.
        self._children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    def observe_request(self, port: str, route: str, status: int, seconds: float) -> None:
        """One answered request; `route` must be a route the server declares, or ``other``."""
        children = self._children.get((port, route, status))
        if children is None:
            children = (
                self._requests.labels(port, route, str(status)),
                self._latency.labels(port, route),
            )
            self._children[(port, route, status)] = children
        children[0].inc()
        children[1].observe(seconds)

    def observe_batch(self, requests: int, rows: int) -> None:
        """One ONNX Runtime run that served `requests` requests (`rows` is not exposed)."""
        self._batch.observe(requests)

    def observe_admission(self, loaded: bool) -> None:
        self._admissions.labels("loaded" if loaded else "refused").inc()

    def observe_load(self, source: str) -> None:
        """A model loaded: ``upload`` or ``store``."""
        self._loads.labels(source).inc()

    def observe_evictions(self, count: int) -> None:
        self._evictions.inc(count)

    def watch(
        self,
        *,
        in_progress: Callable[[], float],
        queued: Callable[[], float],
        models: Callable[[], float],
    ) -> None:
        """Gauges read at scrape time from the live objects (the admission queue, registry)."""
        self._in_progress.set_function(in_progress)
        self._queued.set_function(queued)
        self._models.set_function(models)

    def render(self) -> bytes:
        """The text exposition format (``CONTENT_TYPE``)."""
        return generate_latest(self.registry)
