"""The key map the report data's second half binds: canonical encoding, strict decoding, binding."""

from __future__ import annotations

import hashlib

import cbor2
import pytest

from veil.errors import BindingError, MalformedEvidenceError
from veil.keymap import EMPTY_KEY_MAP, MAX_KEYS, RECEIPT_KEY, KeyMap, check_binding
from veil.tls import binding_report_data, generate_identity

RECEIPT = bytes(range(32))
HPKE = b"\x01" * 32


def test_round_trip_and_canonical_order() -> None:
    keys = KeyMap.build({"zz": b"\x02", RECEIPT_KEY: RECEIPT, "a": b"\x01", "hpke": HPKE})
    # RFC 8949 §4.2.1: by the encoded key's bytes, so shorter text keys come first.
    assert [name for name, _ in keys.keys] == ["a", "zz", "hpke", RECEIPT_KEY]
    assert cbor2.loads(keys.encoded) == {
        "a": b"\x01",
        "zz": b"\x02",
        "hpke": HPKE,
        "receipt": RECEIPT,
    }
    assert KeyMap.decode(keys.encoded) == keys
    assert keys.get(RECEIPT_KEY) == RECEIPT
    assert keys.get("nope") is None
    assert keys.digest == hashlib.sha256(keys.encoded).digest()
    assert (
        KeyMap.build({"hpke": HPKE, RECEIPT_KEY: RECEIPT}).encoded
        == KeyMap.build({RECEIPT_KEY: RECEIPT, "hpke": HPKE}).encoded
    )


def test_empty_map_digest_is_zero_and_report_data_layout() -> None:
    assert EMPTY_KEY_MAP.encoded == b"\xa0"
    assert EMPTY_KEY_MAP.digest == bytes(32)
    der = generate_identity().certificate_der
    keys = KeyMap.build({RECEIPT_KEY: RECEIPT})
    data = binding_report_data(der, keys)
    assert data == hashlib.sha256(der).digest() + hashlib.sha256(keys.encoded).digest()
    assert binding_report_data(der) == hashlib.sha256(der).digest() + bytes(32)


def test_long_keys_use_the_shortest_heads() -> None:
    keys = KeyMap.build({"big": b"\x05" * 300})
    assert keys.encoded == b"\xa1\x63big\x59\x01\x2c" + b"\x05" * 300
    assert KeyMap.decode(keys.encoded) == keys


@pytest.mark.parametrize(
    ("encoded", "match"),
    [
        # keys out of canonical order
        (b"\xa2\x62zz\x41\x02\x61a\x41\x01", "canonical"),
        # a non-shortest length head for the name
        (b"\xa1\x78\x01a\x41\x01", "canonical"),
        # indefinite-length map
        (b"\xbf\x61a\x41\x01\xff", "canonical"),
        # duplicate name
        (b"\xa2\x61a\x41\x01\x61a\x41\x02", "given twice"),
        # a value that is text, not bytes
        (b"\xa1\x61a\x61x", "expected a map of bytes"),
        # not a map
        (b"\x41\x01", "expected a map of bytes"),
        # an empty key
        (b"\xa1\x61a\x40", "1-1024 bytes"),
        # a name outside the alphabet
        (b"\xa1\x61A\x41\x01", "a-z 0-9"),
        # trailing bytes after the map
        (b"\xa0\x00", "after the end"),
        # a tag
        (b"\xc0\xa0", "no CBOR tags"),
        # truncated
        (b"\xa1\x61a\x42\x01", "declared"),
    ],
)
def test_decode_refuses_all_but_the_canonical_map(encoded: bytes, match: str) -> None:
    with pytest.raises(MalformedEvidenceError, match=match):
        KeyMap.decode(encoded)


def test_decode_refuses_too_many_keys_and_oversized_input() -> None:
    many = cbor2.dumps({f"k{i:02d}": b"\x01" for i in range(MAX_KEYS + 1)}, canonical=True)
    with pytest.raises(MalformedEvidenceError, match="at most 16"):
        KeyMap.decode(many)
    with pytest.raises(MalformedEvidenceError, match="more than any map holds"):
        KeyMap.decode(b"\xa0" * 100_000)


@pytest.mark.parametrize(
    ("keys", "match"),
    [
        ({"Receipt": b"\x01"}, "a-z"),
        ({"": b"\x01"}, "a-z"),
        ({"r": b""}, "1-1024"),
        ({"r": "text"}, "1-1024"),
        ({f"k{i}": b"\x01" for i in range(MAX_KEYS + 1)}, "at most"),
    ],
)
def test_build_refuses_names_and_keys_outside_the_limits(
    keys: dict[str, bytes], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        KeyMap.build(keys)


def test_check_binding_trusts_the_map_only_when_both_halves_match() -> None:
    der = generate_identity().certificate_der
    keys = KeyMap.build({RECEIPT_KEY: RECEIPT})
    report = binding_report_data(der, keys)
    assert check_binding(report, der, keys.encoded) == keys

    other = KeyMap.build({RECEIPT_KEY: bytes(31) + b"\x01"})
    with pytest.raises(BindingError, match="key map binding"):
        check_binding(report, der, other.encoded)  # a substituted receipt key
    with pytest.raises(BindingError, match="key map binding"):
        check_binding(report, der, EMPTY_KEY_MAP.encoded)  # the map withheld
    with pytest.raises(BindingError, match="key map binding"):
        check_binding(report, der, None)  # no map served, but the evidence binds one
    with pytest.raises(BindingError, match="certificate binding"):
        check_binding(report, generate_identity().certificate_der, keys.encoded)
    flipped = report[:40] + bytes([report[40] ^ 1]) + report[41:]
    with pytest.raises(BindingError, match="key map binding"):
        check_binding(flipped, der, keys.encoded)


def test_a_server_without_keys_needs_no_map() -> None:
    der = generate_identity().certificate_der
    report = binding_report_data(der)
    assert check_binding(report, der, None) == EMPTY_KEY_MAP
    assert check_binding(report, der, EMPTY_KEY_MAP.encoded) == EMPTY_KEY_MAP
    with pytest.raises(BindingError, match="key map binding"):
        check_binding(report, der, KeyMap.build({RECEIPT_KEY: RECEIPT}).encoded)


def test_repr_names_keys_not_their_bytes() -> None:
    text = repr(KeyMap.build({RECEIPT_KEY: RECEIPT}))
    assert "receipt" in text
    assert RECEIPT.hex() not in text
