"""Model ids belong to their owners where models are kept: the sealed manifest and blobs, the
plain store; state written before (format 1, ids unique server-wide) is read and carried over."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cbor2
import pytest

from veil.errors import ConflictError, SealedStateError
from veil.server.sealed_file import write_sealed
from veil.server.sealing import SealedModelStore
from veil.server.state import MANIFEST_FILENAME, Manifest, ModelEntry, SealedState
from veil.server.store import ModelStore, StoredModel, scoped_key

KEY = bytes(range(32))
ALICE, BOB = "a" * 16, "b" * 16


def meta(model_id: str, blob: bytes, owner: str | None) -> StoredModel:
    return StoredModel(model_id, hashlib.sha256(blob).digest(), "name", len(blob), owner=owner)


def sealed_store(data: Path) -> SealedModelStore:
    return SealedModelStore(data / "sealed", SealedState(data, KEY))


def loaded(store: SealedModelStore | ModelStore) -> dict[str, bytes]:
    return {m.key: b for m, b in store.load_all()}


def test_scoped_key() -> None:
    assert scoped_key(None, "m") == "m"
    assert scoped_key(ALICE, "m") == f"{ALICE}/m"
    assert meta("m", b"x", BOB).key == f"{BOB}/m"


def test_two_owners_keep_one_id_each(tmp_path: Path) -> None:
    store = sealed_store(tmp_path)
    store.put_stream(meta("m", b"alice's", ALICE), [b"alice's"], exclusive=True)
    store.put_stream(meta("m", b"bob's", BOB), [b"bob's"], exclusive=True)
    with pytest.raises(ConflictError, match="model id 'm' is already taken"):
        store.put_stream(meta("m", b"again", ALICE), [b"again"], exclusive=True)
    assert loaded(sealed_store(tmp_path)) == {f"{ALICE}/m": b"alice's", f"{BOB}/m": b"bob's"}
    assert [e.meta.owner for e in store.find("m", None)] == [ALICE, BOB]
    assert [e.meta.owner for e in store.find(f"{BOB}/m", None)] == [BOB]
    assert store.find(f"{BOB}/other", None) == []
    store.delete(f"{BOB}/m")
    assert loaded(sealed_store(tmp_path)) == {f"{ALICE}/m": b"alice's"}
    assert len(list((tmp_path / "sealed").iterdir())) == 1


def _write_format_1(data: Path, entries: list[dict[str, object]], version: int) -> None:
    state = SealedState(data, KEY)
    value = {"format": 1, "version": version, "models": entries, "keys": []}
    write_sealed(data / MANIFEST_FILENAME, state._manifest_key, b"manifest", (cbor2.dumps(value),))


def test_format_1_state_is_read_and_carried_over(tmp_path: Path) -> None:
    # veil before owner-scoped ids: the manifest keyed by bare id, the blob sealed under it.
    # Such a blob is what today's store writes for the owner-less model "m".
    store = sealed_store(tmp_path)
    store.put(meta("m", b"weights", None), b"weights")
    entry = SealedState(tmp_path, KEY).current().models["m"]
    owned = meta("m", b"weights", ALICE)
    _write_format_1(tmp_path, [{"meta": owned.to_json(), "blob_version": entry.blob_version}], 1)

    store = sealed_store(tmp_path)
    assert loaded(store) == {f"{ALICE}/m": b"weights"}  # the blob kept its name
    migrated = SealedState(tmp_path, KEY).current().models[f"{ALICE}/m"]
    assert migrated.blob_name == "m"
    # The next commit writes format 2, the old blob still named by its bare id.
    store.put(meta("m", b"bob", BOB), b"bob")
    again = sealed_store(tmp_path)
    assert loaded(again) == {f"{ALICE}/m": b"weights", f"{BOB}/m": b"bob"}
    assert SealedState(tmp_path, KEY).current().models[f"{ALICE}/m"].blob_name == "m"
    # Replaced and deleted like any other: its old blob goes.
    again.put(meta("m", b"new", ALICE), b"new")
    assert SealedState(tmp_path, KEY).current().models[f"{ALICE}/m"].blob_name is None
    again.delete(f"{ALICE}/m")
    assert loaded(sealed_store(tmp_path)) == {f"{BOB}/m": b"bob"}
    assert len(list((tmp_path / "sealed").iterdir())) == 1


def test_blob_names_that_break_the_rules_are_refused(tmp_path: Path) -> None:
    owned = meta("m", b"x", ALICE).to_json()
    cases = {
        # format 2 names a blob by its key, or (carried over) by its own bare id: never another
        "blob_name got 'other'": {
            "format": 2,
            "version": 1,
            "models": [{"meta": owned, "blob_version": 1, "blob_name": "other"}],
            "keys": [],
        },
        "blob_name in a format 1 manifest": {
            "format": 1,
            "version": 1,
            "models": [{"meta": owned, "blob_version": 1, "blob_name": "m"}],
            "keys": [],
        },
        "duplicate model": {
            "format": 2,
            "version": 1,
            "models": [{"meta": owned, "blob_version": 1}] * 2,
            "keys": [],
        },
        "manifest format": {"format": 3, "version": 1, "models": [], "keys": []},
    }
    state = SealedState(tmp_path, KEY)
    state.open()
    for message, value in cases.items():
        write_sealed(
            tmp_path / MANIFEST_FILENAME, state._manifest_key, b"manifest", (cbor2.dumps(value),)
        )
        with pytest.raises(SealedStateError, match=message):
            SealedState(tmp_path, KEY).current()


def test_entries_encode_their_blob_name_only_when_carried_over() -> None:
    new = ModelEntry(meta("m", b"x", ALICE), 3)
    assert "blob_name" not in new.to_cbor()
    assert ModelEntry.from_cbor(new.to_cbor()) == new
    carried = ModelEntry.from_cbor(new.to_cbor(), legacy=True)
    assert carried.sealed_name == "m"
    assert ModelEntry.from_cbor(carried.to_cbor()) == carried
    manifest = Manifest(3, {carried.meta.key: carried})
    assert Manifest.decode(manifest.encode()) == manifest


def test_plain_store_keeps_two_owners_and_renames_old_files(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    store.put_stream(meta("m", b"alice's", ALICE), [b"alice's"], exclusive=True)
    store.put_stream(meta("m", b"bob's", BOB), [b"bob's"], exclusive=True)
    with pytest.raises(ConflictError, match="already taken"):
        store.put_stream(meta("m", b"again", BOB), [b"again"], exclusive=True)
    # A file pair of veil before owner-scoped ids: named after the bare id.
    old = meta("legacy", b"old", ALICE)
    stem = hashlib.sha256(b"legacy").hexdigest()
    (tmp_path / f"{stem}.onnx").write_bytes(b"old")
    (tmp_path / f"{stem}.json").write_text(json.dumps(old.to_json()))
    assert loaded(ModelStore(tmp_path)) == {
        f"{ALICE}/m": b"alice's",
        f"{BOB}/m": b"bob's",
        f"{ALICE}/legacy": b"old",
    }
    assert not (tmp_path / f"{stem}.json").exists()
    assert not (tmp_path / f"{stem}.onnx").exists()
    store.delete(f"{ALICE}/legacy")
    store.delete(f"{ALICE}/m")
    assert loaded(ModelStore(tmp_path)) == {f"{BOB}/m": b"bob's"}
