"""API keys, roles and the authorization rules the server applies.

Keys are 32 random bytes. The server stores only SHA-256 of the secret (a slow password hash buys
nothing for a 256-bit random value), as a record in its sealed state (`veil.server.state`), and
compares digests in constant time. A key is shown once, when it is created::

    veil_<key id: 16 hex>_<secret: 64 hex>

Roles, from most to least powerful (each includes the rights of those below it):

- ``admin``: manage keys (create, list, revoke); upload; delete any model; predict.
- ``owner``: upload models; delete and list the models it uploaded; predict.
- ``user``: predict.

A model is either ``public`` (any valid key may predict, and, unless the operator turns it off
with ``--no-anonymous``, a request with no key at all: `Principal.anonymous_caller`) or
``restricted`` to named key ids (plus the key that uploaded it). An anonymous caller may only run
public models: never upload, delete, list or manage keys. An admin gets no implicit access to a
restricted model: restricted means exactly the keys listed.

Auth policy: `auth_required` — authentication is ON whenever the server listens beyond loopback,
and whenever keys exist; ``--no-auth`` turns it off for local development only, and the server
must print `NO_AUTH_BANNER` when it does. Secrets and their hashes are never logged; `KeyInfo`
carries neither.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from typing import Literal

from veil.errors import api_error_for_status
from veil.server.state import ROLES, KeyRecord, Manifest, Role, StateBackend

__all__ = [
    "API_KEY_HEADER",
    "NO_AUTH_BANNER",
    "PUBLIC",
    "RESTRICTED",
    "ROLES",
    "AuthGate",
    "KeyInfo",
    "KeySnapshot",
    "KeyStore",
    "Principal",
    "Role",
    "Visibility",
    "auth_required",
    "can_delete",
    "can_list",
    "can_manage_keys",
    "can_predict",
    "can_upload",
    "principal_from_api_key",
    "principal_from_authorization",
]

_RANK: dict[str, int] = {"user": 0, "owner": 1, "admin": 2}

Visibility = Literal["public", "restricted"]
PUBLIC: Visibility = "public"
RESTRICTED: Visibility = "restricted"

_PREFIX = "veil"
_ID_BYTES = 8
_SECRET_BYTES = 32
_KEY_RE = re.compile(r"veil_([0-9a-f]{16})_([0-9a-f]{64})")
_MAX_NAME = 200
# Compared against when the key id is unknown, so that a miss costs the same hash + compare.
_DUMMY_HASH = hashlib.sha256(b"veil: no such key").digest()

NO_AUTH_BANNER = (
    "WARNING: authentication is DISABLED (--no-auth). Anyone who can reach this server may "
    "upload, delete and query models. Use this for local development only."
)


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What the server knows about a key: never its secret or its hash.

    Attributes:
        key_id: public identifier (16 hex digits), also the owner id of the models it uploads.
        role: ``admin``, ``owner`` or ``user``.
        name: free-form label given at creation, or None.
        created_at: creation time, seconds since the epoch.
        revoked_at: revocation time, or None while the key is valid.
    """

    key_id: str
    role: Role
    name: str | None
    created_at: float
    revoked_at: float | None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    @property
    def principal(self) -> Principal:
        return Principal(key_id=self.key_id, role=self.role)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is making a request: a key id and its role.

    ``key_id`` is None only for the local-development principal used when auth is off
    (`Principal.unauthenticated`), which has every right.
    """

    key_id: str | None
    role: Role
    anonymous: bool = False

    @classmethod
    def unauthenticated(cls) -> Principal:
        """The principal of every request when the server runs with ``--no-auth``."""
        return cls(key_id=None, role="admin")

    @classmethod
    def anonymous_caller(cls) -> Principal:
        """A request with no key on a server that asks for keys: it may run public models only."""
        return cls(key_id=None, role="user", anonymous=True)

    def has_role(self, role: Role) -> bool:
        """True when this principal's role is `role` or a more powerful one (never anonymous)."""
        return not self.anonymous and _RANK[self.role] >= _RANK[role]


def can_manage_keys(p: Principal) -> bool:
    """Only admins create, list and revoke keys (and list every model with its metadata)."""
    return p.has_role("admin")


