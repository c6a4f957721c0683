"""`veil proxy` usage errors: one line on stderr, exit 2, nothing served."""

from __future__ import annotations

from pathlib import Path

import pytest

from veil.cli import main


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ([], "--policy FILE is required (or --simulation, insecure)"),
        (["--simulation", "--listen", "0.0.0.0:8000"], "expected a loopback address"),
        (["--simulation", "--listen", "8000"], "expected ADDR:PORT"),
        (["--simulation", "--collateral", "no-such-dir"], "expected 'server', 'services' or a"),
        (["--policy", "no-such-policy.toml"], "no-such-policy.toml"),
    ],
)
def test_usage_errors_exit_2(
    args: list[str],
    words: str,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["proxy", "--server", "127.0.0.1", *args]) == 2
    err = capsys.readouterr().err
    assert words in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err
