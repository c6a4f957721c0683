"""`veil serve`: run the inference server."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from veil.commands import add_collateral_source_arguments, error_line
from veil.errors import VeilError
from veil.server.batching import BatchingConfig
from veil.server.config import DEFAULT_DATA_DIR, ServerConfig, parse_duration
from veil.server.limits import Limits

if TYPE_CHECKING:
    from collections.abc import Callable

    from veil.attestation.trust import TrustStore
    from veil.providers import EvidenceProvider

__all__ = ["apply_settings", "register", "render_settings", "run", "server_config"]


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
        "--config",
        type=Path,
        metavar="FILE",
        help='TOML file of settings, named like the flags (data_dir = "..."); '
        "precedence: flags > VEIL_* environment > this file > defaults",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the settings in effect (as a TOML file) and exit",
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
        default=DEFAULT_DATA_DIR,
        help=f"models, keys and sealed state (default ./{DEFAULT_DATA_DIR}, as 'veil keys')",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--unattested-port", type=int, default=9923, help="default 9923")
    parser.add_argument("--attested-port", type=int, default=9924, help="default 9924")
    parser.add_argument("--management-port", type=int, default=9925, help="default 9925")
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="ONNX Runtime intra-op threads (default: number of cores)",
    )
    parser.add_argument(
        "--log-level", default="warning", choices=("debug", "info", "warning", "error")
    )
    add_collateral_source_arguments(parser)
    cluster = parser.add_argument_group("cluster")
    cluster.add_argument(
        "--join",
        metavar="URL",
        help="join the cluster of the key broker at URL (veil broker): each side attests the "
        "other, then this server presents the cluster's certificate and seals its state with "
        "the cluster's store key",
    )
    cluster.add_argument(
        "--join-policy",
        type=Path,
        metavar="FILE",
        help="policy (TOML) the broker's evidence must satisfy (default: this server's own "
        "measurement, i.e. the same veil build)",
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
    parser.add_argument(
        "--optimize",
        choices=("off", "graph"),
        default="off",
        help="what an upload's 'optimize' flag (BlindAI's, veil's client sends it) does: 'graph' "
        "optimizes the graph at upload (fusions, constant folding) and keeps it only if its "
        "outputs match and it is not slower; default off. A veil client may ask for 'graph' or "
        "'int8' itself (upload_model(optimization=...))",
    )
    _add_hardening_arguments(parser)
    parser.set_defaults(handler=run, parser=parser)


# --- hardening: authentication, sealed storage, resource limits ---------------------------------

# Older spellings kept working.
_LIMIT_ALIASES = {
    "max_request_bytes": ("--max-run-bytes",),
    "models_memory_budget_bytes": ("--models-memory-budget",),
}


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
        "--no-anonymous",
        action="store_true",
        help="refuse requests that carry no API key even for public models (by default they "
        "may run public models, within the anonymous-* rate limits)",
    )
    group.add_argument(
        "--unsealed-store",
        action="store_true",
        help="on a platform with no sealing key, store models as UNENCRYPTED files instead of "
        "refusing to start",
    )
    group.add_argument(
        "--database-url",
        metavar="URL",
        help="keep model metadata, owners and API keys in this PostgreSQL database "
        "(postgresql://...), every row authenticated with the sealing key; replicas share it",
    )
    group.add_argument(
        "--store-dir",
        type=Path,
        metavar="DIR",
        help="directory of the sealed model blobs (default DATA_DIR/sealed); replicas share one",
    )
    group.add_argument(
        "--rotate-keys-every",
        metavar="DURATION",
        help="make new TLS and receipt keys, and new evidence binding them, this often "
        "(e.g. 24h, 30m; clients attest again on their next request); also on SIGHUP and "
        "POST /admin/rotate-keys. Default: only then",
    )
    group.add_argument(
        "--replica-name",
        metavar="NAME",
        help="sent as the Veil-Replica header of every response (which replica answered)",
    )
    limits = parser.add_argument_group("limits (exceeding one answers 413, 422, 429 or 503)")
    defaults = Limits()
    for f in fields(Limits):
        default = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        limits.add_argument(
            flag,
            *_LIMIT_ALIASES.get(f.name, ()),
            dest=f"limit_{f.name}",
            type=type(default),
            default=default,
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


# --- settings from a file and the environment ---------------------------------------------------

# Not settings: what to do, not how to serve.
_NOT_SETTINGS = frozenset({"help", "config", "print_config", "handler"})


def _setting_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every setting of `veil serve` by its key: the flag's name with underscores."""
    return {
        action.option_strings[0][2:].replace("-", "_"): action
        for action in parser._actions
        if action.option_strings and action.dest not in _NOT_SETTINGS
    }


