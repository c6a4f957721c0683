"""The admin-key API on the management port: create, list and revoke keys, for admin keys only.

With an admin key, ``GET /models`` on the same port lists every model with its owner and
visibility: that is the catalogue (no second route for it).

A service's sign-up portal (``veil portal``) is an ordinary client of these routes: the server
generates every secret, returns it once and keeps only its hash in the sealed state; the portal
never holds a secret it did not just hand to its user. Wire formats: `veil.wire.admin`.

Every route first authenticates (401) and then demands the ``admin`` role (403), so a non-admin
learns nothing about other keys or models.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import cbor2
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from veil.errors import BadRequestError, api_error_for_status
from veil.server.keys import ROLES, AuthGate, KeyInfo, Principal, can_manage_keys
from veil.wire.admin import decode_create_key_request, decode_revoke_key_request

__all__ = ["admin_handlers"]

_CBOR = "application/cbor"
Handler = Callable[[Request], Awaitable[Response]]


def _key_entry(info: KeyInfo, last_used: float | None) -> dict[str, Any]:
    return {
        "key_id": info.key_id,
        "role": info.role,
        "name": info.name,
        "created_at": info.created_at,
        "revoked_at": info.revoked_at,
        "last_used_at": last_used,
    }


def admin_handlers(
    *,
    auth: AuthGate,
    authenticate: Callable[[Request], Awaitable[Principal]],
    read_body: Callable[[Request], Awaitable[bytearray]],
) -> list[tuple[str, Handler, str]]:
    """(path, handler, method) of each admin route.

    Args:
        auth: the server's keys and who used them last.
        authenticate: the server's authentication and per-key rate limit for a request.
        read_body: reads a request body under the server's request size limit.
    """
    store = auth.store

    async def admin(request: Request) -> Principal:
        principal = await authenticate(request)
        if principal.key_id is None or not can_manage_keys(principal):
            # With --no-auth there is no key to hold an admin role: the API stays closed.
            raise api_error_for_status(
                403, f"the admin API needs an admin key; this caller's role is {principal.role}"
            )
        return principal

    async def create_key(request: Request) -> Response:
        await admin(request)
        message = decode_create_key_request(await read_body(request))
        if message.role not in ROLES:
            raise BadRequestError(
                400, f"role: got {message.role[:20]!r}, expected one of {', '.join(ROLES)}"
            )
        try:
            key_id, secret = await run_in_threadpool(store.create, message.role, message.name)
        except ValueError as exc:
            raise BadRequestError(400, str(exc)) from None
        info = store.get(key_id)
        assert info is not None  # just created; records are never removed
        reply = {**_key_entry(info, None), "key": secret}
        return Response(cbor2.dumps(reply), media_type=_CBOR)

    async def list_keys(request: Request) -> Response:
        await admin(request)
        keys = [_key_entry(k, auth.last_used(k.key_id)) for k in store.list()]
        return Response(cbor2.dumps(keys), media_type=_CBOR)

    async def revoke_key(request: Request) -> Response:
        await admin(request)
        key_id = decode_revoke_key_request(await read_body(request))
        await run_in_threadpool(store.revoke, key_id)
        return Response(cbor2.dumps(None), media_type=_CBOR)

    return [
        ("/admin/keys", create_key, "POST"),
        ("/admin/keys", list_keys, "GET"),
        ("/admin/keys/revoke", revoke_key, "POST"),
    ]
