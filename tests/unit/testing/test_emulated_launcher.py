"""Hazmat options live in the test bed's launcher, not in the production `veil serve`."""

from __future__ import annotations

from dataclasses import fields

import pytest

from veil.cli import build_parser
from veil.server.config import ServerConfig


def test_production_serve_has_no_tamper_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["serve", "--hazmat-test-tamper-certificate"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --hazmat-test-tamper-certificate" in capsys.readouterr().err
    assert not any("hazmat" in f.name for f in fields(ServerConfig))
