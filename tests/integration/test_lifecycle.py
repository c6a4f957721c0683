"""Start, stop and restart: models survive restarts; signals stop the server cleanly."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx_models import dynamic_batch_model, identity_model, reference
from server_process import ServerFactory

pytestmark = pytest.mark.slow


def test_ready_line(server_factory: ServerFactory) -> None:
    server = server_factory()
    assert server.ready_line == (
        f"veil: serving on 127.0.0.1 (unattested http :{server.unattested_port}, "
        f"attested https :{server.attested_port}, management https :{server.management_port}), "
        "platform=simulated (INSECURE: no TEE), auth=off until a key exists (loopback), "
        "0 stored models restored"
    )


def test_restart_restores_models(server_factory: ServerFactory, tmp_path: Path) -> None:
    data = tmp_path / "kept"
    dense = dynamic_batch_model(seed=3)
    first = server_factory(data_dir=data)
    with first.connect() as client:
        kept = client.upload_model(dense, model_id="dense", model_name="dense.onnx")
        gone = client.upload_model(identity_model("int32"))
        client.upload_model(identity_model("int8"), model_id="deleted")
        client.delete_model("deleted")
    assert first.stop() == 0

    second = server_factory(data_dir=data)
    assert second.ready_line.endswith(", 2 stored models restored")
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    with second.connect() as client:
        listed = {m.model_id: m for m in client.list_models()}
        assert set(listed) == {"dense", gone.model_id}
        assert listed["dense"].hash == kept.hash
        assert listed["dense"].model_name == "dense.onnx"
        (out,) = client.predict("dense", x).output
        np.testing.assert_allclose(out.as_numpy(), reference(dense, {"x": x})[0], rtol=1e-6)
        client.delete_model(gone.model_id)
    assert second.stop(signal.SIGINT) == 0

    third = server_factory(data_dir=data)
    assert third.ready_line.endswith(", 1 stored model restored")
    with third.connect() as client:
        assert [m.model_id for m in client.list_models()] == ["dense"]


def test_sigterm_and_sigint_stop_cleanly(server_factory: ServerFactory) -> None:
    assert server_factory().stop(signal.SIGTERM) == 0
    assert server_factory().stop(signal.SIGINT) == 0


def test_auto_platform_without_tee_refuses(tmp_path: Path) -> None:
    if Path("/dev/attestation").exists() or Path("/sys/kernel/config/tsm/report").exists():
        pytest.skip("this machine has a TEE interface")
    result = subprocess.run(
        [sys.executable, "-m", "veil.cli", "serve", "--data-dir", str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "--platform simulated" in result.stderr
    assert "serving on" not in result.stdout
    assert not (tmp_path / "data").exists()  # a refused start creates nothing
    assert "Traceback" not in result.stderr


def test_taken_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "veil.cli",
                "serve",
                "--platform",
                "simulated",
                "--data-dir",
                str(tmp_path / "data"),
                "--unattested-port",
                "0",
                "--attested-port",
                str(port),
                "--management-port",
                "0",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()


def test_uvicorn_says_start_and_stop_once(server_factory: ServerFactory) -> None:
    server = server_factory("--log-level", "info")
    assert server.stop() == 0
    log = server.stderr()
    for line in ("Started server process", "Shutting down", "Finished server process"):
        assert log.count(line) == 1, log
