"""Options of the shared state: an upload that may not replace (the cluster-wide duplicate id),
and the configuration refusals of --database-url and --replica-name."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from veil.errors import ConflictError
from veil.server.config import ServerConfig
from veil.server.sealing import SealedModelStore
from veil.server.state import SealedState
from veil.server.store import ModelStore, StoredModel


def meta(model_id: str, blob: bytes) -> StoredModel:
    return StoredModel(model_id, hashlib.sha256(blob).digest(), "name", len(blob))


def test_exclusive_sealed_upload_refuses_a_committed_id(tmp_path: Path) -> None:
    store = SealedModelStore(tmp_path / "sealed", SealedState(tmp_path, bytes(range(32))))
    store.put_stream(meta("m", b"first"), [b"first"], exclusive=True)
    with pytest.raises(ConflictError, match="model id 'm' is already taken"):
        store.put_stream(meta("m", b"second"), [b"second"], exclusive=True)
    assert {m.model_id: b for m, b in store.load_all()} == {"m": b"first"}
    # Only blobs the state names are left: the refused one was removed.
    assert len(list((tmp_path / "sealed").iterdir())) == 1


def test_exclusive_plain_upload_refuses_a_stored_id(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    store.put_stream(meta("m", b"first"), [b"first"], exclusive=True)
    with pytest.raises(ConflictError, match="model id 'm' is already taken"):
        store.put_stream(meta("m", b"second"), [b"second"], exclusive=True)
    assert [b for _, b in store.load_all()] == [b"first"]


def test_database_needs_sealed_storage(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="database_url: got it with unsealed_store"):
        ServerConfig(tmp_path, database_url="postgresql://db/veil", unsealed_store=True)


@pytest.mark.parametrize("name", ["", "a b", "r\r\nX-Injected: 1", "é", "x" * 65])
def test_replica_name_is_a_plain_token(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="replica_name: got"):
        ServerConfig(tmp_path, replica_name=name)
    assert ServerConfig(tmp_path, replica_name="replica-1.a_b").replica_name == "replica-1.a_b"
