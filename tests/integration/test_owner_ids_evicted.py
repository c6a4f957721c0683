"""Ids belong to their owners when models are evicted too: an owner's own "m", evicted under the
memory budget while another owner's public "m" stays loaded, is the one its owner runs (loaded
again), never the other; a key that may run only the other gets that one."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from onnx_models import add_weights_model
from starlette.testclient import TestClient

from veil import wire
from veil.errors import SimulationModeWarning
from veil.server.app import build_apps
from veil.server.config import ServerConfig
from veil.server.keys import API_KEY_HEADER
from veil.server.limits import Limits
from veil.server.runner import prepare_state
from veil.tensors import DatumType, WireTensor

N = 4096
X = np.linspace(-1, 1, N, dtype=np.float32)


def add_model(seed: int) -> tuple[bytes, np.ndarray]:
    return add_weights_model(N, seed)


ALICE_M, BOB_M = add_model(1), add_model(2)
SIZE = max(len(ALICE_M[0]), len(BOB_M[0]))


@pytest.fixture
def client(tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, str]]]:
    config = ServerConfig(
        data_dir=tmp_path / "data",
        platform="simulated",
        limits=Limits(models_memory_budget_bytes=SIZE * 3 // 2),  # room for one
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SimulationModeWarning)
        state = prepare_state(config)[0]
    keys = {
        name: state.auth.store.create(role)[1]
        for name, role in (("alice", "owner"), ("bob", "owner"), ("carol", "user"))
    }
    keys["bob-id"] = keys["bob"].split("_")[1]
    _, attested, _ = build_apps(state)
    with TestClient(attested) as test_client:
        yield test_client, keys
    state.registry.executor.shutdown()


def upload(client: TestClient, key: str, blob: bytes, **kw: str) -> None:
    body = wire.encode_upload_request(blob, model_name="m", model_id="m", client_info={}, **kw)
    reply = client.post("/upload", content=body, headers={API_KEY_HEADER: key})
    assert reply.status_code == 200, wire.decode_error(reply.content)


def run(client: TestClient, key: str, model_id: str) -> np.ndarray:
    tensor = WireTensor((N,), DatumType.F32, "x", X.tobytes())
    body = wire.encode_run_request(
        model_id=model_id, model_hash=None, inputs=[tensor], client_info={}
    )
    reply = client.post("/run", content=body, headers={API_KEY_HEADER: key})
    assert reply.status_code == 200, wire.decode_error(reply.content)
    (y,) = wire.decode_run_reply(reply.content)
    return np.frombuffer(y.data, dtype=np.float32)


def test_an_evicted_own_model_is_the_one_its_owner_runs(
    client: tuple[TestClient, dict[str, str]],
) -> None:
    test_client, keys = client
    upload(test_client, keys["alice"], ALICE_M[0])  # restricted to alice
    upload(test_client, keys["bob"], BOB_M[0], visibility="public")  # alice's "m" evicted
    np.testing.assert_array_equal(run(test_client, keys["alice"], "m"), X + ALICE_M[1])
    # bob's is evicted now; carol may run only bob's, bob his own
    np.testing.assert_array_equal(run(test_client, keys["carol"], "m"), X + BOB_M[1])
    np.testing.assert_array_equal(run(test_client, keys["alice"], "m"), X + ALICE_M[1])
    np.testing.assert_array_equal(run(test_client, keys["bob"], "m"), X + BOB_M[1])
    qualified = f"{keys['bob-id']}/m"
    np.testing.assert_array_equal(run(test_client, keys["alice"], qualified), X + BOB_M[1])
