"""A real `veil broker --platform simulated` process on a free loopback port, for cluster tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

START_TIMEOUT_S = 60
_READY = re.compile(
    r"veil broker: serving on (?P<url>http://\S+) \(generation (?P<g>\d+), "
    r"certificate sha256 (?P<digest>[0-9a-f]{64})"
)


@dataclass
class BrokerProcess:
    process: subprocess.Popen[bytes]
    data_dir: Path
    log_dir: Path
    url: str
    generation: int
    certificate_sha256: str

    def stderr(self) -> str:
        return (self.log_dir / "stderr.log").read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)
        return self.process.returncode


def start_broker(
    data_dir: Path, log_dir: Path, *extra: str, port: int = 0, module: str = "veil.cli"
) -> BrokerProcess:
    """Start `veil broker` and wait (bounded) for its ready line.

    `module` is what runs it: ``veil.cli``, or the test bed's ``veil.testing.emulated`` (then
    `extra` names ``--platform`` and the harness options).
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = log_dir / "stdout.log", log_dir / "stderr.log"
    command = [
        sys.executable, "-m", module, "broker", "--platform", "simulated",
        "--data-dir", str(data_dir), "--port", str(port), "--log-level", "info", *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with out_path.open("wb") as out, err_path.open("wb") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, env=env)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        found = _READY.search(out_path.read_text(errors="replace"))
        if found:
            return BrokerProcess(
                process, data_dir, log_dir, found["url"], int(found["g"]), found["digest"]
            )
        if process.poll() is not None:
            break
        time.sleep(0.05)
    if process.poll() is None:
        process.kill()
    process.wait(timeout=15)
    pytest.fail(
        f"veil broker did not become ready:\n{err_path.read_text(errors='replace')[-3000:]}"
    )
