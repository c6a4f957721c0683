"""The genuine BlindAI 0.6.3 client and veil's own across a key rotation (SIGHUP) of a running
`veil serve`: veil's client attests the new keys on its own; BlindAI's, which pins the
certificate it attested at connect(), keeps working through a new connect().

What BlindAI 0.6.3 does with the connection it already has: the server closes every open
connection at a rotation, the client's next request opens a new one, meets a certificate it did
not attest and fails (requests' SSLError); it never re-attests by itself. Nothing is sent to
the server under the new certificate without a new connect() and its attestation.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import warnings
from pathlib import Path

import cbor2
import httpx
import numpy as np
import pytest
from test_blindai_client import (
    STUBS,
    blindai_python,  # noqa: F401 (the module's fixture: the compat venv's interpreter)
    float_model,
)

import veil
from veil.errors import SimulationModeWarning
from veil.testing.local_server import LocalServer

pytestmark = pytest.mark.slow

DRIVER = Path(__file__).with_name("blindai_rotation_driver.py")
ROTATION_TIMEOUT_S = 60
DRIVER_TIMEOUT_S = 180


def served_certificate(server: LocalServer) -> bytes:
    url = f"http://{server.host}:{server.unattested_port}/"
    certificate: bytes = cbor2.loads(httpx.get(url, timeout=30).content)
    return certificate


def test_clients_after_a_sighup_rotation(
    blindai_python: Path,  # noqa: F811 (the fixture imported above)
    tmp_path: Path,
) -> None:
    x = np.random.default_rng(3).standard_normal((2, 4)).astype(np.float32)
    model = float_model(tmp_path / "float.onnx", np.random.default_rng(4))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        env.pop(name, None)
    env["PYTHONPATH"] = str(STUBS)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SimulationModeWarning)
        server = LocalServer(data_dir=tmp_path / "data").start()
        client = veil.connect(server.host, simulation=True, **server.ports)
    driver = None
    try:
        client.upload_model(model, model_id="float")
        expected = client.predict("float", x).output[0].as_numpy()
        plan = {"addr": server.host, **server.ports, "model_id": "float", "x": x.tolist()}
        (tmp_path / "plan.json").write_text(json.dumps(plan))
        driver = subprocess.Popen(
            [str(blindai_python), str(DRIVER), str(tmp_path / "plan.json")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert driver.stdout is not None
        assert driver.stdin is not None
        before = driver.stdout.readline()
        assert before.startswith("BEFORE "), (before, driver.stderr.read() if driver.stderr else "")
        assert json.loads(before[len("BEFORE ") :])["ok"]

        first = served_certificate(server)
        server.send_signal(signal.SIGHUP)
        give_up = time.monotonic() + ROTATION_TIMEOUT_S
        while served_certificate(server) == first:
            assert time.monotonic() < give_up, f"no rotation after SIGHUP:\n{server.log()}"
            time.sleep(0.1)

        # veil's client: the same connection object, attested again on its own.
        after = client.predict("float", x).output[0].as_numpy()
        np.testing.assert_allclose(after, expected, rtol=1e-5, atol=1e-6)
        assert client.reattestations == 1
        assert client.certificate_der == served_certificate(server) != first

        driver.stdin.write("rotated\n")
        driver.stdin.flush()
        out, err = driver.communicate(timeout=DRIVER_TIMEOUT_S)
        summary = json.loads(out.strip().splitlines()[-1])
        assert "traceback" not in summary, summary["traceback"] + err[-2000:]
        # BlindAI's open connection refuses the new certificate; a new connect() works.
        # (requests' SSLError; its parent ConnectionError if the close of the idle connection
        # is seen only when the request is sent on it)
        assert not summary["old_connection"]["ok"]
        failure = summary["old_connection"]["error"].split(":")[0]
        assert failure in ("SSLError", "ConnectionError"), summary["old_connection"]
        assert summary["new_connection"]["ok"], summary["new_connection"]
        new_output = np.array(summary["new_connection"]["output"], dtype=np.float32)
        np.testing.assert_allclose(new_output, expected, rtol=1e-5, atol=1e-6)
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
            driver.communicate(timeout=30)
        client.close()
        server.stop()
