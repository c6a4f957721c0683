"""CBOR messages: BlindAI shapes, the uint8-array form, strict refusals."""

from __future__ import annotations

import enum
from typing import Any

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from veil import wire
from veil.errors import ApiError, BadRequestError, TensorError
from veil.tensors import DatumType, WireTensor


def blindai_upload(model: bytes, **extra: Any) -> bytes:
    message = {
        "model": list(model),
        "length": len(model),
        "model_name": "m.onnx",
        "optimize": True,
        "client_info": {"user_agent": "blindai_python", "is_colab": False},
    }
    return cbor2.dumps(message | extra)


_model_bytes = st.binary(max_size=600) | st.lists(
    st.sampled_from([0x00, 0x17, 0x18, 0x19, 0xFF]), max_size=300
).map(bytes)


@given(_model_bytes)
def test_int_array_upload_decodes_to_the_model(model: bytes) -> None:
    body = blindai_upload(model)
    request = wire.decode_upload_request(body)
    assert request.model == model
    assert request.model_name == "m.onnx"
    assert request.length == len(model)
    assert request.model_id is None


def test_large_int_array_upload() -> None:
    model = bytes(range(256)) * 40_000 + b"\x18" * 1001
    assert wire.decode_upload_request(blindai_upload(model)).model == model


def test_non_canonical_ints_in_a_byte_array_are_refused() -> None:
    # 5 encoded as 0x18 0x05: legal CBOR, but no encoder writes it, and refusing it leaves no
    # one-int-at-a-time path for an attacker to choose.
    body = bytes([0xA1, 0x65]) + b"model" + bytes([0x82, 0x18, 0x05, 0x01])
    with pytest.raises(BadRequestError, match="not in shortest form"):
        wire.decode_upload_request(body)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"\xff", "malformed CBOR"),
        (b"", "malformed CBOR"),
        (cbor2.dumps([1]), "got CBOR list, expected a map"),
        (cbor2.dumps({"model": [1, 256]}), "something else than 0..255"),
        (cbor2.dumps({"model": [1, -1]}), "something else than 0..255"),
        (cbor2.dumps({"model": ["a"]}), "something else than 0..255"),
        (cbor2.dumps({"model": "text"}), "got str, expected"),
        (cbor2.dumps({"length": 3}), "got NoneType"),
        (cbor2.dumps({"model": b"abc", "length": 4}), "got 4, but the model has 3 bytes"),
        (cbor2.dumps({"model": b"abc", "length": "3"}), "length: got str"),
        (cbor2.dumps({"model": b"abc", "model_id": 7}), "model_id: got int"),
        (blindai_upload(b"ab")[:-3], "malformed CBOR"),
    ],
)
def test_bad_uploads_are_400(body: bytes, message: str) -> None:
    with pytest.raises(BadRequestError, match=message) as info:
        wire.decode_upload_request(body)
    assert info.value.status == 400


def test_upload_truncated_inside_the_int_array() -> None:
    body = blindai_upload(bytes(range(200)))
    with pytest.raises(BadRequestError):
        wire.decode_upload_request(body[:100])


def test_int_array_claiming_more_items_than_bytes() -> None:
    body = bytes([0xA1, 0x65]) + b"model" + bytes([0x9B]) + (2**62).to_bytes(8, "big") + b"\x01"
    with pytest.raises(BadRequestError, match="but 1 bytes are left"):
        wire.decode_upload_request(body)


def test_veil_upload_round_trip() -> None:
    body = wire.encode_upload_request(
        b"\x00onnx", model_name="n", model_id="my-model", client_info={"a": "b"}
    )
    request = wire.decode_upload_request(body)
    assert (request.model, request.model_name, request.model_id) == (b"\x00onnx", "n", "my-model")
    assert "onnx" not in repr(request)


def test_upload_reply() -> None:
    reply = wire.encode_upload_reply(b"h" * 32, "id")
    assert cbor2.loads(reply) == {"hash": b"h" * 32, "model_id": "id"}
    assert wire.decode_upload_reply(reply) == ("id", b"h" * 32)
    with pytest.raises(ApiError, match="upload reply"):
        wire.decode_upload_reply(cbor2.dumps({"hash": "x"}))


class ModelDatumType(enum.IntEnum):
    F32 = 0


def test_blindai_run_request() -> None:
    body = cbor2.dumps(
        {
            "model_id": "",
            "model_hash": "ab" * 32,
            "inputs": [
                {
                    "info": {"fact": (1, 2), "datum_type": ModelDatumType.F32, "node_name": None},
                    "bytes_data": bytes(8),
                }
            ],
            "client_info": {"uid": "x"},
        }
    )
    request = wire.decode_run_request(body)
    assert request.model_id is None
    assert request.model_hash == "ab" * 32
    assert request.inputs == (WireTensor((1, 2), DatumType.F32, None, bytes(8)),)


