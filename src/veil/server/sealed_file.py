"""The sealed-file format: bytes encrypted and authenticated under a key from the TEE.

Every file veil keeps sealed (the state manifest, its version witness, each model blob) is
written by `write_sealed` and read by `read_sealed`, bound to a *context*: bytes naming what the
file is (``manifest``; ``blob`` + model tag + blob version). A file copied over another one's
name, or put back from another version, fails authentication because its context differs.

Writes are atomic: ``.tmp-<random>`` in the same directory, fsync, rename over the target, fsync
the directory; a crash leaves the old file or the new one, plus at most a temp file that
`remove_temp_files` clears at start.

Format, version 2 (integers big-endian)::

    header (24 bytes):
        magic        8   b"VEILSEAL"
        version      2   2
        flags        2   0
        chunk_size   4   plaintext bytes per chunk (all chunks but the last are full)
        nonce_prefix 8   random, fresh for every write
    chunks, each AES-256-GCM(key, nonce, chunk plaintext, ad) = ciphertext || 16-byte tag:
        nonce = nonce_prefix || u32 chunk index
        ad    = header || u16 context length || context || u32 chunk index
                || u8 final (1 on the last chunk, else 0)

The index and final flag detect reordered, dropped, duplicated or truncated chunks; bytes after
the final chunk are refused. There is exactly one final chunk of 1..chunk_size bytes (an empty
plaintext is one final chunk of 0 bytes). Chunking keeps a write's memory to one chunk however
large the model; the 64-bit random nonce prefix makes a nonce collision unlikely before ~2^32
writes under one key. Version 1 files (veil before the manifest) are refused by version.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "SealedFileError",
    "derive_key",
    "fsync_dir",
    "read_sealed",
    "remove_temp_files",
    "write_sealed",
]

DEFAULT_CHUNK_SIZE = 4 << 20
MAGIC = b"VEILSEAL"
VERSION = 2
TMP_PREFIX = ".tmp-"
_HEADER = struct.Struct(">8sHHI8s")
_TAG_LEN = 16
_MAX_CHUNK = 64 << 20
_MAX_CONTEXT = 1024


class SealedFileError(Exception):
    """A sealed file is corrupt, tampered with, from another context, or under another key."""


def derive_key(key: bytes, purpose: bytes) -> bytes:
    """A 32-byte key for one `purpose` from the 32-byte platform sealing key (HKDF-SHA256)."""
    if not isinstance(key, bytes) or len(key) != 32:
        raise ValueError("sealing key: expected 32 bytes")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"veil v2 " + purpose)
    return hkdf.derive(key)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_temp_files(directory: Path) -> list[str]:
    """Remove interrupted writes in `directory`; returns their names (for the log)."""
    removed = []
    for tmp in directory.glob(TMP_PREFIX + "*"):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        removed.append(tmp.name)
    return removed


def _ad(header: bytes, context: bytes, index: int, final: bool) -> bytes:
    return header + struct.pack(">H", len(context)) + context + struct.pack(">IB", index, final)


def _nonce(prefix: bytes, index: int) -> bytes:
    return prefix + struct.pack(">I", index)


def _rechunk(parts: Iterable[bytes], size: int) -> Iterator[tuple[bytes, bool]]:
    """Re-cut a byte stream into `size` pieces, marking the last one (never zero pieces)."""
    buf = bytearray()
    pending: bytes | None = None
    for part in parts:
        buf += part
        while len(buf) > size:  # strictly more: the final chunk must stay non-empty
            if pending is not None:
                yield pending, False
            pending = bytes(buf[:size])
            del buf[:size]
    if pending is not None:
        yield pending, not buf
    if buf or pending is None:
        yield bytes(buf), True


def write_sealed(
    path: Path,
    key: bytes,
    context: bytes,
    chunks: Iterable[bytes],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> int:
    """Seal `chunks` into `path` atomically (durable on return); returns the plaintext size.

    If `chunks` raises, nothing is written and the exception propagates.
    """
    if not 0 < chunk_size <= _MAX_CHUNK:
        raise ValueError(f"chunk_size: got {chunk_size}, expected 1..{_MAX_CHUNK}")
    if len(context) > _MAX_CONTEXT:
        raise ValueError(f"context: got {len(context)} bytes, expected at most {_MAX_CONTEXT}")
    aead = AESGCM(key)
    header = _HEADER.pack(MAGIC, VERSION, 0, chunk_size, secrets.token_bytes(8))
    prefix = header[-8:]
    counted = [0]

    def counting() -> Iterator[bytes]:
        for c in chunks:
            counted[0] += len(c)
            yield c

    tmp = path.parent / f"{TMP_PREFIX}{secrets.token_hex(8)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header)
            for index, (plain, final) in enumerate(_rechunk(counting(), chunk_size)):
                if index >= 1 << 32:
                    raise ValueError("too large for the sealed format")
                ad = _ad(header, context, index, final)
                f.write(aead.encrypt(_nonce(prefix, index), plain, ad))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)
    return counted[0]


def read_sealed(path: Path, key: bytes, context: bytes) -> bytes:
    """The plaintext of `path`. Raises `SealedFileError` unless it is intact and for `context`,
    and `FileNotFoundError` when it is absent."""
    aead = AESGCM(key)
    with path.open("rb") as f:
        header = f.read(_HEADER.size)
        if len(header) != _HEADER.size:
            raise SealedFileError("truncated header")
        magic, version, flags, chunk_size, prefix = _HEADER.unpack(header)
        if magic != MAGIC:
            raise SealedFileError("not a veil sealed file")
        if version != VERSION or flags != 0:
            raise SealedFileError(f"format version: got {version}, expected {VERSION}")
        if not 0 < chunk_size <= _MAX_CHUNK:
            raise SealedFileError(f"chunk size: got {chunk_size}, expected 1..{_MAX_CHUNK}")
        plain = bytearray()
        index = 0
        while True:
            ct = f.read(chunk_size + _TAG_LEN)
            if len(ct) < _TAG_LEN:
                raise SealedFileError("truncated: no final chunk")
            final = len(ct) < chunk_size + _TAG_LEN or f.peek(1) == b""
            try:
                plain += aead.decrypt(_nonce(prefix, index), ct, _ad(header, context, index, final))
            except InvalidTag:
                raise SealedFileError(f"chunk {index} failed authentication") from None
            index += 1
            if final:
                break
        if f.read(1):
            raise SealedFileError("data after the final chunk")
    return bytes(plain)
