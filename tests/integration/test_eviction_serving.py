"""A server whose memory budget holds two models serves three: the least recently used is
evicted, stays listed, and loads again from the sealed store on its next use; concurrent runs
across all three while models are evicted and reloaded all answer, correctly; the metrics count
loads and evictions."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cbor2
import numpy as np
import pytest
from onnx_models import add_weights_model
from starlette.testclient import TestClient

from veil import wire
from veil.errors import SimulationModeWarning
from veil.server.app import ServerState, build_apps
from veil.server.config import ServerConfig
from veil.server.limits import Limits
from veil.server.runner import prepare_state
from veil.tensors import DatumType, WireTensor

N = 4096
X = np.linspace(-1, 1, N, dtype=np.float32)
IDS = ("m0", "m1", "m2")


def add_model(seed: int) -> tuple[bytes, np.ndarray]:
    return add_weights_model(N, seed)


MODELS = {model_id: add_model(seed) for seed, model_id in enumerate(IDS)}
SIZE = max(len(blob) for blob, _ in MODELS.values())  # small models cost their size


class Server:
    def __init__(self, data_dir: Path) -> None:
        config = ServerConfig(
            data_dir=data_dir,
            platform="simulated",
            no_auth=True,
            limits=Limits(models_memory_budget_bytes=SIZE * 5 // 2),  # room for two
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SimulationModeWarning)
            self.state: ServerState = prepare_state(config)[0]
        unattested, attested, management = build_apps(self.state)
        self.client = TestClient(attested).__enter__()  # one event loop for every model call
        self.management = TestClient(management)
        self.unattested = TestClient(unattested)

    def upload(self, model_id: str) -> None:
        body = wire.encode_upload_request(
            MODELS[model_id][0], model_name=model_id, model_id=model_id, client_info={}
        )
        assert self.client.post("/upload", content=body).status_code == 200

    def run(self, model_id: str) -> np.ndarray:
        tensor = WireTensor((N,), DatumType.F32, "x", X.tobytes())
        body = wire.encode_run_request(
            model_id=model_id, model_hash=None, inputs=[tensor], client_info={}
        )
        reply = self.client.post("/run", content=body)
        assert reply.status_code == 200, wire.decode_error(reply.content)
        (y,) = wire.decode_run_reply(reply.content)
        return np.frombuffer(y.data, dtype=np.float32)

    def check(self, model_id: str) -> None:
        np.testing.assert_array_equal(self.run(model_id), X + MODELS[model_id][1])

    def loaded(self) -> set[str]:
        return {m.model_id for m in self.state.registry.all()}

    def listed(self) -> set[str]:
        return {str(m["model_id"]) for m in cbor2.loads(self.management.get("/models").content)}

    def metric(self, name: str) -> float:
        text = self.unattested.get("/metrics").text
        found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    def close(self) -> None:
        self.client.__exit__(None, None, None)
        self.management.close()
        self.unattested.close()
        self.state.registry.executor.shutdown()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[Server]]:
    started: list[Server] = []
    try:
        yield started
    finally:
        for server in started:
            server.close()


def test_three_models_in_a_budget_for_two(tmp_path: Path, servers: list[Server]) -> None:
    server = Server(tmp_path)
    servers.append(server)
    for model_id in IDS:
        server.upload(model_id)
    assert server.loaded() == {"m1", "m2"}  # m0, least recently used, made room for m2
    assert server.listed() == set(IDS)
    for model_id in IDS:  # each run of an evicted model loads it again, evicting another
        server.check(model_id)
    assert server.loaded() == {"m1", "m2"}
    assert server.metric('veil_model_loads_total{source="upload"}') == 3
    assert server.metric('veil_model_loads_total{source="store"}') == 3
    assert server.metric("veil_model_evictions_total") == 4
    assert server.state.registry.loaded_cost <= SIZE * 5 // 2
    # an evicted model is deleted like a loaded one
    assert server.state.registry.evicted("m0")
    delete = server.client.post("/delete", content=wire.encode_delete_request("m0"))
    assert delete.status_code == 200
    assert server.listed() == {"m1", "m2"}
    gone = server.client.post(
        "/run",
        content=wire.encode_run_request(
            model_id="m0",
            model_hash=None,
            inputs=[WireTensor((N,), DatumType.F32, "x", X.tobytes())],
            client_info={},
        ),
    )
    assert gone.status_code == 404


def test_concurrent_runs_while_models_are_evicted_lose_nothing(
    tmp_path: Path, servers: list[Server]
) -> None:
    server = Server(tmp_path)
    servers.append(server)
    for model_id in IDS:
        server.upload(model_id)
    order = [IDS[(i * 7 + i // 3) % 3] for i in range(48)]  # every model, interleaved
    with ThreadPoolExecutor(6) as pool:
        outputs = list(pool.map(server.run, order))
    for model_id, y in zip(order, outputs, strict=True):
        np.testing.assert_array_equal(y, X + MODELS[model_id][1])
    assert server.metric("veil_model_evictions_total") >= 2
    assert server.state.registry.loaded_cost <= SIZE * 5 // 2


def test_a_restart_past_the_budget_serves_every_stored_model(
    tmp_path: Path, servers: list[Server]
) -> None:
    first = Server(tmp_path)
    servers.append(first)
    for model_id in IDS:
        first.upload(model_id)
    first.close()
    servers.remove(first)
    second = Server(tmp_path)
    servers.append(second)
    assert len(second.loaded()) == 2
    assert second.listed() == set(IDS)
    for model_id in IDS:
        second.check(model_id)
