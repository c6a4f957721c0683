"""The server's receipts: an in-TEE signing key and the transparency log, kept on disk.

`ReceiptIssuer.issue` signs a receipt (`veil.receipts.payload`) whose sequence number is its
index in the log, appends it, and signs the tree head that includes it; the client gets the
receipt, that head and the inclusion path in the ``X-Veil-Receipt`` response header.

The log file (``<data dir>/receipts.log``) holds one 64-byte record per receipt: the RFC 9162
leaf hash, then ``HMAC-SHA256(k, u64 index || leaf hash || previous MAC)`` under a key derived
from the sealing key, so an edited, reordered or spliced record stops the start.

Durability: a receipt is handed out only once its record is on disk (fsync), with group
commit: records are written as receipts are signed, and one fsync at a time covers every record
written before it started, so concurrent receipts share fsyncs and none waits for more than
two of them (the one running when its record was written, and the next). A crash therefore
loses no record of a receipt a client holds; a cut log (whoever controls the disk can cut it)
restarts at a smaller size, which is not hidden from an auditor: a later tree head that does
not extend one they kept fails the consistency check (`veil.receipts.merkle.verify_consistency`).

Key rotation (`veil.server.rotation`): every generation of the server's keys has its own issuer,
signing with its own receipt key and naming its own evidence; all of them share the one log (and
its lock), so sequence numbers and the tree continue across rotations, as across restarts. A
tree head is signed by the receipt key of the generation that serves it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from veil.errors import SealedStateError
from veil.receipts.cose import Signer
from veil.receipts.merkle import MerkleTree, leaf_hash
from veil.receipts.payload import ReceiptPayload, TreeHead, evidence_digest
from veil.receipts.proof import encode_bundle

__all__ = ["LOG_FILENAME", "RECEIPT_HEADER", "RECEIPT_KEY_HEADER", "ReceiptIssuer", "ReceiptLog"]

LOG_FILENAME = "receipts.log"
RECEIPT_HEADER = "x-veil-receipt"
RECEIPT_KEY_HEADER = "x-veil-receipt-key"
"""Hex of the receipt key the client attested: receipts and log heads must be signed by it."""
_RECORD = 64


def _utc_now() -> datetime:
    return datetime.now(UTC)


class ReceiptLog:
    """The Merkle tree of every receipt issued, persisted as authenticated records.

    `lock` guards the tree and the file's tail: whoever appends holds it until the tree head
    and path of its record are taken. `sync` makes records durable (group commit).
    """

    def __init__(self, path: Path, key: bytes) -> None:
        self._path = path
        self._key = key
        self.tree = MerkleTree()
        self.lock = threading.Lock()
        self._mac = bytes(32)
        self._sync_lock = threading.Lock()
        self._durable = 0  # records known to be on disk
        self._load()
        self._durable = self.tree.size

    def _record_mac(self, index: int, hashed: bytes) -> bytes:
        message = struct.pack(">Q", index) + hashed + self._mac
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def _load(self) -> None:
        try:
            data = self._path.read_bytes()
        except FileNotFoundError:
            # Created (empty) and its name made durable now, so that no fsync of a record
            # depends on a directory entry that a crash could still lose.
            self._path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._path.touch(mode=0o600)
            _fsync(self._path.parent)
            return
        if len(data) % _RECORD:
            raise SealedStateError(
                f"{self._path.name}: {len(data)} bytes, not whole records of {_RECORD}: "
                "the receipt log is cut or was edited"
            )
        for index in range(len(data) // _RECORD):
            record = data[index * _RECORD : (index + 1) * _RECORD]
            hashed, mac = record[:32], record[32:]
            expected = self._record_mac(index, hashed)
            if not hmac.compare_digest(mac, expected):
                raise SealedStateError(
                    f"{self._path.name}: record {index} fails authentication: the receipt log "
                    "was edited, reordered or written under another key"
                )
            self.tree.append(hashed)
            self._mac = mac

    def append(self, entry: bytes) -> int:
        """Add `entry` (a receipt's COSE bytes) and write its record; returns its index.

        Hold `lock`. The record is written, not yet durable: `sync` it before the receipt leaves.
        """
        hashed = leaf_hash(entry)
        index = self.tree.size
        mac = self._record_mac(index, hashed)
        # Opened per record: no descriptor held for the server's life; the cost is microseconds.
        with self._path.open("ab") as file:
            file.write(hashed + mac)
        self._mac = mac
        return self.tree.append(hashed)

    def sync(self, index: int) -> None:
        """Return once record `index` is on disk (without `lock`: others append meanwhile).

        Group commit: one fsync at a time, each covering every record written before it began;
        a caller whose record an earlier fsync covered returns without one.
        """
        with self._sync_lock:
            if index < self._durable:
                return
            written = self.tree.size  # every record up to here was written before this read
            _fsync(self._path)
            self._durable = max(self._durable, written)

    @property
    def durable(self) -> int:
        """How many records are known to be on disk."""
        return self._durable


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ReceiptIssuer:
    """Signs receipts and tree heads with one generation's receipt key, into the shared log."""

    def __init__(
        self,
        signer: Signer,
        evidence: bytes,
        log: ReceiptLog,
        *,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self._signer = signer
        self._evidence = evidence_digest(evidence)
        self._log = log
        self._clock = clock

    @property
    def public_key(self) -> bytes:
        return self._signer.public_key

    @property
    def log(self) -> ReceiptLog:
        return self._log

    def issue(
        self,
        op: str,
        model_id: str,
        model_hash: bytes,
        *,
        inputs: bytes | None = None,
        outputs: bytes | None = None,
    ) -> str:
        """A receipt, its tree head and inclusion path, as the ``X-Veil-Receipt`` header value
        (base64url of a CBOR map ``{receipt, head, path}``), once its record is on disk.

        Blocks for an fsync: call it from a worker thread, not the event loop.
        """
        with self._log.lock:
            payload = ReceiptPayload(
                op=op,
                model_id=model_id,
                model_hash=model_hash,
                time=self._clock(),
                seq=self._log.tree.size,
                evidence=self._evidence,
                inputs=inputs,
                outputs=outputs,
            )
            message = self._signer.sign(payload.encode())
            index = self._log.append(message)
            head = self._head_locked()
            path = self._log.tree.inclusion_proof(index)
        self._log.sync(index)
        return encode_bundle(message, head, path)

    def _head_locked(self) -> bytes:
        tree = self._log.tree
        return self._signer.sign(TreeHead(tree.size, tree.root(), self._clock()).encode())

    def head(self) -> bytes:
        """The current signed tree head (COSE_Sign1)."""
        with self._log.lock:
            return self._head_locked()

    def inclusion(self, index: int, size: int) -> Sequence[bytes]:
        """Raises ValueError for an index or size the log does not have."""
        with self._log.lock:
            return self._log.tree.inclusion_proof(index, size)

    def consistency(self, first: int, second: int) -> Sequence[bytes]:
        """Raises ValueError for sizes the log does not have."""
        with self._log.lock:
            return self._log.tree.consistency_proof(first, second)
