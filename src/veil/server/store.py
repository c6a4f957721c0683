"""Models kept in the data directory, so a restart serves the same ids and hashes.

A model id belongs to its owner: two keys may each upload a model "m", and neither learns that
the other did. Where models are kept they are named by their *key* (`scoped_key`: owner and id).

Each model is two files named after SHA-256 of its key (ids are user-chosen; names on disk must
not be): ``<key>.onnx`` (the blob) and ``<key>.json`` (its metadata). Both are written to a
temporary file, fsynced and renamed; the metadata goes last, so a crash leaves either nothing
or an orphan blob, which `load_all` removes.

Several servers may share the directory. Each change holds ``.store.lock`` shared (writers do
not wait for one another) and `load_all` clears leftovers holding it exclusive, so a starting
server never takes another's blob, written but not yet described, for a crash's orphan.

`ModelStore` keeps plain bytes. Encryption at rest is a separate store with the same interface,
injected into the app in its place.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

from veil.errors import ConflictError

__all__ = ["ModelStore", "ModelStoreProtocol", "StoredModel", "scoped_key"]

_log = logging.getLogger("veil.server.store")
_TMP_PREFIX = ".tmp-"
_LOCK_FILENAME = ".store.lock"


_VISIBILITIES = ("public", "restricted")
_OPTIMIZATIONS = ("graph", "int8")


def scoped_key(owner: str | None, model_id: str) -> str:
    """Where a model is kept: ``<owner>/<model id>``, or the bare id for a model without an
    owner (uploaded with authentication off).

    Unambiguous: an id never holds a ``/`` and a key id never does either. It is also the
    *qualified* form a caller may name a model by when several it may use share an id.
    """
    return model_id if owner is None else f"{owner}/{model_id}"


@dataclass(frozen=True, slots=True)
class StoredModel:
    """What the store remembers about a model beside its bytes.

    Attributes:
        model_id: the id clients use.
        model_hash: SHA-256 of the ONNX bytes.
        model_name: the label the uploader gave.
        size: the ONNX byte count.
        owner: key id of the API key that uploaded it; None when uploaded with auth off.
        visibility: ``public`` (any valid key may predict) or ``restricted`` (only the owner
            and `allowed_keys`).
        allowed_keys: key ids that may predict a restricted model, besides its owner.
        created_at: when it was uploaded (seconds since the epoch); None for records written
            before uploads were dated.
        optimization: the optimization admission kept (``graph`` or ``int8``), None when the
            upload itself is stored and served.
        graph_hash: SHA-256 of the stored graph when it is an optimized one (`optimization`),
            else None: `model_hash` stays the hash of what the uploader sent (the one clients
            pin); the stored bytes are checked against `stored_hash` / `stored_size`.
        graph_size: the stored optimized graph's byte count, with `graph_hash`.

    Records written before owners existed read back as owner None, public: that is how such
    models were served.
    """

    model_id: str
    model_hash: bytes
    model_name: str
    size: int
    owner: str | None = None
    visibility: str = "public"
    allowed_keys: tuple[str, ...] = ()
    created_at: float | None = None
    optimization: str | None = None
    graph_hash: bytes | None = None
    graph_size: int | None = None

    def __post_init__(self) -> None:
        if self.visibility not in _VISIBILITIES:
            raise ValueError(f"visibility: got {self.visibility!r}, expected public or restricted")
        optimized = (self.optimization, self.graph_hash, self.graph_size)
        if any(v is not None for v in optimized) and (
            self.optimization not in _OPTIMIZATIONS
            or not isinstance(self.graph_hash, bytes)
            or len(self.graph_hash) != 32
            or not isinstance(self.graph_size, int)
            or isinstance(self.graph_size, bool)
            or self.graph_size < 0
        ):
            raise ValueError(
                "optimized graph: expected optimization graph or int8 with a 32-byte graph_hash "
                "and a graph_size, or none of them"
            )

    @property
    def stored_hash(self) -> bytes:
        """SHA-256 of the stored bytes: the optimized graph's, else the upload's."""
        return self.graph_hash if self.graph_hash is not None else self.model_hash

    @property
    def stored_size(self) -> int:
        """Byte count of the stored bytes: the optimized graph's, else the upload's."""
        return self.graph_size if self.graph_size is not None else self.size

    @property
    def key(self) -> str:
        """The model's key where models are kept (`scoped_key`): unique, unlike the id."""
        return scoped_key(self.owner, self.model_id)

    def to_json(self) -> dict[str, object]:
        value: dict[str, object] = {
            "model_id": self.model_id,
            "model_hash": self.model_hash.hex(),
            "model_name": self.model_name,
            "size": self.size,
            "owner": self.owner,
            "visibility": self.visibility,
            "allowed_keys": list(self.allowed_keys),
            "created_at": self.created_at,
        }
        if self.graph_hash is not None:  # records of unoptimized models stay as they were
            value["optimization"] = self.optimization
            value["graph_hash"] = self.graph_hash.hex()
            value["graph_size"] = self.graph_size
        return value

    @classmethod
    def from_json(cls, value: object) -> StoredModel:
        if not isinstance(value, dict):
            raise ValueError("metadata is not an object")
        model_id, model_hash = value.get("model_id"), value.get("model_hash")
        model_name, size = value.get("model_name", ""), value.get("size")
        if not isinstance(model_id, str) or not isinstance(model_hash, str):
            raise ValueError("metadata lacks model_id or model_hash")
        if not isinstance(model_name, str) or not isinstance(size, int):
            raise ValueError("metadata has a bad model_name or size")
        owner, visibility = value.get("owner"), value.get("visibility", "public")
        allowed = value.get("allowed_keys", [])
        if owner is not None and not isinstance(owner, str):
            raise ValueError("metadata has a bad owner")
        if not isinstance(visibility, str):
            raise ValueError("metadata has a bad visibility")
        if not isinstance(allowed, list) or not all(isinstance(k, str) for k in allowed):
            raise ValueError("metadata has bad allowed_keys")
        created = value.get("created_at")
        if created is not None and (
            isinstance(created, bool) or not isinstance(created, int | float)
        ):
            raise ValueError("metadata has a bad created_at")
        optimization, graph_hash = value.get("optimization"), value.get("graph_hash")
        graph_size = value.get("graph_size")
        if graph_hash is not None and (
            not isinstance(graph_hash, str) or not re.fullmatch(r"[0-9a-f]{64}", graph_hash)
        ):
            raise ValueError("metadata has a bad graph_hash")
        return cls(
            model_id,
            bytes.fromhex(model_hash),
            model_name,
            size,
            owner,
            visibility,
            tuple(allowed),
            None if created is None else float(created),
            # Checked by __post_init__: all three or none, each of its type.
            cast(Any, optimization),
            None if graph_hash is None else bytes.fromhex(graph_hash),
            cast(Any, graph_size),
        )


