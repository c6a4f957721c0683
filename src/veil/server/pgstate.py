"""The server's state in PostgreSQL, for replicas that share it (``--database-url``).

The same `Manifest` as `veil.server.state.SealedState` (models, owners, visibility, API key
records, one version), kept as rows that every replica reads and writes. PostgreSQL is outside
every TEE, so it is trusted with nothing: each row carries an HMAC under a key derived from the
cluster (or platform) key, and one head row binds the version to a digest of every row's MAC::

    veil_rows(kind, id, body, mac)     kind 'model' or 'key'; id the model's key (owner and
                                       id, `StoredModel.key`) or the key id; body the entry's CBOR;
                                       mac = HMAC(row key, ["veil row", kind, id, body])
    veil_head(id = 1, version, digest, mac)
                                       digest = SHA-256 of the sorted (kind, id, mac) of all rows;
                                       mac = HMAC(head key, ["veil head", version, digest])

What an operator who writes the database can do, and what a replica does about it:

- edit a row, or move a body to another id: its MAC fails: refused;
- put back an older copy of a row, delete a row or add one: the digest no longer matches the
  head: refused;
- put back an older head (with or without all the rows of its time): refused by a replica that
  saw a later version while running; a replica starting fresh accepts a complete, consistent
  older state, as a full-disk rollback of the single-node files is accepted (docs/hardening.md).

Writers serialize on a transaction-scoped advisory lock, so a commit is atomic across replicas
and versions grow by one cluster-wide; readers read rows and head in one snapshot.
Model blobs stay files (`veil.server.sealing`) in `blob_dir`, which replicas share; they are
sealed with `blob_key`, bound to model id and version, exactly as for `SealedState`.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import cast

import cbor2
import psycopg

from veil.errors import SealedStateError
from veil.server.sealed_file import derive_key
from veil.server.state import KeyRecord, Manifest, ModelEntry

__all__ = ["PostgresState"]

# Any constant both sides agree on; "veil" in ASCII.
_LOCK_ID = 0x7665696C
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS veil_rows (kind text NOT NULL, id text NOT NULL, "
    "body bytea NOT NULL, mac bytea NOT NULL, PRIMARY KEY (kind, id))",
    "CREATE TABLE IF NOT EXISTS veil_head (id integer PRIMARY KEY CHECK (id = 1), "
    "version bigint NOT NULL, digest bytea NOT NULL, mac bytea NOT NULL)",
)
_Row = tuple[str, str, bytes, bytes]


def _rows_of(manifest: Manifest) -> dict[tuple[str, str], bytes]:
    rows = {("model", i): cbor2.dumps(e.to_cbor()) for i, e in manifest.models.items()}
    rows.update({("key", i): cbor2.dumps(r.to_cbor()) for i, r in manifest.keys.items()})
    return rows


def _digest(macs: Iterable[tuple[str, str, bytes]]) -> bytes:
    return hashlib.sha256(cbor2.dumps(sorted(macs))).digest()


class PostgresState:
    """The manifest in the PostgreSQL database at `url`, authenticated under `key`.

    Has `SealedState`'s interface (`current`, `open`, `update`, `locked`, `is_new`, `names_blob`,
    `blob_key`, `directory`), so `SealedModelStore` and `KeyStore` use either.
    """

    def __init__(self, url: str, key: bytes, blob_dir: Path | str) -> None:
        self._dir = Path(blob_dir)
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._row_key = derive_key(key, b"state rows")
        self._head_key = derive_key(key, b"state head")
        self._blob_key = derive_key(key, b"state blobs")
        # Each replica keeps its own receipt log in its data directory, under the same key.
        self._receipt_log_key = derive_key(key, b"receipt log")
        self._lock = threading.Lock()
        self._cached: Manifest | None = None
        self._cached_mac: bytes | None = None
        self._seen = 0
        try:
            self._reader = psycopg.connect(url, autocommit=False)
            self._reader.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            self._writer = psycopg.connect(url, autocommit=False)
        except psycopg.Error as exc:
            with contextlib.suppress(AttributeError):
                self._reader.close()
            raise SealedStateError(f"database: cannot connect ({type(exc).__name__})") from None
        with self._lock, self._writer.transaction():
            self._writer.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_ID,))
            for statement in _SCHEMA:
                self._writer.execute(statement)

    def close(self) -> None:
        self._reader.close()
        self._writer.close()

    def __enter__(self) -> PostgresState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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

    # --- authentication -----------------------------------------------------------------------

    def _row_mac(self, kind: str, row_id: str, body: bytes) -> bytes:
        message = cbor2.dumps(["veil row", kind, row_id, body])
        return hmac.new(self._row_key, message, hashlib.sha256).digest()

    def _head_mac(self, version: int, digest: bytes) -> bytes:
        message = cbor2.dumps(["veil head", version, digest])
        return hmac.new(self._head_key, message, hashlib.sha256).digest()

    def _verify(self, head: tuple[int, bytes, bytes] | None, rows: list[_Row]) -> Manifest:
        """Rows and head as read in one snapshot → the manifest they authenticate, or refused."""
        if head is None:
            if rows:
                raise SealedStateError(
                    f"database: {len(rows)} row(s) but no head row: the version cannot be checked"
                )
            return Manifest()
        version, digest, mac = head
        if not hmac.compare_digest(mac, self._head_mac(version, digest)):
            raise SealedStateError("database: head row does not authenticate (edited)")
        models: dict[str, ModelEntry] = {}
        keys: dict[str, KeyRecord] = {}
        for kind, row_id, body, row_mac in rows:
            if not hmac.compare_digest(row_mac, self._row_mac(kind, row_id, body)):
                raise SealedStateError(f"database: {kind} row {row_id!r} does not authenticate")
            try:
                value = cbor2.loads(body)
                if kind == "model":
                    entry = ModelEntry.from_cbor(value)
                    if row_id != entry.meta.key and row_id == entry.meta.model_id:
                        # A row from before ids belonged to owners (named by the bare id, as
                        # its blob is): read as such, written under its key at the next commit.
                        entry = ModelEntry.from_cbor(value, legacy=True)
                    elif row_id != entry.meta.key:
                        raise ValueError("id out of place")
                    if entry.blob_version > version or entry.meta.key in models:
                        raise ValueError("blob version or key out of place")
                    models[entry.meta.key] = entry
                elif kind == "key":
                    record = KeyRecord.from_cbor(value)
                    if record.key_id != row_id:
                        raise ValueError("id out of place")
                    keys[row_id] = record
                else:
                    raise ValueError(f"kind: got {kind!r}, expected 'model' or 'key'")
            except (ValueError, cbor2.CBORDecodeError) as exc:
                raise SealedStateError(f"database: {kind} row {row_id!r}: {exc}") from None
        if not hmac.compare_digest(digest, _digest((k, i, m) for k, i, _, m in rows)):
            raise SealedStateError(
                f"database: the rows differ from those version {version} committed (a row was "
                "added, removed or an older copy put back)"
            )
        if version < self._seen:
            raise SealedStateError(
                f"database: version {version}, expected at least {self._seen} (seen before "
                "while running): rollback"
            )
        self._seen = version
        return Manifest(version, models, keys)

    # --- reading ------------------------------------------------------------------------------

    def _read(self, conn: psycopg.Connection[tuple[object, ...]]) -> Manifest:
        head_row = conn.execute(
            "SELECT version, digest, mac FROM veil_head WHERE id = 1"
        ).fetchone()
        rows = conn.execute("SELECT kind, id, body, mac FROM veil_rows").fetchall()
        head = None
        if head_row is not None:
            version, digest, mac = cast(tuple[int, bytes, bytes], head_row)
            head = (int(version), bytes(digest), bytes(mac))
        typed = [(str(k), str(i), bytes(b), bytes(m)) for k, i, b, m in cast(list[_Row], rows)]
        return self._verify(head, typed)

    @property
    def current_may_block(self) -> bool:
        return True  # one query per call

    def current(self) -> Manifest:
        """The committed manifest, verified; one small query while nothing changed."""
        with self._lock:
            with self._reader.transaction():
                row = self._reader.execute("SELECT mac FROM veil_head WHERE id = 1").fetchone()
                mac = None if row is None else bytes(cast(tuple[bytes], row)[0])
                if self._cached is not None and mac == self._cached_mac:
                    return self._cached
                manifest = self._read(self._reader)
            self._cached, self._cached_mac = manifest, mac
            return manifest

    def is_new(self) -> bool:
        """No head row: nothing was ever committed here (or all of it is gone)."""
        with self._lock, self._reader.transaction():
            return self._reader.execute("SELECT 1 FROM veil_head").fetchone() is None

    def names_blob(self, key: str, blob_version: int) -> bool:
        """Whether the committed state names this blob of the model of `key`; True when that
        cannot be read."""
        try:
            entry = self.current().models.get(key)
        except (SealedStateError, psycopg.Error):
            return True
        return entry is not None and entry.blob_version == blob_version

    # --- writing ------------------------------------------------------------------------------

    def open(self) -> Manifest:
        """At start: check the state whole, and give a new one its head (version 0)."""
        with self._lock, self._writer.transaction():
            self._writer.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_ID,))
            manifest = self._read(self._writer)
            if (
                manifest.version == 0
                and self._writer.execute("SELECT 1 FROM veil_head").fetchone() is None
            ):
                self._write_head(0, _digest([]))
            return manifest

    @contextlib.contextmanager
    def locked(self) -> Iterator[Manifest]:
        """Hold the cluster-wide writers' lock and yield the committed manifest: no replica
        commits until the block exits (`SealedState.locked`)."""
        with self._lock, self._writer.transaction():
            self._writer.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_ID,))
            yield self._read(self._writer)

    def _write_head(self, version: int, digest: bytes) -> None:
        self._writer.execute(
            "INSERT INTO veil_head (id, version, digest, mac) VALUES (1, %s, %s, %s) "
            "ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version, "
            "digest = EXCLUDED.digest, mac = EXCLUDED.mac",
            (version, digest, self._head_mac(version, digest)),
        )

    def update(self, change: Callable[[Manifest, int], Manifest]) -> Manifest:
        """Apply `change` to the freshest committed manifest and commit the next version, as
        one transaction under the cluster-wide writers' lock; if `change` raises, nothing is
        committed."""
        with self._lock:
            with self._writer.transaction():
                self._writer.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_ID,))
                current = self._read(self._writer)
                version = current.version + 1
                new = change(current, version)
                new = Manifest(version, new.models, new.keys)
                # The rows as they are (a row from before owner-scoped ids has another id than
                # the one it is written back under), not as `current` would write them.
                stored = self._writer.execute("SELECT kind, id, body FROM veil_rows").fetchall()
                old_rows = {
                    (str(k), str(i)): bytes(b)
                    for k, i, b in cast(list[tuple[str, str, bytes]], stored)
                }
                new_rows = _rows_of(new)
                for kind, row_id in old_rows.keys() - new_rows.keys():
                    self._writer.execute(
                        "DELETE FROM veil_rows WHERE kind = %s AND id = %s", (kind, row_id)
                    )
                macs = []
                for (kind, row_id), body in new_rows.items():
                    mac = self._row_mac(kind, row_id, body)
                    macs.append((kind, row_id, mac))
                    if old_rows.get((kind, row_id)) != body:
                        self._writer.execute(
                            "INSERT INTO veil_rows (kind, id, body, mac) VALUES (%s, %s, %s, %s) "
                            "ON CONFLICT (kind, id) DO UPDATE SET body = EXCLUDED.body, "
                            "mac = EXCLUDED.mac",
                            (kind, row_id, body, mac),
                        )
                self._write_head(version, _digest(macs))
            self._seen = max(self._seen, version)
            return new
