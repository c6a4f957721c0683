"""The strict CBOR decoder: what it accepts, each refusal with its reason, and its memory bounds."""

from __future__ import annotations

import struct
import tracemalloc
from typing import Any

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from veil import wire
from veil.errors import BadRequestError
from veil.wire.cbor import DecodeLimits, StrictDecoder, decode

_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.binary(max_size=40)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=6), inner, max_size=5)
    ),
    max_leaves=30,
)


@given(_values, st.lists(st.integers(0, 400), max_size=8))
def test_decodes_what_cbor2_encodes_in_any_pieces(value: Any, cuts: list[int]) -> None:
    body = cbor2.dumps(value)
    assert decode(body, "x") == value
    decoder = StrictDecoder("x")
    start = 0
    for cut in sorted(c % (len(body) + 1) for c in cuts):
        decoder.feed(body[start:cut])
        start = max(start, cut)
    decoder.feed(body[start:])
    assert decoder.finish() == value


def test_indefinite_lengths() -> None:
    body = b"\xbf\x61a\x9f\x01\x02\xff\x61b\x5f\x42ab\x41c\xff\x61c\x7f\x61x\x61y\xff\xff"
    assert decode(body, "x") == {"a": [1, 2], "b": b"abc", "c": "xy"}


def test_half_and_single_floats() -> None:
    assert decode(b"\xf9\x3c\x00", "x") == 1.0
    assert decode(b"\xfa" + struct.pack(">f", 0.5), "x") == 0.5


def _refused(body: bytes, match: str, limits: DecodeLimits | None = None) -> None:
    with pytest.raises(BadRequestError, match=match) as info:
        decode(body, "Body", limits=limits)
    assert info.value.status == 400
    assert info.value.message.startswith("Body: malformed CBOR (")


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (cbor2.dumps(cbor2.CBORTag(36, "Content-Type: text/plain\n\nx")), "tag 36"),
        (cbor2.dumps(cbor2.CBORTag(32, "http://x")), "tag 32"),
        (cbor2.dumps(cbor2.CBORTag(35, "a+")), "tag 35"),
        (cbor2.dumps(cbor2.CBORTag(4, [-2, 27315])), "tag 4"),
        (cbor2.dumps(cbor2.CBORTag(258, [1, 2])), "tag 258"),
        (cbor2.dumps(10**5000), "tag 2"),  # the >4300-digit int that was a 500
        (cbor2.dumps(-(10**5000)), "tag 3"),
        (cbor2.dumps({"a": cbor2.CBORTag(1, 0)}), "tag 1"),
    ],
)
def test_every_tag_is_refused(body: bytes, match: str) -> None:
    _refused(body, match + ": the protocol uses no CBOR tags")


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"\x1c", "reserved additional information 28"),
        (b"\x1f", "reserved additional information 31"),
        (b"\xff", "a break outside an indefinite-length item"),
        (b"\xf7", "simple value 23"),  # undefined
        (b"\xf8\x20", "simple value 32"),
        (b"\xf0", "simple value 16"),
        (b"\x62\xff\xfe", "a text string that is not UTF-8"),
        (b"\xa1\x01\x02", "a map key of type int, expected text"),
        (b"\xa1\x41a\x02", "a map key of type bytes, expected text"),
        (b"\xa2\x61a\x01\x61a\x02", "map key 'a' given twice"),
        (b"\x5f\x61a\xff", "a string chunk of another type"),
        (b"\x5f\x5f\xff\xff", "a string chunk of another type or of indefinite length"),
        (b"\x01\x02", "bytes after the end of the message"),
        (b"\x9f\x01", "the body ends inside an item"),
        (b"\x82\x01", "items of 2 declared, but 1 bytes are left"),
        (b"\x5a\x00\x10\x00\x00ab", "string bytes of 1048576 declared, but 2 bytes are left"),
        (b"\x9b" + (2**62).to_bytes(8, "big"), "items of 4611686018427387904 declared"),
        (b"\xbb" + (2**40).to_bytes(8, "big"), "pairs of 1099511627776 declared"),
        (b"", "the body ends inside an item"),
    ],
)
def test_malformed_or_outside_the_protocol(body: bytes, match: str) -> None:
    _refused(body, match)


def test_nesting_depth() -> None:
    limits = DecodeLimits(max_depth=4)
    assert decode(b"\x81" * 4 + b"\x00", "x", limits=limits) == [[[[0]]]]
    _refused(b"\x81" * 5 + b"\x00", "nesting deeper than 4", limits)
    _refused(b"\x9f" * 5 + b"\xff" * 5, "nesting deeper than 4", limits)


def test_item_limit() -> None:
    limits = DecodeLimits(max_items=10)
    assert decode(cbor2.dumps(list(range(9))), "x", limits=limits) == list(range(9))
    _refused(cbor2.dumps(list(range(10))), "a container of 10 entries, over the item limit", limits)
    _refused(b"\x9f" + b"\x00" * 10 + b"\xff", "more than 10 items", limits)
    _refused(b"\x9f" + b"\x80" * 5 + b"\xa0" * 5 + b"\xff", "more than 10 items", limits)