def can_upload(p: Principal) -> bool:
    """Owners and admins may upload models."""
    return p.has_role("owner")


def can_delete(p: Principal, model_owner: str | None) -> bool:
    """Admins may delete any model; owners only the models their key uploaded."""
    if p.has_role("admin"):
        return True
    return p.has_role("owner") and p.key_id is not None and p.key_id == model_owner


def can_list(p: Principal, model_owner: str | None) -> bool:
    """Whether `p` sees the model when listing models it manages (admins: all; owners: own)."""
    return can_delete(p, model_owner)


def can_predict(
    p: Principal,
    model_visibility: str,
    allowed_key_ids: Collection[str],
    model_owner: str | None = None,
) -> bool:
    """Whether `p` may run a model.

    Args:
        p: the caller.
        model_visibility: ``"public"`` or ``"restricted"``; anything else is refused (fail closed).
        allowed_key_ids: for a restricted model, the key ids allowed to predict.
        model_owner: the key id that uploaded the model; it may always run its own model.
    """
    if p.anonymous:  # no key on a server that asks for keys: public models only
        return model_visibility == PUBLIC
    if p.key_id is None:  # auth off: local development, every right
        return True
    if model_visibility == PUBLIC:
        return True
    if model_visibility != RESTRICTED:
        return False
    return p.key_id in allowed_key_ids or (model_owner is not None and p.key_id == model_owner)


def auth_required(host: str, no_auth: bool, *, keys_exist: bool = False) -> bool:
    """Whether the server must demand an API key on every request.

    Rule: with ``no_auth`` (the ``--no-auth`` flag, for local development) auth is off and the
    server must print `NO_AUTH_BANNER`. Otherwise auth is on when `host` is anything but a
    loopback address (``127.0.0.0/8``, ``::1``, ``localhost``) — wildcard binds (``0.0.0.0``,
    ``::``, empty) and host names count as beyond loopback — and also on loopback as soon as any
    key exists (`keys_exist`, from `KeyStore.any_keys`).
    """
    if no_auth:
        return False
    return keys_exist or not _is_loopback(host)


def _is_loopback(host: str) -> bool:
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _hash(secret: bytes) -> bytes:
    return hashlib.sha256(secret).digest()


def _info(r: KeyRecord) -> KeyInfo:
    return KeyInfo(r.key_id, r.role, r.name, r.created_at, r.revoked_at)


@dataclass(frozen=True, slots=True)
class KeySnapshot:
    """The keys of one committed manifest: what one request's authentication reads, so that its
    checks agree with each other and the manifest's freshness is checked once (that check, an
    open, a stat and a read, was the largest Python cost of a null request)."""

    manifest: Manifest

    @property
    def auth_on(self) -> bool:
        """True when the state demands keys: any key ever created, or a restricted model."""
        return self.manifest.auth_on

    @property
    def any_keys(self) -> bool:
        """True when at least one key (valid or revoked) was ever created."""
        return bool(self.manifest.keys)

    def authenticate(self, secret_string: str) -> KeyInfo | None:
        """The key whose secret is `secret_string`, or None (malformed, unknown or revoked)."""
        m = _KEY_RE.fullmatch(secret_string)
        if m is None:
            return None
        key_id, secret_hex = m.group(1), m.group(2)
        r = self.manifest.keys.get(key_id)
        stored = _DUMMY_HASH if r is None else r.secret_hash
        ok = hmac.compare_digest(_hash(secret_hex.encode()), stored)
        if r is None or not ok or r.revoked_at is not None:
            return None
        return _info(r)


