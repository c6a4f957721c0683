"""`veil serve --config FILE`, ``VEIL_*`` and ``--print-config``: flags > env > file > defaults."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from veil.cli import main


def printed(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    *args: str,
    env: dict[str, str] | None = None,
) -> dict[str, object]:
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    assert main(["serve", *args, "--print-config"]) == 0
    return tomllib.loads(capsys.readouterr().out)


def test_defaults_print_as_toml(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = printed(capsys, monkeypatch)
    assert settings["data_dir"] == "veil-data"
    assert settings["attested_port"] == 9924
    assert settings["batching"] is True
    assert settings["no_auth"] is False
    assert "config" not in settings
    assert "print_config" not in settings


def test_precedence_flags_env_file_defaults(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "veil.toml"
    config.write_text(
        'host = "0.0.0.0"\nattested_port = 1001\nunattested_port = 1002\n'
        "max_batch_size = 4\nno_auth = true\n"
    )
    env = {"VEIL_ATTESTED_PORT": "2001", "VEIL_MAX_BATCH_SIZE": "8", "VEIL_BATCHING": "off"}
    settings = printed(
        capsys, monkeypatch, "--config", str(config), "--attested-port", "3001", env=env
    )
    assert settings["attested_port"] == 3001  # flag over env over file
    assert settings["max_batch_size"] == 8  # env over file
    assert settings["unattested_port"] == 1002  # file over default
    assert settings["host"] == "0.0.0.0"
    assert settings["no_auth"] is True
    assert settings["batching"] is False
    assert settings["management_port"] == 9925  # default


def test_printed_config_reads_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    first = printed(capsys, monkeypatch, "--threads", "3", "--max-request-bytes", "1000")
    config = tmp_path / "veil.toml"
    assert main(["serve", "--threads", "3", "--max-request-bytes", "1000", "--print-config"]) == 0
    config.write_text(capsys.readouterr().out)
    assert printed(capsys, monkeypatch, "--config", str(config)) == first


@pytest.mark.parametrize(
    ("content", "env", "message"),
    [
        ("attested_port = 'x'", {}, "veil.toml: attested_port: got 'x', expected int"),
        ("atested_port = 1", {}, "veil.toml: unknown setting 'atested_port', expected one of"),
        ("platform = 'nitro'", {}, "veil.toml: platform: got 'nitro', expected one of auto"),
        ("no_auth = 1", {}, "veil.toml: no_auth: got 1, expected true or false"),
        ("threads = 2.5", {}, "veil.toml: threads: got 2.5, expected an integer"),
        ("[limits", {}, "veil.toml: not TOML"),
        ("", {"VEIL_THREADS": "many"}, "VEIL_THREADS: got 'many', expected int"),
        ("", {"VEIL_NO_AUTH": "maybe"}, "VEIL_NO_AUTH: got 'maybe', expected true or false"),
        ("", {"VEIL_ATTESTED_PORT": "70000"}, "attested_port: got 70000, expected 0..65535"),
    ],
)
def test_bad_settings_are_one_line_exit_2(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    content: str,
    env: dict[str, str],
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("veil.toml").write_text(content)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["serve", "--config", "veil.toml", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert message in err
    assert not Path("veil-data").exists()


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.toml"
    assert main(["serve", "--config", str(missing)]) == 2
    assert capsys.readouterr().err == f"veil serve: {missing}: No such file or directory\n"


@pytest.mark.parametrize(
    ("given", "seconds"), [("90", 90.0), ("90s", 90.0), ("30m", 1800.0), ("24h", 86400.0)]
)
def test_rotate_keys_every_takes_a_duration(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    given: str,
    seconds: float,
) -> None:
    from veil.server.config import ServerConfig, parse_duration

    assert parse_duration(given) == seconds
    assert ServerConfig(Path("d"), rotate_keys_every_s=seconds).rotate_keys_every_s == seconds
    # Accepted on the command line (else exit 2), and printed as given.
    assert printed(capsys, monkeypatch, "--rotate-keys-every", given)["rotate_keys_every"] == given


@pytest.mark.parametrize("given", ["soon", "10 h", "5 m", "0", "0.5s"])
def test_a_bad_rotation_period_is_one_line_exit_2(
    capsys: pytest.CaptureFixture[str], given: str
) -> None:
    assert main(["serve", f"--rotate-keys-every={given}", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "rotate_keys_every" in err or "duration" in err
