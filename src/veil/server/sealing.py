"""Sealed model storage: models at rest encrypted and authenticated with a TEE sealing key.

One file per model holds its metadata and its bytes, so writing a model has a single commit
point (a rename) and a crash at any moment leaves it either fully stored or absent:

- put: write ``.tmp-<random>`` in the same directory, fsync it, rename it over
  ``<name>.sealed``, fsync the directory. The put returns only after the directory fsync.
- delete: unlink ``<name>.sealed``, fsync the directory.
- load: temp files (an interrupted put) are removed; a file that fails authentication is logged
  by file name only and moved to ``quarantine/``; the server starts either way.

File names are ``HMAC-SHA256(name_key, model_id)`` in hex, so the directory reveals no model
ids, and a put of an existing id replaces it atomically.

Keys: from the 32-byte platform sealing key, HKDF-SHA256 derives ``aead_key`` (info
``veil sealed store v1 aead``) and ``name_key`` (info ``veil sealed store v1 names``).

File format, version 1 (integers big-endian)::

    header (24 bytes):
        magic        8   b"VEILSEAL"
        version      2   1
        flags        2   0
        chunk_size   4   plaintext bytes per chunk (all chunks but the last are full)
        nonce_prefix 8   random, fresh for every write
    chunks, each AES-256-GCM(aead_key, nonce, chunk plaintext, ad) = ciphertext || 16-byte tag:
        nonce = nonce_prefix || u32 chunk index
        ad    = header || file tag (32 bytes: the HMAC the file is named after)
                || u32 chunk index || u8 final (1 on the last chunk, else 0)

    plaintext stream = u32 meta length || meta (CBOR) || model bytes

The header in the associated data binds the chunk size and version; the file tag binds the file
to its model id (a file renamed to another id's name fails authentication, and the decrypted
meta's id must hash to the tag); the index and final flag detect reordered, dropped, duplicated
or truncated chunks, and bytes after the final chunk are refused. There is exactly one final
chunk, holding 1..chunk_size bytes (the stream is never empty: it starts with the meta length).
Chunking keeps a put's memory to one chunk however large the model; the 64-bit random nonce
prefix makes a nonce collision unlikely before ~2^32 writes under one key.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from veil.server.store import StoredModel

if TYPE_CHECKING:
    from veil.server.store import ModelStoreProtocol

import cbor2
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DictMetaCodec",
    "JsonMetaCodec",
    "MetaCodec",
    "SealedFileError",
    "SealedModelStore",
]

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 4 << 20
MAGIC = b"VEILSEAL"
VERSION = 1
_HEADER = struct.Struct(">8sHHI8s")
_TAG_LEN = 16
_SUFFIX = ".sealed"
_TMP_PREFIX = ".tmp-"
_QUARANTINE = "quarantine"
_MAX_META = 1 << 20
_MAX_CHUNK = 64 << 20

M = TypeVar("M")


class SealedFileError(Exception):
    """A sealed file is corrupt, tampered with, or sealed under another key (internal)."""


class MetaCodec(Protocol[M]):
    """How model metadata becomes bytes inside a sealed file, and which model id it names."""

    def encode(self, meta: M) -> bytes: ...

    def decode(self, data: bytes) -> M: ...

    def model_id(self, meta: M) -> str: ...


class DictMetaCodec:
    """Metadata as a CBOR map with a string ``"id"`` (plus e.g. hash, name, owner, visibility)."""

    def encode(self, meta: Mapping[str, Any]) -> bytes:
        return cbor2.dumps(dict(meta))

    def decode(self, data: bytes) -> Mapping[str, Any]:
        value = cbor2.loads(data)
        if not isinstance(value, dict) or not isinstance(value.get("id"), str):
            raise SealedFileError("metadata is not a map with a string 'id'")
        return value

    def model_id(self, meta: Mapping[str, Any]) -> str:
        model_id = meta["id"]
        if not isinstance(model_id, str):
            raise TypeError("meta['id'] must be a str")
        return model_id


class JsonMetaCodec:
    """Metadata as `StoredModel` (the plain store's record), via its ``to_json``/``from_json``."""

    def encode(self, meta: StoredModel) -> bytes:
        return cbor2.dumps(meta.to_json())

    def decode(self, data: bytes) -> StoredModel:
        return StoredModel.from_json(cbor2.loads(data))

    def model_id(self, meta: StoredModel) -> str:
        return meta.model_id


@dataclass(frozen=True, slots=True)
class _Keys:
    aead: AESGCM
    name: bytes


def _derive(key: bytes) -> _Keys:
    if not isinstance(key, bytes) or len(key) != 32:
        raise ValueError("sealing key: expected 32 bytes")

    def hkdf(info: bytes) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(key)

    return _Keys(AESGCM(hkdf(b"veil sealed store v1 aead")), hkdf(b"veil sealed store v1 names"))


def _ad(header: bytes, file_tag: bytes, index: int, final: bool) -> bytes:
    return header + file_tag + struct.pack(">IB", index, final)


def _nonce(prefix: bytes, index: int) -> bytes:
    return prefix + struct.pack(">I", index)


def _rechunk(parts: Iterable[bytes], size: int) -> Iterator[tuple[bytes, bool]]:
    """Re-cut a byte stream into `size` pieces, marking the last one (never empty-stream)."""
    buf = bytearray()
    pending: bytes | None = None
    for part in parts:
        buf += part
        while len(buf) > size:  # strictly more: the final chunk must stay non-empty
            if pending is not None:
                yield pending, False
            pending = bytes(buf[:size])
            del buf[:size]
    if buf:
        if pending is not None:
            yield pending, False
        yield bytes(buf), True
    elif pending is not None:
        yield pending, True


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SealedModelStore(Generic[M]):
    """Models and their metadata, sealed to the platform's key, in `directory`.

    Args:
        directory: where the sealed files live (created, mode 0700).
        key: 32 bytes from the platform's sealing facility (``provider.sealing_key()``).
        codec: turns metadata into bytes and names its model id; default `JsonMetaCodec`
            (`veil.server.store.StoredModel`, the plain store's record).
        chunk_size: plaintext bytes per AEAD chunk (default 4 MiB).

    Methods ``put(meta, blob)``, ``put_stream(meta, chunks)``, ``delete(model_id)`` and
    ``load_all()`` mirror the plain store's. Not safe for concurrent writers of the same id;
    the server serialises writes.
    """

    def __init__(
        self,
        directory: Path | str,
        key: bytes,
        *,
        codec: MetaCodec[M] | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        if not 0 < chunk_size <= _MAX_CHUNK:
            raise ValueError(f"chunk_size: got {chunk_size}, expected 1..{_MAX_CHUNK}")
        self._dir = Path(directory)
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._keys = _derive(key)
        self._codec: MetaCodec[M] = codec if codec is not None else JsonMetaCodec()  # type: ignore[assignment]
        self._chunk_size = chunk_size

    @property
    def directory(self) -> Path:
        return self._dir

    def _tag(self, model_id: str) -> bytes:
        return hmac.new(self._keys.name, model_id.encode("utf-8"), hashlib.sha256).digest()

    def _path(self, model_id: str) -> Path:
        return self._dir / (self._tag(model_id).hex() + _SUFFIX)

    # --- writing ------------------------------------------------------------------------------

    def put(self, meta: M, blob: bytes) -> None:
        """Store (or atomically replace) a model. Durable once this returns."""
        self.put_stream(meta, (blob,))

    def put_stream(self, meta: M, chunks: Iterable[bytes]) -> int:
        """Store a model whose bytes arrive as `chunks`, holding one chunk at a time.

        Returns the number of model bytes written. If `chunks` raises, nothing is stored.
        """
        model_id = self._codec.model_id(meta)
        meta_bytes = self._codec.encode(meta)
        if len(meta_bytes) > _MAX_META:
            raise ValueError(f"metadata of {len(meta_bytes)} bytes exceeds {_MAX_META}")
        tag = self._tag(model_id)
        header = _HEADER.pack(MAGIC, VERSION, 0, self._chunk_size, secrets.token_bytes(8))
        prefix = header[-8:]
        counted = [0]

        def stream() -> Iterator[bytes]:
            yield struct.pack(">I", len(meta_bytes)) + meta_bytes
            for c in chunks:
                counted[0] += len(c)
                yield c

        tmp = self._dir / f"{_TMP_PREFIX}{secrets.token_hex(8)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(header)
                for index, (plain, final) in enumerate(_rechunk(stream(), self._chunk_size)):
                    if index >= 1 << 32:
                        raise ValueError("model too large for the sealed format")
                    nonce = _nonce(prefix, index)
                    f.write(self._keys.aead.encrypt(nonce, plain, _ad(header, tag, index, final)))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._path(model_id))
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        _fsync_dir(self._dir)
        return counted[0]

    def delete(self, model_id: str) -> None:
        """Remove a model if present. Durable once this returns."""
        with contextlib.suppress(FileNotFoundError):
            self._path(model_id).unlink()
        _fsync_dir(self._dir)

    def __contains__(self, model_id: str) -> bool:
        return self._path(model_id).exists()

    def stored_bytes(self) -> int:
        """Bytes the sealed files take on disk (for `Limits.check_storage`)."""
        return sum(p.stat().st_size for p in self._dir.glob("*" + _SUFFIX))

    # --- reading ------------------------------------------------------------------------------

    def load_all(self) -> Iterator[tuple[M, bytes]]:
        """Every intact model as ``(meta, blob)``, in file-name order.

        Removes leftover temp files first; moves a file that fails authentication to
        ``quarantine/`` (logged by file name, never content) and goes on. A changed sealing
        key (e.g. a new enclave measurement) therefore quarantines every model rather than
        deleting it. Call it at start-up, before any put: it removes in-progress temp files.
        """
        for tmp in self._dir.glob(_TMP_PREFIX + "*"):
            log.warning("removing interrupted write %s", tmp.name)
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        for path in sorted(self._dir.glob("*" + _SUFFIX)):
            try:
                meta, blob = self._open(path)
            except (SealedFileError, OSError) as exc:
                log.error("sealed model file %s failed to unseal (%s): quarantined", path.name, exc)
                self._quarantine(path)
                continue
            yield meta, blob

    def load(self, model_id: str) -> tuple[M, bytes] | None:
        """One model, or None if absent. Raises `SealedFileError` if its file is not intact."""
        path = self._path(model_id)
        if not path.exists():
            return None
        return self._open(path)

    def _quarantine(self, path: Path) -> None:
        qdir = self._dir / _QUARANTINE
        qdir.mkdir(exist_ok=True, mode=0o700)
        with contextlib.suppress(FileNotFoundError):
            os.replace(path, qdir / f"{path.name}.{secrets.token_hex(4)}")
        _fsync_dir(self._dir)

    def _open(self, path: Path) -> tuple[M, bytes]:
        try:
            tag = bytes.fromhex(path.name[: -len(_SUFFIX)])
        except ValueError:
            raise SealedFileError("file name is not a model tag") from None
        if len(tag) != 32:
            raise SealedFileError("file name is not a model tag")
        with path.open("rb") as f:
            header = f.read(_HEADER.size)
            if len(header) != _HEADER.size:
                raise SealedFileError("truncated header")
            magic, version, flags, chunk_size, prefix = _HEADER.unpack(header)
            if magic != MAGIC or version != VERSION or flags != 0:
                raise SealedFileError(f"not a veil sealed file v{VERSION}")
            if not 0 < chunk_size <= _MAX_CHUNK:
                raise SealedFileError(f"chunk size {chunk_size} out of range")
            plain = bytearray()
            index = 0
            while True:
                ct = f.read(chunk_size + _TAG_LEN)
                if len(ct) <= _TAG_LEN:
                    raise SealedFileError("truncated: no final chunk")
                final = len(ct) < chunk_size + _TAG_LEN or f.peek(1) == b""
                try:
                    plain += self._keys.aead.decrypt(
                        _nonce(prefix, index), ct, _ad(header, tag, index, final)
                    )
                except InvalidTag:
                    raise SealedFileError(f"chunk {index} failed authentication") from None
                index += 1
                if final:
                    break
            if f.read(1):
                raise SealedFileError("data after the final chunk")
        if len(plain) < 4:
            raise SealedFileError("truncated metadata")
        (meta_len,) = struct.unpack_from(">I", plain)
        if meta_len > len(plain) - 4:
            raise SealedFileError("metadata length out of range")
        try:
            meta = self._codec.decode(bytes(plain[4 : 4 + meta_len]))
            model_id = self._codec.model_id(meta)
        except SealedFileError:
            raise
        except Exception as exc:
            raise SealedFileError(f"metadata does not decode: {type(exc).__name__}") from None
        if not hmac.compare_digest(self._tag(model_id), tag):
            raise SealedFileError("metadata names another model than the file")
        return meta, bytes(plain[4 + meta_len :])


if TYPE_CHECKING:  # the sealed store is a drop-in for the plain one

    def _conforms(s: SealedModelStore[StoredModel]) -> ModelStoreProtocol:
        return s
