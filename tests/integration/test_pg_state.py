"""The state in a real PostgreSQL (Debian's, started on loopback by `veil.testing.engines`):
replicas share models and keys through it; every edit, replay, removal or addition of a row by
whoever writes the database is refused with `SealedStateError`; commits are atomic across
replicas."""

from __future__ import annotations

import hashlib
import itertools
import threading
from collections.abc import Iterator
from pathlib import Path

import cbor2
import psycopg
import pytest

from veil.errors import ConflictError, SealedStateError
from veil.server.keys import KeyStore
from veil.server.pgstate import PostgresState, _digest
from veil.server.sealing import SealedModelStore
from veil.server.state import Manifest, ModelEntry
from veil.server.store import StoredModel
from veil.testing.engines import engines_missing, postgres

pytestmark = pytest.mark.skipif(
    "postgresql" in engines_missing(), reason="PostgreSQL is not installed (scripts/test does)"
)

KEY = bytes(range(32))
_names = itertools.count()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with postgres(tmp_path_factory.mktemp("pg")) as url:
        yield url


@pytest.fixture
def url(server: str) -> str:
    """A fresh database of the module's server for each test."""
    name = f"t{next(_names)}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return server.rsplit("/", 1)[0] + "/" + name


_open: list[PostgresState] = []


@pytest.fixture(autouse=True)
def _close_replicas() -> Iterator[None]:
    yield
    while _open:
        _open.pop().close()


def replica(url: str, blobs: Path, key: bytes = KEY) -> PostgresState:
    s = PostgresState(url, key, blobs)
    _open.append(s)
    s.open()
    return s