def test_text_limit() -> None:
    limits = DecodeLimits(max_text_bytes=4)
    assert decode(cbor2.dumps("abcd"), "x", limits=limits) == "abcd"
    _refused(cbor2.dumps("abcde"), "a text string of 5 bytes, more than 4", limits)
    _refused(b"\x7f\x63abc\x62de\xff", "a text string of more than 4 bytes", limits)
    # map keys too (the whole-body decoder reads short keys on a path of their own)
    _refused(cbor2.dumps({"abcde": 1}), "a text string of 5 bytes, more than 4", limits)
    decoder = StrictDecoder("x", limits=limits)
    with pytest.raises(BadRequestError, match="a text string of 5 bytes, more than 4"):
        decoder.feed(cbor2.dumps({"abcde": 1}))
    # byte strings are bounded by the body only (tensors are long)
    assert decode(cbor2.dumps(b"abcdefgh"), "x", limits=limits) == b"abcdefgh"


def test_byte_array_keys() -> None:
    body = cbor2.dumps({"b": list(b"\x00\x17\x18\xff"), "c": [1, 2]})
    got = decode(body, "x", byte_array_keys=frozenset({"b"}))
    assert got == {"b": bytearray(b"\x00\x17\x18\xff"), "c": [1, 2]}
    assert isinstance(got["b"], bytearray)
    indefinite = b"\xa1\x61b\x9f\x01\x18\x18\x18\x20\xff"
    assert decode(indefinite, "x", byte_array_keys=frozenset({"b"})) == {"b": b"\x01\x18\x20"}


@pytest.mark.parametrize(
    ("items", "match"),
    [
        (b"\x18\x05", "not in shortest form"),
        (b"\x19\x00\x05", "not in shortest form"),
        (b"\x19\x01\x00", "something else than 0..255"),
        (b"\x20", "something else than 0..255"),
        (b"\x41a", "something else than 0..255"),
    ],
)
def test_byte_array_refusals(items: bytes, match: str) -> None:
    body = b"\xa1\x61b\x83\x01\x02" + items
    with pytest.raises(BadRequestError, match=match):
        decode(body, "x", byte_array_keys=frozenset({"b"}))


def test_on_size_sees_declared_sizes_first() -> None:
    seen: list[tuple[str, int]] = []

    def on_size(key: str, size: int) -> None:
        seen.append((key, size))

    decoder = StrictDecoder("x", byte_array_keys=frozenset({"m"}), on_size=on_size)
    decoder.feed(b"\xa1\x61m\x5a\x40\x00\x00\x00")  # a 1 GiB byte string, not sent
    assert seen == [("m", 1 << 30)]


# ---- memory: what a body costs, measured with tracemalloc ------------------------------------


def _peak(call: Any) -> tuple[int, BaseException | None]:
    tracemalloc.start()
    error: BaseException | None = None
    try:
        call()
    except BadRequestError as exc:
        error = exc
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak, error


def test_a_body_of_empty_maps_stays_small() -> None:
    # 4 MiB of empty maps: a general decoder builds 4 million dicts (>250 MiB).
    count = 4 << 20
    body = b"\x9a" + count.to_bytes(4, "big") + b"\xa0" * count
    peak, error = _peak(lambda: decode(body, "RunModel"))
    assert isinstance(error, BadRequestError)
    assert "over the item limit" in error.message
    indefinite = b"\x9f" + b"\xa0" * count + b"\xff"
    peak2, error2 = _peak(lambda: decode(indefinite, "RunModel"))
    assert isinstance(error2, BadRequestError)
    assert "more than 65536 items" in error2.message
    assert max(peak, peak2) < 16 << 20


@pytest.mark.parametrize("form", ["bytes", "int-array", "indefinite-map"])
def test_declared_model_size_allocates_nothing(form: str) -> None:
    # A 512 MiB model declared, 1 MiB sent: memory follows what arrived.
    declared = 512 << 20
    sent = 1 << 20
    if form == "bytes":
        head = b"\xa1\x65model\x5a" + declared.to_bytes(4, "big")
        piece = b"\x01" * sent
    elif form == "int-array":
        head = b"\xa1\x65model\x9a" + declared.to_bytes(4, "big")
        piece = b"\x01" * sent
    else:
        head = b"\xbf\x65model\x5a" + declared.to_bytes(4, "big")
        piece = b"\x01" * sent
    decoder = wire.UploadStreamDecoder(max_model_bytes=1 << 30)

    def feed() -> None:
        decoder.feed(head)
        for start in range(0, sent, 64 << 10):
            decoder.feed(piece[start : start + (64 << 10)])

    peak, error = _peak(feed)
    assert error is None
    assert peak < 16 << 20  # was 512 MiB: bytearray(declared size)
