"""`veil` command line: each subcommand lives in `veil.commands.<name>` and registers itself.

Exit status everywhere: 0 success, 1 a rejection (evidence refused, a comparison that fails),
2 a usage or I/O error, each said in one line on stderr without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Sequence
from typing import TextIO

__all__ = ["main"]

# module name in veil.commands -> subcommand; each module defines register(subparsers) and the
# handler it sets with parser.set_defaults(handler=...), which returns the exit status.
_COMMANDS = (
    "serve",
    "verify_evidence",
    "evidence",
    "verify_receipt",
    "collateral",
    "keys",
    "demo",
    "export",
    "policy",
    "proxy",
    "portal",
)


def build_parser() -> argparse.ArgumentParser:
    from veil import __version__

    parser = argparse.ArgumentParser(
        prog="veil",
        description="Confidential inference for ONNX models inside trusted execution environments.",
    )
    parser.add_argument("--version", action="version", version=f"veil {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMANDS:
        importlib.import_module(f"veil.commands.{name}").register(subparsers)
    return parser


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    # A command-line user needs the warning, not the source path and line that raised it.
    print(f"veil: warning: {message}", file=file or sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(arguments)
    # The command line after the command's name: `veil serve` tells given flags from defaults.
    args.argv = arguments[arguments.index(args.command) + 1 :]
    shown = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        status: int = args.handler(args)
    finally:
        warnings.showwarning = shown
    return status


if __name__ == "__main__":
    sys.exit(main())
