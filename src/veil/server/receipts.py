"""The server's receipts: an in-TEE signing key and the transparency log, kept on disk.

`ReceiptIssuer.issue` signs a receipt (`veil.receipts.payload`) whose sequence number is its
index in the log, appends it, and signs the tree head that includes it; the client gets the
receipt, that head and the inclusion path in the ``X-Veil-Receipt`` response header.

The log file (``<data dir>/receipts.log``) holds one 64-byte record per receipt: the RFC 9162
leaf hash, then ``HMAC-SHA256(k, u64 index || leaf hash || previous MAC)`` under a key derived
from the sealing key, so an edited, reordered or spliced record stops the start. Records are
written with each receipt but not fsynced (a receipt must stay cheap): a crash can
lose the last receipts' records, and a cut log restarts at a smaller size. Neither is hidden from
an auditor: a later tree head that does not extend one they kept fails the consistency check
(`veil.receipts.merkle.verify_consistency`), which is what the log is for.
"""

from __future__ import annotations

import hashlib
import hmac
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

__all__ = ["LOG_FILENAME", "RECEIPT_HEADER", "ReceiptIssuer", "ReceiptLog"]

LOG_FILENAME = "receipts.log"
RECEIPT_HEADER = "x-veil-receipt"
_RECORD = 64


def _utc_now() -> datetime:
    return datetime.now(UTC)


class ReceiptLog:
    """The Merkle tree of every receipt issued, persisted as authenticated records."""

    def __init__(self, path: Path, key: bytes) -> None:
        self._path = path
        self._key = key
        self.tree = MerkleTree()
        self._mac = bytes(32)
        self._load()

    def _record_mac(self, index: int, hashed: bytes) -> bytes:
        message = struct.pack(">Q", index) + hashed + self._mac
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def _load(self) -> None:
        try:
            data = self._path.read_bytes()
        except FileNotFoundError:
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
        """Add `entry` (a receipt's COSE bytes) and write its record; returns its index."""
        hashed = leaf_hash(entry)
        index = self.tree.size
        mac = self._record_mac(index, hashed)
        # Opened per record: no descriptor held for the server's life; the cost is microseconds.
        with self._path.open("ab") as file:
            file.write(hashed + mac)
        self._mac = mac
        return self.tree.append(hashed)


class ReceiptIssuer:
    """Signs receipts and tree heads with the receipt key; one per server start."""

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
        self._lock = threading.Lock()

    @property
    def public_key(self) -> bytes:
        return self._signer.public_key

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
        (base64url of a CBOR map ``{receipt, head, path}``)."""
        with self._lock:
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
        return encode_bundle(message, head, path)

    def _head_locked(self) -> bytes:
        tree = self._log.tree
        return self._signer.sign(TreeHead(tree.size, tree.root(), self._clock()).encode())

    def head(self) -> bytes:
        """The current signed tree head (COSE_Sign1)."""
        with self._lock:
            return self._head_locked()

    def inclusion(self, index: int, size: int) -> Sequence[bytes]:
        """Raises ValueError for an index or size the log does not have."""
        with self._lock:
            return self._log.tree.inclusion_proof(index, size)

    def consistency(self, first: int, second: int) -> Sequence[bytes]:
        """Raises ValueError for sizes the log does not have."""
        with self._lock:
            return self._log.tree.consistency_proof(first, second)
