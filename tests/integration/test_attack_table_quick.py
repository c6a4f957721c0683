"""`bench/attack_table.py --quick` on one cheap row, end to end: the harness starts a default
server with keys, measures the victim, and reports the row (slow bodies must not cost the victim
a single request: they hold no concurrency slot)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_quick_attack_row(tmp_path: Path) -> None:
    out = tmp_path / "attacks.json"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "attack_table.py"),
            "--quick",
            "--only",
            "slow-body-x8",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=REPO,
    )
    assert done.returncode in (0, 1), done.stderr[-3000:]  # 1: a row failed its verdict
    report = json.loads(out.read_text())
    assert report["baseline_rps"] > 0
    (row,) = report["rows"]
    assert row["attack"] == "slow-body-x8"
    assert row["victim_errors"] == 0, row
    assert row["victim_throughput_pct"] > 0
    assert 0 < row["peak_rss_mib"] < 1536
    assert "slow-body-x8" in done.stdout
