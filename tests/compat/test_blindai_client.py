"""The genuine BlindAI 0.6.3 Python client, unchanged, against `veil serve --platform simulated`.

The client runs in its own venv (scripts/compat-venv: blindai 0.6.3 with numpy 1.23,
cryptography 39 and cbor2 5, as its metadata pins them) through blindai_driver.py; this side
builds the ONNX models, computes the expected outputs with onnxruntime in-process, starts a real
server on free loopback ports and reads the driver's JSON summary. One driver run covers every
case; the tests below each assert one part of it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from veil.server.ready import ReadyLine

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
COMPAT_VENV_SCRIPT = REPO / "scripts" / "compat-venv"
VENV_PYTHON = REPO / ".work" / "blindai-venv" / "bin" / "python"
DRIVER = Path(__file__).with_name("blindai_driver.py")
STUBS = Path(__file__).with_name("stubs")
SIMULATED_ROOT = REPO / "src/veil/attestation/verify/roots/veil_simulated_root.pem"

SERVER_START_TIMEOUT_S = 90
DRIVER_TIMEOUT_S = 420
OPSET = 17
IR_VERSION = 8
BIG_ELEMENTS = 5_000_000  # float32: a 20 MB initializer, ~40 MB as the client's CBOR int array


# ---------------------------------------------------------------------------------------------
# models


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="veil-compat"
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path))
    return path


def float_model(path: Path, rng: np.random.Generator) -> Path:
    """y = relu(x @ w + b), x: float32[batch, 4] with a dynamic batch axis."""
    w = rng.standard_normal((4, 3)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["pre"]),
            helper.make_node("Relu", ["pre"], ["y"]),
        ],
        "float_dynamic_batch",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    return _save(graph, path)


def pair_model(path: Path) -> Path:
    """Two inputs of different dtypes, two outputs: s = a + float(b), t = 2 * b."""
    two = numpy_helper.from_array(np.array(2, dtype=np.int32), "two")
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["b"], ["bf"], to=TensorProto.FLOAT),
            helper.make_node("Add", ["a", "bf"], ["s"]),
            helper.make_node("Mul", ["b", "two"], ["t"]),
        ],
        "two_in_two_out",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 3]),
            helper.make_tensor_value_info("b", TensorProto.INT32, ["n", 3]),
        ],
        [
            helper.make_tensor_value_info("s", TensorProto.FLOAT, ["n", 3]),
            helper.make_tensor_value_info("t", TensorProto.INT32, ["n", 3]),
        ],
        initializer=[two],
    )
    return _save(graph, path)


def int64_model(path: Path) -> Path:
    """y = 3 * x + 7 on int64[2, 3] (values past 2**32 survive the round trip)."""
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "three"], ["x3"]),
            helper.make_node("Add", ["x3", "seven"], ["y"]),
        ],
        "int64_affine",
        [helper.make_tensor_value_info("x", TensorProto.INT64, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [2, 3])],
        initializer=[
            numpy_helper.from_array(np.array(3, dtype=np.int64), "three"),
            numpy_helper.from_array(np.array(7, dtype=np.int64), "seven"),
        ],
    )
    return _save(graph, path)


# Every BlindAI ModelDatumType, in the client's enum order (F32 = 0 ... Bool = 10).
ALL_TYPES = {
    "f32": (np.float32, TensorProto.FLOAT),
    "f64": (np.float64, TensorProto.DOUBLE),
    "i32": (np.int32, TensorProto.INT32),
    "i64": (np.int64, TensorProto.INT64),
    "u32": (np.uint32, TensorProto.UINT32),
    "u64": (np.uint64, TensorProto.UINT64),
    "u8": (np.uint8, TensorProto.UINT8),
    "u16": (np.uint16, TensorProto.UINT16),
    "i8": (np.int8, TensorProto.INT8),
    "i16": (np.int16, TensorProto.INT16),
    "bool": (np.bool_, TensorProto.BOOL),
}


def all_types_model(path: Path) -> Path:
    """One Identity per datum type: each tensor makes the round trip through the server's codec."""
    graph = helper.make_graph(
        [helper.make_node("Identity", [f"in_{t}"], [f"out_{t}"]) for t in ALL_TYPES],
        "all_datum_types",
        [helper.make_tensor_value_info(f"in_{t}", e, ["n"]) for t, (_, e) in ALL_TYPES.items()],
        [helper.make_tensor_value_info(f"out_{t}", e, ["n"]) for t, (_, e) in ALL_TYPES.items()],
    )
    return _save(graph, path)


