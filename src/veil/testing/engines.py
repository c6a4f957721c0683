"""Real PostgreSQL and HAProxy on 127.0.0.1, in temporary directories, for cluster tests.

Debian's ``postgresql`` and ``haproxy`` packages (``scripts/test`` installs them when it runs as
root). Nothing here is used by production code.

- `postgres(workdir)`: a throw-away cluster (``initdb``, then ``pg_ctl start``) listening on a
  free loopback port with trust authentication; run as the ``postgres`` user when the caller is
  root (PostgreSQL refuses to run as root). Yields the connection URL.
- `haproxy(workdir, frontends)`: HAProxy in TCP mode (TLS passes through untouched: the client's
  TLS session ends in the replica, inside the TEE), one listening port per list of backends,
  round robin. Yields the listening ports.

`engines_missing()` names what is not installed, for tests to skip with that reason.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = ["engines_missing", "free_port", "free_ports", "haproxy", "postgres", "postgres_bin"]


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports (each held until all are chosen, so none repeats)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]


def postgres_bin() -> Path | None:
    """The directory of Debian's PostgreSQL server binaries (the newest installed)."""
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3])
    )
    return versions[-1].parent if versions else None


def engines_missing() -> list[str]:
    missing = [] if postgres_bin() is not None else ["postgresql"]
    if shutil.which("haproxy") is None and not Path("/usr/sbin/haproxy").exists():
        missing.append("haproxy")
    return missing


def _wait_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"exited with status {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"127.0.0.1:{port}: nothing listening after {timeout:.0f} s")


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"{Path(argv[-1] if argv[-1].startswith('/') else argv[0]).name}: exit status "
            f"{done.returncode}: {done.stderr.decode(errors='replace').strip()[-2000:]}"
        )


@contextlib.contextmanager
def postgres(workdir: Path) -> Iterator[str]:
    """A PostgreSQL cluster on a free loopback port; yields its URL; stops and removes it after.

    Its files live in a new directory beside `workdir` readable by the ``postgres`` user (a
    root caller's pytest directories are private to root)."""
    bindir = postgres_bin()
    if bindir is None:
        raise RuntimeError("PostgreSQL is not installed (Debian package postgresql)")
    root = Path(tempfile.mkdtemp(prefix="veil-pg-"))
    data, sockets = root / "data", root / "sockets"
    prefix: list[str] = []
    try:
        for d in (data, sockets):
            d.mkdir(mode=0o700)
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            for d in (root, data, sockets):
                os.chown(d, user.pw_uid, user.pw_gid)
            prefix = ["runuser", "-u", "postgres", "--"]
        port = free_port()
        _run([*prefix, str(bindir / "initdb"), "-A", "trust", "-U", "postgres", "-D", str(data)])
        options = f"-h 127.0.0.1 -p {port} -k {sockets} -c fsync=off -c max_connections=50"
        pg_ctl = [*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-w", "-t", "60"]
        _run([*pg_ctl, "-o", options, "-l", str(root / "log"), "start"])
        try:
            _wait_port(port, 30)
            yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
        finally:
            _run([*pg_ctl, "-m", "immediate", "stop"])
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def haproxy(workdir: Path, frontends: Sequence[Sequence[int]]) -> Iterator[list[int]]:
    """HAProxy in TCP mode: for each list of backend ports, one free listening port that
    spreads connections over them round robin. Yields the listening ports."""
    binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
    ports = free_ports(len(frontends))
    lines = [
        "global",
        "    maxconn 256",
        "defaults",
        "    mode tcp",
        "    timeout connect 5s",
        "    timeout client 60s",
        "    timeout server 60s",
    ]
    for n, (port, backends) in enumerate(zip(ports, frontends, strict=True)):
        lines += [f"listen front{n}", f"    bind 127.0.0.1:{port}", "    balance roundrobin"]
        lines += [f"    server r{i} 127.0.0.1:{b}" for i, b in enumerate(backends)]
    config = workdir / "haproxy.cfg"
    config.write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen(
        [binary, "-db", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        for port in ports:
            _wait_port(port, 20, proc)
        yield ports
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
