"""The portal's own SQLite: accounts, sessions and which key ids belong to which account.

It never holds an API key's secret (the server shows it once, to the user, through the portal's
answer) nor a session token: sessions are stored as SHA-256 of their token, so a copy of this file
opens no session. Passwords are Argon2id hashes (`argon2-cffi`'s defaults, RFC 9106).
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

__all__ = ["Account", "PortalStore", "Session"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (
    id INTEGER PRIMARY KEY,
    email TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    token_hash BLOB PRIMARY KEY,
    account_id INTEGER REFERENCES accounts(id),
    csrf TEXT NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_expiry ON sessions (expires_at);
CREATE TABLE IF NOT EXISTS keys (
    key_id TEXT PRIMARY KEY,
    account_id INTEGER NOT NULL REFERENCES accounts(id),
    created_at REAL NOT NULL
);
"""
SESSION_LIFETIME_S = 8 * 3600
# A visitor who is not logged in still gets a session (its CSRF token guards the login and
# sign-up forms); short-lived, so that cookie-less requests cannot pile rows up for hours.
ANONYMOUS_SESSION_LIFETIME_S = 1800


@dataclass(frozen=True, slots=True)
class Account:
    id: int
    email: str
    created_at: float


@dataclass(frozen=True, slots=True)
class Session:
    """A browser's session: its CSRF token, and the account when logged in."""

    token: str
    csrf: str
    account: Account | None


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class PortalStore:
    """Accounts, sessions and key ownership in one SQLite file (thread-safe, one connection).

    Args:
        path: the database file (created, mode 0600), or ``":memory:"`` for tests.
        now: the clock (seconds since the epoch) sessions expire by.
        hasher: the Argon2id hasher (tests pass cheaper parameters).
    """

    def __init__(
        self,
        path: Path | str,
        *,
        now: Callable[[], float] = time.time,
        hasher: PasswordHasher | None = None,
    ) -> None:
        if isinstance(path, Path) and not path.exists():
            path.touch(mode=0o600)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()
        self._now = now
        self._hasher = hasher or PasswordHasher()
        # Verified against when an e-mail is unknown: a miss costs what a wrong password does.
        self._dummy = self._hasher.hash(secrets.token_hex(16))

    def close(self) -> None:
        self._db.close()

    # ---- accounts ---------------------------------------------------------------------------

    def create_account(self, email: str, password: str) -> Account | None:
        """A new account, or None when the e-mail is taken."""
        hashed = self._hasher.hash(password)
        now = self._now()
        with self._lock:
            try:
                cursor = self._db.execute(
                    "INSERT INTO accounts (email, password_hash, created_at) VALUES (?, ?, ?)",
                    (email, hashed, now),
                )
            except sqlite3.IntegrityError:
                return None
        assert cursor.lastrowid is not None
        return Account(cursor.lastrowid, email, now)

    def check_password(self, email: str, password: str) -> Account | None:
        """The account whose e-mail and password these are, or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT id, password_hash, created_at FROM accounts WHERE email = ?", (email,)
            ).fetchone()
        stored = self._dummy if row is None else row[1]
        try:
            self._hasher.verify(stored, password)
        except (VerificationError, InvalidHashError):
            return None
        if row is None:
            return None
        return Account(row[0], email, row[2])

    # ---- sessions ---------------------------------------------------------------------------

    def new_session(self, account: Account | None = None) -> Session:
        """A fresh session (new token, new CSRF token)."""
        token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        lifetime = ANONYMOUS_SESSION_LIFETIME_S if account is None else SESSION_LIFETIME_S
        with self._lock:
            self._db.execute("DELETE FROM sessions WHERE expires_at <= ?", (self._now(),))
            self._db.execute(
                "INSERT INTO sessions (token_hash, account_id, csrf, expires_at) "
                "VALUES (?, ?, ?, ?)",
                (
                    _digest(token),
                    None if account is None else account.id,
                    csrf,
                    self._now() + lifetime,
                ),
            )
        return Session(token, csrf, account)

    def session(self, token: str) -> Session | None:
        """The live session whose token this is, or None (unknown or expired)."""
        with self._lock:
            row = self._db.execute(
                "SELECT s.csrf, s.expires_at, a.id, a.email, a.created_at FROM sessions s "
                "LEFT JOIN accounts a ON a.id = s.account_id WHERE s.token_hash = ?",
                (_digest(token),),
            ).fetchone()
        if row is None or row[1] <= self._now():
            return None
        account = None if row[2] is None else Account(row[2], row[3], row[4])
        return Session(token, row[0], account)

    def end_session(self, token: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM sessions WHERE token_hash = ?", (_digest(token),))
            self._db.execute("DELETE FROM sessions WHERE expires_at <= ?", (self._now(),))

    # ---- key ownership ----------------------------------------------------------------------

    def add_key(self, account: Account, key_id: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO keys (key_id, account_id, created_at) VALUES (?, ?, ?)",
                (key_id, account.id, self._now()),
            )

    def key_ids(self, account: Account) -> set[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT key_id FROM keys WHERE account_id = ?", (account.id,)
            ).fetchall()
        return {row[0] for row in rows}