def _convert(action: argparse.Action, key: str, value: object, origin: str) -> object:
    """`value` from a file or the environment, as the flag would have parsed it."""
    boolean = action.nargs == 0
    if boolean:
        if isinstance(value, str):
            lowered = value.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off", ""):
                return False
        if isinstance(value, bool):
            return value
        raise ValueError(f"{origin}: got {value!r}, expected true or false")
    kind: Callable[[Any], object] = action.type if callable(action.type) else str
    if isinstance(value, bool) or (
        not isinstance(value, str) and not (isinstance(value, int | float) and kind in (int, float))
    ):
        raise ValueError(f"{origin}: got {value!r}, expected {getattr(kind, '__name__', kind)}")
    if kind is int and isinstance(value, float):
        raise ValueError(f"{origin}: got {value!r}, expected an integer")
    try:
        converted = kind(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"{origin}: got {value!r}, expected {getattr(kind, '__name__', kind)}"
        ) from None
    if action.choices is not None and converted not in action.choices:
        raise ValueError(
            f"{origin}: got {converted!r}, expected one of {', '.join(action.choices)}"
        )
    return converted


def apply_settings(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    argv: list[str],
    env: dict[str, str],
) -> None:
    """Fill in `args` from ``--config`` and ``VEIL_*``: flags > environment > file > defaults.

    `argv` is the command line after ``serve``; the file and the environment fill only what no
    flag in it gave.

    Raises:
        OSError: the file cannot be read. ValueError: a setting has a bad value or no such key.
    """
    import tomllib

    actions = _setting_actions(parser)
    # argparse fills in a default only where the namespace lacks the attribute: parsing again
    # over a namespace of placeholders leaves the placeholder exactly where no flag was given.
    unset = object()
    probe = argparse.Namespace(**{action.dest: unset for action in actions.values()})
    parser.parse_args(argv, namespace=probe)
    given = {action.dest for action in actions.values() if getattr(probe, action.dest) is not unset}
    layers: list[tuple[str, dict[str, object]]] = []
    if args.config is not None:
        path: Path = args.config
        try:
            loaded = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: not TOML: {exc}") from None
        unknown = sorted(set(loaded) - set(actions))
        if unknown:
            raise ValueError(
                f"{path}: unknown setting {unknown[0]!r}, expected one of {', '.join(actions)}"
            )
        layers.append((str(path), loaded))
    environment = {
        key: env[f"VEIL_{key.upper()}"] for key in actions if f"VEIL_{key.upper()}" in env
    }
    layers.append(("environment", {k: v for k, v in environment.items()}))
    for origin, values in layers:  # file first, then the environment over it
        for key, value in values.items():
            action = actions[key]
            if action.dest in given:
                continue
            where = f"VEIL_{key.upper()}" if origin == "environment" else f"{origin}: {key}"
            setattr(args, action.dest, _convert(action, key, value, where))


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def render_settings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The settings in effect as a TOML file that ``--config`` reads back."""
    lines = ["# veil serve settings (veil serve --print-config)"]
    for key, action in _setting_actions(parser).items():
        value = getattr(args, action.dest)
        if value is None:
            lines.append(f"# {key} = (unset)")
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


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
        join=args.join,
        join_policy=args.join_policy,
        no_auth=args.no_auth,
        no_anonymous=args.no_anonymous,
        unsealed_store=args.unsealed_store,
        database_url=args.database_url,
        store_dir=args.store_dir,
        replica_name=args.replica_name,
        rotate_keys_every_s=(
            None if args.rotate_keys_every is None else parse_duration(args.rotate_keys_every)
        ),
        limits=_limits(args),
        optimization=args.optimize,
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
    trust: TrustStore | None = None,
) -> int:
    """Run ``veil serve``; `provider_factory` and `trust` (the roots ``--join`` appraises the
    broker with) are for the emulated test bed only."""
    try:
        apply_settings(args.parser, args, list(args.argv), dict(os.environ))
        config = server_config(args)
    except (ValueError, TypeError, OSError) as exc:
        print(f"veil serve: {error_line(exc)}", file=sys.stderr)
        return 2
    if args.print_config:
        sys.stdout.write(render_settings(args.parser, args))
        return 0
    from veil.server.runner import serve

    logging.basicConfig(level=args.log_level.upper(), format="veil: %(levelname)s %(message)s")
    data_dir: Path = args.data_dir
    if data_dir.exists() and not data_dir.is_dir():
        print(f"veil serve: --data-dir {data_dir}: not a directory", file=sys.stderr)
        return 2
    created = not data_dir.exists()
    started = False

    def ready(line: str) -> None:
        nonlocal started
        started = True
        print(line, flush=True)

    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        provider = provider_factory(config) if provider_factory else None
        return serve(config, provider=provider, ready=ready, trust=trust)
    except (VeilError, ValueError, TypeError, OSError) as exc:
        print(f"veil serve: {error_line(exc)}", file=sys.stderr)
        return 2
    finally:
        if created and not started:
            # A refused start leaves no trace: a typo in --data-dir creates nothing.
            shutil.rmtree(data_dir, ignore_errors=True)
