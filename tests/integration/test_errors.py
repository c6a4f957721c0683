"""Every error path answers a clear status and message, and the server keeps serving."""

from __future__ import annotations

from collections.abc import Iterator

import cbor2
import numpy as np
import pytest
from onnx_models import broadcast_model, dynamic_batch_model, identity_model, multi_io_model
from server_process import SNI, RawClient

import veil
from veil import wire

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def models(client: veil.Connection) -> None:
    client.upload_model(identity_model("float32"), model_id="f32")
    client.upload_model(multi_io_model(), model_id="multi")
    client.upload_model(dynamic_batch_model(), model_id="dynamic")


def still_serves(client: veil.Connection, raw: RawClient) -> None:
    assert raw.get("unattested", "/healthz").status_code == 200
    x = np.ones((2, 3), np.float32)
    np.testing.assert_array_equal(client.predict("f32", x).output[0].as_numpy(), x)


def test_unknown_model(client: veil.Connection, raw: RawClient) -> None:
    with pytest.raises(veil.NotFoundError) as info:
        client.predict("no-such-model", np.ones((2, 3), np.float32))
    assert info.value.status == 404
    assert "no-such-model" in info.value.message
    still_serves(client, raw)


def test_wrong_dtype(client: veil.Connection, raw: RawClient) -> None:
    with pytest.raises(veil.BadRequestError) as info:
        client.predict("f32", np.ones((2, 3), np.int32))
    assert info.value.status == 422
    assert info.value.message == "input 'x': dtype got int32, expected float32"
    still_serves(client, raw)


def test_wrong_shape(client: veil.Connection, raw: RawClient) -> None:
    with pytest.raises(veil.BadRequestError) as info:
        client.predict("f32", np.ones((3, 2), np.float32))
    assert info.value.status == 422
    assert info.value.message == "input 'x': shape got [3, 2], expected [2, 3]"
    still_serves(client, raw)


def test_a_dynamic_dimension_is_shown_by_its_name(client: veil.Connection) -> None:
    with pytest.raises(veil.BadRequestError) as info:
        client.predict("dynamic", np.ones((2, 5), np.float32))
    assert info.value.message == "input 'x': shape got [2, 5], expected [batch, 4]"


def test_wrong_input_count_and_name(client: veil.Connection, raw: RawClient) -> None:
    a = np.ones((2, 2), np.float32)
    with pytest.raises(veil.BadRequestError, match=r"inputs: got 2, expected 3 \(a, b, k\)"):
        client.predict("multi", [a, a])
    with pytest.raises(veil.BadRequestError, match="'zz': no such input"):
        client.predict("multi", {"a": a, "b": a, "zz": np.ones(3, np.int64)})
    still_serves(client, raw)


def test_inputs_the_graph_refuses_at_run_time(client: veil.Connection, raw: RawClient) -> None:
    client.upload_model(broadcast_model(), model_id="broadcast")
    ok = client.predict("broadcast", [np.ones(3, np.float32), np.ones(1, np.float32)])
    assert ok.output[0].as_flat() == [2.0, 2.0, 2.0]
    with pytest.raises(veil.BadRequestError) as info:
        client.predict("broadcast", [np.ones(2, np.float32), np.ones(3, np.float32)])
    assert info.value.status == 422
    assert info.value.message.startswith("inference failed: ")
    still_serves(client, raw)


def test_byte_length_not_matching_shape(client: veil.Connection, raw: RawClient) -> None:
    body = cbor2.dumps(
        {
            "model_id": "f32",
            "inputs": [{"info": {"fact": [2, 3], "datum_type": 0}, "bytes_data": bytes(20)}],
        }
    )
    response = raw.post("attested", "/run", body)
    assert response.status_code == 422
    assert "got 20 bytes, expected 24" in cbor2.loads(response.content)
    still_serves(client, raw)


@pytest.mark.parametrize(
    ("port", "path"),
    [("attested", "/run"), ("management", "/upload"), ("management", "/delete")],
)
@pytest.mark.parametrize("body", [b"\xff\x00garbage", b"", cbor2.dumps([1, 2, 3])])
def test_malformed_cbor(
    client: veil.Connection, raw: RawClient, port: str, path: str, body: bytes
) -> None:
    response = raw.post(port, path, body)
    assert response.status_code == 400
    message = cbor2.loads(response.content)
    assert isinstance(message, str)
    assert "malformed CBOR" in message or "expected a map" in message
    still_serves(client, raw)


def test_oversized_run_body(client: veil.Connection, raw: RawClient) -> None:
    # the module's server allows 1 MiB per run request
    big = np.zeros((1, 300_000), np.float32)
    with pytest.raises(veil.BadRequestError) as info:
        client.predict("f32", big)
    assert info.value.status == 413
    assert info.value.message == "request body exceeds max_request_bytes=1048576"
    still_serves(client, raw)


def test_oversized_upload_without_content_length(client: veil.Connection, raw: RawClient) -> None:
    # chunked transfer: no Content-Length to trust, the count happens while reading
    def chunks() -> Iterator[bytes]:
        for _ in range(40):
            yield bytes(100_000)

    response = raw.pinned.post(raw.url("management", "/upload"), content=chunks(), extensions=SNI)
    assert "content-length" not in response.request.headers
    assert response.status_code == 413
    still_serves(client, raw)


def test_duplicate_model_id(client: veil.Connection, raw: RawClient) -> None:
    with pytest.raises(veil.ConflictError) as info:
        client.upload_model(identity_model("int64"), model_id="f32")
    assert info.value.status == 409
    assert "'f32' is already taken" in info.value.message
    # the original model is untouched
    still_serves(client, raw)


def test_invalid_onnx(client: veil.Connection, raw: RawClient) -> None:
    with pytest.raises(veil.BadRequestError) as info:
        client.upload_model(b"this is not an onnx model", model_id="junk")
    assert info.value.status == 422
    assert info.value.message.startswith("invalid ONNX model")
    assert "junk" not in {m.model_id for m in client.list_models()}
    # the id was not burnt by the failed upload
    client.upload_model(identity_model("uint16"), model_id="junk")
    still_serves(client, raw)


def test_bad_model_id(client: veil.Connection, raw: RawClient) -> None:
    with pytest.raises(veil.BadRequestError, match=r"model_id: got '\.\./etc'"):
        client.upload_model(identity_model("int8"), model_id="../etc")
    still_serves(client, raw)


def test_length_field_must_match(client: veil.Connection, raw: RawClient) -> None:
    model = identity_model("int8").SerializeToString()
    body = cbor2.dumps({"model": model, "length": len(model) + 1, "model_name": "x"})
    response = raw.post("management", "/upload", body)
    assert response.status_code == 400
    assert "length" in cbor2.loads(response.content)
    still_serves(client, raw)


def test_error_bodies_decode_as_text(raw: RawClient) -> None:
    response = raw.post("attested", "/run", cbor2.dumps({"model_id": "", "inputs": []}))
    assert response.status_code == 400
    assert wire.decode_error(response.content) == "RunModel: expected a model_id or a model_hash"