class KeyStore:
    """API keys as records in the server's sealed state (`veil.server.state.SealedState`).

    The records are part of the sealed manifest, so an edited, added or removed record (or a
    manifest put back from before a revocation, beside a newer witness) makes the state refuse
    to load rather than change who may do what. Several processes may share one state (the
    server, and ``veil keys`` beside it with the same sealing key): each change is a commit
    under the state's lock, and `authenticate` sees the last commit from the next request on.

    Example::

        store = KeyStore(state)
        key_id, secret = store.create("owner", name="alice")   # show `secret` once
        info = store.authenticate(secret)                       # KeyInfo, or None
    """

    def __init__(self, state: StateBackend, *, now: Callable[[], float] = time.time) -> None:
        self._state = state
        self._now = now

    @property
    def state(self) -> StateBackend:
        return self._state

    def create(self, role: Role, name: str | None = None) -> tuple[str, str]:
        """Create a key; return ``(key_id, secret_string)``. The secret is not stored anywhere."""
        if role not in ROLES:
            raise ValueError(f"role: got {role!r}, expected one of {', '.join(ROLES)}")
        if name is not None and (len(name) > _MAX_NAME or not name.isprintable()):
            raise ValueError(f"name: expected at most {_MAX_NAME} printable characters")
        secret = secrets.token_bytes(_SECRET_BYTES)
        made: list[str] = []

        def add(current: Manifest, version: int) -> Manifest:
            key_id = secrets.token_hex(_ID_BYTES)
            while key_id in current.keys:  # 2^-64 id collision: draw again
                key_id = secrets.token_hex(_ID_BYTES)
            made.append(key_id)
            record = KeyRecord(key_id, role, name, _hash(secret.hex().encode()), self._now())
            return current.replace(keys={**current.keys, key_id: record})

        self._state.update(add)
        return made[-1], f"{_PREFIX}_{made[-1]}_{secret.hex()}"

    def list(self) -> list[KeyInfo]:
        """Every key, revoked ones included, oldest first."""
        records = sorted(
            self._state.current().keys.values(), key=lambda r: (r.created_at, r.key_id)
        )
        return [_info(r) for r in records]

    def get(self, key_id: str) -> KeyInfo | None:
        """The key `key_id`, or None."""
        r = self._state.current().keys.get(key_id)
        return None if r is None else _info(r)

    def revoke(self, key_id: str) -> None:
        """Revoke `key_id` (idempotent). Raises `NotFoundError` (404) for an unknown id."""
        current = self._state.current().keys.get(key_id)
        if current is None:
            raise api_error_for_status(404, f"key id: got {key_id!r}, no such key")
        if current.revoked_at is not None:
            return

        def revoke(m: Manifest, version: int) -> Manifest:
            r = m.keys.get(key_id)
            if r is None:  # cannot happen: records are never removed
                raise api_error_for_status(404, f"key id: got {key_id!r}, no such key")
            revoked = r if r.revoked_at is not None else replace(r, revoked_at=self._now())
            return m.replace(keys={**m.keys, key_id: revoked})

        self._state.update(revoke)

    @property
    def may_block(self) -> bool:
        """Whether a look-up may wait on the network (`StateBackend.current_may_block`)."""
        return self._state.current_may_block

    def snapshot(self) -> KeySnapshot:
        """The keys as last committed (checked for a newer commit now)."""
        return KeySnapshot(self._state.current())

    def any_keys(self) -> bool:
        """True when at least one key (valid or revoked) was ever created."""
        return self.snapshot().any_keys

    def auth_on(self) -> bool:
        """True when the state demands keys: any key ever created, or a restricted model."""
        return self.snapshot().auth_on

    def authenticate(self, secret_string: str) -> KeyInfo | None:
        """The key whose secret is `secret_string`, or None (malformed, unknown or revoked)."""
        return self.snapshot().authenticate(secret_string)


API_KEY_HEADER = "X-Veil-Api-Key"


def principal_from_api_key(api_key: str | None, store: KeyStore | KeySnapshot) -> Principal:
    """The principal of a request, from its ``X-Veil-Api-Key`` header value (the SDK's header).

    Raises `AuthenticationError` (401) when the key is missing, malformed, unknown or revoked.
    The message never repeats the key.
    """
    if not api_key:
        raise api_error_for_status(
            401,
            f"missing API key: pass api_key= to veil.connect (or send the {API_KEY_HEADER} header)",
        )
    info = store.authenticate(api_key.strip())
    if info is None:
        raise api_error_for_status(401, "invalid or revoked API key")
    return info.principal


