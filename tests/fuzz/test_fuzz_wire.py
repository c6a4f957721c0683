"""CBOR request decoding and tensor decoding on hostile input: only typed veil errors escape."""

from __future__ import annotations

import contextlib
from typing import Any

import cbor2
import pytest
from fuzz_mutations import mutated
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.errors import BadRequestError, TensorError, VeilError

wire = pytest.importorskip("veil.wire")
cbor = pytest.importorskip("veil.wire.cbor")
tensors = pytest.importorskip("veil.tensors")

FUZZ = settings.get_profile("veil-fuzz")

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64)
    | st.floats(allow_nan=True)
    | st.binary(max_size=64)
    | st.text(max_size=32)
)
_keys = st.sampled_from(
    [
        "model",
        "length",
        "model_name",
        "model_id",
        "model_hash",
        "inputs",
        "info",
        "fact",
        "datum_type",
        "node_name",
        "bytes_data",
        "client_info",
        "optimize",
    ]
) | st.text(max_size=8)
cbor_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(_keys, inner, max_size=6),
    max_leaves=40,
)


@st.composite
def tensor_maps(draw: st.DrawFn) -> dict[str, Any]:
    """Tensors that are almost right: each field valid or replaced by a hostile value."""
    shape = draw(st.lists(st.integers(0, 5), max_size=4))
    code = draw(st.integers(0, 10))
    itemsize = [4, 1, 1, 2, 2, 4, 8, 1, 2, 8, 4][code] if code <= 10 else 1
    n = 1
    for d in shape:
        n *= d
    info: dict[str, Any] = {
        "fact": draw(st.just(shape) | cbor_values | st.lists(st.integers(-(2**70), 2**70))),
        "datum_type": draw(st.just(code) | cbor_values),
        "node_name": draw(st.text(max_size=8) | cbor_values),
    }
    data = draw(st.just(bytes(n * itemsize)) | st.binary(max_size=64) | cbor_values)
    return {"info": draw(st.just(info) | cbor_values), "bytes_data": data}


run_requests = st.fixed_dictionaries(
    {},
    optional={
        "model_id": st.text(max_size=8) | cbor_values,
        "model_hash": st.text(max_size=8) | cbor_values,
        "inputs": st.lists(tensor_maps(), max_size=3) | cbor_values,
        "client_info": cbor_values,
    },
)
upload_requests = st.fixed_dictionaries(
    {},
    optional={
        "model": st.binary(max_size=64)
        | st.lists(st.integers(-300, 300), max_size=64)
        | cbor_values,
        "length": st.integers(-5, 100) | cbor_values,
        "model_name": st.text(max_size=8) | cbor_values,
        "model_id": st.text(max_size=8) | cbor_values,
    },
)


def _decode(fn: Any, body: bytes) -> None:
    error: VeilError | None = None
    try:
        fn(body)
    except (BadRequestError, TensorError) as exc:
        error = exc
    if isinstance(error, BadRequestError):
        assert error.status in (400, 413, 422)


_DECODERS = [
    pytest.param("decode_run_request", id="run"),
    pytest.param("decode_upload_request", id="upload"),
    pytest.param("decode_delete_request", id="delete"),
]


@pytest.mark.parametrize("name", _DECODERS)
@settings(parent=FUZZ)
@given(body=st.binary(max_size=512))
def test_arbitrary_bytes(name: str, body: bytes) -> None:
    _decode(getattr(wire, name), body)


@pytest.mark.parametrize("name", _DECODERS)
@settings(parent=FUZZ)
@given(value=cbor_values)
def test_arbitrary_cbor(name: str, value: Any) -> None:
    _decode(getattr(wire, name), cbor2.dumps(value))


@settings(parent=FUZZ)
@given(message=run_requests)
def test_near_valid_run_requests(message: dict[str, Any]) -> None:
    _decode(wire.decode_run_request, cbor2.dumps(message))


@settings(parent=FUZZ)
@given(
    message=upload_requests,
    as_list=st.booleans(),
    first=st.booleans(),
)
def test_near_valid_upload_requests(message: dict[str, Any], as_list: bool, first: bool) -> None:
    model = message.get("model")
    if as_list and isinstance(model, bytes):
        message["model"] = list(model)  # BlindAI's form: the numpy uint8-array decoding
    if first and "model" in message:
        message = {"model": message.pop("model"), **message}
    _decode(wire.decode_upload_request, cbor2.dumps(message))


def _valid_bodies() -> list[bytes]:
    t = tensors.WireTensor((2, 3), tensors.DatumType(0), "x", bytes(24))
    model = bytes(range(256)) * 3
    return [
        wire.encode_run_request(model_id="m", model_hash=None, inputs=[t, t], client_info={}),
        wire.encode_upload_request(model, model_name="n", model_id="m", client_info={}),
        cbor2.dumps({"model": list(model), "length": len(model), "model_name": "n"}),
        cbor2.dumps({"model": [*list(model[:40]), 24, 23, 24, 24, 0, 255], "model_id": "x"}),
        wire.encode_delete_request("model-id"),
    ]


