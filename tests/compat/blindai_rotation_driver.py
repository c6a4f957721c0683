"""The genuine BlindAI 0.6.3 client across a key rotation of `veil serve` (runs in the compat venv).

    python blindai_rotation_driver.py PLAN.json

PLAN.json: addr, unattested_port, attested_port, management_port, model_id, x (a nested list of
float32 values). The driver connects, runs the model, prints ``BEFORE <json>`` and waits for a
line on stdin (the test rotates the server's keys meanwhile); then it runs the model again on the
connection it has, then on a new ``connect()``, and prints one JSON summary as its last line.
"""

from __future__ import annotations

import json
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import blindai.core
import numpy as np


def connect(plan: dict[str, Any]) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return blindai.core.connect(
            plan["addr"],
            unattested_server_port=plan["unattested_port"],
            attested_server_port=plan["attested_port"],
            model_management_port=plan["management_port"],
            hazmat_http_on_unattested_port=True,
            simulation_mode=True,
        )


def run(conn: Any, plan: dict[str, Any]) -> dict[str, Any]:
    """{"ok": True, "output": [...]} or {"ok": False, "error": "Type: message"}."""
    x = np.array(plan["x"], dtype=np.float32)
    try:
        reply = conn.run_model(model_id=plan["model_id"], input_tensors=x)
        return {"ok": True, "output": reply.output[0].as_numpy().tolist()}
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}


def main(plan_path: str) -> int:
    plan = json.loads(Path(plan_path).read_text())
    summary: dict[str, Any] = {}
    try:
        conn = connect(plan)
        summary["before"] = run(conn, plan)
        print("BEFORE " + json.dumps(summary["before"]), flush=True)
        sys.stdin.readline()  # the server's keys rotate meanwhile
        summary["old_connection"] = run(conn, plan)
        summary["new_connection"] = run(connect(plan), plan)
    except Exception:
        summary["traceback"] = traceback.format_exc(limit=6)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
