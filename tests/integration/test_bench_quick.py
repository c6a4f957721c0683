"""`bench/bench_inference.py --quick` end to end: every system answers, nothing fails.

A smoke test of the benchmark (speed targets are read from its table, not asserted here).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")  # the first run exports the models with torch/transformers
pytest.importorskip("transformers")

pytestmark = [pytest.mark.torch, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def test_quick_bench_runs(tmp_path: Path) -> None:
    out = tmp_path / "quick.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_inference.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    systems = {row["system"] for row in report["rows"]}
    assert {"inproc", "batcher", "unbatched", "plain", "veil"} <= systems
    for row in report["rows"]:
        assert row["errors"] == 0, row
        assert row["requests"] > 0, row
    veil_rows = [row for row in report["rows"] if row["system"] == "veil"]
    assert all(row["p50_ms"] and row["seq_per_s"] for row in veil_rows)
    assert [u["client"] for u in report["upload"]] == ["veil"], report["skipped"]
    assert report["ratios"], "no ratio computed"
    assert "ratios" in done.stdout
