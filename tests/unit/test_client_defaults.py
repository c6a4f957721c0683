"""The default server: VEIL_SERVER / VEIL_POLICY / VEIL_SIMULATION, then the client config file."""

from __future__ import annotations

from pathlib import Path

import pytest

import veil
from veil.client.defaults import default_server, parse_address

POLICY = 'allow_debug = false\n[sgx]\nmr_enclave = ["' + "ab" * 32 + '"]\n'


@pytest.mark.parametrize(
    ("address", "host", "ports"),
    [
        ("veil.example.com", "veil.example.com", {}),
        (
            "10.0.0.5:1:2:3",
            "10.0.0.5",
            {"unattested_port": 1, "attested_port": 2, "management_port": 3},
        ),
        (
            "[::1]:9923:9924:9925",
            "::1",
            {"unattested_port": 9923, "attested_port": 9924, "management_port": 9925},
        ),
        ("[::1]", "::1", {}),
    ],
)
def test_parse_address(address: str, host: str, ports: dict[str, int]) -> None:
    assert parse_address(address) == (host, ports)


@pytest.mark.parametrize(
    "address", ["", "host:9923", "host:1:2", "host:0:2:3", "host:1:2:70000", "a b", "::1:1:2:3"]
)
def test_parse_address_refuses(address: str) -> None:
    with pytest.raises(ValueError, match="server address"):
        parse_address(address)


def test_environment(tmp_path: Path) -> None:
    (tmp_path / "p.toml").write_text(POLICY)
    env = {"VEIL_SERVER": "h:1:2:3", "VEIL_POLICY": str(tmp_path / "p.toml")}
    d = default_server(env)
    assert d.host == "h"
    assert d.ports["management_port"] == 3
    assert d.policy is not None
    assert d.simulation is False
    assert default_server({"VEIL_SERVER": "h", "VEIL_SIMULATION": "1"}).simulation is True
    assert default_server({"VEIL_SERVER": "h", "VEIL_SIMULATION": "yes"}).simulation is False


def test_environment_wins_over_the_file(tmp_path: Path) -> None:
    (tmp_path / "client.toml").write_text('server = "from-file"\n')
    env = {"VEIL_SERVER": "from-env", "VEIL_CLIENT_CONFIG": str(tmp_path / "client.toml")}
    assert default_server(env).host == "from-env"


def test_config_file(tmp_path: Path) -> None:
    (tmp_path / "veil").mkdir()
    (tmp_path / "veil" / "policy.toml").write_text(POLICY)
    (tmp_path / "veil" / "client.toml").write_text(
        'server = "[::1]:1:2:3"\npolicy = "policy.toml"\nsimulation = true\n'
    )
    d = default_server({"XDG_CONFIG_HOME": str(tmp_path)})
    assert (d.host, d.simulation) == ("::1", True)
    assert d.policy is not None


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("server = 3\n", "server: expected a text address"),
        ('server = "h"\npolicy = 1\n', "policy: expected the path"),
        ('server = "h"\nsimulation = "yes"\n', "simulation: expected true or false"),
        ("server = \n", "client.toml"),
    ],
)
def test_config_file_refusals(tmp_path: Path, text: str, words: str) -> None:
    (tmp_path / "client.toml").write_text(text)
    with pytest.raises(ValueError, match=words):
        default_server({"VEIL_CLIENT_CONFIG": str(tmp_path / "client.toml")})


def test_nothing_configured_says_how(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="set VEIL_SERVER") as info:
        default_server({"XDG_CONFIG_HOME": str(tmp_path)})
    assert str(tmp_path) in str(info.value)
    monkeypatch.delenv("VEIL_SERVER", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.delenv("VEIL_CLIENT_CONFIG", raising=False)
    with pytest.raises(ValueError, match="no server address"):
        veil.connect()
