"""Sealed model store: round trips, tamper detection, and crash consistency under SIGKILL."""

from __future__ import annotations

import hashlib
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from veil.server.sealing import DictMetaCodec, SealedFileError, SealedModelStore
from veil.server.store import ModelStore, StoredModel

KEY = bytes(range(32))
DICT = DictMetaCodec()


def meta(model_id: str, **extra: object) -> dict[str, object]:
    return {"id": model_id, "name": "n", "owner": "o", "visibility": "public", **extra}


@pytest.fixture
def store(tmp_path: Path) -> SealedModelStore[dict[str, object]]:
    return SealedModelStore(tmp_path / "models", os.urandom(32), codec=DICT, chunk_size=1000)


def only_file(s: SealedModelStore[dict[str, object]]) -> Path:
    (path,) = s.directory.glob("*.sealed")
    return path


@pytest.mark.parametrize("size", [0, 1, 995, 996, 997, 1000, 1996, 1997, 5000, 12345])
def test_round_trip_sizes(store: SealedModelStore[dict[str, object]], size: int) -> None:
    blob = os.urandom(size)
    store.put(meta("m"), blob)
    assert list(store.load_all()) == [(meta("m"), blob)]
    assert store.load("m") == (meta("m"), blob)


def test_streamed_put_and_reopen(tmp_path: Path) -> None:
    key = os.urandom(32)
    s = SealedModelStore(tmp_path, key, codec=DICT, chunk_size=64)
    parts = [os.urandom(n) for n in (0, 10, 100, 64, 1, 300)]
    assert s.put_stream(meta("a"), iter(parts)) == sum(map(len, parts))
    s.put(meta("b", owner="x"), b"bee")
    again = SealedModelStore(
        tmp_path, key, codec=DICT, chunk_size=4096
    )  # chunk size is read from the file
    assert dict((m["id"], (m, b)) for m, b in again.load_all()) == {
        "a": (meta("a"), b"".join(parts)),
        "b": (meta("b", owner="x"), b"bee"),
    }


def test_nothing_in_clear(store: SealedModelStore[dict[str, object]]) -> None:
    blob = b"SECRET-MODEL-BYTES" * 100
    store.put(meta("model-id-visible?", name="secret-name"), blob)
    raw = only_file(store).read_bytes()
    for needle in (b"SECRET-MODEL", b"model-id-visible", b"secret-name"):
        assert needle not in raw
    assert "model-id" not in only_file(store).name


def test_fresh_nonce_per_write(store: SealedModelStore[dict[str, object]]) -> None:
    store.put(meta("m"), b"x" * 100)
    first = only_file(store).read_bytes()
    store.put(meta("m"), b"x" * 100)
    second = only_file(store).read_bytes()
    assert first[16:24] != second[16:24]
    assert first[24:] != second[24:]


def test_replace_and_delete(store: SealedModelStore[dict[str, object]]) -> None:
    store.put(meta("m"), b"one")
    store.put(meta("m"), b"two")
    assert list(store.load_all()) == [(meta("m"), b"two")]
    assert "m" in store
    store.delete("m")
    store.delete("m")  # absent: no error
    assert list(store.load_all()) == []
    assert store.load("m") is None


def test_stored_bytes(store: SealedModelStore[dict[str, object]]) -> None:
    assert store.stored_bytes() == 0
    store.put(meta("m"), b"x" * 5000)
    assert 5000 < store.stored_bytes() < 5300


