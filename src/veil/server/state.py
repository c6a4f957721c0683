"""The server's state at rest: one sealed manifest, versioned, naming everything the server trusts.

The manifest holds every stored model (id, SHA-256, name, size, owner, visibility, allowed keys
and the version of its blob; keyed by owner and id, since an id belongs to its owner) and every
API key record (role, name, SHA-256 of the secret, creation and revocation times), under a
version that grows by one with each change. It is one sealed file (`veil.server.sealed_file`,
context ``manifest``), so a change to models and keys commits with one rename, and nothing in it
can be edited, added or removed without the key.

Files in ``<data dir>``::

    state.sealed    the manifest
    state.version   a sealed copy of the last committed version (the *witness*)
    state.lock      flock: one writer at a time (the server, or `veil keys` beside it)

A commit writes the manifest, then the witness. At start (`SealedState.current`):

- witness present, manifest older than it: an old manifest was put back: refused;
- manifest present, witness absent; or witness present, manifest absent: refused;
- manifest one version ahead of the witness: a crash between the two writes; the witness
  catches up;
- neither present: a new, empty state (version 0).

While running, the version read never goes down (a replay under a running server is refused).
What no file on the same disk can detect is a rollback of *all* of them together (manifest,
witness and blobs copied back from an earlier backup): that needs a monotonic counter outside
the disk (docs/hardening.md says what is and is not detected).

Key for ``--unsealed-store`` (no platform sealing key): `UNSEALED_STATE_KEY`, which is public:
the state is then authenticated against accidents only, like the plain model files beside it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import math
import os
import struct
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, Protocol, cast, get_args

import cbor2

from veil.errors import EvidenceUnavailableError, SealedStateError
from veil.server.sealed_file import (
    SealedFileError,
    derive_key,
    read_sealed,
    remove_temp_files,
    write_sealed,
)
from veil.server.store import StoredModel

__all__ = [
    "LEGACY_KEYS_FILENAME",
    "MANIFEST_FILENAME",
    "ROLES",
    "UNSEALED_STATE_KEY",
    "KeyRecord",
    "Manifest",
    "ModelEntry",
    "Role",
    "SealedState",
    "StateBackend",
    "open_state",
]

_log = logging.getLogger("veil.server.state")

MANIFEST_FILENAME = "state.sealed"
_WITNESS_FILENAME = "state.version"
_LOCK_FILENAME = "state.lock"
# The SQLite key database of veil before the manifest: its keys are not trusted any more.
LEGACY_KEYS_FILENAME = "keys.sqlite3"
UNSEALED_STATE_KEY = bytes(32)
_MANIFEST_CONTEXT = b"manifest"
_WITNESS_CONTEXT = b"version witness"
# 2: models keyed by owner and id (`StoredModel.key`). 1 (before ids belonged to owners) is read,
# its blobs keeping their names, and written back as 2 at the next commit.
_FORMAT = 2
_FORMATS = (1, 2)
_MAX_MANIFEST = 64 << 20

Role = Literal["admin", "owner", "user"]
ROLES: tuple[Role, ...] = get_args(Role)


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """One API key as stored: never the secret, only its SHA-256.

    Records are revoked, never removed: a key database that ever held a key keeps auth on.
    """

    key_id: str
    role: Role
    name: str | None
    secret_hash: bytes = field(repr=False)
    created_at: float
    revoked_at: float | None = None

    def to_cbor(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id,
            "role": self.role,
            "name": self.name,
            "secret_hash": self.secret_hash,
            "created_at": self.created_at,
            "revoked_at": self.revoked_at,
        }

    @classmethod
    def from_cbor(cls, value: object) -> KeyRecord:
        if not isinstance(value, dict):
            raise ValueError("key record: expected a map")
        key_id, role, name = value.get("key_id"), value.get("role"), value.get("name")
        secret_hash, created, revoked = (
            value.get("secret_hash"),
            value.get("created_at"),
            value.get("revoked_at"),
        )
        if not isinstance(key_id, str) or role not in ROLES:
            raise ValueError("key record: bad key_id or role")
        if name is not None and not isinstance(name, str):
            raise ValueError("key record: bad name")
        if not isinstance(secret_hash, bytes) or len(secret_hash) != 32:
            raise ValueError("key record: bad secret_hash")
        if not _is_time(created) or (revoked is not None and not _is_time(revoked)):
            raise ValueError("key record: bad created_at or revoked_at")
        return cls(
            key_id, role, name, secret_hash, float(cast(float, created)), _opt_float(revoked)
        )


def _is_time(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _opt_float(value: object) -> float | None:
    return None if value is None else float(value)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class ModelEntry:
    """A stored model: its metadata and the version of the blob that holds its bytes.

    `blob_name` is what its blob is sealed and named under (`veil.server.sealing`): None for the
    model's key (`StoredModel.key`); the bare model id for a blob sealed before ids belonged to
    owners (format 1), kept as it was rather than sealed again.
    """

    meta: StoredModel
    blob_version: int
    blob_name: str | None = None

    @property
    def sealed_name(self) -> str:
        return self.meta.key if self.blob_name is None else self.blob_name

    def to_cbor(self) -> dict[str, Any]:
        value: dict[str, Any] = {"meta": self.meta.to_json(), "blob_version": self.blob_version}
        if self.blob_name is not None:
            value["blob_name"] = self.blob_name
        return value

    @classmethod
    def from_cbor(cls, value: object, *, legacy: bool = False) -> ModelEntry:
        """An entry as encoded; `legacy`: one of format 1, whose blob is named by its bare id."""
        if not isinstance(value, dict):
            raise ValueError("model entry: expected a map")
        version = value.get("blob_version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ValueError("model entry: bad blob_version")
        meta = StoredModel.from_json(value.get("meta"))
        blob_name = value.get("blob_name")
        if legacy:
            if blob_name is not None:
                raise ValueError("model entry: blob_name in a format 1 manifest")
            blob_name = meta.model_id
        elif blob_name is not None and blob_name != meta.model_id:
            # Only the bare id of a migrated entry: a blob is never named after another model.
            raise ValueError(f"model entry: blob_name got {str(blob_name)[:130]!r}, expected none")
        return cls(meta, version, None if blob_name == meta.key else blob_name)


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True, slots=True)
class Manifest:
    """Everything the state vouches for, at one version (0: nothing committed yet).

    `models` is keyed by each model's key (`StoredModel.key`: owner and id), `keys` by key id.
    """

    version: int = 0
    models: Mapping[str, ModelEntry] = field(default_factory=dict)
    keys: Mapping[str, KeyRecord] = field(default_factory=dict)
    # Asked per request: found once per manifest, not by a walk over every model each time.
    _auth_on: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", _frozen(self.models))
        object.__setattr__(self, "keys", _frozen(self.keys))
        object.__setattr__(
            self,
            "_auth_on",
            bool(self.keys)
            or any(
                e.meta.visibility != "public" or e.meta.owner is not None
                for e in self.models.values()
            ),
        )

    @property
    def auth_on(self) -> bool:
        """Whether keys were ever created (records are never removed) or a model is restricted:
        then a request without a valid key is refused, whatever else is on disk."""
        return self._auth_on

    def replace(
        self,
        *,
        models: Mapping[str, ModelEntry] | None = None,
        keys: Mapping[str, KeyRecord] | None = None,
    ) -> Manifest:
        return dataclasses.replace(
            self,
            models=self.models if models is None else models,
            keys=self.keys if keys is None else keys,
        )

    def encode(self) -> bytes:
        return cbor2.dumps(
            {
                "format": _FORMAT,
                "version": self.version,
                "models": [self.models[k].to_cbor() for k in sorted(self.models)],
                "keys": [self.keys[k].to_cbor() for k in sorted(self.keys)],
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> Manifest:
        value = cbor2.loads(data)
        if not isinstance(value, dict) or value.get("format") not in _FORMATS:
            raise ValueError(f"manifest format: expected one of {_FORMATS}")
        version, models, keys = value.get("version"), value.get("models"), value.get("keys")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ValueError("manifest: bad version")
        if not isinstance(models, list) or not isinstance(keys, list):
            raise ValueError("manifest: models and keys must be lists")
        legacy = value["format"] == 1
        entries = [ModelEntry.from_cbor(m, legacy=legacy) for m in models]
        records = [KeyRecord.from_cbor(k) for k in keys]
        by_id = {e.meta.key: e for e in entries}
        by_key = {r.key_id: r for r in records}
        if len(by_id) != len(entries) or len(by_key) != len(records):
            raise ValueError("manifest: duplicate model or key id")
        if any(e.blob_version > version for e in entries):
            raise ValueError("manifest: a blob version is newer than the manifest")
        return cls(version, by_id, by_key)


class StateBackend(Protocol):
    """What the model store and the key store need of the state: `SealedState` (files in the
    data directory) or `veil.server.pgstate.PostgresState` (rows shared by replicas)."""

    @property
    def directory(self) -> Path: ...
    @property
    def blob_key(self) -> bytes: ...
    @property
    def receipt_log_key(self) -> bytes: ...
    @property
    def current_may_block(self) -> bool:
        """Whether `current` waits on a network round trip even while nothing changed: an
        event loop then calls it from a worker thread."""
        ...

    def current(self) -> Manifest: ...
    def open(self) -> Manifest: ...
    def is_new(self) -> bool: ...
    def names_blob(self, key: str, blob_version: int) -> bool: ...
    def update(self, change: Callable[[Manifest, int], Manifest]) -> Manifest: ...
    def locked(self) -> contextlib.AbstractContextManager[Manifest]: ...


class SealedState:
    """The manifest in `data_dir`, sealed under a key derived from `key`.

    `current` is cheap (one ``stat`` while nothing changed) and is called per request; `update`
    is the only way to change the state. Several processes may use one state (the server and
    `veil keys`): writers take ``state.lock``, readers see whole files (atomic renames).
    """

    def __init__(self, data_dir: Path | str, key: bytes) -> None:
        self._dir = Path(data_dir)
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._manifest_path = self._dir / MANIFEST_FILENAME  # once: `current` runs per request
        self._manifest_key = derive_key(key, b"state manifest")
        self._blob_key = derive_key(key, b"state blobs")
        self._receipt_log_key = derive_key(key, b"receipt log")
        self._lock = threading.Lock()  # writers in this process (then the flock: other processes)
        self._cache_lock = threading.Lock()
        self._cached: Manifest | None = None
        self._signature: tuple[int, int, int, bytes] | None = None
        self._seen = 0

    @property
    def current_may_block(self) -> bool:
        return False  # a local file: an open, a stat and a 24-byte read while nothing changed

    @property
    def directory(self) -> Path:
        return self._dir

    @property
    def blob_key(self) -> bytes:
        """The key model blobs are sealed with (`veil.server.sealing`)."""
        return self._blob_key

    @property
    def receipt_log_key(self) -> bytes:
        """The key the receipt log's records are authenticated with (`veil.server.receipts`)."""
        return self._receipt_log_key

    @property
    def manifest_path(self) -> Path:
        return self._manifest_path

    def _signature_now(self) -> tuple[int, int, int, bytes] | None:
        # The header's random nonce prefix changes with every write, whatever the clock's
        # granularity or the inode numbers the file system reuses.
        # Plain descriptors, no file object: this runs several times per request.
        try:
            fd = os.open(self._manifest_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            st = os.fstat(fd)
            header = os.read(fd, 24)
        finally:
            os.close(fd)
        return (st.st_ino, st.st_mtime_ns, st.st_size, header)

    def current(self) -> Manifest:
        """The committed manifest, verified. Raises `SealedStateError` when it is not intact,
        older than one seen before, or (first read in this process) out of step with its
        witness.

        Cheap while nothing changed (an open, a stat and a 24-byte read): called per request.
        """
        signature = self._signature_now()
        cached = self._cached
        if cached is not None and signature == self._signature:
            return cached
        if cached is None:
            with self._exclusive():  # the first read checks the witness: no commit in between
                return self._load()
        # Later reads skip the writers' lock, so that a request never waits for a model blob
        # being written; the versions seen in this process stand in for the witness. A commit
        # landing during the read can make it look older: it is read again once.
        found = 0
        for _ in range(2):
            signature = self._signature_now()
            manifest = self._read_manifest()
            if manifest is None:
                raise SealedStateError(
                    f"{MANIFEST_FILENAME}: missing while running (version {self._seen} was "
                    "seen): refusing to go on with no models and no keys"
                )
            with self._cache_lock:
                if manifest.version >= self._seen:
                    self._seen = manifest.version
                    self._cached, self._signature = manifest, signature
                    return manifest
            found = manifest.version
        raise SealedStateError(
            f"{MANIFEST_FILENAME}: version {found}, expected at least {self._seen} "
            "(seen before while running): rollback"
        )

    def _load(self) -> Manifest:
        signature = self._signature_now()
        manifest = self._read_manifest()
        witness = self._read_witness()
        if manifest is None:
            if witness is not None and witness > 0:
                raise SealedStateError(
                    f"{MANIFEST_FILENAME}: missing, but {_WITNESS_FILENAME} says version "
                    f"{witness} was committed: refusing to start with no models and no keys"
                )
            manifest = Manifest()
        elif witness is None:
            raise SealedStateError(
                f"{_WITNESS_FILENAME}: missing beside {MANIFEST_FILENAME} (version "
                f"{manifest.version}): the version cannot be checked"
            )
        elif manifest.version < witness:
            raise SealedStateError(
                f"{MANIFEST_FILENAME}: version {manifest.version}, but version {witness} was "
                "committed: an older manifest was put back (rollback)"
            )
        elif manifest.version > witness + 1:
            raise SealedStateError(
                f"{MANIFEST_FILENAME}: version {manifest.version}, expected {witness} or "
                f"{witness + 1} after {_WITNESS_FILENAME}"
            )
        with self._cache_lock:
            if manifest.version < self._seen:
                raise SealedStateError(
                    f"{MANIFEST_FILENAME}: version {manifest.version}, expected at least "
                    f"{self._seen} (seen before while running): rollback"
                )
            self._seen = manifest.version
            self._cached, self._signature = manifest, signature
        return manifest

    def _read_manifest(self) -> Manifest | None:
        try:
            plain = read_sealed(self.manifest_path, self._manifest_key, _MANIFEST_CONTEXT)
        except FileNotFoundError:
            return None
        except SealedFileError as exc:
            raise SealedStateError(
                f"{MANIFEST_FILENAME}: does not unseal ({exc}): tampered with, or sealed under "
                "another key (another enclave measurement, platform or data directory)"
            ) from None
        try:
            return Manifest.decode(plain)
        except (ValueError, cbor2.CBORDecodeError) as exc:
            raise SealedStateError(f"{MANIFEST_FILENAME}: {exc}") from None

    def _read_witness(self) -> int | None:
        path = self._dir / _WITNESS_FILENAME
        try:
            plain = read_sealed(path, self._manifest_key, _WITNESS_CONTEXT)
        except FileNotFoundError:
            return None
        except SealedFileError as exc:
            raise SealedStateError(f"{_WITNESS_FILENAME}: does not unseal ({exc})") from None
        if len(plain) != 8:
            raise SealedStateError(f"{_WITNESS_FILENAME}: got {len(plain)} bytes, expected 8")
        version: int = struct.unpack(">Q", plain)[0]
        return version

    def _write_witness(self, version: int) -> None:
        path = self._dir / _WITNESS_FILENAME
        write_sealed(path, self._manifest_key, _WITNESS_CONTEXT, (struct.pack(">Q", version),))

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        with self._lock:
            fd = os.open(self._dir / _LOCK_FILENAME, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # releases the flock

    @contextlib.contextmanager
    def locked(self) -> Iterator[Manifest]:
        """Hold the writers' lock (every process using this state) and yield the committed
        manifest: no commit happens until the block exits. A writer writes its blob under this
        lock before the commit that names it, so within the block a blob the manifest does not
        name is left over from a failed write or a removal, never one in flight."""
        with self._exclusive():
            yield self._load()

    def names_blob(self, key: str, blob_version: int) -> bool:
        """Whether the manifest on disk names this blob of the model of `key`; True when that
        cannot be read (after a failed commit, a caller keeps a blob in doubt: an unnamed blob is
        removed at the next start, a named one that is missing stops it)."""
        try:
            manifest = self._read_manifest()
        except (SealedStateError, OSError):
            return True
        if manifest is None:
            return False
        entry = manifest.models.get(key)
        return entry is not None and entry.blob_version == blob_version

    def is_new(self) -> bool:
        """Neither manifest nor witness exists: no state was ever opened here (or all of it is
        gone: the caller checks whether what it stores beside the state agrees)."""
        return not self.manifest_path.exists() and not (self._dir / _WITNESS_FILENAME).exists()

    def open(self) -> Manifest:
        """At start: clear interrupted writes, check the state, and create it when new.

        A new state gets its witness (version 0) at once, so that from then on a manifest
        without a witness, or a witness without a manifest, is refused.
        """
        with self._exclusive():
            if (self._dir / LEGACY_KEYS_FILENAME).exists():
                raise SealedStateError(
                    f"{LEGACY_KEYS_FILENAME}: a key database from veil before the sealed state; "
                    "its keys cannot be trusted. Create the keys again with 'veil keys create' "
                    "and remove the file"
                )
            for name in remove_temp_files(self._dir):
                _log.warning("removed interrupted write %s", name)
            manifest = self._load()
            witness = self._read_witness()
            if witness is None:
                self._write_witness(0)
            elif witness < manifest.version:
                self._write_witness(manifest.version)
            return manifest

    def update(self, change: Callable[[Manifest, int], Manifest]) -> Manifest:
        """Apply `change` and commit the result as the next version; returns it.

        `change(current, next_version)` runs under the lock with the freshest committed
        manifest; it may write files named after `next_version` first (a model's blob). If it
        raises, nothing is committed.
        """
        with self._exclusive():
            current = self._load()
            version = current.version + 1
            new = dataclasses.replace(change(current, version), version=version)
            encoded = new.encode()
            if len(encoded) > _MAX_MANIFEST:
                raise ValueError(f"manifest of {len(encoded)} bytes exceeds {_MAX_MANIFEST}")
            write_sealed(self.manifest_path, self._manifest_key, _MANIFEST_CONTEXT, (encoded,))
            try:
                self._write_witness(version)
            except OSError as exc:
                # The manifest is committed; a witness one version behind is accepted (and
                # caught up) at the next start or commit, so this commit still counts.
                _log.error("%s not written (%s): caught up later", _WITNESS_FILENAME, exc)
            signature = self._signature_now()
            with self._cache_lock:
                self._seen = max(self._seen, version)
                self._cached, self._signature = new, signature
            return new


def open_state(
    data_dir: Path,
    sealing_key: Callable[[], bytes],
    *,
    unsealed: bool = False,
    database_url: str | None = None,
    blob_dir: Path | None = None,
) -> StateBackend:
    """The state of the server whose data directory is `data_dir`, as the server opens it.

    `sealing_key` is the platform's (``provider.sealing_key``); ``veil keys`` must get the same
    key, so it runs where the server runs (simulated: the key file in `data_dir`; SGX: inside
    the same enclave). With `unsealed` (``--unsealed-store``) a platform without a sealing key
    falls back to `UNSEALED_STATE_KEY`, which protects nothing against whoever writes the disk.
    With `database_url` the state is rows in PostgreSQL (`veil.server.pgstate`) authenticated
    with the same key, its blobs in `blob_dir` (default ``<data_dir>/sealed``).

    Raises:
        EvidenceUnavailableError: no sealing key and not `unsealed`.
        SealedStateError: the database cannot be reached.
    """
    try:
        key = sealing_key()
    except EvidenceUnavailableError as exc:
        if not unsealed:
            raise EvidenceUnavailableError(
                f"no sealing key on this platform ({exc}); refusing to keep models and keys "
                "unprotected. Start with --unsealed-store to store them unencrypted (anyone "
                "reading the disk reads them, anyone writing it changes them)"
            ) from None
        key = UNSEALED_STATE_KEY
    if database_url is not None:
        # Imported here: psycopg is needed only by servers that use PostgreSQL.
        from veil.server.pgstate import PostgresState

        return PostgresState(database_url, key, blob_dir or Path(data_dir) / "sealed")
    return SealedState(data_dir, key)
