"""The sealed-file format: round trips, and every mutation refused with `SealedFileError`."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from veil.server.sealed_file import (
    SealedFileError,
    derive_key,
    read_sealed,
    remove_temp_files,
    write_sealed,
)

KEY = derive_key(bytes(range(32)), b"test")
CTX = b"blob test context"
HEADER = 24


def seal(path: Path, data: bytes, *, chunk_size: int = 64, context: bytes = CTX) -> Path:
    write_sealed(path, KEY, context, (data,), chunk_size=chunk_size)
    return path


@pytest.mark.parametrize("size", [0, 1, 63, 64, 65, 128, 1000])
def test_round_trip_sizes(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    path = seal(tmp_path / "f", data)
    assert read_sealed(path, KEY, CTX) == data
    chunks = max(1, -(-size // 64))
    assert path.stat().st_size == HEADER + size + 16 * chunks
    assert path.stat().st_mode & 0o077 == 0


def test_streamed_write_counts_and_fresh_nonces(tmp_path: Path) -> None:
    parts = [os.urandom(n) for n in (10, 200, 3, 77)]
    assert write_sealed(tmp_path / "a", KEY, CTX, iter(parts), chunk_size=64) == 290
    assert read_sealed(tmp_path / "a", KEY, CTX) == b"".join(parts)
    seal(tmp_path / "b", b"same")
    seal(tmp_path / "c", b"same")
    assert (tmp_path / "b").read_bytes() != (tmp_path / "c").read_bytes()


def test_other_context_or_key_refused(tmp_path: Path) -> None:
    path = seal(tmp_path / "f", b"data")
    with pytest.raises(SealedFileError, match="chunk 0 failed authentication"):
        read_sealed(path, KEY, CTX + b"x")
    with pytest.raises(SealedFileError, match="chunk 0 failed authentication"):
        read_sealed(path, derive_key(bytes(32), b"test"), CTX)


def _flip(data: bytes, at: int) -> bytes:
    mutated = bytearray(data)
    mutated[at] ^= 1
    return bytes(mutated)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b[:10], "truncated header"),
        (lambda b: b"NOTSEAL!" + b[8:], "not a veil sealed file"),
        (lambda b: b[:8] + struct.pack(">H", 1) + b[10:], "format version: got 1, expected 2"),
        (lambda b: b[:10] + b"\0\1" + b[12:], "format version"),
        (lambda b: b[:12] + struct.pack(">I", 0) + b[16:], "chunk size: got 0"),
        (lambda b: b[:12] + struct.pack(">I", 32) + b[16:], "failed authentication"),
        (lambda b: _flip(b, 20), "chunk 0 failed authentication"),  # nonce prefix
        (lambda b: _flip(b, HEADER + 3), "chunk 0 failed authentication"),
        (lambda b: _flip(b, len(b) - 1), "chunk 2 failed authentication"),
        (lambda b: b[: HEADER + 80], "chunk 0 failed authentication"),  # final flag wrong
        (lambda b: b[:HEADER], "truncated: no final chunk"),
        (lambda b: b[: HEADER + 8], "truncated: no final chunk"),
        (lambda b: b[: -(16 + 10)], "chunk 1 failed authentication"),  # last chunk dropped
        (lambda b: b + b"\0", "chunk 2 failed authentication"),
        # chunks 0 and 1 swapped
        (
            lambda b: (
                b[:HEADER]
                + b[HEADER + 80 : HEADER + 160]
                + b[HEADER : HEADER + 80]
                + b[HEADER + 160 :]
            ),
            "chunk 0",
        ),
    ],
)
def test_mutations_refused(tmp_path: Path, mutate: object, message: str) -> None:
    path = seal(tmp_path / "f", os.urandom(64 * 2 + 10))
    path.write_bytes(mutate(path.read_bytes()))  # type: ignore[operator]
    with pytest.raises(SealedFileError, match=message):
        read_sealed(path, KEY, CTX)


def test_data_after_final_chunk_refused(tmp_path: Path) -> None:
    # A full-size final chunk followed by more bytes: authenticated as non-final, then refused.
    path = seal(tmp_path / "f", os.urandom(64))
    data = path.read_bytes()
    path.write_bytes(data + data[HEADER:])
    with pytest.raises(SealedFileError, match="chunk 0 failed authentication"):
        read_sealed(path, KEY, CTX)


def test_failed_stream_leaves_old_file_and_no_temp(tmp_path: Path) -> None:
    path = seal(tmp_path / "f", b"old")

    def chunks() -> Iterator[bytes]:
        yield b"new"
        raise ConnectionError("client went away")

    with pytest.raises(ConnectionError):
        write_sealed(path, KEY, CTX, chunks())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]
    assert read_sealed(path, KEY, CTX) == b"old"


def test_remove_temp_files(tmp_path: Path) -> None:
    (tmp_path / ".tmp-abc").write_bytes(b"partial")
    seal(tmp_path / "kept", b"x")
    assert remove_temp_files(tmp_path) == [".tmp-abc"]
    assert [p.name for p in tmp_path.iterdir()] == ["kept"]


def test_argument_checks(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="expected 32 bytes"):
        derive_key(b"short", b"x")
    with pytest.raises(ValueError, match="chunk_size"):
        write_sealed(tmp_path / "f", KEY, CTX, (b"",), chunk_size=0)
    with pytest.raises(ValueError, match="context"):
        write_sealed(tmp_path / "f", KEY, b"x" * 2000, (b"",))
    with pytest.raises(FileNotFoundError):
        read_sealed(tmp_path / "absent", KEY, CTX)
