"""COSE_Sign1 with EdDSA and the receipt payloads: what verifies, and every malformed or
tampered message refused with ReceiptError."""

from __future__ import annotations

from datetime import UTC, datetime

import cbor2
import numpy as np
import pytest

from veil.errors import ReceiptError
from veil.receipts.cose import Signer, key_id, verify_sign1
from veil.receipts.payload import ReceiptPayload, TreeHead, tensors_digest
from veil.tensors import encode_inputs

WHEN = datetime(2026, 3, 1, 12, 0, 0, 250000, tzinfo=UTC)


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer()


def predict_payload() -> ReceiptPayload:
    return ReceiptPayload(
        op="predict",
        model_id="m",
        model_hash=b"\x01" * 32,
        time=WHEN,
        seq=7,
        evidence=b"\x02" * 32,
        inputs=b"\x03" * 32,
        outputs=b"\x04" * 32,
    )


def test_sign_and_verify_round_trip(signer: Signer) -> None:
    payload = predict_payload()
    message = signer.sign(payload.encode())
    assert ReceiptPayload.decode(verify_sign1(message, signer.public_key)) == payload
    value = cbor2.loads(message)
    assert value.tag == 18
    header = cbor2.loads(value.value[0])
    assert header[1] == -8  # EdDSA
    assert header[4] == key_id(signer.public_key)
    assert "kid=" in repr(signer)


def test_tampered_messages_are_refused(signer: Signer) -> None:
    message = signer.sign(predict_payload().encode())
    items = list(cbor2.loads(message).value)

    def rebuilt(index: int, value: object) -> bytes:
        changed = list(items)
        changed[index] = value
        return bytes(cbor2.dumps(cbor2.CBORTag(18, changed)))

    other = predict_payload().encode().replace(b"\x03" * 32, b"\x05" * 32)
    cases = {
        "payload field": rebuilt(2, other),
        "signature bit": rebuilt(3, items[3][:-1] + bytes([items[3][-1] ^ 1])),
        "protected header": rebuilt(0, cbor2.dumps({1: -8, 4: b"otherkid"})),
    }
    for name, tampered in cases.items():
        with pytest.raises(ReceiptError, match="does not verify"):
            verify_sign1(tampered, signer.public_key)
        assert name
    with pytest.raises(ReceiptError, match="does not verify"):
        verify_sign1(message, Signer().public_key)  # another key


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda items: cbor2.dumps(cbor2.CBORTag(98, items)), "tag 18"),
        (lambda items: cbor2.dumps(items), "tag 18"),
        (lambda items: cbor2.dumps(cbor2.CBORTag(18, items[:3])), "4 items"),
        (lambda items: cbor2.dumps(cbor2.CBORTag(18, [items[0], {}, "text", items[3]])), "bytes"),
        (lambda items: cbor2.dumps(cbor2.CBORTag(18, [items[0], [], items[2], items[3]])), "map"),
        (
            lambda items: cbor2.dumps(cbor2.CBORTag(18, [cbor2.dumps({1: -7}), *items[1:]])),
            "expected EdDSA",
        ),
        (
            lambda items: cbor2.dumps(cbor2.CBORTag(18, [b"\xff", *items[1:]])),
            "protected header",
        ),
        (lambda items: b"\x9f", "malformed CBOR"),
        (lambda items: b"\x00" * 70_000, "at most"),
    ],
)
def test_malformed_messages_are_refused(signer: Signer, mutate: object, match: str) -> None:
    items = list(cbor2.loads(signer.sign(b"x")).value)
    assert callable(mutate)
    with pytest.raises(ReceiptError, match=match):
        verify_sign1(bytes(mutate(items)), signer.public_key)


def test_a_key_that_is_not_ed25519_is_refused(signer: Signer) -> None:
    with pytest.raises(ReceiptError, match="not an Ed25519"):
        verify_sign1(signer.sign(b"x"), b"\x01" * 31)


