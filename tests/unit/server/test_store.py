"""The plain model store: atomic files, restart, cleanup of partial writes."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from veil.server.store import ModelStore, StoredModel


def record(model_id: str, blob: bytes) -> StoredModel:
    return StoredModel(model_id, hashlib.sha256(blob).digest(), f"{model_id}.onnx", len(blob))


def model_files(directory: Path) -> list[Path]:
    """The directory's files but the lock writers share (`ModelStore._locked`)."""
    return [p for p in directory.iterdir() if p.name != ".store.lock"]


def test_put_load_delete(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    store.put(record("a", b"first"), b"first")
    store.put(record("../b", b"second"), b"second")
    loaded = {
        meta.model_id: (meta, blob) for meta, blob in ModelStore(tmp_path / "models").load_all()
    }
    assert loaded == {
        "a": (record("a", b"first"), b"first"),
        "../b": (record("../b", b"second"), b"second"),
    }
    # file names come from the id's hash, never from the id itself
    assert all(len(p.stem) == 64 for p in model_files(tmp_path / "models"))
    assert (tmp_path / "models").stat().st_mode & 0o777 == 0o700
    store.delete("a")
    store.delete("never-stored")
    assert [m.model_id for m, _ in store.load_all()] == ["../b"]


def test_partial_writes_are_cleaned(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    store.put(record("kept", b"kept"), b"kept")
    (tmp_path / ".tmp-abc").write_bytes(b"half a blob")
    orphan = tmp_path / ("0" * 64 + ".onnx")
    orphan.write_bytes(b"blob whose metadata never landed")
    assert [m.model_id for m, _ in store.load_all()] == ["kept"]
    assert sorted(p.name for p in model_files(tmp_path)) == sorted(
        [hashlib.sha256(b"kept").hexdigest() + s for s in (".json", ".onnx")]
    )


def test_corrupt_entries_are_skipped(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    store.put(record("flipped", b"abcd"), b"abcd")
    store.put(record("bad-json", b"xyz"), b"xyz")
    key = hashlib.sha256(b"flipped").hexdigest()
    (tmp_path / f"{key}.onnx").write_bytes(b"abce")
    (tmp_path / f"{hashlib.sha256(b'bad-json').hexdigest()}.json").write_text("{")
    assert list(store.load_all()) == []


def test_failed_write_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ModelStore(tmp_path)

    def broken_fsync(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        store.put(record("m", b"blob"), b"blob")
    assert model_files(tmp_path) == []


def test_metadata_json_shape(tmp_path: Path) -> None:
    ModelStore(tmp_path).put(record("m", b"blob"), b"blob")
    (sidecar,) = tmp_path.glob("*.json")
    assert json.loads(sidecar.read_text()) == {
        "model_id": "m",
        "model_hash": hashlib.sha256(b"blob").hexdigest(),
        "model_name": "m.onnx",
        "size": 4,
        "owner": None,
        "visibility": "public",
        "allowed_keys": [],
        "created_at": None,
    }


def test_owner_and_visibility_round_trip(tmp_path: Path) -> None:
    blob = b"blob"
    meta = StoredModel(
        "m", hashlib.sha256(blob).digest(), "n", 4, "a" * 16, "restricted", ("b" * 16,), 1.5e9
    )
    ModelStore(tmp_path).put(meta, blob)
    assert list(ModelStore(tmp_path).load_all()) == [(meta, blob)]


def test_old_metadata_reads_as_public_without_owner() -> None:
    old = {"model_id": "m", "model_hash": "00" * 32, "model_name": "", "size": 1}
    meta = StoredModel.from_json(old)
    assert (meta.owner, meta.visibility, meta.allowed_keys) == (None, "public", ())
    assert meta.created_at is None


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("visibility", "everyone", "visibility: got 'everyone'"),
        ("visibility", 3, "bad visibility"),
        ("owner", 5, "bad owner"),
        ("allowed_keys", "abc", "bad allowed_keys"),
        ("allowed_keys", [1], "bad allowed_keys"),
        ("created_at", "yesterday", "bad created_at"),
        ("created_at", True, "bad created_at"),
    ],
)
def test_bad_access_metadata_refused(field: str, value: object, match: str) -> None:
    record = {"model_id": "m", "model_hash": "00" * 32, "model_name": "", "size": 1, field: value}
    with pytest.raises(ValueError, match=match):
        StoredModel.from_json(record)
