"""The admin-key API's messages (veil extension, management port, admin keys only).

Requests (client → server) and replies::

    POST /admin/keys         {role, name?}        → {key_id, key, role, name, created_at}
    GET  /admin/keys                              → [{key_id, role, name, created_at,
                                                      revoked_at, last_used_at}...]
    POST /admin/keys/revoke  {key_id}             → null

The ``key`` of a create reply is the only time a secret crosses the wire; the server keeps its
hash. Times are seconds since the epoch (``last_used_at``: since the server started, or null).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cbor2

from veil.errors import BadRequestError
from veil.wire.cbor import decode

__all__ = [
    "CreateKeyRequest",
    "decode_create_key_request",
    "decode_revoke_key_request",
    "encode_create_key_request",
    "encode_revoke_key_request",
]

_KEY_ID = re.compile(r"[0-9a-f]{16}")


@dataclass(frozen=True, slots=True)
class CreateKeyRequest:
    role: str
    name: str | None


def _map(body: bytes | bytearray, what: str) -> Mapping[str, Any]:
    message = decode(body, what)
    if not isinstance(message, Mapping):
        raise BadRequestError(400, f"{what}: got CBOR {type(message).__name__}, expected a map")
    return message


def decode_create_key_request(body: bytes | bytearray) -> CreateKeyRequest:
    message = _map(body, "CreateKey")
    role, name = message.get("role"), message.get("name")
    if not isinstance(role, str):
        raise BadRequestError(400, f"CreateKey.role: got {type(role).__name__}, expected text")
    if name is not None and not isinstance(name, str):
        raise BadRequestError(400, f"CreateKey.name: got {type(name).__name__}, expected text")
    return CreateKeyRequest(role=role, name=name)


def encode_create_key_request(role: str, name: str | None) -> bytes:
    return bytes(cbor2.dumps({"role": role, "name": name}))


def decode_revoke_key_request(body: bytes | bytearray) -> str:
    key_id = _map(body, "RevokeKey").get("key_id")
    if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
        raise BadRequestError(400, "RevokeKey.key_id: expected 16 lower-case hex digits")
    return key_id


def encode_revoke_key_request(key_id: str) -> bytes:
    return bytes(cbor2.dumps({"key_id": key_id}))
