"""What a server serves, saved by `veil evidence save`, is verified offline by `verify-evidence`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from server_process import VeilServer

from veil.cli import main

pytestmark = pytest.mark.slow


def test_saved_evidence_verifies_offline_only_with_simulated(
    server: VeilServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "evidence"
    port = str(server.unattested_port)
    assert (
        main(["evidence", "save", "127.0.0.1", "--unattested-port", port, "--out", str(out)]) == 0
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "certificate.cbor",
        "collateral.cbor",
        "quote.cbor",
    ]
    assert "unverified" in capsys.readouterr().err
    check = [
        "verify-evidence",
        str(out / "quote.cbor"),
        "--collateral",
        str(out / "collateral.cbor"),
    ]

    # Intel's root does not sign a simulated quote: a rejection (1), not a traceback.
    assert main([*check, "--json"]) == 1
    refused = json.loads(capsys.readouterr().out)
    assert refused["platform"] == "sgx"
    assert refused["error_type"] == "ChainError"

    assert main([*check, "--simulated", "--json"]) == 0
    captured = capsys.readouterr()
    accepted = json.loads(captured.out)
    assert accepted["verdict"] == "accepted"
    assert accepted["simulated"] is True
    assert "SIMULATED" in captured.err


def test_saving_from_the_wrong_port_is_one_line(
    server: VeilServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "never"
    port = str(server.attested_port)  # TLS, not the plain port
    assert (
        main(["evidence", "save", "127.0.0.1", "--unattested-port", port, "--out", str(out)]) == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "unattested port" in err
    assert not out.exists()
