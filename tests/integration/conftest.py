"""Fixtures: real `veil serve --platform simulated` processes (see server_process.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from server_process import RawClient, ServerFactory, VeilServer, start_server

import veil


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[ServerFactory]:
    """Start servers for one test; every one is stopped at the end."""
    started: list[VeilServer] = []

    def factory(*extra: str, data_dir: Path | None = None, module: str = "veil.cli") -> VeilServer:
        index = len(started)
        server = start_server(
            data_dir or tmp_path / f"data-{index}", tmp_path / f"log-{index}", *extra, module=module
        )
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VeilServer]:
    """One server shared by a test module, with small body limits (1 MiB run, 2 MiB upload)."""
    root = tmp_path_factory.mktemp("veil-server")
    running = start_server(
        root / "data",
        root / "log",
        "--max-run-bytes",
        str(1 << 20),
        "--max-upload-bytes",
        str(2 << 20),
    )
    yield running
    assert running.stop() == 0, running.stderr()[-3000:]


@pytest.fixture(scope="module")
def client(server: VeilServer) -> Iterator[veil.Connection]:
    with server.connect() as connection:
        yield connection


@pytest.fixture(scope="module")
def raw(server: VeilServer) -> Iterator[RawClient]:
    client = RawClient(server)
    yield client
    client.close()