def test_payload_encodings_of_each_operation() -> None:
    upload = ReceiptPayload("upload", "m", b"\x01" * 32, WHEN, 0, b"\x02" * 32)
    assert ReceiptPayload.decode(upload.encode()) == upload
    assert ReceiptPayload.decode(predict_payload().encode()).time == WHEN


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"v": 2}, "receipt.v"),
        ({"op": "train"}, "receipt.op"),
        ({"seq": -1}, "non-negative"),
        ({"seq": True}, "receipt.seq"),
        ({"model_hash": b"\x01" * 31}, "31 bytes"),
        ({"model_id": 5}, "receipt.model_id"),
        ({"outputs": None}, "receipt.outputs"),
        ({"evidence": "text"}, "receipt.evidence"),
    ],
)
def test_payload_fields_are_checked(change: dict[str, object], match: str) -> None:
    fields = cbor2.loads(predict_payload().encode())
    fields.update(change)
    fields = {k: v for k, v in fields.items() if v is not None}
    with pytest.raises(ReceiptError, match=match):
        ReceiptPayload.decode(cbor2.dumps(fields))


def test_inputs_only_in_predict_receipts() -> None:
    fields = cbor2.loads(
        ReceiptPayload("delete", "m", b"\x01" * 32, WHEN, 0, b"\x02" * 32).encode()
    )
    fields["inputs"] = b"\x03" * 32
    with pytest.raises(ReceiptError, match="only in a predict"):
        ReceiptPayload.decode(cbor2.dumps(fields))
    with pytest.raises(ReceiptError, match="expected a map"):
        ReceiptPayload.decode(cbor2.dumps([1]))
    with pytest.raises(ReceiptError, match="malformed"):
        ReceiptPayload.decode(b"\xff")


def test_tree_head_round_trip_and_checks() -> None:
    head = TreeHead(3, b"\x09" * 32, WHEN)
    assert TreeHead.decode(head.encode()) == head
    with pytest.raises(ReceiptError, match="root"):
        TreeHead.decode(cbor2.dumps({"size": 3, "root": b"\x09", "time": 1}))
    with pytest.raises(ReceiptError, match="non-negative"):
        TreeHead.decode(cbor2.dumps({"size": -3, "root": b"\x09" * 32, "time": 1}))


def test_tensors_digest_binds_names_types_shapes_and_bytes() -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    base = tensors_digest(encode_inputs([x]))
    assert base == tensors_digest(encode_inputs([x.copy()]))
    variants = [
        encode_inputs([x.reshape(3, 2)]),
        encode_inputs([x.astype(np.int32)]),
        encode_inputs({"x": x}),
        encode_inputs([x, x]),
        encode_inputs([x + 1]),
        [],
    ]
    digests = {tensors_digest(v) for v in variants}
    assert base not in digests
    assert len(digests) == len(variants)


@pytest.mark.parametrize("size", [0, 1, 23, 24, 255, 256, 65535, 65536])
def test_the_signer_writes_the_bytes_pycose_writes(size: int) -> None:
    """The hand-written COSE_Sign1 is byte for byte pycose's, for payloads across every CBOR
    length encoding (Ed25519 is deterministic: the same key signs the same bytes alike)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from pycose.algorithms import EdDSA
    from pycose.headers import KID, Algorithm
    from pycose.keys.curves import Ed25519
    from pycose.keys.okp import OKPKey
    from pycose.messages.sign1message import Sign1Message

    private = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    signer = Signer(private)
    payload = bytes(i % 251 for i in range(size))
    key = OKPKey(crv=Ed25519, d=private.private_bytes_raw(), x=signer.public_key)
    reference = Sign1Message(
        phdr={Algorithm: EdDSA, KID: key_id(signer.public_key)}, payload=payload, key=key
    ).encode(tag=True)
    assert signer.sign(payload) == bytes(reference)
    if size < 1024:  # larger messages are past what a verifier reads (MAX_MESSAGE_BYTES)
        assert verify_sign1(signer.sign(payload), signer.public_key) == payload
