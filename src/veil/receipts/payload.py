"""What a receipt says, and the digests both sides compute the same way.

A receipt's payload is a CBOR map (text keys)::

    v           1
    op          "predict" | "upload" | "delete"
    model_id    text
    model_hash  bytes(32)  SHA-256 of the model's ONNX bytes
    inputs      bytes(32)  `tensors_digest` of the request's inputs     (predict only)
    outputs     bytes(32)  `tensors_digest` of the reply's outputs      (predict only)
    time        int        server time, milliseconds since the Unix epoch (UTC)
    seq         int        the receipt's index in the server's transparency log
    evidence    bytes(32)  SHA-256 of the evidence (quote or report) that binds the signing key

A signed tree head's payload is ``{"size": int, "root": bytes(32), "time": int}``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import cbor2

from veil.errors import ReceiptError
from veil.tensors import WireTensor

__all__ = [
    "OPERATIONS",
    "ReceiptPayload",
    "TreeHead",
    "evidence_digest",
    "tensors_digest",
]

OPERATIONS = ("predict", "upload", "delete")
_VERSION = 1


def tensors_digest(tensors: Sequence[WireTensor]) -> bytes:
    """SHA-256 over tensors as the protocol carries them: count, then per tensor a CBOR header
    ``[name or null, datum type code, shape, byte length]`` followed by its bytes.

    The header fixes each tensor's length, so no two different sequences hash the same bytes.
    """
    digest = hashlib.sha256(cbor2.dumps(len(tensors)))
    for tensor in tensors:
        header = [tensor.name, int(tensor.datum_type), list(tensor.shape), len(tensor.data)]
        digest.update(cbor2.dumps(header))
        digest.update(tensor.data)
    return digest.digest()


def evidence_digest(evidence: bytes) -> bytes:
    """SHA-256 of the raw evidence (quote or report)."""
    return hashlib.sha256(evidence).digest()


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def _field(value: Mapping[str, Any], name: str, kind: type, what: str) -> Any:
    item = value.get(name)
    if not isinstance(item, kind) or isinstance(item, bool):
        raise ReceiptError(f"{what}.{name}: got {type(item).__name__}, expected {kind.__name__}")
    return item


def _digest_field(value: Mapping[str, Any], name: str, what: str) -> bytes:
    item: bytes = _field(value, name, bytes, what)
    if len(item) != 32:
        raise ReceiptError(f"{what}.{name}: got {len(item)} bytes, expected 32")
    return item


def _decode_map(payload: bytes, what: str) -> Mapping[str, Any]:
    try:
        value = cbor2.loads(payload)
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError):
        raise ReceiptError(f"{what}: malformed CBOR") from None
    if not isinstance(value, Mapping):
        raise ReceiptError(f"{what}: got {type(value).__name__}, expected a map")
    return value


@dataclass(frozen=True, slots=True)
class ReceiptPayload:
    """The facts a receipt signs (see the module docstring for the encoding)."""

    op: str
    model_id: str
    model_hash: bytes
    time: datetime
    seq: int
    evidence: bytes
    inputs: bytes | None = None
    outputs: bytes | None = None

    def encode(self) -> bytes:
        fields: dict[str, Any] = {
            "v": _VERSION,
            "op": self.op,
            "model_id": self.model_id,
            "model_hash": self.model_hash,
            "time": _ms(self.time),
            "seq": self.seq,
            "evidence": self.evidence,
        }
        if self.inputs is not None:
            fields["inputs"] = self.inputs
        if self.outputs is not None:
            fields["outputs"] = self.outputs
        return bytes(cbor2.dumps(fields, canonical=True))

    @classmethod
    def decode(cls, payload: bytes) -> ReceiptPayload:
        """Read a receipt payload; every field checked for type and size.

        Raises:
            ReceiptError: malformed, an unknown version or operation, a field missing.
        """
        what = "receipt"
        value = _decode_map(payload, what)
        if value.get("v") != _VERSION:
            raise ReceiptError(f"receipt.v: got {value.get('v')!r}, expected {_VERSION}")
        op = _field(value, "op", str, what)
        if op not in OPERATIONS:
            raise ReceiptError(f"receipt.op: got {op[:20]!r}, expected one of {OPERATIONS}")
        predict = op == "predict"
        for name in ("inputs", "outputs"):
            if (name in value) != predict:
                raise ReceiptError(f"receipt.{name}: expected only in a predict receipt")
        seq = _field(value, "seq", int, what)
        millis = _field(value, "time", int, what)
        if seq < 0 or not 0 <= millis < 1 << 53:
            raise ReceiptError("receipt: seq and time must be non-negative")
        return cls(
            op=op,
            model_id=_field(value, "model_id", str, what),
            model_hash=_digest_field(value, "model_hash", what),
            time=datetime.fromtimestamp(millis / 1000, UTC),
            seq=seq,
            evidence=_digest_field(value, "evidence", what),
            inputs=_digest_field(value, "inputs", what) if predict else None,
            outputs=_digest_field(value, "outputs", what) if predict else None,
        )


@dataclass(frozen=True, slots=True)
class TreeHead:
    """A tree head of the transparency log: its size, root hash and time."""

    size: int
    root: bytes
    time: datetime

    def encode(self) -> bytes:
        fields = {"size": self.size, "root": self.root, "time": _ms(self.time)}
        return bytes(cbor2.dumps(fields, canonical=True))

    @classmethod
    def decode(cls, payload: bytes) -> TreeHead:
        """Raises ReceiptError when malformed."""
        what = "tree head"
        value = _decode_map(payload, what)
        size = _field(value, "size", int, what)
        millis = _field(value, "time", int, what)
        if size < 0 or not 0 <= millis < 1 << 53:
            raise ReceiptError("tree head: size and time must be non-negative")
        root = _digest_field(value, "root", what)
        return cls(size=size, root=root, time=datetime.fromtimestamp(millis / 1000, UTC))