def all_types_inputs(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    inputs = {}
    for name, (dtype, _) in ALL_TYPES.items():
        if dtype is np.bool_:
            value = rng.integers(0, 2, n).astype(np.bool_)
        elif np.issubdtype(dtype, np.floating):
            value = rng.standard_normal(n).astype(dtype)
        else:
            info = np.iinfo(dtype)  # the extremes, then random values
            rest = rng.integers(info.min, info.max, n - 2, dtype=dtype, endpoint=True)
            value = np.array([info.min, info.max, *rest], dtype=dtype)
        inputs[f"in_{name}"] = value
    return inputs


def big_model(path: Path, rng: np.random.Generator) -> Path:
    """out = table[idx] with a 20 MB float32 table: the answer proves the bytes arrived intact."""
    table = rng.standard_normal(BIG_ELEMENTS).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "idx"], ["out"], axis=0)],
        "big_gather",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["k"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["k"])],
        initializer=[numpy_helper.from_array(table, "table")],
    )
    return _save(graph, path)


# ---------------------------------------------------------------------------------------------
# the plan the driver executes


@dataclass
class Plan:
    directory: Path
    models: dict[str, Path] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)
    rejections: list[dict[str, Any]] = field(default_factory=list)
    deletions: list[dict[str, str]] = field(default_factory=list)

    def add_run(
        self, case: str, model: str, select: str, style: str, inputs: dict[str, np.ndarray]
    ) -> None:
        session = ort.InferenceSession(str(self.models[model]), providers=["CPUExecutionProvider"])
        input_names = [i.name for i in session.get_inputs()]
        output_names = [o.name for o in session.get_outputs()]
        expected = session.run(None, inputs)
        # dict style keeps the caller's key order (possibly not the model's), others follow it
        order = list(inputs) if style == "dict" else input_names
        in_specs = []
        for name in order:
            key = f"{case}.in.{name}"
            self.arrays[key] = inputs[name]
            in_specs.append({"array": key, "name": name})
        out_specs = []
        for name, value in zip(output_names, expected, strict=True):
            key = f"{case}.out.{name}"
            self.arrays[key] = np.asarray(value)
            out_specs.append({"array": key, "name": name})
        self.runs.append(
            {
                "case": case,
                "model": model,
                "select": select,
                "style": style,
                "inputs": in_specs,
                "expected": out_specs,
            }
        )

    def add_rejection(
        self, case: str, target: dict[str, str], select: str, inputs: dict[str, np.ndarray]
    ) -> None:
        """A request the server must answer with a 4xx; target names the model to ask for."""
        in_specs = []
        for name, value in inputs.items():
            key = f"{case}.in.{name}"
            self.arrays[key] = value
            in_specs.append({"array": key, "name": name})
        self.rejections.append(
            {"case": case, **target, "select": select, "style": "list", "inputs": in_specs}
        )

    def write(self, ports: tuple[int, int, int]) -> Path:
        arrays_path = self.directory / "arrays.npz"
        np.savez(arrays_path, **self.arrays)
        plan = {
            "addr": "127.0.0.1",
            "unattested_port": ports[0],
            "attested_port": ports[1],
            "management_port": ports[2],
            "arrays": str(arrays_path),
            "models": [{"key": k, "path": str(p)} for k, p in self.models.items()],
            "runs": self.runs,
            "rejections": self.rejections,
            "deletions": self.deletions,
            "simulated_root": str(SIMULATED_ROOT),
        }
        path = self.directory / "plan.json"
        path.write_text(json.dumps(plan, indent=1))
        return path


