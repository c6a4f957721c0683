"""`veil --help` lists the commands without importing them; the listing matches each command."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from veil.cli import _COMMANDS, build_parser, main


def test_help_imports_no_command_and_no_heavy_library() -> None:
    # Speed is measured in the report (python -X importtime, repeated runs); this pins the cause.
    code = (
        "import sys, contextlib, io\n"
        "from veil.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    main(['--help'])\n"
        "heavy = ('numpy', 'httpx', 'cryptography', 'cbor2', 'onnxruntime', 'veil.client',\n"
        "         'veil.attestation', 'veil.server', 'veil.commands.serve')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"


def test_listing_matches_each_command() -> None:
    full = build_parser()
    (sub,) = [a for a in full._actions if isinstance(a, argparse._SubParsersAction)]
    helps = {choice.dest: choice.help for choice in sub._choices_actions}
    assert helps == {name: summary for name, (_, summary) in _COMMANDS.items()}


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for name in _COMMANDS:
        assert name in out


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["srve"])
    assert info.value.code == 2
    assert "invalid choice: 'srve'" in capsys.readouterr().err
