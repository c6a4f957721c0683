"""``veil proxy``: verify a server, then serve the Open Inference Protocol v2 on loopback.

See `veil.proxy` for what is relayed and how verification fails closed.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import sys
import warnings
from pathlib import Path
from typing import Any

from veil.errors import AttestationError, SimulationModeWarning, TransportError

__all__ = ["listen", "parse_listen", "register"]

_SIMULATION_BANNER = (
    "veil proxy: WARNING: --simulation: the server runs in no TEE and its evidence proves "
    "NOTHING. Anyone running that server sees every input and output. Never send real data."
)


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "proxy",
        help="verify a server, then serve the Open Inference Protocol v2 on a loopback port",
        description=(
            "Attest the server as veil.connect does, then relay Open Inference Protocol v2 "
            "requests (KServe v2 REST: /v2/models/NAME/infer ...) from a loopback port over the "
            "channel pinned to the attested certificate, so that curl, tritonclient or any HTTP "
            "client reaches the confidential model. Requests are refused (502) while the server "
            "fails verification; it is verified again when its certificate changes."
        ),
    )
    parser.add_argument("--server", required=True, metavar="HOST", help="the veil server")
    parser.add_argument(
        "--policy",
        type=Path,
        help="TOML policy naming the measurements to accept (required unless --simulation)",
    )
    parser.add_argument(
        "--simulation",
        action="store_true",
        help="accept a simulated server (NO SECURITY: development only); without --policy it "
        "pins this veil version's simulated measurement",
    )
    parser.add_argument(
        "--api-key-env",
        metavar="VAR",
        default="VEIL_API_KEY",
        help="environment variable holding the API key sent to the server (default "
        "VEIL_API_KEY; the key is never read from the command line)",
    )
    parser.add_argument(
        "--listen",
        default="127.0.0.1:8000",
        metavar="ADDR:PORT",
        help="loopback address and port to serve on (default 127.0.0.1:8000; port 0 picks one)",
    )
    parser.add_argument("--unattested-port", type=int, default=9923)
    parser.add_argument("--attested-port", type=int, default=9924)
    parser.add_argument("--management-port", type=int, default=9925)
    parser.add_argument(
        "--collateral",
        default="server",
        metavar="SOURCE",
        help="'server' (default: what the server serves), 'services' (Intel PCS/PCCS, AMD "
        "KDS), or a bundle directory written by 'veil collateral fetch'",
    )
    parser.add_argument("--pccs-url", help="with --collateral services: Intel PCS or a PCCS")
    parser.add_argument("--kds-url", help="with --collateral services: AMD KDS or a mirror")
    parser.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="seconds per relayed request, and for a caller to send its body (default 30)",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=64 << 20,
        help="largest request body relayed (default 64 MiB; 413 past it)",
    )
    parser.set_defaults(handler=_proxy)


def parse_listen(text: str) -> tuple[str, int]:
    """(host, port) of ``--listen``, refusing any address but a loopback one.

    Raises:
        ValueError: not ``ADDR:PORT``, or not a loopback address: the proxy hands decrypted
            outputs to whoever reaches it.
    """
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"--listen: got {text!r}, expected ADDR:PORT such as 127.0.0.1:8000")
    if host != "localhost":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(
                f"--listen: got {host!r}, expected a loopback address (127.0.0.1, ::1): the "
                "proxy relays plaintext to whoever reaches it"
            )
    return host, int(port_text)


def listen(host: str, port: int) -> socket.socket:
    """The proxy's listening socket (port 0 picks a free one).

    Raises:
        OSError: the address cannot be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted sockets inherit it: without, an answer's headers and body go out as two
        # writes and Nagle holds the body for the client's delayed ACK (40 ms a request,
        # measured with bench/bench_proxy.py).
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        listener.bind((host, port))
        listener.listen(128)
    except OSError:
        listener.close()
        raise
    return listener


def _collateral(args: argparse.Namespace) -> Any:
    from veil.client.collateral import CollateralServices

    if args.collateral == "server":
        return "server"
    if args.collateral == "services":
        given = {"pccs_url": args.pccs_url, "kds_url": args.kds_url}
        return CollateralServices(**{k: v for k, v in given.items() if v})
    bundle = Path(args.collateral)
    if not bundle.is_dir():
        raise ValueError(
            f"--collateral: got {args.collateral!r}, expected 'server', 'services' or a "
            "bundle directory"
        )
    return bundle


def _proxy(args: argparse.Namespace) -> int:
    import uvicorn

    from veil.attestation.policy import Policy
    from veil.client.connection import Connection
    from veil.proxy import AttestedUpstream, ProxySettings, build_proxy_app
    from veil.server.connections import header_capped_http, run_event_loop

    if args.policy is None and not args.simulation:
        print("veil proxy: --policy FILE is required (or --simulation, insecure)", file=sys.stderr)
        return 2
    try:
        host, port = parse_listen(args.listen)
        collateral = _collateral(args)
        policy = Policy.from_toml(args.policy.read_text()) if args.policy else None
        settings = ProxySettings(
            max_body_bytes=args.max_body_bytes, body_read_timeout_s=args.timeout
        )
    except (OSError, ValueError, AttestationError) as exc:
        print(f"veil proxy: {exc}", file=sys.stderr)
        return 2
    api_key = os.environ.get(args.api_key_env)
    if args.simulation:
        print(_SIMULATION_BANNER, file=sys.stderr)
        # The banner said it once; the same warning on every re-attestation adds nothing.
        warnings.simplefilter("ignore", SimulationModeWarning)

    def connect() -> Connection:
        return Connection(
            args.server,
            api_key=api_key,
            simulation=args.simulation,
            policy=policy,
            unattested_port=args.unattested_port,
            attested_port=args.attested_port,
            management_port=args.management_port,
            timeout=args.timeout,
            collateral=collateral,
        )

    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    upstream = AttestedUpstream(connect, retry_s=settings.retry_s)
    try:
        upstream.connection()
    except (AttestationError, TransportError) as exc:
        # Serve anyway: every request answers this error until the server passes.
        print(f"veil proxy: not verified, refusing requests: {exc}", file=sys.stderr)
    try:
        listener = listen(host, port)
    except OSError as exc:
        print(f"veil proxy: --listen {args.listen}: {exc.strerror}", file=sys.stderr)
        return 2
    bound = listener.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    print(
        f"veil proxy: serving the Open Inference Protocol on http://{shown}:{bound} "
        f"for {args.server}",
        flush=True,
    )
    app = build_proxy_app(upstream, settings)
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        timeout_keep_alive=30,
        limit_concurrency=64,
        # httptools has no cap of its own on a request's line and headers
        http=header_capped_http(16 * 1024),
        ws="none",
    )
    try:
        run_event_loop(uvicorn.Server(config).serve(sockets=[listener]))
    except KeyboardInterrupt:
        pass
    finally:
        upstream.close()
        listener.close()
    return 0