def build_plan(directory: Path) -> Plan:
    rng = np.random.default_rng(20230314)
    plan = Plan(directory)
    plan.models = {
        "float": float_model(directory / "float.onnx", rng),
        "pair": pair_model(directory / "pair.onnx"),
        "int64": int64_model(directory / "int64.onnx"),
        "alltypes": all_types_model(directory / "alltypes.onnx"),
        "big": big_model(directory / "big.onnx", rng),
    }

    def f32(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    def i32(*shape: int) -> np.ndarray:
        return rng.integers(-1000, 1000, shape, dtype=np.int32)

    plan.add_run("float_by_id_batch1", "float", "id", "numpy", {"x": f32(1, 4)})
    plan.add_run("float_by_hash_batch5", "float", "hash", "numpy", {"x": f32(5, 4)})
    plan.add_run("float_by_id_list", "float", "id", "list", {"x": f32(2, 4)})
    plan.add_run("float_by_id_flat", "float", "id", "flat", {"x": f32(3, 4)})
    a, b = f32(2, 3), i32(2, 3)
    plan.add_run("pair_by_id_list", "pair", "id", "list", {"a": a, "b": b})
    plan.add_run("pair_by_hash_dict", "pair", "hash", "dict", {"a": a, "b": b})
    plan.add_run("pair_by_id_dict_reversed", "pair", "id", "dict", {"b": i32(4, 3), "a": f32(4, 3)})
    plan.add_run("pair_by_id_flat", "pair", "id", "flat", {"a": f32(1, 3), "b": i32(1, 3)})
    x64 = np.array([[0, -1, 2**40], [7, -(2**50), 123456789]], dtype=np.int64)
    plan.add_run("int64_by_id_numpy", "int64", "id", "numpy", {"x": x64})
    plan.add_run("int64_by_hash_flat", "int64", "hash", "flat", {"x": x64[::-1].copy()})
    plan.add_run("alltypes_by_id_list", "alltypes", "id", "list", all_types_inputs(rng, 6))
    plan.add_run("alltypes_by_hash_dict", "alltypes", "hash", "dict", all_types_inputs(rng, 3))
    plan.add_run("alltypes_by_id_flat", "alltypes", "id", "flat", all_types_inputs(rng, 5))
    idx = np.array([0, 1, BIG_ELEMENTS - 1, *rng.integers(0, BIG_ELEMENTS, 29)], dtype=np.int64)
    plan.add_run("big_by_id_numpy", "big", "id", "numpy", {"idx": idx})
    x = {"x": f32(2, 4)}
    plan.add_rejection("wrong_dtype", {"model": "float"}, "id", {"x": i32(2, 4)})
    plan.add_rejection("wrong_shape", {"model": "float"}, "id", {"x": f32(2, 5)})
    plan.add_rejection("missing_input", {"model": "pair"}, "id", {"a": f32(2, 3)})
    plan.add_rejection("unknown_model_id", {"model_id": "no-such-model"}, "id", x)
    plan.add_rejection("unknown_model_hash", {"model_hash": "00" * 32}, "hash", x)
    plan.deletions = [
        {"model": "float", "probe": "float_by_id_batch1"},
        {"model": "pair", "probe": "pair_by_id_list"},
        {"model": "int64", "probe": "int64_by_id_numpy"},
        {"model": "alltypes", "probe": "alltypes_by_id_list"},
        {"model": "big", "probe": "big_by_id_numpy"},
    ]
    return plan


# ---------------------------------------------------------------------------------------------
# processes


@pytest.fixture(scope="module")
def blindai_python() -> Path:
    """The compat venv's interpreter; scripts/compat-venv builds it, or returns at once if built."""
    done = subprocess.run(
        ["bash", str(COMPAT_VENV_SCRIPT)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(f"scripts/compat-venv failed ({done.returncode}):\n{done.stderr[-4000:]}")
    python = Path(done.stdout.strip().splitlines()[-1])
    assert python == VENV_PYTHON, python
    assert python.is_file()
    return python


@pytest.fixture(scope="module")
def veil_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int, int]]:
    """A real `veil serve --platform simulated` on free loopback ports; yields the ports."""
    data_dir = tmp_path_factory.mktemp("veil-data")
    # Port 0: the server binds and reports its ports (a port chosen here and closed again
    # could be taken by another process before the server binds it).
    command = [
        sys.executable, "-m", "veil.cli", "serve",
        "--platform", "simulated",
        "--data-dir", str(data_dir),
        "--host", "127.0.0.1",
        "--unattested-port", "0",
        "--attested-port", "0",
        "--management-port", "0",
    ]  # fmt: skip
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        cwd=data_dir,
    )
    lines: list[str] = []
    ready = threading.Event()
    found: list[ReadyLine] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if not found and (ready_line := ReadyLine.find(line)) is not None:
                found.append(ready_line)
                ready.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not ready.wait(0.2):
            if proc.poll() is not None or time.monotonic() > deadline:
                output = "".join(lines)[-4000:]
                pytest.fail(f"veil serve did not report 'serving' (rc={proc.poll()}):\n{output}")
        yield found[0].unattested_port, found[0].attested_port, found[0].management_port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
        reader.join(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()


@dataclass(frozen=True)
class DriverResult:
    returncode: int
    summary: dict[str, Any]
    plan: Plan
    stderr: str


@pytest.fixture(scope="module")
def driver_result(
    blindai_python: Path,
    veil_server: tuple[int, int, int],
    tmp_path_factory: pytest.TempPathFactory,
) -> DriverResult:
    plan = build_plan(tmp_path_factory.mktemp("blindai-compat"))
    plan_path = plan.write(veil_server)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    # requests lets these override a Session's `verify` (the client pins the attested certificate
    # that way), which would make the pinned TLS connection fail against a system CA bundle.
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        env.pop(name, None)
    env["PYTHONPATH"] = str(STUBS)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    done = subprocess.run(
        [str(blindai_python), str(DRIVER), str(plan_path)],
        capture_output=True,
        text=True,
        timeout=DRIVER_TIMEOUT_S,
        env=env,
        check=False,
    )
    lines = done.stdout.strip().splitlines()
    if not lines:
        pytest.fail(f"driver printed nothing (rc={done.returncode}):\n{done.stderr[-4000:]}")
    summary = json.loads(lines[-1])
    return DriverResult(done.returncode, summary, plan, done.stderr)


# ---------------------------------------------------------------------------------------------
# tests


def test_client_is_the_genuine_0_6_3(driver_result: DriverResult) -> None:
    assert driver_result.summary["blindai_version"] == "0.6.3"
    assert driver_result.summary["numpy_version"].startswith("1.23.")


def test_connects_in_simulation_mode(driver_result: DriverResult) -> None:
    summary = driver_result.summary
    assert summary["connected"], summary["failures"]
    assert summary["simulation_warning"]


def test_uploads_return_id_and_sha256(driver_result: DriverResult) -> None:
    uploads = driver_result.summary["uploads"]
    assert set(uploads) == set(driver_result.plan.models), driver_result.summary["failures"]
    for key, upload in uploads.items():
        assert upload["model_id_type"] == "str", key
        assert upload["model_id"], key
        assert upload["hash_type"] == "bytes", key
        assert upload["hash_is_sha256_of_file"], key
    assert len({u["model_id"] for u in uploads.values()}) == len(uploads)


def test_big_model_upload_through_cbor_int_array(driver_result: DriverResult) -> None:
    big = driver_result.summary["uploads"].get("big")
    assert big is not None, driver_result.summary["failures"]
    assert big["size"] > 4 * BIG_ELEMENTS
    assert driver_result.summary["runs"]["big_by_id_numpy"]["ok"]


RUN_CASES = [
    "float_by_id_batch1",
    "float_by_hash_batch5",
    "float_by_id_list",
    "float_by_id_flat",
    "pair_by_id_list",
    "pair_by_hash_dict",
    "pair_by_id_dict_reversed",
    "pair_by_id_flat",
    "int64_by_id_numpy",
    "int64_by_hash_flat",
    "alltypes_by_id_list",
    "alltypes_by_hash_dict",
    "alltypes_by_id_flat",
    "big_by_id_numpy",
]


def test_run_cases_cover_the_plan(driver_result: DriverResult) -> None:
    assert [r["case"] for r in driver_result.plan.runs] == RUN_CASES


@pytest.mark.parametrize("case", RUN_CASES)
def test_run_matches_onnxruntime(driver_result: DriverResult, case: str) -> None:
    run = driver_result.summary["runs"].get(case)
    assert run is not None, driver_result.summary["failures"]
    assert run["ok"], run.get("problems")
    expected = next(r for r in driver_result.plan.runs if r["case"] == case)["expected"]
    shapes = [list(driver_result.plan.arrays[e["array"]].shape) for e in expected]
    assert [o["shape"] for o in run["outputs"]] == shapes


REJECTIONS = [
    "wrong_dtype",
    "wrong_shape",
    "missing_input",
    "unknown_model_id",
    "unknown_model_hash",
]


@pytest.mark.parametrize("case", REJECTIONS)
def test_bad_request_is_a_client_error(driver_result: DriverResult, case: str) -> None:
    assert [r["case"] for r in driver_result.plan.rejections] == REJECTIONS
    rejection = driver_result.summary["rejections"].get(case)
    assert rejection is not None, driver_result.summary["failures"]
    status = rejection["status"]
    assert status is not None, driver_result.summary["failures"]
    assert 400 <= status < 500


@pytest.mark.parametrize("model", ["float", "pair", "int64", "alltypes", "big"])
def test_deleted_model_no_longer_runs(driver_result: DriverResult, model: str) -> None:
    deletion = driver_result.summary["deletions"].get(model)
    assert deletion is not None, driver_result.summary["failures"]
    assert deletion["deleted"], driver_result.summary["failures"]
    status = deletion["run_after_delete_status"]
    assert status is not None, driver_result.summary["failures"]
    assert 400 <= status < 500


def test_production_mode_client_refuses_simulated_server(driver_result: DriverResult) -> None:
    production = driver_result.summary["production_mode"]
    assert production["rejected"], production["error"]
    assert production["error"].startswith("AttestationError")


def test_intel_qvl_parses_quote_bound_to_served_certificate(driver_result: DriverResult) -> None:
    # Intel's QVL (what the client verifies real quotes with) reads the simulated quote and finds
    # SHA-256(certificate DER) in its report data: the binding is in the genuine SGX format.
    qvl = driver_result.summary["qvl"]
    assert qvl["report_parsed"], qvl
    assert qvl["report_data_binds_certificate"], qvl


def test_driver_reports_no_failure(driver_result: DriverResult) -> None:
    assert driver_result.summary["failures"] == []
    assert driver_result.returncode == 0, driver_result.stderr[-2000:]
