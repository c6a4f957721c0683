"""`veil serve`: run the inference server."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from veil.attestation.collateral_source import INTEL_PCS_URL
from veil.attestation.kds import AMD_KDS_URL
from veil.errors import VeilError
from veil.server.batching import BatchingConfig
from veil.server.config import ServerConfig
from veil.server.limits import Limits

if TYPE_CHECKING:
    from collections.abc import Callable

    from veil.providers import EvidenceProvider

__all__ = ["register", "run", "server_config"]


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "serve",
        help="run the inference server",
        description=(
            "Serve ONNX models over TLS bound to TEE evidence (BlindAI 0.6 protocol). "
            "Use --platform simulated only for development: it proves nothing."
        ),
    )
    parser.add_argument(
        "--platform",
        choices=("auto", "simulated", "sgx", "tdx", "sev-snp"),
        default="auto",
        help="TEE to get evidence from (default: the one present; never simulated)",
    )
    parser.add_argument("--data-dir", type=Path, default=Path("veil-data"), help="model storage")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--unattested-port", type=int, default=9923)
    parser.add_argument("--attested-port", type=int, default=9924)
    parser.add_argument("--management-port", type=int, default=9925)
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="ONNX Runtime intra-op threads (default: number of cores)",
    )
    parser.add_argument(
        "--log-level", default="warning", choices=("debug", "info", "warning", "error")
    )
    parser.add_argument(
        "--pccs-url",
        default=INTEL_PCS_URL,
        help="where SGX/TDX collateral is fetched: Intel PCS (default) or your PCCS",
    )
    parser.add_argument(
        "--kds-url",
        default=AMD_KDS_URL,
        help="where SEV-SNP collateral (VCEK, ASK/ARK chain, CRL) is fetched: AMD KDS "
        "(default) or a mirror",
    )
    parser.add_argument(
        "--snp-product",
        choices=("Milan", "Genoa", "Turin"),
        help="SEV-SNP product, needed only to fetch a VCEK for a version 2 report (later "
        "reports name their CPU)",
    )
    batching = parser.add_argument_group("batching")
    default = BatchingConfig()
    batching.add_argument(
        "--batching",
        action=argparse.BooleanOptionalAction,
        default=default.enabled,
        help="merge concurrent predictions for one model along its batch axis (default on; "
        "only models whose inputs and outputs all have a free axis 0)",
    )
    batching.add_argument(
        "--max-batch-size",
        type=int,
        default=default.max_batch_size,
        metavar="N",
        help=f"most rows merged into one run (default {default.max_batch_size})",
    )
    batching.add_argument(
        "--max-batch-delay-ms",
        type=float,
        default=default.max_delay_ms,
        metavar="MS",
        help="longest wait for more requests before a run, once requests are being merged "
        f"(default {default.max_delay_ms:g})",
    )
    _add_hardening_arguments(parser)
    parser.set_defaults(handler=run)


# --- hardening: authentication, sealed storage, resource limits ---------------------------------

# Older spellings kept working.
_LIMIT_ALIASES = {"max_request_bytes": ("--max-run-bytes",)}


def _add_hardening_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("security")
    group.add_argument(
        "--no-auth",
        action="store_true",
        help="ask for no API key (LOCAL DEVELOPMENT ONLY: anyone reaching the server may "
        "upload, delete and run models). Without it, keys are required whenever the server "
        "binds beyond loopback or any key exists (see 'veil keys')",
    )
    group.add_argument(
        "--unsealed-store",
        action="store_true",
        help="on a platform with no sealing key, store models as UNENCRYPTED files instead of "
        "refusing to start",
    )
    limits = parser.add_argument_group("limits (exceeding one answers 413, 422 or 429)")
    defaults = Limits()
    for f in fields(Limits):
        default = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        limits.add_argument(
            flag,
            *_LIMIT_ALIASES.get(f.name, ()),
            dest=f"limit_{f.name}",
            type=type(default),
            default=None,
            metavar="N",
            help=f"default {default:g}" if isinstance(default, float) else f"default {default}",
        )


def _limits(args: argparse.Namespace) -> Limits:
    given = {
        f.name: getattr(args, f"limit_{f.name}")
        for f in fields(Limits)
        if getattr(args, f"limit_{f.name}", None) is not None
    }
    return Limits(**given)


def server_config(args: argparse.Namespace) -> ServerConfig:
    """The `ServerConfig` that parsed ``veil serve`` arguments describe."""
    return ServerConfig(
        data_dir=args.data_dir,
        platform=args.platform,
        host=args.host,
        unattested_port=args.unattested_port,
        attested_port=args.attested_port,
        management_port=args.management_port,
        threads=args.threads,
        log_level=args.log_level,
        pccs_url=args.pccs_url,
        kds_url=args.kds_url,
        snp_product=args.snp_product,
        no_auth=args.no_auth,
        unsealed_store=args.unsealed_store,
        limits=_limits(args),
        batching=BatchingConfig(
            enabled=args.batching,
            max_batch_size=args.max_batch_size,
            max_delay_ms=args.max_batch_delay_ms,
        ),
    )


def run(
    args: argparse.Namespace,
    *,
    provider_factory: Callable[[ServerConfig], EvidenceProvider] | None = None,
) -> int:
    """Run ``veil serve``; `provider_factory` is for the emulated test bed only."""
    from veil.server.runner import serve

    logging.basicConfig(level=args.log_level.upper(), format="veil: %(levelname)s %(message)s")
    try:
        config = server_config(args)
        args.data_dir.mkdir(parents=True, exist_ok=True)
        provider = provider_factory(config) if provider_factory else None
        return serve(config, provider=provider)
    except (VeilError, ValueError, TypeError, OSError) as exc:
        print(f"veil serve: {exc}", file=sys.stderr)
        return 2
