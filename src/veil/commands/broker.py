"""`veil broker`: run the key broker that releases the cluster's secrets to attested replicas."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from veil.commands import add_collateral_source_arguments, error_line
from veil.errors import EvidenceUnavailableError, VeilError

if TYPE_CHECKING:
    from veil.attestation.trust import TrustStore
    from veil.cluster.broker import BrokerState
    from veil.cluster.exchange import Verify
    from veil.providers import EvidenceProvider
    from veil.server.config import ServerConfig

__all__ = ["PEER_WAIT_S", "register", "run"]

PEER_WAIT_S = 30.0
"""How long ``--peer`` keeps trying a peer broker that cannot be reached."""


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "broker",
        help="run the key broker of a cluster (replicas join with 'veil serve --join URL')",
        description=(
            "Hold the cluster's TLS identity and model-store key and release them only to "
            "replicas whose evidence passes the broker policy (default: this broker's own "
            "measurement, i.e. the same veil build). The secrets are sealed to this TEE (SGX), "
            "or obtained from a live peer broker (--peer), or made new and held in memory only "
            "(--new-cluster): TDX and SEV-SNP have no sealing key. Run it in a TEE; "
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
        "--peer",
        action="append",
        metavar="URL",
        help="obtain the cluster secrets from the live broker at URL (repeatable: the first "
        "that answers), attested both ways as a replica is; nothing is kept at rest. If none "
        "answers, the start is refused, unless --new-cluster is given too",
    )
    parser.add_argument(
        "--peer-wait",
        dest="peer_wait_s",
        type=float,
        default=PEER_WAIT_S,
        metavar="SECONDS",
        help=f"how long to keep trying each unreachable peer (default {PEER_WAIT_S:g})",
    )
    parser.add_argument(
        "--peer-policy",
        type=Path,
        metavar="FILE",
        help="policy (TOML) a peer broker's evidence must satisfy (default: this broker's own "
        "measurement)",
    )
    parser.add_argument(
        "--new-cluster",
        action="store_true",
        help="make new cluster secrets held in memory only (after --peer: only when no peer "
        "answers). A restart of the last broker makes a new identity: clients re-attest and "
        "models sealed with the old store key are lost",
    )
    add_collateral_source_arguments(parser)
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


def _secrets(args: argparse.Namespace, provider: EvidenceProvider, verify: Verify) -> BrokerState:
    """The broker's secrets, from where the flags say (`veil.cluster.broker`)."""
    from veil.attestation.claims import Platform
    from veil.attestation.policy import Policy
    from veil.cluster.broker import from_peers, load_or_create, new_cluster, rotate
    from veil.cluster.exchange import own_measurement_policy

    data_dir: Path = args.data_dir
    if args.rotate and (args.peer or args.new_cluster):
        raise ValueError(
            "--rotate: got it with --peer or --new-cluster, expected the sealed secrets of an "
            "SGX broker (secrets held in memory change only with a new cluster)"
        )
    if args.peer:
        if args.peer_policy is not None:
            peer_policy = Policy.from_toml(args.peer_policy)
        else:
            peer_policy = own_measurement_policy(provider.evidence(b""))
        state = from_peers(args.peer, provider, peer_policy, verify, wait_s=args.peer_wait_s)
        if state is not None:
            return state
        if not args.new_cluster:
            raise EvidenceUnavailableError(
                f"--peer: got no answer from {', '.join(args.peer)}, expected a live broker; "
                "add --new-cluster to start a new cluster when none answers"
            )
        print(
            "veil broker: no peer broker answered: a NEW cluster identity and store key "
            "(--new-cluster), held in memory only",
            file=sys.stderr,
            flush=True,
        )
        return new_cluster()
    if args.new_cluster:
        print(
            "veil broker: --new-cluster: a new cluster identity and store key, held in memory "
            "only; they end with the last broker holding them",
            file=sys.stderr,
            flush=True,
        )
        return new_cluster()
    if provider.platform in (Platform.TDX, Platform.SEV_SNP):
        raise EvidenceUnavailableError(
            f"got platform {provider.platform.value}, which has no sealing key; use --peer URL "
            "(the secrets of a live broker) or --new-cluster (new secrets, in memory only)"
        )
    key = provider.sealing_key()
    return rotate(data_dir, key) if args.rotate else load_or_create(data_dir, key)


def run(
    args: argparse.Namespace,
    *,
    provider_factory: Callable[[ServerConfig], EvidenceProvider] | None = None,
    trust: TrustStore | None = None,
    clock: Callable[[], datetime] | None = None,
) -> int:
    """Run ``veil broker``.

    `provider_factory` and `trust` (the roots peers and replicas are appraised with; default
    the vendors') are for the emulated test bed only; `clock` is the broker's time.
    """
    from veil.attestation.policy import Policy
    from veil.cluster.broker import Offer, broker_app, serve_broker
    from veil.cluster.exchange import (
        broker_report_data,
        own_measurement_policy,
        peer_trust,
        verifier,
    )
    from veil.server.config import ServerConfig
    from veil.server.runner import collateral_keeper, make_provider

    logging.basicConfig(level=args.log_level.upper(), format="veil: %(levelname)s %(message)s")
    data_dir: Path = args.data_dir
    now = clock or (lambda: datetime.now(UTC))
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        config = ServerConfig(
            data_dir=data_dir,
            platform=args.platform,
            pccs_url=args.pccs_url,
            kds_url=args.kds_url,
            snp_product=args.snp_product,
        )
        if provider_factory is not None:
            provider = provider_factory(config)
        else:
            provider = make_provider(config, clock=now)
        verify = verifier(trust or peer_trust(provider), now)
        state = _secrets(args, provider, verify)
        if args.policy is not None:
            policy = Policy.from_toml(args.policy)
        else:
            policy = own_measurement_policy(provider.evidence(b""))
        evidence = provider.evidence(broker_report_data(state.key))
        keeper = collateral_keeper(config, provider, evidence, clock=now)
        app = broker_app(state, Offer.of(state.key, evidence, keeper), policy, verify)
        return serve_broker(
            app,
            state,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            ready=lambda line: print(line, flush=True),
            keeper=keeper,
        )
    except (VeilError, ValueError, TypeError, OSError) as exc:
        print(f"veil broker: {error_line(exc)}", file=sys.stderr)
        return 2