def sql(url: str, statement: str, *args: object) -> list[tuple[object, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(statement, args)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description else []


def meta(model_id: str, blob: bytes) -> StoredModel:
    return StoredModel(model_id, hashlib.sha256(blob).digest(), "name", len(blob))


def add_model(s: PostgresState, model_id: str) -> Manifest:
    def change(m: Manifest, version: int) -> Manifest:
        entry = ModelEntry(meta(model_id, model_id.encode()), version)
        return m.replace(models={**m.models, model_id: entry})

    return s.update(change)


def test_replicas_share_models_and_keys(url: str, tmp_path: Path) -> None:
    a, b = replica(url, tmp_path), replica(url, tmp_path)
    store_a = SealedModelStore(tmp_path / "sealed", a)
    store_a.put(meta("m", b"onnx bytes"), b"onnx bytes")
    key_id, secret = KeyStore(a).create("owner", "alice")
    # The other replica sees both at once: the model by id with its sealed blob, the key.
    assert "m" in SealedModelStore(tmp_path / "sealed", b)
    assert {
        m.model_id: blob for m, blob in SealedModelStore(tmp_path / "sealed", b).load_all()
    } == {"m": b"onnx bytes"}
    info = KeyStore(b).authenticate(secret)
    assert info is not None
    assert info.key_id == key_id
    # Nothing readable in the database: no secret, only MACed metadata.
    dump = b"".join(bytes(r[0]) for r in sql(url, "SELECT body FROM veil_rows"))  # type: ignore[call-overload]
    assert secret.encode() not in dump


def test_edited_row_is_refused(url: str, tmp_path: Path) -> None:
    s = replica(url, tmp_path)
    add_model(s, "m")
    sql(url, "UPDATE veil_rows SET body = body || '\\x00'::bytea WHERE id = 'm'")
    with pytest.raises(SealedStateError, match="model row 'm' does not authenticate"):
        s.current()


def test_row_moved_to_another_id_is_refused(url: str, tmp_path: Path) -> None:
    s = replica(url, tmp_path)
    add_model(s, "m")
    sql(url, "UPDATE veil_rows SET id = 'n' WHERE id = 'm'")
    with pytest.raises(SealedStateError, match="model row 'n' does not authenticate"):
        replica(url, tmp_path)


def test_older_copy_of_a_row_is_refused(url: str, tmp_path: Path) -> None:
    s = replica(url, tmp_path)
    add_model(s, "m")
    old = sql(url, "SELECT body, mac FROM veil_rows WHERE id = 'm'")[0]

    def replace(m: Manifest, version: int) -> Manifest:
        return m.replace(models={"m": ModelEntry(meta("m", b"new"), version)})

    s.update(replace)
    sql(url, "UPDATE veil_rows SET body = %s, mac = %s WHERE id = 'm'", *old)
    with pytest.raises(SealedStateError, match="rows differ from those version 2 committed"):
        replica(url, tmp_path)


def test_removed_row_is_refused(url: str, tmp_path: Path) -> None:
    s = replica(url, tmp_path)
    KeyStore(s).create("admin")
    add_model(s, "m")
    sql(url, "DELETE FROM veil_rows WHERE kind = 'key'")
    with pytest.raises(SealedStateError, match="a row was added, removed"):
        s.current()


def test_edited_head_is_refused(url: str, tmp_path: Path) -> None:
    s = replica(url, tmp_path)
    add_model(s, "m")
    sql(url, "UPDATE veil_head SET version = version + 1")
    with pytest.raises(SealedStateError, match="head row does not authenticate"):
        s.current()


def test_rows_without_head_are_refused(url: str, tmp_path: Path) -> None:
    s = replica(url, tmp_path)
    add_model(s, "m")
    sql(url, "DELETE FROM veil_head")
    with pytest.raises(SealedStateError, match="1 row\\(s\\) but no head row"):
        s.current()


def test_whole_database_replay_refused_by_a_running_replica(url: str, tmp_path: Path) -> None:
    s = replica(url, tmp_path)
    add_model(s, "m")
    rows, head = sql(url, "SELECT * FROM veil_rows"), sql(url, "SELECT * FROM veil_head")
    add_model(s, "n")
    assert s.current().version == 2
    sql(url, "DELETE FROM veil_rows")
    sql(url, "DELETE FROM veil_head")
    for r in rows:
        sql(url, "INSERT INTO veil_rows VALUES (%s, %s, %s, %s)", *r)
    sql(url, "INSERT INTO veil_head VALUES (%s, %s, %s, %s)", *head[0])
    with pytest.raises(SealedStateError, match="version 1, expected at least 2"):
        s.current()
    # A replica starting now cannot tell (no counter outside the database): the documented limit.
    assert set(replica(url, tmp_path).current().models) == {"m"}


def test_another_key_is_refused(url: str, tmp_path: Path) -> None:
    add_model(replica(url, tmp_path), "m")
    with pytest.raises(SealedStateError, match="head row does not authenticate"):
        replica(url, tmp_path, key=bytes(32))


def test_failed_change_commits_nothing(url: str, tmp_path: Path) -> None:
    s = replica(url, tmp_path)
    add_model(s, "m")

    def fail(m: Manifest, version: int) -> Manifest:
        raise ValueError("refused")

    with pytest.raises(ValueError, match="refused"):
        s.update(fail)
    assert s.current().version == 1
    assert add_model(s, "n").version == 2


def test_commits_are_atomic_across_replicas(url: str, tmp_path: Path) -> None:
    replicas = [replica(url, tmp_path) for _ in range(3)]
    errors: list[BaseException] = []

    def write(n: int, s: PostgresState) -> None:
        try:
            for i in range(10):
                add_model(s, f"r{n}-{i}")
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(n, s)) for n, s in enumerate(replicas)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    final = replica(url, tmp_path).current()
    # No lost update: every commit saw the one before it, cluster-wide.
    assert final.version == 30
    assert len(final.models) == 30
    assert {e.blob_version for e in final.models.values()} == set(range(1, 31))


# --- model ids belong to their owners ------------------------------------------------------------

ALICE, BOB = "a" * 16, "b" * 16


def owned(model_id: str, blob: bytes, owner: str | None) -> StoredModel:
    return StoredModel(model_id, hashlib.sha256(blob).digest(), "name", len(blob), owner=owner)


def test_two_owners_keep_one_id_each_cluster_wide(url: str, tmp_path: Path) -> None:
    a, b = replica(url, tmp_path), replica(url, tmp_path)
    SealedModelStore(tmp_path / "sealed", a).put_stream(
        owned("m", b"alice", ALICE), [b"alice"], exclusive=True
    )
    store_b = SealedModelStore(tmp_path / "sealed", b)
    store_b.put_stream(owned("m", b"bob", BOB), [b"bob"], exclusive=True)
    with pytest.raises(ConflictError, match="model id 'm' is already taken"):
        store_b.put_stream(owned("m", b"again", ALICE), [b"again"], exclusive=True)
    assert sorted(str(r[0]) for r in sql(url, "SELECT id FROM veil_rows")) == [
        f"{ALICE}/m",
        f"{BOB}/m",
    ]
    assert {m.key: blob for m, blob in SealedModelStore(tmp_path / "sealed", a).load_all()} == {
        f"{ALICE}/m": b"alice",
        f"{BOB}/m": b"bob",
    }
    # The owner is MACed with the row: a row handed to another owner is refused.
    sql(url, "UPDATE veil_rows SET id = %s WHERE id = %s", f"{BOB}/x", f"{ALICE}/m")
    with pytest.raises(SealedStateError, match="does not authenticate"):
        replica(url, tmp_path)


def test_rows_of_before_owner_scoped_ids_are_carried_over(url: str, tmp_path: Path) -> None:
    # veil before owner-scoped ids wrote alice's "m" as row "m", its blob sealed under "m": what
    # today's replica writes for an owner-less "m", with alice's metadata MACed in its place.
    s = replica(url, tmp_path)
    SealedModelStore(tmp_path / "sealed", s).put(owned("m", b"w", None), b"w")
    (version,) = sql(url, "SELECT version FROM veil_head")[0]
    entry = ModelEntry(owned("m", b"w", ALICE), int(version))  # type: ignore[call-overload]
    body = cbor2.dumps(entry.to_cbor())
    mac = s._row_mac("model", "m", body)
    digest = _digest([("model", "m", mac)])
    sql(url, "UPDATE veil_rows SET body = %s, mac = %s WHERE id = 'm'", body, mac)
    sql(url, "UPDATE veil_head SET digest = %s, mac = %s", digest, s._head_mac(version, digest))  # type: ignore[arg-type]

    fresh = replica(url, tmp_path)
    store = SealedModelStore(tmp_path / "sealed", fresh)
    assert {m.key: blob for m, blob in store.load_all()} == {f"{ALICE}/m": b"w"}
    # The next commit writes it under its key; its blob keeps its name.
    store.put(owned("m", b"bob", BOB), b"bob")
    assert sorted(str(r[0]) for r in sql(url, "SELECT id FROM veil_rows")) == [
        f"{ALICE}/m",
        f"{BOB}/m",
    ]
    again = SealedModelStore(tmp_path / "sealed", replica(url, tmp_path))
    assert {m.key: blob for m, blob in again.load_all()} == {
        f"{ALICE}/m": b"w",
        f"{BOB}/m": b"bob",
    }
