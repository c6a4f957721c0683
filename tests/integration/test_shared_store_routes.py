"""Two replicas in one process on one PostgreSQL state and one blob directory (as ``--join``
replicas are, with the key the broker releases): every route that runs a model (BlindAI's /run
by id and by hash, OIP by name) and /delete first bring the model up to date with the shared
state: loaded on first use within this replica's limits, dropped when another replica deleted
it or stored another record under its id."""

from __future__ import annotations

import hashlib
import itertools
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from onnx_models import add_weights_model
from starlette.testclient import TestClient

from veil import wire
from veil.cluster.exchange import ClusterSecrets
from veil.errors import SimulationModeWarning
from veil.server.app import ServerState, build_apps
from veil.server.config import ServerConfig
from veil.server.keys import API_KEY_HEADER
from veil.server.limits import Limits
from veil.server.pgstate import PostgresState
from veil.server.runner import prepare_state
from veil.tensors import DatumType, WireTensor
from veil.testing.engines import engines_missing, postgres
from veil.tls import generate_identity

pytestmark = pytest.mark.skipif(
    "postgresql" in engines_missing(), reason="PostgreSQL is not installed (scripts/test does)"
)

_names = itertools.count()
N = 16
X = np.arange(N, dtype=np.float32)


@pytest.fixture(scope="module")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with postgres(tmp_path_factory.mktemp("pg")) as url:
        yield url


@pytest.fixture
def url(pg_server: str) -> str:
    name = f"routes{next(_names)}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return pg_server.rsplit("/", 1)[0] + "/" + name


def add_model(seed: int) -> tuple[bytes, np.ndarray]:
    return add_weights_model(N, seed)


class Replica:
    def __init__(self, state: ServerState) -> None:
        self.state = state
        _, attested, _ = build_apps(state)
        self.client = TestClient(attested)

    def post(self, path: str, body: bytes, key: str | None) -> Any:
        headers = {} if key is None else {API_KEY_HEADER: key}
        return self.client.post(path, content=body, headers=headers)

    def upload(self, blob: bytes, model_id: str, key: str | None, **kw: Any) -> None:
        body = wire.encode_upload_request(
            blob, model_name="add", model_id=model_id, client_info={}, **kw
        )
        reply = self.post("/upload", body, key)
        assert reply.status_code == 200, reply.content

    def delete(self, model_id: str, key: str | None) -> int:
        reply = self.post("/delete", wire.encode_delete_request(model_id), key)
        return int(reply.status_code)

    def run(
        self, key: str | None, *, model_id: str | None = None, model_hash: str | None = None
    ) -> tuple[int, Any]:
        tensor = WireTensor((N,), DatumType.F32, "x", X.tobytes())
        body = wire.encode_run_request(
            model_id=model_id, model_hash=model_hash, inputs=[tensor], client_info={}
        )
        reply = self.post("/run", body, key)
        if reply.status_code != 200:
            return reply.status_code, wire.decode_error(reply.content)
        (y,) = wire.decode_run_reply(reply.content)
        return 200, np.frombuffer(y.data, dtype=np.float32)

    def infer(self, name: str, key: str | None) -> tuple[int, Any]:
        request = {"inputs": [{"name": "x", "shape": [N], "datatype": "FP32", "data": X.tolist()}]}
        headers = {} if key is None else {API_KEY_HEADER: key}
        reply = self.client.post(f"/v2/models/{name}/infer", json=request, headers=headers)
        if reply.status_code != 200:
            return reply.status_code, reply.json()["error"]
        return 200, np.array(reply.json()["outputs"][0]["data"], dtype=np.float32)

    def close(self) -> None:
        self.client.close()
        self.state.registry.executor.shutdown()
        backend = self.state.auth.store.state
        assert isinstance(backend, PostgresState)
        backend.close()


@pytest.fixture
def replicas(url: str, tmp_path: Path) -> Iterator[Any]:
    secrets = ClusterSecrets(1, generate_identity(), bytes(range(32)))
    opened: list[Replica] = []

    def start(name: str, limits: Limits | None = None, *, no_auth: bool = True) -> Replica:
        (tmp_path / name).mkdir()  # as `veil serve` makes its data directory
        config = ServerConfig(
            data_dir=tmp_path / name,
            platform="simulated",
            no_auth=no_auth,
            database_url=url,
            store_dir=tmp_path / "blobs",
            limits=limits or Limits(),
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SimulationModeWarning)
            state, _ = prepare_state(config, cluster=secrets)
        opened.append(Replica(state))
        return opened[-1]

    try:
        yield start
    finally:
        for replica in opened:
            replica.close()


def test_oip_loads_a_model_stored_through_another_replica(replicas: Any) -> None:
    a, b = replicas("a"), replicas("b")
    blob, w = add_model(1)
    a.upload(blob, "m", None)
    assert "m" not in b.state.access
    status, y = b.infer("m", None)
    assert status == 200
    np.testing.assert_array_equal(y, X + w)
    assert b.client.get("/v2/models/m").json()["name"] == "m"
    assert b.infer("absent", None) == (404, "unknown model id 'absent'")


