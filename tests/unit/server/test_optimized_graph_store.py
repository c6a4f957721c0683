"""An optimized graph stored in place of the upload: the manifest ties it to the upload's hash
(the one clients pin) and to its own, and the stored bytes must match the latter."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest

from veil.errors import SealedStateError
from veil.server.sealing import SealedModelStore
from veil.server.state import Manifest, ModelEntry, SealedState
from veil.server.store import ModelStore, StoredModel

KEY = bytes(range(32))
UPLOAD = b"the upload as the client sent it" * 10
GRAPH = b"the optimized graph admission kept"


def optimized(graph: bytes = GRAPH, mode: str = "int8") -> StoredModel:
    return StoredModel(
        "m",
        hashlib.sha256(UPLOAD).digest(),
        "name",
        len(UPLOAD),
        optimization=mode,
        graph_hash=hashlib.sha256(graph).digest(),
        graph_size=len(graph),
    )


def open_store(data: Path) -> SealedModelStore:
    return SealedModelStore(data / "sealed", SealedState(data, KEY))


def test_the_graph_is_stored_and_loaded_under_the_upload_hash(tmp_path: Path) -> None:
    meta = optimized()
    open_store(tmp_path).put(meta, GRAPH)
    ((loaded_meta, blob),) = list(open_store(tmp_path).load_all())
    assert blob == GRAPH
    assert loaded_meta == meta
    assert loaded_meta.model_hash == hashlib.sha256(UPLOAD).digest()
    assert (loaded_meta.stored_hash, loaded_meta.stored_size) == (
        hashlib.sha256(GRAPH).digest(),
        len(GRAPH),
    )


def test_an_unoptimized_record_is_written_as_before() -> None:
    plain = StoredModel("m", hashlib.sha256(UPLOAD).digest(), "name", len(UPLOAD))
    assert not {"optimization", "graph_hash", "graph_size"} & set(plain.to_json())
    assert (plain.stored_hash, plain.stored_size) == (plain.model_hash, plain.size)
    assert StoredModel.from_json(optimized().to_json()) == optimized()


def test_bytes_other_than_the_graph_are_not_stored(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    with pytest.raises(ValueError, match="bytes differ from its size or hash"):
        store.put(optimized(), UPLOAD)  # the upload, where the record names the graph
    assert "m" not in store
    assert list(open_store(tmp_path).load_all()) == []


def test_a_graph_that_differs_from_the_manifest_is_refused_at_start(tmp_path: Path) -> None:
    open_store(tmp_path).put(optimized(), GRAPH)
    state = SealedState(tmp_path, KEY)
    other = optimized(b"another graph of another size")

    def swap_record(current: Manifest, version: int) -> Manifest:
        entry = current.models["m"]
        return current.replace(models={"m": ModelEntry(other, entry.blob_version)})

    state.update(swap_record)
    with pytest.raises(SealedStateError, match=r"model 'm': blob of 34 bytes does not match"):
        list(open_store(tmp_path).load_all())


@pytest.mark.parametrize(
    "change",
    [
        {"optimization": None},
        {"graph_hash": None},
        {"graph_size": None},
        {"optimization": "fast"},
        {"optimization": "off"},
        {"graph_hash": b"short"},
        {"graph_size": -1},
        {"graph_size": True},
    ],
)
def test_an_optimized_record_needs_all_three_fields(change: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="optimized graph: expected"):
        dataclasses.replace(optimized(), **change)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "change",
    [{"graph_hash": 5}, {"graph_hash": "zz"}, {"graph_size": "34"}, {"optimization": 1}],
)
def test_a_record_with_bad_optimized_fields_does_not_load(change: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="graph"):
        StoredModel.from_json({**optimized().to_json(), **change})


def test_the_plain_store_checks_the_graph_hash(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    store.put(optimized(), GRAPH)
    assert [b for _, b in store.load_all()] == [GRAPH]
    store.put(optimized(), UPLOAD)  # the plain store writes what it is given
    assert list(store.load_all()) == []  # and skips what does not match its record
