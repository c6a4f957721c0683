"""`UploadStreamDecoder`: the same result as `decode_upload_request`, whatever the chunking."""

from __future__ import annotations

from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from veil import wire
from veil.errors import ApiError, BadRequestError

CLIENT_INFO = {"user_agent": "veil-test"}


def blindai_upload(model: bytes, **extra: Any) -> bytes:
    message = {
        "model": list(model),
        "length": len(model),
        "model_name": "m.onnx",
        "optimize": True,
        "client_info": {"user_agent": "blindai_python", "is_colab": False},
    }
    return cbor2.dumps(message | extra)


def veil_upload(model: bytes, **kwargs: Any) -> bytes:
    return wire.encode_upload_request(
        model,
        model_name="m.onnx",
        model_id=kwargs.pop("model_id", "m1"),
        client_info=CLIENT_INFO,
        **kwargs,
    )


def stream(body: bytes, cuts: list[int], limit: int = 1 << 30) -> wire.UploadRequest:
    decoder = wire.UploadStreamDecoder(max_model_bytes=limit, size=len(body))
    start = 0
    for cut in sorted(c % (len(body) + 1) for c in cuts):
        decoder.feed(body[start:cut])
        start = max(start, cut)
    decoder.feed(body[start:])
    return decoder.finish()


def outcome(call: Any) -> Any:
    try:
        request = call()
    except BadRequestError as exc:
        return ("error", exc.status, exc.message)
    return (
        "ok",
        bytes(request.model),
        request.model_name,
        request.model_id,
        request.length,
        request.visibility,
        request.allowed_keys,
    )


_model_bytes = st.binary(max_size=600) | st.lists(
    st.sampled_from([0x00, 0x17, 0x18, 0x19, 0xFF]), max_size=300
).map(bytes)
_cuts = st.lists(st.integers(0, 5000), max_size=12)


@settings(max_examples=150)
@given(_model_bytes, _cuts)
def test_blindai_array_streams(model: bytes, cuts: list[int]) -> None:
    body = blindai_upload(model)
    request = stream(body, cuts)
    assert outcome(lambda: request) == outcome(lambda: wire.decode_upload_request(body))


@settings(max_examples=150)
@given(_model_bytes, _cuts, st.sampled_from([None, "public", "restricted"]))
def test_veil_bytes_stream(model: bytes, cuts: list[int], visibility: str | None) -> None:
    body = veil_upload(model, visibility=visibility)
    request = stream(body, cuts)
    assert bytes(request.model) == model
    assert request.model_id == "m1"
    assert outcome(lambda: request) == outcome(lambda: wire.decode_upload_request(body))


@pytest.mark.parametrize("blindai", [False, True])
def test_large_model_in_one_piece_streams(blindai: bool) -> None:
    # One piece holding the whole body decodes like many small ones.
    model = bytes(range(256)) * 12_000  # 3 MiB
    body = blindai_upload(model) if blindai else veil_upload(model)
    request = stream(body, [])
    assert request.model == model


def test_large_array_across_windows() -> None:
    model = bytes(range(256)) * 40_000 + b"\x18" * 1001
    body = blindai_upload(model)
    cuts = list(range(0, len(body), 65_536))
    request = stream(body, cuts)
    assert request.model == model


NON_CANONICAL = bytes([0xA1, 0x65]) + b"model" + bytes([0x83, 0x18, 0x05, 0x01, 0x19, 0x00, 0xFF])

BAD_OR_ODD = [
    b"\xff",
    b"",
    cbor2.dumps([1]),
    cbor2.dumps({"model": [1, 256]}),
    cbor2.dumps({"model": [1, -1]}),
    cbor2.dumps({"model": ["a"]}),
    cbor2.dumps({"model": "text"}),
    cbor2.dumps({"length": 3}),
    cbor2.dumps({"model": b"abc", "length": 4}),
    cbor2.dumps({"model": b"abc", "length": "3"}),
    cbor2.dumps({"model": b"abc", "model_id": 7}),
    cbor2.dumps({"model_id": "x", "model": b"abc", "visibility": "nobody"}),
    blindai_upload(b"ab")[:-3],
    blindai_upload(bytes(range(200)))[:100],
    veil_upload(b"abcdef")[:-2],
    NON_CANONICAL,
    # indefinite-length map and byte string
    b"\xbf\x65model\x5f\x42ab\x41c\xff\xff",
    cbor2.dumps({"model": b"xy", 7: [1, 2]}),
    veil_upload(b"abc") + b"\x00trailing",
]


@pytest.mark.parametrize("body", BAD_OR_ODD)
@pytest.mark.parametrize("step", [1, 3, 1 << 20])
def test_same_outcome_as_whole_body(body: bytes, step: int) -> None:
    def streamed() -> wire.UploadRequest:
        return stream(body, list(range(step, len(body), step)))

    assert outcome(streamed) == outcome(lambda: wire.decode_upload_request(body))


def test_model_size_checked_before_anything_is_read() -> None:
    seen: list[int] = []

    def refuse(size: int) -> None:
        seen.append(size)
        raise ApiError(413, f"model of {size} bytes exceeds max_model_bytes=10")

    decoder = wire.UploadStreamDecoder(max_model_bytes=10, on_model_size=refuse)
    head = wire.encode_upload_head(1 << 40, model_name="", model_id=None, client_info=CLIENT_INFO)
    with pytest.raises(ApiError) as info:
        decoder.feed(head)
    assert info.value.status == 413
    assert seen == [1 << 40]


def test_model_over_the_decoder_limit_is_400() -> None:
    body = bytes([0xA1, 0x65]) + b"model" + bytes([0x9B]) + (2**62).to_bytes(8, "big") + b"\x01"
    decoder = wire.UploadStreamDecoder(max_model_bytes=1 << 20)
    with pytest.raises(BadRequestError, match="more than 1048576"):
        decoder.feed(body)


def test_long_fields_before_and_after_the_model_stream() -> None:
    body = cbor2.dumps({"model_name": "n" * 60_000, "model": b"abc", "x": "y" * 60_000})
    request = stream(body, list(range(0, len(body), 1000)))
    assert request.model == b"abc"
    assert request.model_name == "n" * 60_000


def test_model_given_twice() -> None:
    body = (
        bytes([0xA2])
        + cbor2.dumps("model")
        + cbor2.dumps(b"a")
        + cbor2.dumps("model")
        + cbor2.dumps(b"b")
    )
    with pytest.raises(BadRequestError, match="given twice"):
        stream(body, [])


def test_encode_upload_head_puts_the_model_last() -> None:
    head = wire.encode_upload_head(3, model_name="n", model_id="i", client_info=CLIENT_INFO)
    decoded = cbor2.loads(head + b"abc")
    assert list(decoded)[-1] == "model"
    assert decoded["model"] == b"abc"
    assert decoded["length"] == 3