def test_oip_and_run_by_hash_drop_a_model_deleted_through_another_replica(
    replicas: Any,
) -> None:
    a, b = replicas("a"), replicas("b")
    blob, _ = add_model(2)
    digest = hashlib.sha256(blob).hexdigest()
    a.upload(blob, "m", None)
    assert b.run(None, model_hash=digest)[0] == 200
    assert b.infer("m", None)[0] == 200
    assert a.delete("m", None) == 200
    assert b.run(None, model_hash=digest) == (404, f"no model with hash {digest!r}")
    assert b.infer("m", None) == (404, "unknown model id 'm'")
    assert "m" not in b.state.access


def test_a_replaced_model_answers_with_its_new_bytes_on_every_route(replicas: Any) -> None:
    a, b = replicas("a"), replicas("b")
    old, _ = add_model(3)
    new, w_new = add_model(4)
    a.upload(old, "m", None)
    assert b.run(None, model_id="m")[0] == 200
    a.delete("m", None)
    a.upload(new, "m", None)
    old_hash, new_hash = hashlib.sha256(old).hexdigest(), hashlib.sha256(new).hexdigest()
    assert b.run(None, model_hash=old_hash)[0] == 404
    for status, y in (b.infer("m", None), b.run(None, model_hash=new_hash)):
        assert status == 200
        np.testing.assert_array_equal(y, X + w_new)


def test_the_same_bytes_stored_again_by_another_owner_follow_the_new_record(
    replicas: Any,
) -> None:
    a = replicas("a", no_auth=False)
    (_, alice), (bob_id, bob) = (a.state.auth.store.create("owner") for _ in range(2))
    b = replicas("b", no_auth=False)
    blob, w = add_model(5)
    digest = hashlib.sha256(blob).hexdigest()
    a.upload(blob, "m", alice)  # restricted to alice (the default with keys)
    assert b.run(alice, model_id="m")[0] == 200  # loaded on b, under alice's record
    assert a.delete("m", alice) == 200
    a.upload(blob, "m", bob)  # the same bytes, hence the same hash: now bob's, restricted
    assert b.run(alice, model_id="m") == (404, "unknown model id 'm'")
    assert b.run(alice, model_hash=digest)[0] == 404
    assert b.infer("m", alice)[0] == 404
    # and alice's key may not delete bob's model through the replica that knew it as hers
    assert b.delete("m", alice) == 404
    status, y = b.run(bob, model_id="m")
    assert status == 200
    np.testing.assert_array_equal(y, X + w)
    assert list(b.state.access) == [f"{bob_id}/m"]  # alice's dropped (ids are per owner)


def test_a_model_loaded_on_first_use_counts_against_the_storage_limit(replicas: Any) -> None:
    a = replicas("a")
    blob, _ = add_model(6)
    b = replicas("b", Limits(max_total_stored_bytes=len(blob) - 1))
    c = replicas("c", Limits(max_model_bytes=len(blob) - 1))
    a.upload(blob, "m", None)
    expected = f"storing this model of {len(blob)} bytes exceeds the server's storage limit"
    assert b.run(None, model_id="m") == (413, expected)
    assert b.infer("m", None) == (413, expected)
    assert "m" not in b.state.access
    assert b.state.registry.all() == []
    assert c.run(None, model_id="m") == (
        413,
        f"model of {len(blob)} bytes exceeds max_model_bytes={len(blob) - 1}",
    )
    assert "m" not in c.state.access
    # A replica starting with that limit does not load it either (and says why in its log).
    d = replicas("d", Limits(max_total_stored_bytes=len(blob) - 1))
    assert "m" not in d.state.access
    assert d.run(None, model_id="m") == (413, expected)


def test_two_owners_keep_one_id_each_across_replicas(replicas: Any) -> None:
    # Ids belong to their owners cluster-wide: bob uploads "m" through one replica while
    # alice's "m" is stored through the other, and each replica serves each owner their own.
    a = replicas("a", no_auth=False)
    (_, alice), (_, bob) = (a.state.auth.store.create("owner") for _ in range(2))
    b = replicas("b", no_auth=False)
    blob_a, w_a = add_model(7)
    blob_b, w_b = add_model(8)
    a.upload(blob_a, "m", alice)
    b.upload(blob_b, "m", bob)
    for replica in (a, b):
        status, y = replica.run(alice, model_id="m")
        assert status == 200
        np.testing.assert_array_equal(y, X + w_a)
        status, y = replica.run(bob, model_id="m")
        assert status == 200
        np.testing.assert_array_equal(y, X + w_b)
    assert b.delete("m", alice) == 200  # alice's, through the replica bob uploaded to
    assert a.run(alice, model_id="m") == (404, "unknown model id 'm'")
    assert a.run(bob, model_id="m")[0] == 200
