"""Every ```python block of docs/*.md runs, as written, in order, one namespace per document.

The documents tell the reader to start ``veil serve --platform simulated`` in another terminal and
then talk to it on its default ports; this test does the same: one such server (default ports,
temporary data directory) per document, and the blocks run in a temporary working directory.
Fences other than ``python`` (bash, toml, text) are not executed.
"""

from __future__ import annotations

import re
import socket
import warnings
from pathlib import Path

import pytest

from veil.errors import SimulationModeWarning
from veil.providers.measurement import simulated_measurement
from veil.testing.local_server import LocalServer

DOCS = Path(__file__).resolve().parents[2] / "docs"
_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
_DEFAULT_PORTS = {"unattested_port": 9923, "attested_port": 9924, "management_port": 9925}


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number of the block's first code line, code) for each ```python block."""
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in _FENCE.finditer(text)]


def _documents() -> list[object]:
    params: list[object] = []
    for path in sorted(DOCS.glob("*.md")):
        text = path.read_text(encoding="utf-8")
        if not python_blocks(text):
            continue
        heavy = re.search(r"^\s*(import|from) (torch|transformers)\b", text, re.MULTILINE)
        marks = [pytest.mark.torch, pytest.mark.slow] if heavy else []
        params.append(pytest.param(path, id=path.name, marks=marks))
    return params


def test_block_extraction() -> None:
    text = "intro\n```python\nx = 1\n```\n```bash\nno\n```\n\n```python\ny = 2\nz = 3\n```\n"
    assert python_blocks(text) == [(3, "x = 1\n"), (10, "y = 2\nz = 3\n")]


def test_the_tutorial_has_code() -> None:
    blocks = python_blocks((DOCS / "tutorial.md").read_text(encoding="utf-8"))
    assert len(blocks) >= 8


def _require_free(ports: dict[str, int]) -> None:
    for port in ports.values():
        with socket.socket() as probe:
            # As veil serve binds: a connection of the previous document's server in TIME_WAIT
            # does not keep the port from it (without this option the probe alone would fail).
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                pytest.fail(
                    f"the docs talk to veil serve on its default port {port}, which is in use"
                )


@pytest.mark.parametrize("document", _documents())
def test_document_runs(document: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if document.name == "tutorial.md":
        pytest.importorskip("torch")
        pytest.importorskip("transformers")
    _require_free(_DEFAULT_PORTS)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace: dict[str, object] = {"__name__": "__docs__"}
    with LocalServer(data_dir=tmp_path / "veil-data", ports=_DEFAULT_PORTS):
        # The simulated measurement hashes veil's sources; measure them here now, as the server
        # just did, rather than after the docs' slow export (the tree may change in between
        # while someone edits it).
        simulated_measurement()
        for line, code in python_blocks(document.read_text(encoding="utf-8")):
            compiled = compile(code, f"{document.name}, block at line {line}", "exec")
            # The documents' code is what users run: third-party deprecation warnings (torch's
            # TorchScript exporter) are theirs to see, not failures of the docs.
            with warnings.catch_warnings():
                warnings.simplefilter("default")
                warnings.simplefilter("ignore", SimulationModeWarning)  # asserted in client tests
                exec(compiled, namespace)  # the code is this repository's own docs
