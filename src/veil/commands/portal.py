"""``veil portal``: the sign-up and API-key pages of a managed service, in front of ``veil serve``.

The portal connects to the server like any veil client (its evidence verified against
``--policy``) with an admin key read from a file or ``VEIL_ADMIN_KEY``, never from the command
line (process listings show arguments). It serves plain HTTP on loopback by default: put a
TLS-terminating reverse proxy in front (its cookies are Secure: browsers send them only over
HTTPS, and to ``localhost``).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from veil.errors import VeilError

__all__ = ["register"]


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "portal",
        help="serve the sign-up / API-key web pages of a managed veil service",
        description="Web pages where users sign up, create and revoke API keys and manage "
        "their models; a client of 'veil serve' holding an admin key.",
    )
    parser.add_argument(
        "--server",
        default=None,
        help="the veil server: HOST or HOST:UNATTESTED:ATTESTED:MANAGEMENT "
        "(default: VEIL_SERVER or the client config file)",
    )
    parser.add_argument("--policy", type=Path, default=None, help="the policy TOML to verify it")
    parser.add_argument(
        "--simulation",
        action="store_true",
        help="accept a simulated server (NO SECURITY; development only)",
    )
    parser.add_argument(
        "--admin-key-file",
        type=Path,
        default=None,
        help="file holding the admin API key (default: the VEIL_ADMIN_KEY variable)",
    )
    parser.add_argument(
        "--db", type=Path, default=Path("veil-portal.sqlite3"), help="the portal's database"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument(
        "--port", type=int, default=8080, help="port to listen on (0: a free one, printed)"
    )
    parser.add_argument("--name", default="veil", help="the service's name in page titles")
    parser.set_defaults(handler=run)


def _admin_key(args: argparse.Namespace) -> str:
    if args.admin_key_file is not None:
        return Path(args.admin_key_file).read_text(encoding="utf-8").strip()
    key = os.environ.get("VEIL_ADMIN_KEY", "").strip()
    if not key:
        raise ValueError("no admin key: pass --admin-key-file FILE or set VEIL_ADMIN_KEY")
    return key


class _Reconnecting:
    """A `veil.Connection` with the admin key, opened again (and re-attested) when it fails."""

    def __init__(self, args: argparse.Namespace, api_key: str) -> None:
        self._args = args
        self._api_key = api_key
        self._lock = threading.Lock()
        self._connection: Any = None

    def _connect(self) -> Any:
        import veil
        from veil.client.defaults import parse_address

        kwargs: dict[str, Any] = {"api_key": self._api_key}
        if self._args.policy is not None:
            kwargs["policy"] = veil.Policy.from_toml(Path(self._args.policy))
        if self._args.simulation:
            kwargs["simulation"] = True
        if self._args.server is None:
            return veil.connect(**kwargs)
        host, ports = parse_address(self._args.server)
        return veil.connect(host, **ports, **kwargs)

    def __getattr__(self, name: str) -> Any:
        from veil.errors import TransportError

        def call(*args: Any) -> Any:
            with self._lock:
                if self._connection is None:
                    self._connection = self._connect()
                connection = self._connection
            try:
                return getattr(connection, name)(*args)
            except TransportError:
                with self._lock:
                    self._connection = None
                raise

        return call


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from veil.portal.app import build_portal
        from veil.portal.store import PortalStore
    except ImportError as exc:
        print(f"veil portal: {exc}: install veil[portal]", file=sys.stderr)
        return 2
    try:
        admin = _Reconnecting(args, _admin_key(args))
        admin.list_keys()  # attest the server and check the key now, not on the first visitor
    except (VeilError, ValueError, OSError) as exc:
        print(f"veil portal: {exc}", file=sys.stderr)
        return 2
    store = PortalStore(Path(args.db))
    app = build_portal(store, admin, service_name=args.name)
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as exc:
        sock.close()
        print(f"veil portal: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    # The bound port, not the one asked for: with --port 0 the system chooses a free one.
    port = sock.getsockname()[1]
    print(f"veil portal: serving on http://{args.host}:{port}", flush=True)
    config = uvicorn.Config(app, log_level="warning", server_header=False)
    uvicorn.Server(config).run(sockets=[sock])
    return 0
