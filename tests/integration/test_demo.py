"""`veil demo` end to end: PyTorch DistilBERT -> ONNX -> simulated veil server -> same logits."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import veil  # noqa: E402
from veil.commands.demo import run_demo  # noqa: E402
from veil.export import DEMO_TOKEN_IDS, build_demo_distilbert  # noqa: E402
from veil.testing.local_server import LocalServer  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.slow]

_LOGITS = re.compile(r"^(veil|PyTorch) logits:\s+\[(.*)\]$", re.MULTILINE)


def _env(tmp: Path) -> dict[str, str]:
    # TMPDIR: every temporary file and folder the demo makes lands here, so that the test can
    # check they are all gone afterwards.
    tmp.mkdir(exist_ok=True)
    return {**os.environ, "TMPDIR": str(tmp), "HF_HUB_OFFLINE": "1"}


def _ours(tmp: Path) -> list[str]:
    # torch may leave its own caches in TMPDIR (torchinductor_*); veil's all start with "veil-".
    return sorted(p.name for p in tmp.iterdir() if p.name.startswith("veil-"))


def _servers_under(path: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if "serve" in cmdline and any(str(path) in part for part in cmdline):
            found.append(process)
    return found


def test_veil_demo_matches_pytorch_and_cleans_up(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    result = subprocess.run(
        [sys.executable, "-m", "veil.cli", "demo"],
        env=_env(tmp),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    printed = {
        name: np.array([float(v) for v in values.split(",")])
        for name, values in _LOGITS.findall(result.stdout)
    }
    assert set(printed) == {"veil", "PyTorch"}
    assert f"-> {list(DEMO_TOKEN_IDS)}" in result.stdout
    assert re.search(r"max \|difference\|: \S+ \(tolerance 0\.0001\) OK", result.stdout)
    # Independently of the demo's own comparison: the logits veil served are the ones this
    # process computes with PyTorch for the same seed and sentence (printed to 6 decimals).
    with torch.no_grad():
        want = (
            build_demo_distilbert(seed=0)(input_ids=torch.tensor([DEMO_TOKEN_IDS]))
            .logits[0]
            .numpy()
        )
    np.testing.assert_allclose(printed["veil"], want, atol=2e-6)
    np.testing.assert_allclose(printed["PyTorch"], want, atol=2e-6)
    # Progress for the slow steps, on stderr.
    for step in ("exporting DistilBERT", "starting veil serve", "uploading 255 MiB as distilbert-"):
        assert re.search(re.escape(step) + r".* done in \d+\.\d s", result.stderr), result.stderr
    assert _ours(tmp) == []
    assert _servers_under(tmp) == []


def test_ctrl_c_stops_the_server_and_removes_files(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    with (tmp_path / "out").open("w") as out, (tmp_path / "err").open("w") as err:
        demo = subprocess.Popen(
            [sys.executable, "-m", "veil.cli", "demo"], env=_env(tmp), stdout=out, stderr=err
        )
        try:
            deadline = time.monotonic() + 300
            # Interrupt in the middle of the upload, with the embedded server running.
            while demo.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
                if "uploading" in (tmp_path / "err").read_text():
                    break
            servers = _servers_under(tmp)
            assert servers, (tmp_path / "err").read_text()
            time.sleep(0.3)
            demo.send_signal(signal.SIGINT)
            status = demo.wait(60)
        finally:
            if demo.poll() is None:
                demo.kill()
                demo.wait()
    assert status == 130, (tmp_path / "err").read_text()
    err = (tmp_path / "err").read_text()
    assert "interrupted, cleaned up" in err
    assert "uploading" in err
    assert " failed\n" in err  # the interrupted step says so
    for server in servers:
        assert not server.is_running() or server.status() == psutil.STATUS_ZOMBIE
    assert _ours(tmp) == []


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-layer DistilBERT classifier saved as a local Transformers checkpoint (no tokenizer)."""
    folder = tmp_path_factory.mktemp("small-distilbert")
    torch.manual_seed(7)
    config = transformers.DistilBertConfig(
        num_labels=2, n_layers=1, dim=64, hidden_dim=128, n_heads=4
    )
    transformers.DistilBertForSequenceClassification(config).save_pretrained(folder)
    return folder


def test_demo_against_an_existing_server_with_a_checkpoint(small_checkpoint: Path) -> None:
    lines: list[str] = []
    with LocalServer() as server:
        status = run_demo(
            model_dir=small_checkpoint,
            addr=server.host,
            ports=server.ports,
            simulation=True,
            out=lines.append,
        )
        assert status == 0, lines
        assert any(line.endswith(" OK") for line in lines)
        # What was attested is the point of the demo.
        attested = next(line for line in lines if line.startswith("attested:"))
        assert "sgx (SIMULATED: no TEE), TCB status UpToDate, debug False" in attested
        assert any(line.strip().startswith("mr_enclave:") for line in lines)
        # With --addr, the demo leaves the server as it found it.
        with veil.connect(server.host, simulation=True, **server.ports) as client:
            assert client.list_models() == []
        # Its own comparison can fail: with a tolerance below float32 rounding it reports it.
        lines.clear()
        status = run_demo(
            model_dir=small_checkpoint,
            addr=server.host,
            ports=server.ports,
            atol=1e-12,
            out=lines.append,
        )
        assert status == 1
        assert any("MISMATCH" in line for line in lines), lines


def test_demo_refuses_a_simulated_server_unless_asked(
    small_checkpoint: Path, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[sgx]\nmr_enclave = ["' + "ab" * 32 + '"]\n')
    with LocalServer() as server:
        # No policy and no simulation: refused before contacting anyone.
        with pytest.raises(veil.PolicyError, match="no policy"):
            run_demo(
                model_dir=small_checkpoint, addr=server.host, ports=server.ports, simulation=False
            )
        # A policy for real hardware: the simulated server is refused, nothing is uploaded.
        with pytest.raises(veil.AttestationError, match="simulated"):
            run_demo(
                model_dir=small_checkpoint,
                addr=server.host,
                ports=server.ports,
                simulation=False,
                policy_file=policy,
            )
        with veil.connect(server.host, simulation=True, **server.ports) as client:
            assert client.list_models() == []
