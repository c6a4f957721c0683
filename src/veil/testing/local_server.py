"""``veil serve --platform simulated`` in a subprocess on loopback. TEST AND DEMO HARNESS.

`veil demo`, the documentation's examples and the integration tests run a real server this way:
free loopback ports by default, the ready line parsed for the ports, the process and its data
directory removed on exit. The server it starts is simulated: its evidence proves nothing.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

from veil.server.ready import ReadyLine

__all__ = ["LocalServer"]


class LocalServer:
    """``veil serve --platform simulated`` in a subprocess on loopback (free ports by default).

    Use as a context manager; the process is stopped and its data directory removed on exit::

        with LocalServer() as server:
            with veil.connect(server.host, simulation=True, **server.ports) as client:
                ...

    Attributes (after start): host, unattested_port, attested_port, management_port.
    """

    def __init__(
        self,
        *,
        data_dir: Path | None = None,
        ports: Mapping[str, int] | None = None,
        extra_args: Sequence[str] = (),
        start_timeout: float = 60.0,
    ) -> None:
        wanted = dict(ports or {})
        unknown = set(wanted) - {"unattested_port", "attested_port", "management_port"}
        if unknown:
            raise ValueError(f"ports: unknown keys {sorted(unknown)!r}")
        self._wanted = wanted
        self._own_dir = data_dir is None
        self._data_dir = data_dir
        self._extra_args = tuple(extra_args)
        self._start_timeout = start_timeout
        self._process: subprocess.Popen[str] | None = None
        self._log: IO[str] | None = None
        self.host = "127.0.0.1"
        self.unattested_port = self.attested_port = self.management_port = 0

    @property
    def pid(self) -> int:
        """The server's process id (benchmarks read its memory under ``/proc``)."""
        if self._process is None:
            raise RuntimeError("server not started")
        return self._process.pid

    @property
    def ports(self) -> dict[str, int]:
        """Keyword arguments for `veil.connect`."""
        return {
            "unattested_port": self.unattested_port,
            "attested_port": self.attested_port,
            "management_port": self.management_port,
        }

    def start(self) -> LocalServer:
        if self._process is not None:
            raise RuntimeError("server already started")
        if self._data_dir is None:
            self._data_dir = Path(tempfile.mkdtemp(prefix="veil-demo-server-"))
        # Lives as long as the server process; closed in stop().
        self._log = tempfile.TemporaryFile(mode="w+", prefix="veil-serve-log-")  # noqa: SIM115
        command = [
            sys.executable,
            "-m",
            "veil.cli",
            "serve",
            "--platform",
            "simulated",
            "--host",
            self.host,
            "--data-dir",
            str(self._data_dir),
            "--unattested-port",
            str(self._wanted.get("unattested_port", 0)),
            "--attested-port",
            str(self._wanted.get("attested_port", 0)),
            "--management-port",
            str(self._wanted.get("management_port", 0)),
            *self._extra_args,
        ]
        self._process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
            text=True,
            # Its own process group: a Ctrl-C meant for the demo is handled by the demo, which
            # then stops the server itself.
            start_new_session=True,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        assert self._process is not None
        assert self._process.stdout is not None
        lines: list[str] = []
        stdout = self._process.stdout

        def read() -> None:
            for line in stdout:
                lines.append(line)
                if ReadyLine.find(line):
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(self._start_timeout)
        for line in lines:
            found = ReadyLine.find(line)
            if found:
                self.host = found.host
                self.unattested_port = found.unattested_port
                self.attested_port = found.attested_port
                self.management_port = found.management_port
                # Keep draining stdout so that the server never blocks on a full pipe.
                threading.Thread(target=lambda: stdout.read(), daemon=True).start()
                return
        status = self._process.poll()
        state = "did not start" if status is None else f"exited with status {status}"
        raise RuntimeError(f"veil serve {state} within {self._start_timeout:g} s:\n{self.log()}")

    def send_signal(self, sig: int) -> None:
        """Send `sig` to the server process (e.g. ``signal.SIGHUP``: rotate its keys)."""
        if self._process is None:
            raise RuntimeError("server not started")
        self._process.send_signal(sig)

    def log(self) -> str:
        """What the server wrote to stderr so far (its last 4000 characters)."""
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(0)
        return self._log.read()[-4000:]

    def stop(self) -> None:
        """Stop the server (SIGINT, then SIGKILL after 10 s) and remove its temporary data."""
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(10)
            if process.stdout is not None:
                process.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._own_dir and self._data_dir is not None:
            shutil.rmtree(self._data_dir, ignore_errors=True)
            self._data_dir = None

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