class ModelStoreProtocol(Protocol):
    """The interface the app needs from a store (plain or sealed)."""

    def put(self, meta: StoredModel, blob: bytes) -> None: ...

    def put_stream(
        self, meta: StoredModel, chunks: Iterable[bytes], *, exclusive: bool = False
    ) -> int: ...

    def delete(self, key: str) -> None: ...

    def load_all(self) -> Iterator[tuple[StoredModel, bytes]]: ...


def _key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ModelStore:
    """Plain model files under ``root`` (created if missing, mode 0700)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True, mode=0o700)

    @contextlib.contextmanager
    def _locked(self, operation: int) -> Iterator[None]:
        """Hold the directory's lock (``fcntl.LOCK_SH``: a change; ``LOCK_EX``: clearing
        leftovers), across processes and threads (each holder has its own descriptor)."""
        fd = os.open(self.root / _LOCK_FILENAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, operation)
            yield
        finally:
            os.close(fd)  # releases the flock

    def _write_atomic(self, target: Path, data: Iterable[bytes]) -> int:
        fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=self.root)
        written = 0
        try:
            with os.fdopen(fd, "wb") as handle:
                for chunk in data:
                    written += handle.write(chunk)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return written

    def put(self, meta: StoredModel, blob: bytes) -> None:
        """Store a model durably: blob first, then its metadata."""
        self.put_stream(meta, (blob,))

    def put_stream(
        self, meta: StoredModel, chunks: Iterable[bytes], *, exclusive: bool = False
    ) -> int:
        """Like `put`, the blob arriving as `chunks`; returns the blob's byte count. With
        `exclusive`, a stored model of that key (owner and id) is a `ConflictError` (409)."""
        key = _key(meta.key)
        with self._locked(fcntl.LOCK_SH):
            if exclusive and (self.root / f"{key}.json").exists():
                raise ConflictError(409, f"model id {meta.model_id!r} is already taken")
            written = self._write_atomic(self.root / f"{key}.onnx", chunks)
            self._write_atomic(
                self.root / f"{key}.json", (json.dumps(meta.to_json(), sort_keys=True).encode(),)
            )
            _fsync_dir(self.root)
        return written

    def delete(self, key: str) -> None:
        """Forget the model of `key` (`StoredModel.key`): metadata first, so a crash leaves only
        an orphan blob."""
        name = _key(key)
        with self._locked(fcntl.LOCK_SH):
            for suffix in (".json", ".onnx"):
                with contextlib.suppress(FileNotFoundError):
                    (self.root / f"{name}{suffix}").unlink()
            _fsync_dir(self.root)

    def load_all(self) -> Iterator[tuple[StoredModel, bytes]]:
        """Every stored model; first removes temporary files and blobs without metadata, while
        no change is under way (in this process or another sharing the directory)."""
        with self._locked(fcntl.LOCK_EX):
            for path in sorted(self.root.iterdir()):
                if path.name.startswith(_TMP_PREFIX):
                    path.unlink(missing_ok=True)
            for path in sorted(self.root.glob("*.onnx")):
                if not path.with_suffix(".json").exists():
                    path.unlink(missing_ok=True)
        for path in sorted(self.root.glob("*.json")):
            blob_path = path.with_suffix(".onnx")
            try:
                meta = StoredModel.from_json(json.loads(path.read_bytes()))
                blob = blob_path.read_bytes()
            except (OSError, ValueError) as exc:
                _log.warning("skipping stored model %s: %s", path.name, type(exc).__name__)
                continue
            if path.stem == _key(meta.model_id) != _key(meta.key):
                # Named by its bare id, before ids belonged to owners: renamed to its key.
                path, blob_path = self._rename_legacy(meta, path, blob_path)
            digest = hashlib.sha256(blob).digest()
            if _key(meta.key) != path.stem or digest != meta.stored_hash:
                _log.warning("skipping stored model %s: contents do not match", path.name)
                continue
            yield meta, blob

    def _rename_legacy(self, meta: StoredModel, path: Path, blob_path: Path) -> tuple[Path, Path]:
        target = self.root / _key(meta.key)
        # Exclusive: no put of another process is between its blob and its metadata. A second
        # name for the blob, then the metadata moved, then the old name dropped: a crash at any
        # point leaves one whole model plus an orphan blob, which the start removes.
        with self._locked(fcntl.LOCK_EX):
            if target.with_suffix(".json").exists():
                return path, blob_path  # taken: left alone (skipped as not matching)
            target.with_suffix(".onnx").unlink(missing_ok=True)  # an orphan: nothing names it
            os.link(blob_path, target.with_suffix(".onnx"))
            os.replace(path, target.with_suffix(".json"))
            blob_path.unlink()
            _fsync_dir(self.root)
        return target.with_suffix(".json"), target.with_suffix(".onnx")
