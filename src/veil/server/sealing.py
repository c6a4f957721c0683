"""Sealed model storage: each model's bytes in a sealed blob that the state manifest names.

The manifest (`veil.server.state`) says which models exist and, for each, its SHA-256, size,
owner, visibility and the *blob version*: the manifest version that committed it. A model
whose upload admission optimized (`veil.server.optimize`) is stored as the optimized graph: its
entry keeps the upload's SHA-256 (the hash clients pin) and adds the graph's SHA-256 and size,
which the blob is checked against (`StoredModel.stored_hash`), so a restart serves the graph
that was served before it. The blob is
``<directory>/<tag>-<blob version>.sealed``, sealed under the state's blob key with context
``blob`` || tag || u64 blob version, where tag = HMAC-SHA256(name key, model key): the model key
is owner and id (`veil.server.store.scoped_key`; the bare id for a blob sealed before ids
belonged to owners, `ModelEntry.blob_name`). The directory reveals no model ids, and a blob
renamed to another model or version fails authentication.

- put: (under the state lock) write the blob of version v+1 → commit manifest v+1 naming it →
  remove the previous blob of that id. A crash before the commit leaves an unnamed new blob; a
  crash after it an unnamed old blob: `load_all` removes unnamed blobs, which are never served,
  under the writers' lock, so never the blob of a put in flight on another replica.
- delete: commit a manifest without the model → remove its blob.
- load_all, at start: every model the manifest names must have its blob, intact, of the right
  id, version, size and hash; otherwise the server refuses to start (`SealedStateError` names
  the model). Nothing is set aside silently: what is served is exactly what the manifest says.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import re
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from veil.errors import ConflictError, SealedStateError
from veil.server.sealed_file import (
    DEFAULT_CHUNK_SIZE,
    SealedFileError,
    derive_key,
    fsync_dir,
    read_sealed,
    remove_temp_files,
    write_sealed,
)
from veil.server.state import Manifest, ModelEntry, StateBackend
from veil.server.store import StoredModel

if TYPE_CHECKING:
    from veil.server.store import ModelStoreProtocol

__all__ = ["SealedModelStore"]

_log = logging.getLogger("veil.server.sealing")

_SUFFIX = ".sealed"
_BLOB_NAME = re.compile(r"[0-9a-f]{64}-[1-9][0-9]{0,19}\.sealed")
# A blob found missing is looked up again this often: each time another replica replaced the
# model between the lookup and the read.
_RELOOKUPS = 4


class SealedModelStore:
    """Models sealed in `directory`, named by the manifest of `state`.

    Args:
        directory: where the blobs live (created, mode 0700).
        state: the server's sealed state (its manifest names every blob).
        chunk_size: plaintext bytes per AEAD chunk (default 4 MiB).

    Not safe for concurrent writers of the same id; the server serialises writes per id, and
    the state lock serialises commits.
    """

    def __init__(
        self, directory: Path | str, state: StateBackend, *, chunk_size: int = DEFAULT_CHUNK_SIZE
    ) -> None:
        self._dir = Path(directory)
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._state = state
        self._key = state.blob_key
        self._name_key = derive_key(state.blob_key, b"blob names")
        self._chunk_size = chunk_size

    @property
    def directory(self) -> Path:
        return self._dir

    @property
    def may_block(self) -> bool:
        """Whether `find` may wait on the network (`StateBackend.current_may_block`): an event
        loop then calls it from a worker thread."""
        return self._state.current_may_block

    def _tag(self, name: str) -> bytes:
        return hmac.new(self._name_key, name.encode("utf-8"), hashlib.sha256).digest()

    def _path(self, name: str, version: int) -> Path:
        return self._dir / f"{self._tag(name).hex()}-{version}{_SUFFIX}"

    def _context(self, name: str, version: int) -> bytes:
        return b"blob" + self._tag(name) + struct.pack(">Q", version)

    # --- writing ------------------------------------------------------------------------------

    def put(self, meta: StoredModel, blob: bytes) -> None:
        """Store (or atomically replace) a model. Durable once this returns."""
        self.put_stream(meta, (blob,))

    def put_stream(
        self, meta: StoredModel, chunks: Iterable[bytes], *, exclusive: bool = False
    ) -> int:
        """Store a model whose bytes arrive as `chunks`, holding one chunk at a time.

        Returns the number of bytes written. If `chunks` raises, or the bytes do not match
        ``meta.stored_size`` and ``meta.stored_hash``, nothing is stored. With `exclusive`, a
        model of the same owner and id in the committed state is a `ConflictError` (409),
        decided in the commit itself, so two replicas uploading one id at once store one model.
        """
        model_id, key = meta.model_id, meta.key
        written: list[int] = []
        replaced: list[ModelEntry] = []

        def change(current: Manifest, version: int) -> Manifest:
            if exclusive and key in current.models:
                raise ConflictError(409, f"model id {model_id!r} is already taken")
            path = self._path(key, version)
            digest = hashlib.sha256()

            def hashing() -> Iterator[bytes]:
                for c in chunks:
                    digest.update(c)
                    yield c

            written.append(version)
            size = write_sealed(
                path,
                self._key,
                self._context(key, version),
                hashing(),
                chunk_size=self._chunk_size,
            )
            if size != meta.stored_size or digest.digest() != meta.stored_hash:
                raise ValueError(f"model {model_id!r}: bytes differ from its size or hash")
            old = current.models.get(key)
            if old is not None:
                replaced.append(old)
            return current.replace(models={**current.models, key: ModelEntry(meta, version)})

        try:
            self._state.update(change)
        except BaseException:
            # Remove the new blob unless the manifest names it (the commit's rename happened
            # before the failure, e.g. in the directory fsync): then the blob is the model.
            for version in written:
                if not self._state.names_blob(key, version):
                    with contextlib.suppress(FileNotFoundError):
                        self._path(key, version).unlink()
            raise
        for entry in replaced:
            self._remove(self._path(entry.sealed_name, entry.blob_version))
        return meta.stored_size

    def delete(self, key: str) -> None:
        """Remove the model of `key` (`StoredModel.key`) if present. Durable once this returns."""
        removed: list[ModelEntry] = []

        def change(current: Manifest, version: int) -> Manifest:
            entry = current.models.get(key)
            if entry is not None:
                removed.append(entry)
            return current.replace(models={k: v for k, v in current.models.items() if k != key})

        if key not in self._state.current().models:
            return
        self._state.update(change)
        for entry in removed:
            self._remove(self._path(entry.sealed_name, entry.blob_version))

    def _remove(self, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        fsync_dir(self._dir)

    def __contains__(self, key: str) -> bool:
        return key in self._state.current().models

    # --- reading ------------------------------------------------------------------------------

    def load_all(self) -> Iterator[tuple[StoredModel, bytes]]:
        """Every model the manifest names, as ``(meta, blob)``, in id order. Call at start: it
        opens the state (`SealedState.open`).

        First checks the directory against the manifest, under the writers' lock
        (`SealedState.locked`), so that a replica sharing the directory is never between
        writing a blob and committing it: interrupted writes and blobs the manifest does not
        name (a failed put or delete, or a file put back) are removed; a file that is not a
        blob at all is refused. Raises `SealedStateError` naming the model whose blob is
        missing, does not unseal, or differs from the manifest's size or hash. A model another
        replica replaces or deletes meanwhile is read as the state then names it.
        """
        blob_files = [p.name for p in self._dir.iterdir() if _BLOB_NAME.fullmatch(p.name)]
        if self._state.is_new() and blob_files:
            raise SealedStateError(
                f"{self._dir.name}/: {len(blob_files)} model blob(s) but no state (the manifest "
                "and its witness are missing): refusing to start with no models and no keys"
            )
        self._state.open()
        with self._state.locked() as manifest:
            self._remove_unnamed(manifest)
        for key in sorted(manifest.models):
            found = self.load_latest(manifest.models[key])
            if found is not None:
                yield found

    def _remove_unnamed(self, manifest: Manifest) -> None:
        for name in remove_temp_files(self._dir):
            _log.warning("removed interrupted write %s", name)
        named = {self._path(e.sealed_name, e.blob_version).name for e in manifest.models.values()}
        for path in sorted(self._dir.iterdir()):
            if path.name in named:
                continue
            if not _BLOB_NAME.fullmatch(path.name):
                raise SealedStateError(
                    f"{path.name}: not a model blob of this veil version in {self._dir.name}/ "
                    "(files from veil before the sealed manifest cannot be checked for rollback: "
                    "move them away and upload the models again)"
                )
            _log.warning(
                "removed sealed file %s: the manifest does not name it (an interrupted write, "
                "or an old file put back)",
                path.name,
            )
            self._remove(path)

    def find(self, model_id: str | None, model_hash: bytes | None) -> list[ModelEntry]:
        """The committed entries of the models with this id (of every owner; the one of a
        qualified ``owner/id``), else with this SHA-256, in key order: what a replica loads on
        first use of a model another replica stored."""
        models = self._state.current().models
        if model_id and "/" in model_id:
            return [models[model_id]] if model_id in models else []
        if model_id:
            return [models[k] for k in sorted(models) if models[k].meta.model_id == model_id]
        if model_hash is not None:
            return [models[k] for k in sorted(models) if models[k].meta.model_hash == model_hash]
        return []

    def load_latest(self, entry: ModelEntry) -> tuple[StoredModel, bytes] | None:
        """`entry`'s model and bytes, unsealed and checked against its size and hash, as the
        state names it now: a blob missing because another replica
        replaced the model (or deleted it: None) since `entry` was read is looked up again; one
        missing while the state still names it, or one that does not unseal or differs, is a
        `SealedStateError`."""
        for _ in range(_RELOOKUPS):
            blob = self._read(entry)
            if blob is not None:
                return entry.meta, blob
            key = entry.meta.key
            if self._state.names_blob(key, entry.blob_version):
                raise self._missing(entry)
            latest = self._state.current().models.get(key)
            if latest is None:
                return None
            entry = latest
        raise self._missing(entry)

    @staticmethod
    def _missing(entry: ModelEntry) -> SealedStateError:
        return SealedStateError(
            f"model {entry.meta.model_id!r}: its blob (version {entry.blob_version}) is missing"
        )

    def _read(self, entry: ModelEntry) -> bytes | None:
        """`load`, None when the blob file does not exist."""
        meta, version = entry.meta, entry.blob_version
        path = self._path(entry.sealed_name, version)
        try:
            blob = read_sealed(path, self._key, self._context(entry.sealed_name, version))
        except FileNotFoundError:
            return None
        except SealedFileError as exc:
            raise SealedStateError(
                f"model {meta.model_id!r}: its blob (version {version}) does not unseal: {exc}"
            ) from None
        if len(blob) != meta.stored_size or hashlib.sha256(blob).digest() != meta.stored_hash:
            raise SealedStateError(
                f"model {meta.model_id!r}: blob of {len(blob)} bytes does not match the "
                f"manifest ({meta.stored_size} bytes, sha256 {meta.stored_hash.hex()[:16]}…)"
            )
        return blob


if TYPE_CHECKING:  # the sealed store is a drop-in for the plain one

    def _conforms(s: SealedModelStore) -> ModelStoreProtocol:
        return s
