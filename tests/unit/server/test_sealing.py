"""Sealed model blobs named by the manifest: round trips, nothing in clear, and every replayed,
swapped, edited or missing blob refused at start (`SealedStateError`); crash consistency under
SIGKILL."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from veil.errors import SealedStateError
from veil.server.sealing import SealedModelStore
from veil.server.state import SealedState
from veil.server.store import StoredModel

KEY = bytes(range(32))


def meta(model_id: str, blob: bytes, **kw: object) -> StoredModel:
    return StoredModel(model_id, hashlib.sha256(blob).digest(), "name", len(blob), **kw)  # type: ignore[arg-type]


def open_store(data: Path, key: bytes = KEY, **kw: int) -> SealedModelStore:
    return SealedModelStore(data / "sealed", SealedState(data, key), **kw)


def loaded(store: SealedModelStore) -> dict[str, bytes]:
    return {m.model_id: b for m, b in store.load_all()}


def blobs(data: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (data / "sealed").iterdir()}


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 100_000])
def test_round_trip_and_restart(tmp_path: Path, size: int) -> None:
    blob = os.urandom(size)
    store = open_store(tmp_path, chunk_size=4096)
    store.put(meta("m", blob, owner="k", visibility="restricted"), blob)
    assert "k/m" in store  # kept under its owner and id
    ((m, b),) = list(open_store(tmp_path).load_all())
    assert (m, b) == (meta("m", blob, owner="k", visibility="restricted"), blob)


def test_nothing_in_clear(tmp_path: Path) -> None:
    blob = b"secret weights " * 1000
    open_store(tmp_path).put(meta("secret-model-id", blob), blob)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    for p in files:
        assert b"secret weights" not in p.read_bytes()
        assert b"secret-model-id" not in p.read_bytes()
        assert "secret-model-id" not in p.name


def test_replace_and_delete_keep_one_blob(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    store.put(meta("m", b"one"), b"one")
    store.put(meta("m", b"two"), b"two")
    assert len(blobs(tmp_path)) == 1
    assert loaded(open_store(tmp_path)) == {"m": b"two"}
    store.delete("m")
    store.delete("m")  # absent: nothing to commit
    assert blobs(tmp_path) == {}
    assert loaded(open_store(tmp_path)) == {}


def test_deleted_model_put_back_is_never_served(tmp_path: Path) -> None:
    # Issue 10: the old .sealed file copied back while the server is down restored the model.
    store = open_store(tmp_path)
    store.put(meta("gone", b"old"), b"old")
    store.put(meta("kept", b"k"), b"k")
    saved = blobs(tmp_path)
    store.delete("gone")
    for name, data in saved.items():
        (tmp_path / "sealed" / name).write_bytes(data)
    assert loaded(open_store(tmp_path)) == {"kept": b"k"}
    assert len(blobs(tmp_path)) == 1  # the unnamed file is removed, not served


def test_old_manifest_and_blobs_put_back_are_refused(tmp_path: Path) -> None:
    # A model deleted and uploaded again restricted: the old public state copied back.
    store = open_store(tmp_path)
    store.put(meta("m", b"v1"), b"v1")
    old = {
        p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != "state.version"
    }
    store.delete("m")
    store.put(meta("m", b"v2", owner="k", visibility="restricted"), b"v2")
    for p in (tmp_path / "sealed").iterdir():
        p.unlink()
    for p, data in old.items():
        p.write_bytes(data)
    with pytest.raises(SealedStateError, match="rollback"):
        loaded(open_store(tmp_path))


def test_blob_of_an_older_version_under_the_current_name_is_refused(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    store.put(meta("m", b"old"), b"old")
    (old_name,) = blobs(tmp_path)
    old = blobs(tmp_path)[old_name]
    store.put(meta("m", b"old"), b"old")  # same bytes, new version
    (new_name,) = blobs(tmp_path)
    (tmp_path / "sealed" / new_name).write_bytes(old)
    with pytest.raises(
        SealedStateError, match=r"model 'm': its blob \(version 2\) does not unseal"
    ):
        loaded(open_store(tmp_path))


def test_blob_swapped_between_ids_is_refused(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    store.put(meta("a", b"aaa"), b"aaa")
    store.put(meta("b", b"bbb"), b"bbb")
    names = sorted(blobs(tmp_path), key=lambda n: int(n.split("-")[1].split(".")[0]))
    a_path, b_path = (tmp_path / "sealed" / n for n in names)
    a_bytes = a_path.read_bytes()
    a_path.write_bytes(b_path.read_bytes())
    b_path.write_bytes(a_bytes)
    with pytest.raises(SealedStateError, match=r"model 'a': its blob .* does not unseal"):
        loaded(open_store(tmp_path))


@pytest.mark.parametrize("how", ["missing", "flipped", "truncated"])
def test_damaged_blob_is_refused_not_quarantined(tmp_path: Path, how: str) -> None:
    store = open_store(tmp_path)
    store.put(meta("m", b"x" * 5000), b"x" * 5000)
    (path,) = (tmp_path / "sealed").iterdir()
    data = path.read_bytes()
    if how == "missing":
        path.unlink()
    elif how == "flipped":
        path.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    else:
        path.write_bytes(data[:-1])
    with pytest.raises(SealedStateError, match="model 'm': its blob"):
        loaded(open_store(tmp_path))
    assert not (tmp_path / "sealed" / "quarantine").exists()


def test_foreign_file_in_the_blob_directory_is_refused(tmp_path: Path) -> None:
    open_store(tmp_path).put(meta("m", b"x"), b"x")
    (tmp_path / "sealed" / ("ab" * 32 + ".sealed")).write_bytes(b"a version 1 file")
    with pytest.raises(SealedStateError, match="not a model blob"):
        loaded(open_store(tmp_path))


def test_bytes_that_differ_from_the_record_are_not_stored(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    with pytest.raises(ValueError, match="differ from its size or hash"):
        store.put(meta("m", b"expected"), b"received")
    assert blobs(tmp_path) == {}
    assert loaded(open_store(tmp_path)) == {}


def test_failed_stream_leaves_the_old_model(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    store.put(meta("m", b"old"), b"old")

    def chunks() -> Iterator[bytes]:
        yield b"new"
        raise ConnectionError("client went away")

    with pytest.raises(ConnectionError):
        store.put_stream(meta("m", b"new!"), chunks())
    assert len(blobs(tmp_path)) == 1
    assert loaded(open_store(tmp_path)) == {"m": b"old"}


def test_failure_after_the_commit_keeps_the_blob(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The manifest's rename happened, then its directory fsync failed: the new blob is the
    # model now, and deleting it would leave the manifest naming a missing blob.
    import veil.server.state as state_module

    real = state_module.write_sealed

    def fsync_fails(path: Path, *args: object, **kw: object) -> int:
        written = real(path, *args, **kw)  # type: ignore[arg-type]
        if path.name == "state.sealed":
            raise OSError(5, "Input/output error")
        return written

    store = open_store(tmp_path)
    store.put(meta("m", b"old"), b"old")
    monkeypatch.setattr(state_module, "write_sealed", fsync_fails)
    with pytest.raises(OSError, match="Input/output error"):
        store.put(meta("m", b"new"), b"new")
    monkeypatch.undo()
    assert loaded(open_store(tmp_path)) == {"m": b"new"}
    assert len(blobs(tmp_path)) == 1


def test_witness_write_failure_still_commits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    store = open_store(tmp_path)
    store.put(meta("a", b"a"), b"a")

    def fails(self: SealedState, version: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(SealedState, "_write_witness", fails)
    store.put(meta("b", b"b"), b"b")  # committed: the caller is told so
    monkeypatch.undo()
    assert "state.version not written" in caplog.text
    assert loaded(open_store(tmp_path)) == {"a": b"a", "b": b"b"}  # one behind: caught up


def test_interrupted_writes_removed_at_start(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    store.put(meta("m", b"x"), b"x")
    (tmp_path / "sealed" / ".tmp-0123").write_bytes(b"partial")
    (tmp_path / ".tmp-4567").write_bytes(b"partial")
    assert loaded(open_store(tmp_path)) == {"m": b"x"}
    assert not list(tmp_path.rglob(".tmp-*"))


def test_streamed_put_uses_bounded_memory(tmp_path: Path) -> None:
    import tracemalloc

    store = open_store(tmp_path, chunk_size=1 << 19)
    part = os.urandom(1 << 19)
    whole = hashlib.sha256(part * 64).digest()
    big = StoredModel("big", whole, "", 32 << 20)
    tracemalloc.start()
    try:
        written = store.put_stream(big, (part for _ in range(64)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert written == 32 << 20
    assert peak < 6 << 20  # a few chunks, not the 32 MiB model
    assert loaded(open_store(tmp_path)) == {"big": part * 64}


def test_another_sealing_key_is_refused(tmp_path: Path) -> None:
    open_store(tmp_path).put(meta("m", b"x"), b"x")
    with pytest.raises(SealedStateError, match="another key"):
        loaded(open_store(tmp_path, bytes(32)))


def test_blobs_without_any_state_are_refused(tmp_path: Path) -> None:
    open_store(tmp_path).put(meta("m", b"x"), b"x")
    (tmp_path / "state.sealed").unlink()
    (tmp_path / "state.version").unlink()
    store = SealedModelStore(tmp_path / "sealed", SealedState(tmp_path, KEY))
    with pytest.raises(SealedStateError, match=r"1 model blob\(s\) but no state"):
        loaded(store)
    assert len(blobs(tmp_path)) == 1  # nothing removed


def test_copied_data_directory_keeps_working(tmp_path: Path) -> None:
    open_store(tmp_path / "a").put(meta("m", b"x"), b"x")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert loaded(open_store(tmp_path / "b")) == {"m": b"x"}


# --- crash consistency -----------------------------------------------------------------------

_WRITER = r"""
import hashlib, random, sys
from veil.server.sealing import SealedModelStore
from veil.server.state import SealedState
from veil.server.store import StoredModel

