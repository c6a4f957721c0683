"""Sealed storage against a real server: restarts restore ids, hashes, owners and visibility;
nothing on disk shows a model in clear; a tampered, replayed or missing file stops the start
(and a deleted model put back is never served); SIGKILL during uploads loses nothing
acknowledged."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from server_process import ServerFactory, create_key, veil_cli

import veil
from veil.errors import ApiError, TransportError
from veil.server.runner import UNSEALED_STORE_WARNING


def add_model(n: int, seed: int) -> tuple[bytes, np.ndarray]:
    """y = x + w with w random float32 [n]: the model bytes hold w's bytes verbatim."""
    w = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n])],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString(), w


def files_under(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_restart_restores_sealed_models_with_owners(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    admin, alice, bob = (create_key(data, r) for r in ("admin", "owner", "owner"))
    blob_a, w_a = add_model(1024, 1)
    blob_b, w_b = add_model(512, 2)
    first = server_factory(data_dir=data)
    with first.connect(api_key=alice[1]) as client:
        client.upload_model(blob_a, model_id="secret-model-alice")
    with first.connect(api_key=bob[1]) as client:
        client.upload_model(blob_b, model_id="model-bob", visibility="public")
    assert first.stop() == 0

    # Nothing at rest shows the models: not their bytes, weights or ids.
    stored = files_under(data)
    assert any(p.suffix == ".sealed" for p in stored)
    assert not (data / "models").exists()
    for blob, w in ((blob_a, w_a), (blob_b, w_b)):
        raw = w.tobytes()
        for needle in (blob[:64], raw[:64], raw[len(raw) // 2 : len(raw) // 2 + 64]):
            assert not any(needle in content for content in stored.values())
    for content in stored.values():
        assert b"secret-model-alice" not in content
    assert not any("secret-model-alice" in str(p) for p in stored)

    second = server_factory(data_dir=data)
    with second.connect(api_key=admin[1]) as client:
        listed = {m.model_id: m for m in client.list_models()}
    assert set(listed) == {"secret-model-alice", "model-bob"}
    assert listed["secret-model-alice"].hash == hashlib.sha256(blob_a).digest()
    assert listed["secret-model-alice"].owner == alice[0]
    assert listed["secret-model-alice"].visibility == "restricted"
    assert listed["model-bob"].hash == hashlib.sha256(blob_b).digest()
    assert (listed["model-bob"].owner, listed["model-bob"].visibility) == (bob[0], "public")
    # and the rules still hold after the restart
    with second.connect(api_key=alice[1]) as client:
        x = np.ones(1024, np.float32)
        assert np.array_equal(client.predict("secret-model-alice", x).output[0].as_numpy(), x + w_a)
    with second.connect(api_key=bob[1]) as client:
        with pytest.raises(veil.NotFoundError):
            client.predict("secret-model-alice", np.ones(1024, np.float32))
        x = np.ones(512, np.float32)
        assert np.array_equal(client.predict("model-bob", x).output[0].as_numpy(), x + w_b)


def refused_start(data: Path) -> str:
    """Start `veil serve` on `data`, expecting it to refuse (exit 2); returns its stderr."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "veil.cli",
            "serve",
            "--platform",
            "simulated",
            "--data-dir",
            str(data),
            *("--unattested-port", "0", "--attested-port", "0", "--management-port", "0"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "serving on" not in result.stdout
    return result.stderr


def sealed_files(data: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in (data / "sealed").glob("*.sealed")}


def test_tampered_blob_refuses_start(server_factory: ServerFactory, tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = server_factory(data_dir=data)
    with first.connect() as client:
        client.upload_model(add_model(64, 4)[0], model_id="tampered")
        (victim,) = (data / "sealed").glob("*.sealed")
        client.upload_model(add_model(64, 3)[0], model_id="kept")
    assert first.stop() == 0
    blob = bytearray(victim.read_bytes())
    blob[len(blob) // 2] ^= 1
    victim.write_bytes(bytes(blob))
    err = refused_start(data)
    assert "model 'tampered': its blob (version 1) does not unseal" in err
    assert not (data / "sealed" / "quarantine").exists()


def test_deleted_model_put_back_does_not_come_back(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    # Issue 10: an old .sealed file copied back while the server was down restored the model.
    data = tmp_path / "data"
    first = server_factory(data_dir=data)
    with first.connect() as client:
        client.upload_model(add_model(64, 1)[0], model_id="deleted")
        client.upload_model(add_model(64, 2)[0], model_id="kept")
    saved = sealed_files(data)
    with first.connect() as client:
        client.delete_model("deleted")
    assert first.stop() == 0
    for path, content in saved.items():
        path.write_bytes(content)
    second = server_factory(data_dir=data)
    with second.connect() as client:
        assert [m.model_id for m in client.list_models()] == ["kept"]
    assert "the manifest does not name it" in second.stderr()


def test_narrowed_model_rolled_back_refuses_start(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    # A public model deleted and uploaded again restricted; the old files (the manifest
    # included) copied back while the server is down would make it public again.
    data = tmp_path / "data"
    admin, alice = create_key(data, "admin"), create_key(data, "owner")
    first = server_factory(data_dir=data)
    with first.connect(api_key=alice[1]) as client:
        client.upload_model(add_model(64, 1)[0], model_id="m", visibility="public")
    saved = {**sealed_files(data), data / "state.sealed": (data / "state.sealed").read_bytes()}
    with first.connect(api_key=alice[1]) as client:
        client.delete_model("m")
        client.upload_model(add_model(64, 1)[0], model_id="m", visibility="restricted")
    assert first.stop() == 0
    for path in sealed_files(data):
        path.unlink()
    for path, content in saved.items():
        path.write_bytes(content)
    err = refused_start(data)
    assert "an older manifest was put back (rollback)" in err
    del admin


def test_revoked_key_restored_by_an_old_state_refuses_start(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    dave = create_key(data, "owner", "dave")
    saved = (data / "state.sealed").read_bytes()
    result = veil_cli("keys", "revoke", dave[0], "--data-dir", str(data), "--platform", "simulated")
    assert result.returncode == 0, result.stderr
    (data / "state.sealed").write_bytes(saved)
    assert "rollback" in refused_start(data)
    # and `veil keys` refuses it too
    listing = veil_cli("keys", "list", "--data-dir", str(data), "--platform", "simulated")
    assert listing.returncode == 2
    assert "rollback" in listing.stderr


def test_edited_key_records_refuse_start(tmp_path: Path) -> None:
    data = tmp_path / "data"
    create_key(data, "owner")
    state = data / "state.sealed"
    content = bytearray(state.read_bytes())
    content[-20] ^= 1  # inside the last chunk: the key records
    state.write_bytes(bytes(content))
    assert "state.sealed: does not unseal" in refused_start(data)


def test_vanished_state_does_not_turn_auth_off(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    # Issue 10: deleting keys.sqlite3 and restarting on loopback turned auth off while a
    # restricted model remained.
    data = tmp_path / "data"
    alice = create_key(data, "owner")
    first = server_factory(data_dir=data)
    with first.connect(api_key=alice[1]) as client:
        client.upload_model(add_model(64, 1)[0], model_id="private")
    assert first.stop() == 0
    (data / "state.sealed").unlink()
    assert "state.sealed: missing, but state.version says version 2" in refused_start(data)
    (data / "state.version").unlink()  # both gone: the blobs still say models existed
    assert "model blob(s) but no state" in refused_start(data)


def test_sigkill_during_uploads_loses_nothing_acknowledged(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    server = server_factory(data_dir=data)
    acked: dict[str, tuple[str, int, int]] = {}
    in_flight: list[str] = []

    def writer() -> None:
        try:
            # No failover: an upload cut by the kill fails at once, instead of looking for its
            # model on the dead server until the upload's 600 s are up (the thread would outlive
            # the test and hold up pytest's exit).
            with server.connect(failover_retries=0) as client:
                for i in range(10_000):
                    n = (16, 4096, 262_144, 1_048_576)[i % 4]
                    blob, _ = add_model(n, i)
                    in_flight[:] = [f"m{i}"]
                    client.upload_model(blob, model_id=f"m{i}")
                    acked[f"m{i}"] = (hashlib.sha256(blob).hexdigest(), n, i)
                    in_flight.clear()
        except (TransportError, ApiError, OSError):
            return  # killed under us

    thread = threading.Thread(target=writer)
    thread.start()
    # Kill once uploads are under way (however long connecting took), in the middle of more.
    deadline = time.monotonic() + 60
    while not acked and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    server.stop(signal.SIGKILL)
    thread.join(60)
    assert not thread.is_alive(), "the writer still runs after the kill"
    assert acked, "no upload was acknowledged before the kill"

    restarted = server_factory(data_dir=data)
    with restarted.connect() as client:
        listed = {m.model_id: m.hash.hex() for m in client.list_models()}
        for model_id, (sha, _, _) in acked.items():
            assert listed.get(model_id) == sha, f"{model_id} acknowledged but not restored"
        unexpected = set(listed) - set(acked) - set(in_flight)
        assert not unexpected
        model_id, (sha, n, seed) = max(acked.items(), key=lambda item: item[1][2])
        x = np.ones(n, np.float32)
        y = client.predict(model_id, x).output[0].as_numpy()
        assert np.array_equal(y, x + add_model(n, seed)[1])
    assert not list(data.rglob(".tmp*"))


def test_unsealed_store_is_plain_and_says_so(server_factory: ServerFactory) -> None:
    running = server_factory("--unsealed-store")
    assert UNSEALED_STORE_WARNING in running.stderr()
    blob, _ = add_model(16, 5)
    with running.connect() as client:
        client.upload_model(blob, model_id="plain")
    assert [p.read_bytes() for p in (running.data_dir / "models").glob("*.onnx")] == [blob]


def test_state_replayed_under_a_running_server_stops_serving(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    alice = create_key(data, "owner")
    saved = (data / "state.sealed").read_bytes()
    running = server_factory(data_dir=data)
    result = veil_cli(
        "keys", "revoke", alice[0], "--data-dir", str(data), "--platform", "simulated"
    )
    assert result.returncode == 0, result.stderr
    with running.connect(api_key=alice[1]) as client, pytest.raises(veil.AuthenticationError):
        client.list_models()
    (data / "state.sealed").write_bytes(saved)  # alice's key valid again, if it were believed
    with running.connect(api_key=alice[1]) as client, pytest.raises(veil.ApiError) as info:
        client.list_models()
    assert info.value.status == 503
    assert "expected at least 2 (seen before while running): rollback" in running.stderr()
