"""Every CLI error path a new user hit: one clear line on stderr, no traceback; exit 2 for usage
and I/O, 1 for a rejection."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

import veil
from veil.cli import main


def one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound, so no other process can take it while
    the test runs (a port closed again could be), and not listening."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"veil {veil.__version__}\n"


@pytest.mark.parametrize("action", [["list"], ["revoke", "0" * 16], ["create", "--role", "user"]])
def test_keys_on_a_missing_data_dir_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], action: list[str]
) -> None:
    typo = tmp_path / "veil-dtaa"
    sim = ["--platform", "simulated"]
    assert main(["keys", *action, "--data-dir", str(typo), *sim]) == 2
    line = one_line(capsys)
    assert f"--data-dir {typo}: no such directory" in line
    assert not typo.exists()


def test_keys_on_a_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = tmp_path / "notes.txt"
    file.write_text("x")
    assert main(["keys", "list", "--data-dir", str(file), "--platform", "simulated"]) == 2
    assert one_line(capsys) == f"veil keys list: --data-dir {file}: not a directory"


def test_keys_and_serve_share_the_default_data_dir(capsys: pytest.CaptureFixture[str]) -> None:
    for command in (["keys", "list"], ["serve"]):
        with pytest.raises(SystemExit):
            main([*command, "--help"])
        assert "default ./veil-data" in " ".join(capsys.readouterr().out.split())


def test_serve_with_a_file_as_data_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = tmp_path / "data"
    file.write_text("x")
    assert main(["serve", "--platform", "simulated", "--data-dir", str(file)]) == 2
    assert one_line(capsys) == f"veil serve: --data-dir {file}: not a directory"


def test_verify_evidence_missing_collateral_is_usage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    evidence = tmp_path / "quote.bin"
    evidence.write_bytes(b"\x03\x00" + bytes(100))
    missing = tmp_path / "missing.json"
    assert main(["verify-evidence", str(evidence), "--collateral", str(missing)]) == 2
    assert one_line(capsys) == f"veil verify-evidence: {missing}: No such file or directory"


def test_verify_evidence_collateral_neither_json_nor_cbor(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    evidence = tmp_path / "quote.bin"
    evidence.write_bytes(b"\x03\x00" + bytes(100))
    junk = tmp_path / "coll.bin"
    junk.write_bytes(b"\xff\xfe not cbor")
    assert main(["verify-evidence", str(evidence), "--collateral", str(junk)]) == 2
    assert "got neither JSON nor a CBOR map" in one_line(capsys)


def test_evidence_save_nothing_listening(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], refused_port: int
) -> None:
    out = tmp_path / "out"
    port = str(refused_port)
    assert (
        main(["evidence", "save", "127.0.0.1", "--unattested-port", port, "--out", str(out)]) == 2
    )
    assert one_line(capsys).startswith(f"veil evidence save: http://127.0.0.1:{port}/")
    assert not out.exists()


def test_cli_warnings_carry_no_source_lines(capsys: pytest.CaptureFixture[str]) -> None:
    import warnings

    from veil.cli import _show_warning

    _show_warning(UserWarning("careful"), UserWarning, "/some/file.py", 12)
    assert capsys.readouterr().err == "veil: warning: careful\n"
    # main() puts the previous hook back.
    before = warnings.showwarning
    with pytest.raises(SystemExit):
        main(["keys", "--help"])
    assert warnings.showwarning is before


def test_demo_addr_without_policy_fails_before_anything_slow(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["demo", "--addr", "127.0.0.1"]) == 2
    assert one_line(capsys) == (
        "veil demo: --addr needs --policy FILE (the measurements to accept) or, for a server "
        "started with --platform simulated, --simulation"
    )


def test_demo_wrong_port_fails_before_the_export(
    capsys: pytest.CaptureFixture[str], refused_port: int
) -> None:
    port = str(refused_port)
    status = main(["demo", "--addr", "127.0.0.1", "--simulation", "--unattested-port", port])
    assert status == 2
    line = one_line(capsys)
    assert line.startswith(f"veil demo: cannot reach the server: http://127.0.0.1:{port}/")
    assert line.endswith("(check --addr and the --*-port options)")