def principal_from_authorization(
    authorization: str | None, store: KeyStore | KeySnapshot
) -> Principal:
    """Like `principal_from_api_key`, from an ``Authorization: Bearer <key>`` header value."""
    if not authorization:
        raise api_error_for_status(401, "missing API key: send 'Authorization: Bearer <key>'")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise api_error_for_status(401, "Authorization header: expected 'Bearer <key>'")
    return principal_from_api_key(token.strip(), store)


_FIRST_KEY_HINT = (
    "no API keys exist yet: the server's administrator creates the first one with "
    "'veil keys create --role admin --data-dir <the server's data directory> "
    "--platform <its platform>'"
)


class AuthGate:
    """Whether a request needs an API key (`auth_required`), and whose key it is.

    The decision is re-made per request from the sealed state, so keys created while the server
    runs (``veil keys create`` on its data directory) take effect at once: on loopback, the
    first key created turns authentication on. Once the state holds a key record (records are
    revoked, never removed) or a restricted model, authentication stays on: no file vanishing
    turns it off (a missing manifest is a `SealedStateError`, not "no keys").

    Args:
        store: the server's keys.
        host: the address the server binds (beyond loopback: authentication always on).
        no_auth: ``--no-auth``: never ask (local development; print `NO_AUTH_BANNER`).
        anonymous: whether a request with no key may run public models
            (`Principal.anonymous_caller`); ``--no-anonymous`` turns it off.
        now: the clock of `last_used`.
    """

    def __init__(
        self,
        store: KeyStore,
        *,
        host: str,
        no_auth: bool,
        anonymous: bool = True,
        now: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._no_auth = no_auth
        self._always = auth_required(host, no_auth)
        self._anonymous = anonymous
        self._now = now
        # In memory only: writing the sealed state on every request would cost a commit each.
        # One entry per key that was ever used, so it is bounded by the key records.
        self._last_used: dict[str, float] = {}

    @property
    def store(self) -> KeyStore:
        return self._store

    @property
    def may_block(self) -> bool:
        """Whether `enabled` and `authenticate` may wait on the network (shared state in a
        database): an event loop calls them from a worker thread then, else inline (they cost
        a stat and a SHA-256 while nothing changed, less than a hop to a thread and back)."""
        return not self._no_auth and self._store.may_block

    def describe(self) -> str:
        """One phrase for the server's ready line."""
        if self._no_auth:
            return "auth=OFF (--no-auth)"
        if self._always:
            return "auth=on"
        return "auth=on" if self._store.auth_on() else "auth=off until a key exists (loopback)"

    def enabled(self) -> bool:
        """Whether this request must carry a valid API key."""
        return not self._no_auth and self._demands_keys(self._store.snapshot())

    def _demands_keys(self, keys: KeySnapshot) -> bool:
        return self._always or keys.auth_on

    @property
    def anonymous(self) -> bool:
        """Whether requests with no key may run public models (while auth is on)."""
        return self._anonymous

    def last_used(self, key_id: str) -> float | None:
        """When `key_id` last authenticated a request since this server started, or None."""
        return self._last_used.get(key_id)

    def authenticate(self, api_key: str | None, *, allow_anonymous: bool = False) -> Principal:
        """The principal of a request; auth off: `Principal.unauthenticated`.

        With `allow_anonymous` (routes that run models) and anonymous access on, a request
        that carries no key at all is `Principal.anonymous_caller`; a key that is sent but
        wrong is still refused, never downgraded.

        Raises `AuthenticationError` (401) for a missing, malformed, unknown or revoked key; when
        no key exists at all, the message says how the first admin key is made.
        """
        if self._no_auth:
            return Principal.unauthenticated()
        keys = self._store.snapshot()  # one manifest for every check below
        if not self._demands_keys(keys):
            return Principal.unauthenticated()
        if allow_anonymous and self._anonymous and not api_key:
            return Principal.anonymous_caller()
        if not keys.any_keys:
            raise api_error_for_status(401, _FIRST_KEY_HINT)
        principal = principal_from_api_key(api_key, keys)
        if principal.key_id is not None:
            self._last_used[principal.key_id] = self._now()
        return principal
