"""A real `veil serve --platform simulated` process on free loopback ports.

The server picks its own ports (``--*-port 0``) and reports them in its ready line, so no port
is guessed. Its stdout and stderr go to files in the test's temporary directory.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
import httpx
import pytest

import veil
from veil.providers import detect_provider
from veil.server.keys import KeyStore, Role
from veil.server.ready import ReadyLine
from veil.server.state import open_state
from veil.tls import SERVER_NAME, pinned_client_context

START_TIMEOUT_S = 60
SNI = {"sni_hostname": SERVER_NAME}
# A clean stop exits 0, which tests assert: give a loaded machine time before the SIGKILL.
STOP_TIMEOUT_S = 60


@dataclass
class VeilServer:
    """A running server process and where it listens."""

    process: subprocess.Popen[bytes]
    data_dir: Path
    log_dir: Path
    ready_line: str
    unattested_port: int
    attested_port: int
    management_port: int

    @property
    def ports(self) -> dict[str, int]:
        return {
            "unattested_port": self.unattested_port,
            "attested_port": self.attested_port,
            "management_port": self.management_port,
        }

    def connect(self, **kwargs: Any) -> veil.Connection:
        kwargs.setdefault("simulation", True)
        return veil.connect("127.0.0.1", **self.ports, **kwargs)

    def stderr(self) -> str:
        return (self.log_dir / "stderr.log").read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT_S)
        return self.process.returncode


def start_server(
    data_dir: Path, log_dir: Path, *extra: str, module: str = "veil.cli"
) -> VeilServer:
    """Start `veil serve` and wait (bounded) for its ready line.

    `module` is what runs it: ``veil.cli``, or the test bed's ``veil.testing.emulated``.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = log_dir / "stdout.log", log_dir / "stderr.log"
    command = [
        sys.executable,
        "-m",
        module,
        "serve",
        "--platform",
        "simulated",
        "--data-dir",
        str(data_dir),
        "--host",
        "127.0.0.1",
        "--unattested-port",
        "0",
        "--attested-port",
        "0",
        "--management-port",
        "0",
        "--threads",
        "1",
        *extra,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with out_path.open("wb") as out, err_path.open("wb") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, env=env)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        output = out_path.read_text(errors="replace")
        ready = ReadyLine.find(output)
        if ready:
            return VeilServer(
                process=process,
                data_dir=data_dir,
                log_dir=log_dir,
                ready_line=next(line for line in output.splitlines() if "serving on" in line),
                unattested_port=ready.unattested_port,
                attested_port=ready.attested_port,
                management_port=ready.management_port,
            )
        if process.poll() is not None:
            break
        time.sleep(0.05)
    if process.poll() is None:
        process.kill()
    process.wait(timeout=STOP_TIMEOUT_S)
    pytest.fail(
        f"veil serve did not become ready (exit {process.returncode}):\n"
        f"{err_path.read_text(errors='replace')[-3000:]}"
    )


ServerFactory = Callable[..., VeilServer]


class RawClient:
    """Plain HTTP requests to a server, pinned like the SDK, for bodies the SDK never sends."""

    def __init__(self, server: VeilServer) -> None:
        self.server = server
        self.plain = httpx.Client(timeout=30)
        certificate = cbor2.loads(self.plain.get(self.url("unattested", "/")).content)
        self.pinned = httpx.Client(verify=pinned_client_context(certificate), timeout=30)

    def url(self, port: str, path: str) -> str:
        scheme = "http" if port == "unattested" else "https"
        return f"{scheme}://127.0.0.1:{getattr(self.server, port + '_port')}{path}"

    def get(self, port: str, path: str) -> httpx.Response:
        client = self.plain if port == "unattested" else self.pinned
        return client.get(self.url(port, path), extensions=SNI)

    def post(self, port: str, path: str, body: bytes) -> httpx.Response:
        return self.pinned.post(self.url(port, path), content=body, extensions=SNI)

    def close(self) -> None:
        self.plain.close()
        self.pinned.close()


def create_key(data_dir: Path, role: Role, name: str | None = None) -> tuple[str, str]:
    """A new API key in a server's data directory: (key id, secret). Running servers see it."""
    provider = detect_provider("simulated", data_dir=data_dir)
    return KeyStore(open_state(data_dir, provider.sealing_key)).create(role, name=name)


def veil_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m veil.cli ARGS`` (bounded), capturing its output."""
    return subprocess.run(
        [sys.executable, "-m", "veil.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
