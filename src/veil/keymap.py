"""The key map: every server key the evidence vouches for besides the TLS certificate.

Report data has one layout on every platform (64 bytes)::

    [0:32]   SHA-256(TLS certificate DER)        what BlindAI 0.6 clients check
    [32:64]  SHA-256(canonical CBOR key map)     all zero when the map is empty

The key map is a CBOR map from a key's name (text) to its public key (bytes). Each name fixes its
key's format:

- ``"receipt"`` (`RECEIPT_KEY`): the Ed25519 public key (RFC 8032, 32 bytes) that signs the
  server's receipts (COSE_Sign1, algorithm EdDSA);
- other names are added by the components that need them (the broker exchange's HPKE key).

The encoding is canonical (RFC 8949 §4.2.1, core deterministic encoding: definite lengths,
shortest heads, keys sorted by their encoded bytes), and `KeyMap.decode` accepts nothing else, so
one map has exactly one encoding and one digest. The server makes its report data with
`veil.tls.binding_report_data` and serves the encoded map on the unattested port
(``GET /keys``); a client recomputes the map's digest, compares it with the verified report data
(`check_binding`) and only then trusts a key in it. A server with no key besides the certificate
leaves ``[32:64]`` zero, as BlindAI's servers do.

Example::

    >>> keys = KeyMap.build({RECEIPT_KEY: bytes(32)})
    >>> KeyMap.decode(keys.encoded) == keys
    True
    >>> KeyMap.build({}).digest == bytes(32)
    True
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from veil.errors import BadRequestError, BindingError, MalformedEvidenceError

__all__ = [
    "EMPTY_KEY_MAP",
    "MAX_KEYS",
    "MAX_KEY_BYTES",
    "RECEIPT_KEY",
    "KeyMap",
    "check_binding",
]

RECEIPT_KEY = "receipt"
"""Name of the receipt signing key: an Ed25519 public key, 32 bytes."""
MAX_KEYS = 16
MAX_KEY_BYTES = 1024
_NAME = re.compile(r"[a-z][a-z0-9-]{0,31}")
_DIGEST_SIZE = 32


def _head(major: int, value: int) -> bytes:
    """The shortest CBOR head for `major` type and `value` (RFC 8949 §4.2.1)."""
    if value < 24:
        return bytes([major << 5 | value])
    for extra, fmt in ((24, ">B"), (25, ">H"), (26, ">I")):
        if value < 1 << (8 * struct.calcsize(fmt)):
            return bytes([major << 5 | extra]) + struct.pack(fmt, value)
    return bytes([major << 5 | 27]) + struct.pack(">Q", value)


def _encoded_name(name: str) -> bytes:
    raw = name.encode()
    return _head(3, len(raw)) + raw


def _encode(keys: tuple[tuple[str, bytes], ...]) -> bytes:
    return _head(5, len(keys)) + b"".join(
        _encoded_name(name) + _head(2, len(key)) + key for name, key in keys
    )


@dataclass(frozen=True, slots=True)
class KeyMap:
    """A canonical key map and its encoding. Build with `build` or `decode`, not directly.

    Attributes:
        keys: public keys by name, as (name, key) pairs in canonical order.
        encoded: the canonical CBOR encoding (what the report data's second half hashes).
    """

    keys: tuple[tuple[str, bytes], ...]
    encoded: bytes

    @classmethod
    def build(cls, keys: Mapping[str, bytes]) -> KeyMap:
        """The key map of `keys` (names: 1-32 of ``a-z 0-9 -``, starting with a letter).

        Raises:
            ValueError: a name, a key or the number of keys is outside the limits.
        """
        if len(keys) > MAX_KEYS:
            raise ValueError(f"key map: got {len(keys)} keys, expected at most {MAX_KEYS}")
        for name, key in keys.items():
            if not isinstance(name, str) or not _NAME.fullmatch(name):
                raise ValueError(f"key map: name {name!r} is not 1-32 of a-z 0-9 -")
            if not isinstance(key, bytes) or not 0 < len(key) <= MAX_KEY_BYTES:
                raise ValueError(
                    f"key map: key {name!r} must be 1-{MAX_KEY_BYTES} bytes, "
                    f"got {type(key).__name__} of {len(key) if isinstance(key, bytes) else '?'}"
                )
        # Canonical order: by the encoded name's bytes (shorter names first, then bytewise).
        ordered = tuple(sorted(keys.items(), key=lambda item: _encoded_name(item[0])))
        return cls(ordered, _encode(ordered))

    @classmethod
    def decode(cls, encoded: bytes) -> KeyMap:
        """Read an encoded key map; only its canonical encoding is accepted.

        Raises:
            MalformedEvidenceError: not a canonical map of names to keys within the limits.
        """
        if len(encoded) > 1 + MAX_KEYS * (40 + 3 + MAX_KEY_BYTES):
            raise MalformedEvidenceError(f"key map: {len(encoded)} bytes, more than any map holds")
        # Imported here: the wire package pulls numpy, which the key map itself never needs.
        from veil.wire import cbor

        try:
            value = cbor.decode(encoded, "key map")
        except BadRequestError as exc:  # the strict decoder speaks HTTP; this is evidence
            raise MalformedEvidenceError(exc.message) from None
        if not isinstance(value, dict) or not all(
            isinstance(k, bytes | bytearray) for k in value.values()
        ):
            raise MalformedEvidenceError("key map: got something else, expected a map of bytes")
        try:
            built = cls.build({name: bytes(key) for name, key in value.items()})
        except ValueError as exc:
            raise MalformedEvidenceError(str(exc)) from None
        if built.encoded != bytes(encoded):
            raise MalformedEvidenceError(
                "key map: not in canonical CBOR (RFC 8949 §4.2.1), expected the one encoding"
            )
        return built

    @property
    def digest(self) -> bytes:
        """What report data holds at ``[32:64]``: SHA-256 of `encoded`, or zeros when empty."""
        if not self.keys:
            return bytes(_DIGEST_SIZE)
        return hashlib.sha256(self.encoded).digest()

    def get(self, name: str) -> bytes | None:
        """The key named `name`, or None."""
        for key_name, key in self.keys:
            if key_name == name:
                return key
        return None

    def __repr__(self) -> str:
        return f"KeyMap({', '.join(name for name, _ in self.keys)}; digest={self.digest.hex()})"


EMPTY_KEY_MAP = KeyMap.build({})


def check_binding(report: bytes, certificate_der: bytes, key_map_encoded: bytes | None) -> KeyMap:
    """The key map the verified `report` data vouches for, after checking both halves.

    Args:
        report: the verified evidence's 64 bytes of report data.
        certificate_der: the certificate the server showed.
        key_map_encoded: the encoded key map the server served; None when it serves none (a
            BlindAI or older veil server), which only a report whose second half is zero allows.

    Raises:
        BindingError: either half differs from what the certificate and map hash to.
        MalformedEvidenceError: the key map is not a canonical key map.
    """
    expected = hashlib.sha256(certificate_der).digest()
    if report[:32] != expected:
        raise BindingError(
            f"certificate binding: report data starts with {report[:32].hex()}, "
            f"expected SHA-256 of the server certificate {expected.hex()}"
        )
    key_map = EMPTY_KEY_MAP if key_map_encoded is None else KeyMap.decode(key_map_encoded)
    if report[32:64] != key_map.digest:
        raise BindingError(
            f"key map binding: report data [32:64] is {report[32:64].hex()}, "
            f"expected {key_map.digest.hex()} (the digest of the key map served)"
        )
    return key_map
