"""`veil` command line: each subcommand lives in `veil.commands.<name>` and registers itself."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["main"]

# module name in veil.commands -> subcommand; each module defines register(subparsers) and the
# handler it sets with parser.set_defaults(handler=...), which returns the exit status.
_COMMANDS = ("serve", "verify_evidence", "collateral", "keys", "demo", "export", "policy")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="veil",
        description="Confidential inference for ONNX models inside trusted execution environments.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMANDS:
        importlib.import_module(f"veil.commands.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    status: int = args.handler(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
