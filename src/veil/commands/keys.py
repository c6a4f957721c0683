"""``veil keys``: create, list and revoke the server's API keys, on its data directory.

The key records are part of the server's sealed state, so this command needs the server's
sealing key: it opens the same platform as ``veil serve`` (``--platform``, same default) on the
same data directory. Simulated: the key file in the data directory. SGX: the sealing key exists
only inside the enclave, so the command runs inside the same enclave (same measurement) as the
server. TDX / SEV-SNP without a sealing key: only beside a server started with
``--unsealed-store``, and given that flag too. A running server sees each change from its next
request on.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from veil.commands import error_line
from veil.errors import ApiError, VeilError
from veil.providers import detect_provider
from veil.server.config import DEFAULT_DATA_DIR
from veil.server.keys import ROLES, KeyStore, Role
from veil.server.state import open_state

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

    lst = sub.add_parser("list", help="list keys (ids, roles, names; never secrets)")

    revoke = sub.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("key_id")

    for p in (create, lst, revoke):
        p.add_argument(
            "--data-dir",
            type=Path,
            default=DEFAULT_DATA_DIR,
            help=f"the server's data directory (default ./{DEFAULT_DATA_DIR}, as 'veil serve')",
        )
        p.add_argument(
            "--platform",
            choices=("auto", "simulated", "sgx", "tdx", "sev-snp"),
            default="auto",
            help="the server's platform, whose sealing key protects the keys (default: the one "
            "present; never simulated)",
        )
        p.add_argument(
            "--unsealed-store",
            action="store_true",
            help="the server runs with --unsealed-store on a platform with no sealing key",
        )
    parser.set_defaults(handler=_guarded)


def _store(args: argparse.Namespace) -> KeyStore:
    data_dir = Path(args.data_dir)
    # Checked first, so that a typo creates nothing (the sealed state would be made there).
    if not data_dir.exists():
        raise OSError(
            f"--data-dir {data_dir}: no such directory (start 'veil serve --data-dir "
            f"{data_dir}' once, or give the server's data directory)"
        )
    if not data_dir.is_dir():
        raise OSError(f"--data-dir {data_dir}: not a directory")
    provider = detect_provider(args.platform, data_dir=data_dir)
    return KeyStore(open_state(data_dir, provider.sealing_key, unsealed=args.unsealed_store))


def _guarded(args: argparse.Namespace) -> int:
    handler = {"create": _create, "list": _list, "revoke": _revoke}[args.keys_command]
    try:
        return handler(args)
    except (VeilError, OSError) as exc:
        print(f"veil keys {args.keys_command}: {error_line(exc)}", file=sys.stderr)
        return 2


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
