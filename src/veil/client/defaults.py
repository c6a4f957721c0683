"""The default server: where `veil.connect()` goes when no address is given.

So that a managed service's tutorial code runs unchanged (``veil.Connection(api_key=KEY)``), the
address, the policy and the simulation opt-in come from, in this order:

1. the environment: ``VEIL_SERVER`` (the address), ``VEIL_POLICY`` (the path of a policy TOML
   file) and ``VEIL_SIMULATION=1`` (accept a simulated server: development only);
2. the client configuration file, ``VEIL_CLIENT_CONFIG`` or else
   ``$XDG_CONFIG_HOME/veil/client.toml`` (``~/.config/veil/client.toml``)::

       server = "veil.example.com"          # the address, as in VEIL_SERVER
       policy = "/etc/veil/policy.toml"     # a relative path is relative to this file
       simulation = false

An address is ``HOST`` (the default ports 9923, 9924, 9925) or
``HOST:UNATTESTED:ATTESTED:MANAGEMENT`` (an IPv6 host in brackets: ``[::1]:9923:9924:9925``).
Arguments given to `veil.connect` win over both. Nothing configured is an error that says how
to configure it.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from veil.attestation.policy import Policy

__all__ = ["DefaultServer", "default_server", "parse_address"]

_ADDRESS = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[^:\[\]\s]+)(?::(\d{1,5}):(\d{1,5}):(\d{1,5}))?")
_NONE_CONFIGURED = (
    "no server address: pass one (veil.connect('host', ...)), or set VEIL_SERVER (and "
    "VEIL_POLICY, the path of your policy TOML), or write 'server = \"host\"' in {path}"
)


@dataclass(frozen=True, slots=True)
class DefaultServer:
    """A configured server: its host, ports, policy and simulation opt-in.

    Attributes:
        host: host name or IP address (IPv6 without brackets).
        ports: ``unattested_port``, ``attested_port``, ``management_port`` when the address
            named them; empty for the defaults.
        policy: the policy loaded from the configured file, or None.
        simulation: whether a simulated server was opted into.
    """

    host: str
    ports: Mapping[str, int]
    policy: Policy | None
    simulation: bool


def parse_address(address: str) -> tuple[str, dict[str, int]]:
    """``HOST`` or ``HOST:U:A:M`` → (host, ports named in it). Raises ValueError."""
    match = _ADDRESS.fullmatch(address.strip())
    if match is None:
        raise ValueError(
            f"server address: got {address[:100]!r}, expected HOST or "
            "HOST:UNATTESTED:ATTESTED:MANAGEMENT (IPv6 in brackets)"
        )
    host = match.group(1).strip("[]")
    if match.group(2) is None:
        return host, {}
    ports = {
        name: int(match.group(i))
        for i, name in enumerate(("unattested_port", "attested_port", "management_port"), 2)
    }
    for name, port in ports.items():
        if not 0 < port <= 65535:
            raise ValueError(f"server address: {name} got {port}, expected 1..65535")
    return host, ports


def _config_path(environ: Mapping[str, str]) -> Path:
    if environ.get("VEIL_CLIENT_CONFIG"):
        return Path(environ["VEIL_CLIENT_CONFIG"])
    base = environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "veil" / "client.toml"


def default_server(environ: Mapping[str, str] | None = None) -> DefaultServer:
    """The server configured by the environment or the client configuration file.

    Args:
        environ: the environment to read (default: this process's).

    Raises:
        ValueError: nothing is configured, or what is configured is malformed (the message
            names the variable or file).
    """
    env = os.environ if environ is None else environ
    path = _config_path(env)
    if env.get("VEIL_SERVER"):
        host, ports = parse_address(env["VEIL_SERVER"])
        policy_path = env.get("VEIL_POLICY") or None
        policy = Policy.from_toml(Path(policy_path)) if policy_path else None
        return DefaultServer(host, ports, policy, env.get("VEIL_SIMULATION") == "1")
    if not path.is_file():
        raise ValueError(_NONE_CONFIGURED.format(path=path))
    try:
        config = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path}: {exc}") from None
    address, policy_value = config.get("server"), config.get("policy")
    simulation = config.get("simulation", False)
    if not isinstance(address, str):
        raise ValueError(f"{path}: server: expected a text address")
    if policy_value is not None and not isinstance(policy_value, str):
        raise ValueError(f"{path}: policy: expected the path of a policy TOML file")
    if not isinstance(simulation, bool):
        raise ValueError(f"{path}: simulation: expected true or false")
    host, ports = parse_address(address)
    policy = Policy.from_toml(path.parent / policy_value) if policy_value else None
    return DefaultServer(host, ports, policy, simulation)
