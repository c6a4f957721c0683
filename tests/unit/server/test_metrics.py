"""Server metrics: what is counted, with labels that never carry a tenant's data."""

from __future__ import annotations

from veil.server.metrics import Metrics


def _value(text: str, sample: str) -> float:
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {sample}")


def test_requests_latency_batches_admissions_and_gauges() -> None:
    m = Metrics()
    queue = {"active": 3, "queued": 5}
    m.watch(in_progress=lambda: queue["active"], queued=lambda: queue["queued"], models=lambda: 2)
    m.observe_request("attested", "/run", 200, 0.004)
    m.observe_request("attested", "/run", 200, 0.2)
    m.observe_request("attested", "other", 404, 0.001)
    for requests in (1, 3, 32):
        m.observe_batch(requests, requests * 2)
    m.observe_admission(loaded=True)
    m.observe_admission(loaded=False)
    text = m.render().decode()
    assert _value(text, 'veil_requests_total{port="attested",route="/run",status="200"}') == 2
    assert _value(text, 'veil_requests_total{port="attested",route="other",status="404"}') == 1
    run = 'port="attested",route="/run"'
    assert _value(text, f'veil_request_duration_seconds_bucket{{le="0.005",{run}}}') == 1
    assert _value(text, f"veil_request_duration_seconds_count{{{run}}}") == 2
    assert _value(text, 'veil_batch_requests_bucket{le="2.0"}') == 1
    assert _value(text, 'veil_batch_requests_bucket{le="4.0"}') == 2
    assert _value(text, "veil_batch_requests_sum") == 36
    assert _value(text, 'veil_model_admissions_total{outcome="loaded"}') == 1
    assert _value(text, 'veil_model_admissions_total{outcome="refused"}') == 1
    assert _value(text, "veil_requests_in_progress") == 3
    queue["queued"] = 0  # read at scrape time
    assert _value(m.render().decode(), "veil_requests_queued") == 0
    assert _value(text, "veil_models_loaded") == 2


def test_each_server_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()
    a.observe_request("attested", "/run", 200, 0.01)
    assert "veil_requests_total{" not in b.render().decode()


def test_statuses_of_one_route_count_apart_and_time_together() -> None:
    m = Metrics()
    for status in (200, 500, 200, 429):
        m.observe_request("attested", "/run", status, 0.003)
    text = m.render().decode()
    for status, count in (("200", 2), ("500", 1), ("429", 1)):
        sample = f'veil_requests_total{{port="attested",route="/run",status="{status}"}}'
        assert _value(text, sample) == count
    assert _value(text, 'veil_request_duration_seconds_count{port="attested",route="/run"}') == 4