directory, key_hex, seed, start = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
state = SealedState(directory, bytes.fromhex(key_hex))
state.open()
store = SealedModelStore(directory + "/sealed", state, chunk_size=65536)

def blob(model_id, version):
    size = (hashlib.sha256(f"{model_id}/{version}".encode()).digest()[0] + 1) * 16411
    h = hashlib.sha256(f"{model_id}/{version}".encode()).digest()
    return (h * (size // 32 + 1))[:size]

rng = random.Random(seed)
for n in range(start, start + 400):
    model_id = f"m{rng.randrange(8)}"
    if rng.random() < 0.7:
        print(f"BEGIN put {model_id} {n}", flush=True)
        b = blob(model_id, n)
        store.put(StoredModel(model_id, hashlib.sha256(b).digest(), str(n), len(b)), b)
        print(f"ACK put {model_id} {n}", flush=True)
    else:
        print(f"BEGIN del {model_id} {n}", flush=True)
        store.delete(model_id)
        print(f"ACK del {model_id} {n}", flush=True)
"""


def _blob(model_id: str, version: int) -> bytes:
    size = (hashlib.sha256(f"{model_id}/{version}".encode()).digest()[0] + 1) * 16411
    h = hashlib.sha256(f"{model_id}/{version}".encode()).digest()
    return (h * (size // 32 + 1))[:size]


def test_sigkill_during_puts_and_deletes(tmp_path: Path) -> None:
    directory = tmp_path / "data"
    key = os.urandom(32)
    rng = random.Random(os.urandom(8))
    # model id -> set of states it may be in: None (absent) or a version number
    allowed: dict[str, set[int | None]] = {f"m{i}": {None} for i in range(8)}
    start = 0
    kills = 0
    interrupted_writes = 0
    for round_ in range(6):
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(directory), key.hex(), str(round_), str(start)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        first = proc.stdout.readline()  # the writer is up (imports done): now kill at random
        time.sleep(rng.uniform(0.0, 0.5))
        proc.send_signal(signal.SIGKILL)
        # Through the same reader as the first line: readline() may have buffered more lines
        # than it returned, and communicate(timeout=...) reads the pipe beneath that buffer,
        # so the lines written while this process slept would be lost.
        out = first + proc.stdout.read()
        proc.stdout.close()
        proc.wait(timeout=30)
        kills += proc.returncode == -signal.SIGKILL
        in_flight: tuple[str, str, int] | None = None
        for line in out.splitlines():
            word, op, model_id, n = line.split()
            if word == "BEGIN":
                in_flight = (op, model_id, int(n))
                continue
            allowed[model_id] = {int(n) if op == "put" else None}
            in_flight = None
            start = int(n) + 1
        if in_flight is not None:
            op, model_id, n = in_flight
            allowed[model_id].add(n if op == "put" else None)
            start = n + 1

        interrupted_writes += len(list(directory.rglob(".tmp-*")))
        store = open_store(directory, key)
        restored = {m.model_id: (m, b) for m, b in store.load_all()}
        assert not list(directory.rglob(".tmp-*"))
        assert len(blobs(directory)) == len(restored)  # leftovers of the kill removed
        for model_id, states in allowed.items():
            if model_id in restored:
                m, b = restored[model_id]
                version = int(m.model_name)
                assert version in states, (model_id, version, states)
                assert b == _blob(model_id, version)  # complete and bit-identical
                allowed[model_id] = {version}
            else:
                assert None in states, (model_id, states)
                allowed[model_id] = {None}
        # The next writer starts from what is on disk now.
    assert kills >= 1
    assert start > 0
    # The kills did land inside writes (not only between them): the test exercised recovery.
    assert interrupted_writes >= 1


def test_find_blocks_only_where_the_state_does(tmp_path: Path) -> None:
    class NetworkState(SealedState):
        @property
        def current_may_block(self) -> bool:
            return True

    assert not open_store(tmp_path / "local").may_block
    remote = tmp_path / "remote"
    assert SealedModelStore(remote / "sealed", NetworkState(remote, KEY)).may_block