@pytest.mark.parametrize("name", _DECODERS)
@settings(parent=FUZZ)
@given(data=st.data())
def test_mutated_valid_requests(name: str, data: st.DataObject) -> None:
    _decode(getattr(wire, name), data.draw(mutated(_valid_bodies())))


def test_uint8_array_matches_cbor2() -> None:
    # The numpy uint8-array decoding must give exactly what cbor2 decodes (seeds for the mutations).
    for body in _valid_bodies()[2:4]:
        request = wire.decode_upload_request(body)
        assert request.model == bytes(cbor2.loads(body)["model"])


def _outcome(call: Any) -> Any:
    try:
        return ("ok", call())
    except BadRequestError as exc:
        return ("error", exc.status)


@settings(parent=FUZZ)
@given(
    body=st.binary(max_size=256) | mutated(_valid_bodies()),
    cuts=st.lists(st.integers(0, 4000), max_size=8),
)
def test_strict_decoder_in_pieces(body: bytes, cuts: list[int]) -> None:
    # Any bytes, cut anywhere: a value or a 400, and the same one as for the whole body.
    keys = frozenset({"model", "bytes_data"})

    def pieces() -> Any:
        decoder = cbor.StrictDecoder("x", byte_array_keys=keys)
        start = 0
        for cut in sorted(c % (len(body) + 1) for c in cuts):
            decoder.feed(body[start:cut])
            start = max(start, cut)
        decoder.feed(body[start:])
        return decoder.finish()

    whole = _outcome(lambda: cbor.decode(body, "x", byte_array_keys=keys))
    assert whole[0] == "ok" or whole == ("error", 400)
    # (messages may differ: the whole body's length lets a lying size be named sooner)
    assert _outcome(pieces)[:2] == whole[:2] if whole[0] == "error" else _outcome(pieces) == whole


@settings(parent=FUZZ)
@given(body=st.binary(max_size=256) | mutated(_valid_bodies()), step=st.integers(1, 64))
def test_upload_stream_matches_whole_body(body: bytes, step: int) -> None:
    def streamed() -> Any:
        decoder = wire.UploadStreamDecoder(max_model_bytes=1 << 20)
        for start in range(0, len(body), step):
            decoder.feed(body[start : start + step])
        return decoder.finish()

    assert _outcome(streamed) == _outcome(lambda: wire.decode_upload_request(body))


@settings(parent=FUZZ)
@given(
    shape=st.lists(st.integers(0, 2**20), max_size=5),
    code=st.integers(0, 10),
    data=st.binary(max_size=128),
)
def test_decode_array(shape: list[int], code: int, data: bytes) -> None:
    try:
        array = tensors.decode_array(data, tensors.DatumType(code), shape)
    except TensorError:
        return
    assert list(array.shape) == shape
    assert array.nbytes == len(data)


# Regression (found by these fuzzers, fixed in veil.tensors): a shape with a zero satisfies the
# byte-length check for any other dims, and numpy then refused the reshape with a bare ValueError.
def test_regression_zero_size_huge_dims() -> None:
    with pytest.raises(TensorError):
        tensors.decode_array(b"", tensors.DatumType(1), [0, 4637, 4661, 70005, 762000])


@settings(parent=FUZZ)
@given(value=cbor_values)
def test_datum_type_of(value: Any) -> None:
    with contextlib.suppress(TensorError):
        tensors.datum_type_of(value)


# Regression (found by these fuzzers, fixed in veil.tensors): np.dtype({"a": []}) raises
# ValueError, which leaked through datum_type_of and decode_run_request (a 500, not a 400).
def test_regression_datum_type_of_map() -> None:
    with pytest.raises(TensorError):
        tensors.datum_type_of({"model": []})


def test_regression_run_request_datum_type_map() -> None:
    info = {"fact": [1], "datum_type": {"a": []}, "node_name": "x"}
    body = cbor2.dumps({"model_id": "m", "inputs": [{"info": info, "bytes_data": b"1234"}]})
    with pytest.raises(BadRequestError) as err:
        wire.decode_run_request(body)
    assert err.value.status == 400


@settings(parent=FUZZ)
@given(
    shape=st.lists(st.integers(0, 2**40), max_size=4),
    code=st.integers(0, 10),
    data=st.binary(max_size=64),
    name=st.none() | st.text(min_size=1, max_size=8),  # "" decodes as None, by design
)
def test_wire_tensor(shape: list[int], code: int, data: bytes, name: str | None) -> None:
    try:
        t = tensors.WireTensor(tuple(shape), tensors.DatumType(code), name, data)
    except TensorError:
        return
    assert wire.decode_run_reply(wire.encode_run_reply([t])) == [t]
