"""``veil keys``: create, list and revoke the server's API keys (offline, on its data directory)."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from veil.errors import ApiError
from veil.server.keys import KEYS_FILENAME, ROLES, KeyStore, Role

__all__ = ["register"]


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "keys",
        help="manage API keys (admin / owner / user)",
        description="Manage the API keys a veil server accepts. Run it on the server's data dir.",
    )
    sub = parser.add_subparsers(dest="keys_command", required=True, metavar="ACTION")

    create = sub.add_parser("create", help="create a key and print it once")
    create.add_argument("--role", required=True, choices=ROLES)
    create.add_argument("--name", default=None, help="a label to recognise the key by")
    create.set_defaults(handler=_create)

    lst = sub.add_parser("list", help="list keys (ids, roles, names; never secrets)")
    lst.set_defaults(handler=_list)

    revoke = sub.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("key_id")
    revoke.set_defaults(handler=_revoke)

    for p in (create, lst, revoke):
        p.add_argument("--data-dir", required=True, type=Path, help="the server's data directory")


def _store(args: argparse.Namespace) -> KeyStore:
    return KeyStore(Path(args.data_dir) / KEYS_FILENAME)


def _create(args: argparse.Namespace) -> int:
    try:
        key_id, secret = _store(args).create(cast(Role, args.role), name=args.name)
    except ValueError as exc:
        print(f"veil keys create: {exc}", file=sys.stderr)
        return 2
    print(f"key id: {key_id}")
    print(f"role:   {args.role}")
    print(f"key:    {secret}")
    print(
        "Store this key now: it is shown only once and cannot be recovered "
        "(the server keeps only its hash).",
        file=sys.stderr,
    )
    return 0


def _time(t: float | None) -> str:
    if t is None:
        return "-"
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _list(args: argparse.Namespace) -> int:
    keys = _store(args).list()
    if not keys:
        print("no keys")
        return 0
    print(f"{'KEY ID':<16}  {'ROLE':<5}  {'CREATED':<20}  {'REVOKED':<20}  NAME")
    for k in keys:
        print(
            f"{k.key_id:<16}  {k.role:<5}  {_time(k.created_at):<20}  "
            f"{_time(k.revoked_at):<20}  {k.name or ''}"
        )
    return 0


def _revoke(args: argparse.Namespace) -> int:
    try:
        _store(args).revoke(args.key_id)
    except ApiError as exc:
        print(f"veil keys revoke: {exc.message}", file=sys.stderr)
        return 1
    print(f"revoked {args.key_id}")
    return 0
