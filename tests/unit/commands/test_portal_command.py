"""``veil portal``'s start-up refusals: it needs an admin key, and a server that answers."""

from __future__ import annotations

from pathlib import Path

import pytest

from veil.cli import main


def test_no_admin_key(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("VEIL_ADMIN_KEY", raising=False)
    assert main(["portal", "--server", "127.0.0.1:1:2:3", "--simulation"]) == 2
    assert (
        "no admin key: pass --admin-key-file FILE or set VEIL_ADMIN_KEY" in capsys.readouterr().err
    )


def test_unreachable_server_fails_at_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "admin.key"
    key.write_text("veil_0123456789abcdef_" + "0" * 64 + "\n")
    args = ["portal", "--server", "127.0.0.1:1:2:3", "--simulation", "--admin-key-file", str(key)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("veil portal: ")
    assert "0" * 64 not in err  # the key is never repeated


def test_bad_server_address(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    key = tmp_path / "admin.key"
    key.write_text("k")
    assert main(["portal", "--server", "h:1", "--admin-key-file", str(key)]) == 2
    assert "server address: got 'h:1'" in capsys.readouterr().err
