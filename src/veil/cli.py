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

# command -> (module in veil.commands, one-line summary). Each module defines
# register(subparsers), adding its command with that summary as help= (a test keeps the two
# equal) and the handler it sets with parser.set_defaults(handler=...), which returns the exit
# status. The table lets `veil --help` list the commands without importing any of them.
# A new command: a line here (tests/unit/test_cli.py checks the summary against the module).
_COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("serve", "run the inference server"),
    "broker": (
        "broker",
        "run the key broker of a cluster (replicas join with 'veil serve --join URL')",
    ),
    "verify-evidence": (
        "verify_evidence",
        "verify an SGX/TDX quote or SEV-SNP report offline",
    ),
    "evidence": (
        "evidence",
        "save a server's evidence, certificate and collateral (unverified)",
    ),
    "verify-receipt": ("verify_receipt", "verify a proof file (receipt) offline"),
    "collateral": ("collateral", "fetch collateral for evidence into an offline bundle"),
    "keys": ("keys", "manage API keys (admin / owner / user)"),
    "demo": ("demo", "run the Transformers tutorial end to end (needs veil[transformers])"),
    "export": ("export", "export a Transformers model to ONNX (needs veil[transformers])"),
    "policy": (
        "policy",
        "print the policy to pin for an SGX enclave or a confidential VM; check evidence",
    ),
    "proxy": (
        "proxy",
        "verify a server, then serve the Open Inference Protocol v2 on a loopback port",
    ),
    "portal": ("portal", "serve the sign-up / API-key web pages of a managed veil service"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `veil` parser: every command with its options, or, given `command`, that one with its
    options and the others by name only (no other command module is imported)."""
    from veil import __version__

    parser = argparse.ArgumentParser(
        prog="veil",
        description="Confidential inference for ONNX models inside trusted execution environments.",
    )
    parser.add_argument("--version", action="version", version=f"veil {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, summary) in _COMMANDS.items():
        if command is None or name == command:
            importlib.import_module(f"veil.commands.{module}").register(subparsers)
        else:
            subparsers.add_parser(name, help=summary)
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
    # The top level has options only before the command: the first other word names it.
    named = next((a for a in arguments if not a.startswith("-")), "")
    args = build_parser(named).parse_args(arguments)
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
