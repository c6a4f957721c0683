"""`veil broker`: run the key broker that releases the cluster's secrets to attested replicas."""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from veil.commands import error_line
from veil.errors import VeilError

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "broker",
        help="run the key broker of a cluster (replicas join with 'veil serve --join URL')",
        description=(
            "Hold the cluster's TLS identity and model-store key, sealed to this TEE, and release "
            "them only to replicas whose evidence passes the broker policy (default: this "
            "broker's own measurement, i.e. the same veil build). Run it in a TEE; "
            "--platform simulated proves nothing."
        ),
    )
    parser.add_argument(
        "--platform",
        choices=("auto", "simulated", "sgx", "tdx", "sev-snp"),
        default="auto",
        help="TEE to get evidence from (default: the one present; never simulated)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path("veil-broker"),
        help="where the sealed secrets live (default ./veil-broker)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9930, help="default 9930")
    parser.add_argument(
        "--policy",
        type=Path,
        metavar="FILE",
        help="policy (TOML) a replica's evidence must satisfy (default: this broker's own "
        "measurement)",
    )
    parser.add_argument(
        "--rotate",
        action="store_true",
        help="make a new cluster TLS identity before serving; replicas get it when they next "
        "join, clients re-attest when they see it",
    )
    parser.add_argument(
        "--log-level", default="warning", choices=("debug", "info", "warning", "error")
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from veil.attestation.policy import Policy
    from veil.cluster.broker import broker_app, load_or_create, rotate, serve_broker
    from veil.cluster.exchange import own_measurement_policy, peer_trust, verifier
    from veil.server.config import ServerConfig
    from veil.server.runner import make_provider

    logging.basicConfig(level=args.log_level.upper(), format="veil: %(levelname)s %(message)s")
    data_dir: Path = args.data_dir
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        provider = make_provider(ServerConfig(data_dir=data_dir, platform=args.platform))
        key = provider.sealing_key()
        state = rotate(data_dir, key) if args.rotate else load_or_create(data_dir, key)
        if args.policy is not None:
            policy = Policy.from_toml(args.policy)
        else:
            policy = own_measurement_policy(provider.evidence(b""))
        app = broker_app(
            state, provider, policy, verifier(peer_trust(provider), lambda: datetime.now(UTC))
        )
        return serve_broker(
            app,
            state,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            ready=lambda line: print(line, flush=True),
        )
    except (VeilError, ValueError, TypeError, OSError) as exc:
        print(f"veil broker: {error_line(exc)}", file=sys.stderr)
        return 2