def test_wrong_key_quarantines(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    SealedModelStore(tmp_path, os.urandom(32), codec=DICT).put(meta("m"), b"blob")
    other = SealedModelStore(tmp_path, os.urandom(32), codec=DICT)
    with caplog.at_level(logging.ERROR):
        assert list(other.load_all()) == []
    assert len(list((tmp_path / "quarantine").iterdir())) == 1
    assert "quarantined" in caplog.text
    assert "blob" not in caplog.text


def test_bad_key_length(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        SealedModelStore(tmp_path, b"short")


def _tamper_cases() -> list[tuple[str, object]]:
    def flip(at: int):  # type: ignore[no-untyped-def]
        def f(raw: bytes) -> bytes:
            b = bytearray(raw)
            b[at] ^= 1
            return bytes(b)

        return f

    return [
        ("magic", flip(0)),
        ("version", flip(9)),
        ("chunk size", flip(15)),
        ("nonce prefix", flip(20)),
        ("first chunk", flip(30)),
        ("tag of a middle chunk", flip(24 + 1016 + 1010)),
        ("last byte", flip(-1)),
        ("truncated at a chunk boundary", lambda r: r[: 24 + 2 * 1016]),
        ("truncated mid chunk", lambda r: r[:-5]),
        ("header only", lambda r: r[:24]),
        ("empty", lambda r: b""),
        ("appended bytes", lambda r: r + b"\0"),
        ("appended copy of a chunk", lambda r: r + r[24 : 24 + 1016]),
        ("chunks swapped", lambda r: r[:24] + r[1040:2056] + r[24:1040] + r[2056:]),
        ("chunk dropped", lambda r: r[:24] + r[1040:]),
    ]


@pytest.mark.parametrize(("what", "mutate"), _tamper_cases(), ids=[c[0] for c in _tamper_cases()])
def test_tampering_detected(
    store: SealedModelStore[dict[str, object]], what: str, mutate: object
) -> None:
    store.put(meta("m"), os.urandom(3500))  # 4 chunks of 1000
    path = only_file(store)
    raw = path.read_bytes()
    path.write_bytes(mutate(raw))  # type: ignore[operator]
    with pytest.raises(SealedFileError):
        store.load("m")
    assert list(store.load_all()) == []
    assert not path.exists()
    assert len(list((store.directory / "quarantine").iterdir())) == 1


def test_blob_swapped_between_ids(store: SealedModelStore[dict[str, object]]) -> None:
    store.put(meta("a"), b"model a")
    store.put(meta("b"), b"model b")
    pa, pb = store._path("a"), store._path("b")
    pa.write_bytes(pb.read_bytes())  # b's file under a's name
    with pytest.raises(SealedFileError, match="failed authentication"):
        store.load("a")
    assert [m["id"] for m, _ in store.load_all()] == ["b"]


def test_meta_naming_other_id_rejected(tmp_path: Path) -> None:
    # Sealed with the right key and the right file tag but metadata naming another id: this can
    # only come from a bug, but the store still refuses to hand it out under the wrong id.
    s = SealedModelStore(tmp_path, KEY, codec=DICT)
    s.put(meta("a"), b"x")
    inner = SealedModelStore(tmp_path, KEY, codec=DICT)
    inner._tag = lambda model_id: s._tag("a")  # type: ignore[method-assign]
    inner.put(meta("b"), b"y")
    with pytest.raises(SealedFileError, match="another model"):
        s.load("a")


def test_temp_files_removed_on_load(store: SealedModelStore[dict[str, object]]) -> None:
    store.put(meta("m"), b"ok")
    leftover = store.directory / ".tmp-0123456789abcdef"
    leftover.write_bytes(b"partial")
    assert list(store.load_all()) == [(meta("m"), b"ok")]
    assert not leftover.exists()


def test_failed_stream_leaves_nothing(store: SealedModelStore[dict[str, object]]) -> None:
    store.put(meta("m"), b"old")

    def chunks():  # type: ignore[no-untyped-def]
        yield b"new" * 1000
        raise ConnectionError("client went away")

    with pytest.raises(ConnectionError):
        store.put_stream(meta("m"), chunks())
    assert sorted(p.name for p in store.directory.iterdir()) == [only_file(store).name]
    assert list(store.load_all()) == [(meta("m"), b"old")]


# --- crash consistency -----------------------------------------------------------------------

_WRITER = r"""
import hashlib, random, sys
from veil.server.sealing import DictMetaCodec, SealedModelStore

directory, key_hex, seed, start = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
store = SealedModelStore(directory, bytes.fromhex(key_hex), codec=DictMetaCodec(), chunk_size=65536)

def blob(model_id, version):
    size = (hashlib.sha256(f"{model_id}/{version}".encode()).digest()[0] + 1) * 16411
    h = hashlib.sha256(f"{model_id}/{version}".encode()).digest()
    return (h * (size // 32 + 1))[:size]

rng = random.Random(seed)
for n in range(start, start + 400):
    model_id = f"m{rng.randrange(8)}"
    if rng.random() < 0.7:
        print(f"BEGIN put {model_id} {n}", flush=True)
        store.put({"id": model_id, "version": n}, blob(model_id, n))
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
    directory = tmp_path / "store"
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
        out, _ = proc.communicate(timeout=30)
        out = first + out
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

        interrupted_writes += len(list(directory.glob(".tmp-*")))
        store: SealedModelStore[dict[str, object]] = SealedModelStore(directory, key, codec=DICT)
        loaded = {m["id"]: (m, b) for m, b in store.load_all()}
        assert not list(directory.glob(".tmp-*"))
        assert not (directory / "quarantine").exists()
        for model_id, states in allowed.items():
            if model_id in loaded:
                m, b = loaded[model_id]
                version = m["version"]
                assert isinstance(version, int)
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


def test_default_codec_is_the_plain_stores_record(tmp_path: Path) -> None:
    key = os.urandom(32)
    blob = b"onnx bytes"
    record = StoredModel("my-model", hashlib.sha256(blob).digest(), "name", len(blob))
    sealed = SealedModelStore(tmp_path / "sealed", key)
    plain = ModelStore(tmp_path / "plain")
    for s in (sealed, plain):
        s.put(record, blob)
    assert list(sealed.load_all()) == list(plain.load_all()) == [(record, blob)]
    assert list(SealedModelStore(tmp_path / "sealed", key).load_all()) == [(record, blob)]
    sealed.delete("my-model")
    assert list(sealed.load_all()) == []


def test_streamed_put_uses_bounded_memory(tmp_path: Path) -> None:
    import tracemalloc

    s = SealedModelStore(tmp_path, os.urandom(32), codec=DICT, chunk_size=1 << 19)
    part = os.urandom(1 << 19)
    tracemalloc.start()
    try:
        written = s.put_stream(meta("big"), (part for _ in range(32)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert written == 16 << 20
    assert peak < 3 << 20  # a few chunks, not the 16 MiB model
    m, blob = s.load("big")  # type: ignore[misc]
    assert m == meta("big")
    assert blob == part * 32


def test_stray_files_quarantined(store: SealedModelStore[dict[str, object]]) -> None:
    store.put(meta("m"), b"ok")
    (store.directory / "not-hex.sealed").write_bytes(b"x")
    (store.directory / ("ab" * 8 + ".sealed")).write_bytes(b"x")  # hex, but not 32 bytes
    assert list(store.load_all()) == [(meta("m"), b"ok")]
    assert len(list((store.directory / "quarantine").iterdir())) == 2


def test_undecodable_metadata_quarantined(tmp_path: Path) -> None:
    class BadCodec(DictMetaCodec):
        def encode(self, meta: object) -> bytes:  # type: ignore[override]
            return b"\xff\xff not cbor"

    key = os.urandom(32)
    SealedModelStore(tmp_path, key, codec=BadCodec()).put(meta("m"), b"x")
    s = SealedModelStore(tmp_path, key, codec=DICT)
    with pytest.raises(SealedFileError, match="metadata does not decode"):
        s.load("m")

    class ListCodec(DictMetaCodec):
        def encode(self, meta: object) -> bytes:  # type: ignore[override]
            import cbor2

            return cbor2.dumps(["not", "a", "map"])

    SealedModelStore(tmp_path, key, codec=ListCodec()).put(meta("m"), b"x")
    with pytest.raises(SealedFileError, match="not a map"):
        s.load("m")


def test_argument_checks(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        SealedModelStore(tmp_path, KEY, chunk_size=0)
    s = SealedModelStore(tmp_path, KEY, codec=DICT)
    with pytest.raises(ValueError, match="metadata of"):
        s.put(meta("m", blob=b"x" * (2 << 20)), b"")
    assert list(s.load_all()) == []
