"""The genuine BlindAI 0.6.3 client through HAProxy (TCP mode) in front of three `veil serve
--join` replicas sharing one broker identity and one PostgreSQL state (Debian's packages).

The client fetches evidence on the unattested port and opens TLS on the attested port: through
the balancer these are new connections, so usually to different replicas. It works because every
replica presents the broker's one certificate and each replica's evidence binds it; models the
client uploads to one replica are run by the others from the shared state.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
from test_blindai_client import (
    DRIVER,
    DRIVER_TIMEOUT_S,
    STUBS,
    Plan,
    blindai_python,  # noqa: F401 (the module's fixture: the compat venv's interpreter)
    float_model,
    pair_model,
)

from veil.testing.engines import engines_missing, haproxy, postgres
from veil.testing.local_server import LocalServer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        bool(engines_missing()),
        reason=f"{' and '.join(engines_missing())} not installed (scripts/test installs them)",
    ),
]

_BROKER_READY = re.compile(r"veil broker: serving on (?P<url>http://\S+) ")
_PORTS = ("unattested_port", "attested_port", "management_port")


def _broker(stack: ExitStack, root: Path) -> str:
    log = root / "broker.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "veil.cli", "broker", "--platform", "simulated",
             "--data-dir", str(root / "broker"), "--port", "0"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def stop() -> None:
        proc.terminate()
        proc.wait(15)

    stack.callback(stop)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        found = _BROKER_READY.search(log.read_text(errors="replace"))
        if found:
            return found["url"]
        time.sleep(0.05)
    pytest.fail(f"veil broker did not start:\n{log.read_text(errors='replace')[-3000:]}")


@pytest.fixture(scope="module")
def balanced_ports(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int, int]]:
    root = tmp_path_factory.mktemp("blindai-cluster")
    with ExitStack() as stack:
        url = stack.enter_context(postgres(root))
        broker_url = _broker(stack, root)
        replicas = [
            stack.enter_context(
                LocalServer(
                    data_dir=root / f"data{i}",
                    extra_args=(
                        "--join", broker_url, "--database-url", url,
                        "--store-dir", str(root / "store"), "--threads", "1",
                    ),
                )
            )
            for i in range(3)
        ]  # fmt: skip
        frontends = [[getattr(r, p) for r in replicas] for p in _PORTS]
        unattested, attested, management = stack.enter_context(haproxy(root, frontends))
        yield unattested, attested, management


@pytest.fixture(scope="module")
def summary(
    blindai_python: Path,  # noqa: F811 (the fixture imported above)
    balanced_ports: tuple[int, int, int],
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, object]:
    directory = tmp_path_factory.mktemp("blindai-cluster-plan")
    rng = np.random.default_rng(14)
    plan = Plan(directory)
    plan.models = {
        "float": float_model(directory / "float.onnx", rng),
        "pair": pair_model(directory / "pair.onnx"),
    }
    for i in range(3):  # several runs: each is a new TLS connection through the balancer
        x = rng.standard_normal((2, 4)).astype(np.float32)
        plan.add_run(f"float_by_id_{i}", "float", "id", "numpy", {"x": x})
        plan.add_run(f"float_by_hash_{i}", "float", "hash", "list", {"x": x})
    a = rng.standard_normal((2, 3)).astype(np.float32)
    b = rng.integers(-9, 9, (2, 3), dtype=np.int32)
    plan.add_run("pair_by_id", "pair", "id", "dict", {"a": a, "b": b})
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        env.pop(name, None)
    env["PYTHONPATH"] = str(STUBS)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    done = subprocess.run(
        [str(blindai_python), str(DRIVER), str(plan.write(balanced_ports))],
        capture_output=True,
        text=True,
        timeout=DRIVER_TIMEOUT_S,
        env=env,
        check=False,
    )
    lines = done.stdout.strip().splitlines()
    if not lines:
        pytest.fail(f"driver printed nothing (rc={done.returncode}):\n{done.stderr[-4000:]}")
    result: dict[str, object] = json.loads(lines[-1])
    result["plan_runs"] = [r["case"] for r in plan.runs]
    return result


def test_blindai_client_uploads_and_runs_through_the_balancer(summary: dict[str, object]) -> None:
    assert summary["connected"], summary["failures"]
    uploads = summary["uploads"]
    assert isinstance(uploads, dict)
    assert set(uploads) == {"float", "pair"}, summary["failures"]
    runs = summary["runs"]
    assert isinstance(runs, dict)
    for case in summary["plan_runs"]:  # type: ignore[attr-defined]
        assert runs[case]["ok"], (case, runs[case].get("problems"), summary["failures"])
    assert summary["failures"] == []
