"""Two servers on one model directory: one starting (`load_all` clears leftovers) while the other
has written a model's blob but not yet what names it (metadata, or the manifest's commit). The
starting one must not take the blob for a crash's orphan: the upload stays whole.

Each test pauses the writer between its two writes, starts the other store's `load_all`, and
lets the writer go on only once that store has either finished (the old code: it removed the
blob) or reached the writers' lock (it then waits for the commit)."""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from veil.errors import SealedStateError
from veil.server.sealing import SealedModelStore
from veil.server.state import Manifest, SealedState, StateBackend
from veil.server.store import ModelStore, StoredModel
from veil.testing.engines import engines_missing, postgres

KEY = bytes(range(32))
BLOB = b"the model's bytes, " * 1000
DEADLINE_S = 60.0


def record(model_id: str, blob: bytes) -> StoredModel:
    return StoredModel(model_id, hashlib.sha256(blob).digest(), "name", len(blob))


class Worker(threading.Thread):
    """A thread that keeps what its target raised, for the test to re-raise."""

    def __init__(self, target: Callable[[], object]) -> None:
        super().__init__(daemon=True)
        self._run_target = target
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._run_target()
        except BaseException as exc:
            self.error = exc

    def finish(self) -> None:
        self.join(DEADLINE_S)
        assert not self.is_alive(), "still running after the deadline"
        if self.error is not None:
            raise self.error


def wait_for(condition: Callable[[], bool]) -> None:
    event = threading.Event()
    for _ in range(int(DEADLINE_S / 0.01)):
        if condition():
            return
        event.wait(0.01)
    raise AssertionError("condition not reached before the deadline")


def test_plain_store_start_keeps_a_blob_whose_metadata_is_on_its_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer, starter = ModelStore(tmp_path), ModelStore(tmp_path)
    blob_written, go_on = threading.Event(), threading.Event()
    starter_locking = threading.Event()
    write_atomic = writer._write_atomic

    def pausing_write(target: Path, data: Any) -> int:
        written = write_atomic(target, data)
        if target.suffix == ".onnx":  # the blob is in place, its metadata not yet
            blob_written.set()
            assert go_on.wait(DEADLINE_S)
        return written

    monkeypatch.setattr(writer, "_write_atomic", pausing_write)
    real_locked = getattr(starter, "_locked", None)

    @contextlib.contextmanager
    def spied_locked(operation: int) -> Iterator[None]:
        starter_locking.set()
        assert real_locked is not None
        with real_locked(operation):
            yield

    # raising=False: the store before the fix had no lock, and must fail on the lost blob.
    monkeypatch.setattr(starter, "_locked", spied_locked, raising=False)

    upload = Worker(lambda: writer.put(record("m", BLOB), BLOB))
    upload.start()
    assert blob_written.wait(DEADLINE_S)
    start = Worker(lambda: list(starter.load_all()))
    start.start()
    wait_for(lambda: starter_locking.is_set() or not start.is_alive())
    go_on.set()
    upload.finish()
    start.finish()
    assert list(ModelStore(tmp_path).load_all()) == [(record("m", BLOB), BLOB)]


def _race_sealed(
    writer_state: StateBackend,
    starter_state: StateBackend,
    blob_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The writer pauses after its blob is written, before the commit naming it; the other
    store starts after opening the state and before clearing unnamed blobs."""
    list(SealedModelStore(blob_dir, writer_state).load_all())  # a state in use, as in a cluster
    writer = SealedModelStore(blob_dir, writer_state)
    starter = SealedModelStore(blob_dir, starter_state)
    opened, go_starter, starter_locking = threading.Event(), threading.Event(), threading.Event()
    blob_written, go_writer = threading.Event(), threading.Event()
    real_open, real_update = starter_state.open, writer_state.update

    def pausing_open() -> Manifest:
        manifest = real_open()
        opened.set()
        assert go_starter.wait(DEADLINE_S)
        return manifest

    def pausing_update(change: Callable[[Manifest, int], Manifest]) -> Manifest:
        def paused(current: Manifest, version: int) -> Manifest:
            new = change(current, version)  # writes the blob
            blob_written.set()
            assert go_writer.wait(DEADLINE_S)
            return new

        return real_update(paused)

    real_locked = getattr(starter_state, "locked", None)

    @contextlib.contextmanager
    def spied_locked() -> Iterator[Manifest]:
        starter_locking.set()
        assert real_locked is not None
        with real_locked() as manifest:
            yield manifest

    monkeypatch.setattr(starter_state, "open", pausing_open)
    monkeypatch.setattr(writer_state, "update", pausing_update)
    monkeypatch.setattr(starter_state, "locked", spied_locked, raising=False)

    start = Worker(lambda: list(starter.load_all()))
    start.start()
    assert opened.wait(DEADLINE_S)
    upload = Worker(lambda: writer.put(record("m", BLOB), BLOB))
    upload.start()
    assert blob_written.wait(DEADLINE_S)
    go_starter.set()
    wait_for(lambda: starter_locking.is_set() or not start.is_alive())
    go_writer.set()
    upload.finish()
    start.finish()
    monkeypatch.undo()
    assert {m.model_id: b for m, b in SealedModelStore(blob_dir, writer_state).load_all()} == {
        "m": BLOB
    }


def test_sealed_store_start_keeps_a_blob_whose_commit_is_on_its_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two states on one directory: two processes (the flock is per open file, not per process).
    _race_sealed(
        SealedState(tmp_path, KEY), SealedState(tmp_path, KEY), tmp_path / "sealed", monkeypatch
    )


@pytest.mark.skipif(
    "postgresql" in engines_missing(), reason="PostgreSQL is not installed (scripts/test does)"
)
def test_replica_start_keeps_a_blob_whose_commit_is_on_its_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from veil.server.pgstate import PostgresState

    with postgres(tmp_path / "pg") as url:
        writer = PostgresState(url, KEY, tmp_path / "sealed")
        starter = PostgresState(url, KEY, tmp_path / "sealed")
        try:
            _race_sealed(writer, starter, tmp_path / "sealed", monkeypatch)
        finally:
            writer.close()
            starter.close()


def test_a_model_replaced_or_deleted_by_another_replica_is_read_as_the_state_names_it(
    tmp_path: Path,
) -> None:
    state = SealedState(tmp_path, KEY)
    store, other = (
        SealedModelStore(tmp_path / "sealed", state),
        SealedModelStore(tmp_path / "sealed", SealedState(tmp_path, KEY)),
    )
    list(store.load_all())
    store.put(record("m", b"first"), b"first")
    seen = state.current().models["m"]
    other.put(record("m", b"second"), b"second")  # the blob `seen` names is removed
    assert store.load_latest(seen) == (record("m", b"second"), b"second")
    other.delete("m")
    assert store.load_latest(seen) is None


def test_a_blob_missing_while_the_state_names_it_is_refused(tmp_path: Path) -> None:
    state = SealedState(tmp_path, KEY)
    store = SealedModelStore(tmp_path / "sealed", state)
    store.put(record("m", b"bytes"), b"bytes")
    (blob,) = (tmp_path / "sealed").iterdir()
    blob.unlink()
    with pytest.raises(SealedStateError, match=r"model 'm': its blob \(version 1\) is missing"):
        store.load_latest(state.current().models["m"])
