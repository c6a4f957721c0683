"""`veil serve`: run the inference server."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from veil.errors import VeilError
from veil.server.config import DEFAULT_MAX_RUN_BYTES, DEFAULT_MAX_UPLOAD_BYTES, ServerConfig

__all__ = ["register"]


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
    parser.add_argument("--max-upload-bytes", type=int, default=DEFAULT_MAX_UPLOAD_BYTES)
    parser.add_argument("--max-run-bytes", type=int, default=DEFAULT_MAX_RUN_BYTES)
    parser.add_argument(
        "--log-level", default="warning", choices=("debug", "info", "warning", "error")
    )
    # Test-only: serve a certificate the evidence does not bind; clients must refuse it.
    parser.add_argument(
        "--hazmat-test-tamper-certificate", action="store_true", help=argparse.SUPPRESS
    )
    parser.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    from veil.server.runner import serve

    logging.basicConfig(level=args.log_level.upper(), format="veil: %(levelname)s %(message)s")
    try:
        config = ServerConfig(
            data_dir=args.data_dir,
            platform=args.platform,
            host=args.host,
            unattested_port=args.unattested_port,
            attested_port=args.attested_port,
            management_port=args.management_port,
            threads=args.threads,
            max_upload_bytes=args.max_upload_bytes,
            max_run_bytes=args.max_run_bytes,
            log_level=args.log_level,
            hazmat_test_tamper_certificate=args.hazmat_test_tamper_certificate,
        )
        args.data_dir.mkdir(parents=True, exist_ok=True)
        return serve(config)
    except (VeilError, ValueError, OSError) as exc:
        print(f"veil serve: {exc}", file=sys.stderr)
        return 2