def test_run_request_round_trip_and_extras_ignored() -> None:
    tensor = WireTensor((2,), DatumType.I16, "x", b"\x01\x00\x02\x00")
    body = wire.encode_run_request(model_id="m", model_hash=None, inputs=[tensor], client_info={})
    message = cbor2.loads(body)
    message["new_key"] = [1, 2]
    message["inputs"][0]["info"]["fact"] = [2]
    message["inputs"][0]["info"]["datum_type"] = "I16"
    request = wire.decode_run_request(cbor2.dumps(message))
    assert request.model_id == "m"
    assert request.inputs == (tensor,)


def _run(inputs: Any, **extra: Any) -> bytes:
    return cbor2.dumps({"model_id": "m", "inputs": inputs} | extra)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (cbor2.dumps({"inputs": []}), "expected a model_id or a model_hash"),
        (cbor2.dumps({"model_id": 3, "inputs": []}), "model_id: got int"),
        (_run(None), "inputs: got NoneType, expected an array"),
        (_run([1]), r"inputs\[0\]: got CBOR int"),
        (_run([{"info": {}, "bytes_data": b""}]), "fact: expected a list"),
        (_run([{"info": {"fact": [-1]}, "bytes_data": b""}]), "fact: expected a list"),
        (_run([{"info": {"fact": [True]}, "bytes_data": b""}]), "fact: expected a list"),
        (_run([{"info": {"fact": [1], "datum_type": 42}, "bytes_data": b"\0"}]), "code 42"),
        (_run([{"info": {"fact": [1], "datum_type": 6}, "bytes_data": "x"}]), "got str"),
        (
            _run([{"info": {"fact": [1], "datum_type": 6, "node_name": 5}, "bytes_data": b"\0"}]),
            "node_name: got int",
        ),
    ],
)
def test_bad_run_requests_are_400(body: bytes, message: str) -> None:
    with pytest.raises(BadRequestError, match=message) as info:
        wire.decode_run_request(body)
    assert info.value.status == 400


def test_run_tensor_with_wrong_byte_count_is_a_tensor_error() -> None:
    body = _run([{"info": {"fact": [2, 2], "datum_type": 0}, "bytes_data": bytes(15)}])
    with pytest.raises(TensorError, match="got 15 bytes, expected 16"):
        wire.decode_run_request(body)


def test_run_reply_holds_only_blindai_info_keys() -> None:
    tensor = WireTensor((1,), DatumType.Bool, "y", b"\x01")
    reply = cbor2.loads(wire.encode_run_reply([tensor]))
    assert reply == {
        "outputs": [
            {"info": {"fact": [1], "datum_type": 10, "node_name": "y"}, "bytes_data": b"\x01"}
        ]
    }
    assert wire.decode_run_reply(wire.encode_run_reply([tensor])) == [tensor]
    with pytest.raises(ApiError, match="run reply"):
        wire.decode_run_reply(cbor2.dumps({"outputs": [{"info": {}}]}))


def test_delete_and_errors() -> None:
    assert wire.decode_delete_request(wire.encode_delete_request("m")).model_id == "m"
    with pytest.raises(BadRequestError, match="model_id: expected a non-empty"):
        wire.decode_delete_request(cbor2.dumps({"model_id": ""}))
    assert wire.decode_error(wire.encode_error("unknown model")) == "unknown model"
    assert wire.decode_error(b"plain text") == "plain text"


def test_upload_access_fields_round_trip() -> None:
    body = wire.encode_upload_request(
        b"m",
        model_name="n",
        model_id="x",
        client_info={},
        visibility="restricted",
        allowed_keys=["0123456789abcdef"],
    )
    message = wire.decode_upload_request(body)
    assert (message.visibility, message.allowed_keys) == ("restricted", ("0123456789abcdef",))
    # a BlindAI client sends neither: the server picks the default
    plain = wire.decode_upload_request(
        wire.encode_upload_request(b"m", model_name="n", model_id=None, client_info={})
    )
    assert (plain.visibility, plain.allowed_keys) == (None, ())


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"visibility": "everyone"}, "visibility: got 'everyone'"),
        ({"visibility": 1}, "visibility"),
        ({"allowed_keys": "0123456789abcdef"}, "allowed_keys"),
        ({"allowed_keys": ["not-a-key-id"]}, "allowed_keys"),
        ({"allowed_keys": ["0123456789abcdef"] * 1025}, "allowed_keys"),
    ],
)
def test_upload_access_fields_refused(extra: dict[str, object], match: str) -> None:
    body = cbor2.dumps({"model": b"m", "model_name": "n", **extra})
    with pytest.raises(BadRequestError, match=match):
        wire.decode_upload_request(body)
