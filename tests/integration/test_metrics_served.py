"""GET /metrics on the unattested port of a real server: counts what happened, names no tenant."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from onnx_models import identity_model
from server_process import ServerFactory, create_key

import veil


def test_metrics_count_requests_batches_and_models_without_naming_them(
    server_factory: ServerFactory,
) -> None:
    running = server_factory()
    key_id, key = create_key(running.data_dir, "owner")
    model_id = "tenant-secret-model-name"
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    with running.connect(api_key=key) as client:
        client.upload_model(identity_model("float32"), model_id=model_id)
        for _ in range(3):
            client.predict(model_id, x)
        with pytest.raises(veil.NotFoundError):
            client.predict("no-such-model", x)
    url = f"http://127.0.0.1:{running.unattested_port}/metrics"
    response = httpx.get(url, headers={"accept-encoding": "identity"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'veil_requests_total{port="attested",route="/run",status="200"} 3.0' in text
    assert 'veil_requests_total{port="attested",route="/run",status="404"} 1.0' in text
    assert 'veil_model_admissions_total{outcome="loaded"} 1.0' in text
    assert "veil_batch_requests_count 3.0" in text
    assert "veil_models_loaded 1.0" in text
    # Nothing a tenant chose or sent: no model ids, key ids or keys.
    for secret in (model_id, "no-such-model", key_id, key):
        assert secret not in text
    # A path the server does not serve is counted as "other", never as itself.
    httpx.get(f"http://127.0.0.1:{running.unattested_port}/{model_id}")
    assert model_id not in httpx.get(url).text
