"""Hostile ONNX models: each is refused by check_model with a clear 413/422, before ORT sees it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from veil.errors import BadRequestError
from veil.server.limits import Limits
from veil.server.onnx_guard import check_model, create_session

LIMITS = Limits()


def make_model(
    nodes: list[onnx.NodeProto] | None = None,
    initializers: list[onnx.TensorProto] | None = None,
    opsets: list[tuple[str, int]] | None = None,
    functions: list[onnx.FunctionProto] | None = None,
    out: str = "y",
) -> onnx.ModelProto:
    nodes = nodes if nodes is not None else [helper.make_node("Relu", ["x"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, [2])],
        initializer=initializers or [],
    )
    opset_imports = [helper.make_opsetid(d, v) for d, v in (opsets or [("", 17)])]
    model = helper.make_model(graph, opset_imports=opset_imports, functions=functions or [])
    model.ir_version = 8
    return model


def rejected(model: onnx.ModelProto | bytes, match: str, limits: Limits = LIMITS) -> int:
    data = model if isinstance(model, bytes) else model.SerializeToString()
    with pytest.raises(BadRequestError, match=match) as info:
        check_model(data, limits)
    return info.value.status


def test_good_model_passes_and_runs() -> None:
    w = numpy_helper.from_array(np.array([1.0, -2.0], dtype=np.float32), "w")
    model = make_model([helper.make_node("Mul", ["x", "w"], ["y"])], [w])
    data = model.SerializeToString()
    assert check_model(data, LIMITS).graph.name == "g"
    session = create_session(data, LIMITS)
    (y,) = session.run(None, {"x": np.array([3.0, 3.0], dtype=np.float32)})
    assert y.tolist() == [3.0, -6.0]


@pytest.mark.parametrize("data", [b"", b"\xff" * 64, b"not an onnx model at all", b"\x08"])
def test_malformed_bytes(data: bytes) -> None:
    status = rejected(data, "invalid ONNX model")
    assert status == 422


def test_too_large_is_413() -> None:
    status = rejected(make_model(), "max_model_bytes=10", Limits(max_model_bytes=10))
    assert status == 413


def _external(tensor: onnx.TensorProto, location: str) -> onnx.TensorProto:
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", "8")):
        entry = tensor.external_data.add()
        entry.key, entry.value = k, v
    return tensor


def test_external_data_initializer_refused() -> None:
    w = _external(numpy_helper.from_array(np.zeros(2, np.float32), "w"), "../../../etc/passwd")
    model = make_model([helper.make_node("Add", ["x", "w"], ["y"])], [w])
    assert rejected(model, "'w' references external data") == 422


def test_external_data_entries_without_location_flag_refused() -> None:
    w = numpy_helper.from_array(np.zeros(2, np.float32), "w")
    entry = w.external_data.add()
    entry.key, entry.value = "location", "/etc/shadow"
    model = make_model([helper.make_node("Add", ["x", "w"], ["y"])], [w])
    rejected(model, "external data")


def test_external_data_in_constant_node_refused() -> None:
    t = _external(numpy_helper.from_array(np.zeros(2, np.float32), "c"), "../../etc/passwd")
    nodes = [
        helper.make_node("Constant", [], ["c"], value=t),
        helper.make_node("Add", ["x", "c"], ["y"]),
    ]
    rejected(make_model(nodes), "references external data")


def test_external_data_in_subgraph_refused() -> None:
    t = _external(numpy_helper.from_array(np.zeros(2, np.float32), "inner"), "/etc/passwd")
    then_graph = helper.make_graph(
        [helper.make_node("Identity", ["inner"], ["t_out"])],
        "then",
        [],
        [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [2])],
        initializer=[t],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["e_out"])],
        "else",
        [],
        [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [2])],
    )
    cond = numpy_helper.from_array(np.array(True), "cond")
    node = helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph)
    rejected(make_model([node], [cond]), "'inner' references external data")


def test_create_session_refuses_external_data() -> None:
    w = _external(numpy_helper.from_array(np.zeros(2, np.float32), "w"), "../../../etc/passwd")
    model = make_model([helper.make_node("Add", ["x", "w"], ["y"])], [w])
    with pytest.raises(BadRequestError, match="external data"):
        create_session(model.SerializeToString(), LIMITS)


def test_custom_domain_operator_refused() -> None:
    node = helper.make_node("Evil", ["x"], ["y"], domain="com.attacker")
    rejected(make_model([node], opsets=[("", 17), ("com.attacker", 1)]), "opset domain")
    rejected(make_model([node]), "operator com.attacker::Evil is not allowed")


def test_allowed_domains_pass() -> None:
    opsets = [("", 17), ("ai.onnx.ml", 3), ("com.microsoft", 1)]
    nodes = [helper.make_node("Gelu", ["x"], ["y"], domain="com.microsoft")]
    check_model(make_model(nodes, opsets=opsets).SerializeToString(), LIMITS)


def test_local_function_domain_allowed() -> None:
    fn = helper.make_function(
        "local.fn",
        "Double",
        ["a"],
        ["b"],
        [helper.make_node("Add", ["a", "a"], ["b"])],
        [helper.make_opsetid("", 17)],
    )
    node = helper.make_node("Double", ["x"], ["y"], domain="local.fn")
    model = make_model([node], opsets=[("", 17), ("local.fn", 1)], functions=[fn])
    check_model(model.SerializeToString(), LIMITS)
    # but a function body may not smuggle in an unknown domain
    bad_fn = helper.make_function(
        "local.fn",
        "Double",
        ["a"],
        ["b"],
        [helper.make_node("Evil", ["a"], ["b"], domain="com.attacker")],
        [helper.make_opsetid("", 17)],
    )
    model = make_model([node], opsets=[("", 17), ("local.fn", 1)], functions=[bad_fn])
    rejected(model, "com.attacker::Evil")


def test_initializer_size_caps() -> None:
    w = numpy_helper.from_array(np.zeros(1000, np.float32), "w")
    model = make_model([helper.make_node("Add", ["x", "w"], ["y"])], [w])
    rejected(
        model,
        "'w' declares 4000 bytes, exceeds max_initializer_bytes=3999",
        Limits(max_initializer_bytes=3999),
    )
    w2 = numpy_helper.from_array(np.zeros(1000, np.float32), "w2")
    nodes = [
        helper.make_node("Add", ["x", "w"], ["s"]),
        helper.make_node("Add", ["s", "w2"], ["y"]),
    ]
    rejected(
        make_model(nodes, [w, w2]),
        "max_initializers_total_bytes=7000",
        Limits(max_initializers_total_bytes=7000),
    )
    check_model(
        make_model(nodes, [w, w2]).SerializeToString(), Limits(max_initializers_total_bytes=8000)
    )


def test_declared_shape_counts_not_stored_bytes() -> None:
    # A tensor that declares 2^40 floats but stores 8 bytes: refused by its declared size.
    w = numpy_helper.from_array(np.zeros(2, np.float32), "w")
    w.ClearField("dims")
    w.dims.extend([1 << 20, 1 << 20])
    rejected(
        make_model([helper.make_node("Add", ["x", "w"], ["y"])], [w]), "declares 4398046511104"
    )


def _constant_of_shape(n: int, count: int = 1) -> onnx.ModelProto:
    nodes, inits, prev = [], [], "x"
    for i in range(count):
        inits.append(numpy_helper.from_array(np.array([n, 1024, 1024], np.int64), f"shape{i}"))
        value = helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])
        nodes += [
            helper.make_node("ConstantOfShape", [f"shape{i}"], [f"big{i}"], value=value),
            helper.make_node("ReduceSum", [f"big{i}"], [f"s{i}"], keepdims=0),
            helper.make_node("Add", [prev, f"s{i}"], [f"a{i}"]),
        ]
        prev = f"a{i}"
    return make_model(nodes, inits, out=prev)


def test_constant_of_shape_bomb_refused() -> None:
    status = rejected(
        _constant_of_shape(1 << 20), "ConstantOfShape.*exceeds max_tensor_elements=16777216"
    )
    assert status == 422
    check_model(_constant_of_shape(1).SerializeToString(), LIMITS)  # 1 Mi elements: fine


def test_checker_runs() -> None:
    # Structurally wrong: a node consumes a value nothing produces.
    model = make_model([helper.make_node("Relu", ["nowhere"], ["y"])])
    rejected(model, "onnx.checker")


def test_ort_refusal_is_422() -> None:
    model = make_model(opsets=[("", 17)])
    model.opset_import[0].version = 10_000  # passes our domain rules; ORT cannot run it
    with pytest.raises(BadRequestError) as info:
        create_session(model.SerializeToString(), LIMITS, checked=True)
    assert info.value.status == 422


_PEAK = """
import sys
import onnx
sys.path.insert(0, {testdir!r})
from test_onnx_guard import _constant_of_shape
from veil.server.limits import Limits
model = _constant_of_shape(64, count=3).SerializeToString()  # 3 x 256 MiB of constants
if sys.argv[1] == "guarded":
    from veil.server.onnx_guard import create_session
    create_session(model, Limits(), checked=True)  # skip the static check: test containment
else:
    import onnxruntime as ort
    ort.InferenceSession(model, providers=["CPUExecutionProvider"])
# VmHWM: this process image's peak RSS (ru_maxrss would include the parent's, from before exec)
status = open("/proc/self/status").read()
print(int(status.split("VmHWM:")[1].split()[0]) // 1024)
"""


def _peak_mib(mode: str) -> int:
    import pathlib

    code = _PEAK.format(testdir=str(pathlib.Path(__file__).parent))
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), mode],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="reads VmHWM from /proc")
def test_session_creation_does_not_materialise_constants() -> None:
    # Plain ORT folds the constants at session creation (hundreds of MiB before any request);
    # create_session does not. The unguarded run shows the test can fail.
    unguarded, guarded = _peak_mib("plain"), _peak_mib("guarded")
    assert unguarded > guarded + 200
    assert guarded < 250


def _slow_model(steps: int) -> bytes:
    """y = x·W·…·W, x float32 [rows, 768] (any number of rows), W 768x768."""
    nodes, prev = [], "x"
    for i in range(steps):
        nodes.append(helper.make_node("MatMul", [prev, "w"], [f"h{i}"]))
        prev = f"h{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    w = numpy_helper.from_array(np.eye(768, dtype=np.float32), "w")
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", 768])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", 768])],
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def test_run_with_timeout_terminates() -> None:
    import asyncio
    import concurrent.futures
    import time

    from veil.errors import ApiError
    from veil.server.onnx_guard import run_with_timeout

    # 400 chained matmuls of 8192x768 by 768x768 on one thread: most of a minute if left to
    # run, far above the bound below even when a loaded machine slows the stopped run down.
    # (Rows, not nodes: ONNX Runtime prepacks every MatMul's weight when it builds a session.)
    session = create_session(_slow_model(400), LIMITS, intra_op_threads=1)
    heavy = np.ones((8192, 768), np.float32)
    pool = concurrent.futures.ThreadPoolExecutor(1)

    async def main() -> float:
        t0 = time.monotonic()
        with pytest.raises(ApiError) as info:
            await run_with_timeout(session, {"x": heavy}, 0.2, executor=pool)
        assert info.value.status == 504
        assert "request_timeout_s=0.2" in info.value.message
        # The worker is free again soon: the run was terminated, not left to finish.
        await asyncio.get_running_loop().run_in_executor(pool, lambda: None)
        return time.monotonic() - t0

    try:
        assert asyncio.run(main()) < 10.0
    finally:
        pool.shutdown(wait=True)
    # A run within the limit returns its outputs.
    fast = create_session(_slow_model(1), LIMITS)
    x = np.ones((768, 768), np.float32)
    (y,) = asyncio.run(run_with_timeout(fast, {"x": x}, 30.0))
    assert np.array_equal(y, x)


def test_negative_dimension_refused() -> None:
    w = numpy_helper.from_array(np.zeros(2, np.float32), "w")
    w.ClearField("dims")
    w.dims.extend([-1, 2])
    rejected(make_model([helper.make_node("Add", ["x", "w"], ["y"])], [w]), "negative dimension")


def test_external_data_in_sparse_initializer_refused() -> None:
    values = _external(numpy_helper.from_array(np.zeros(1, np.float32), "sv"), "/etc/passwd")
    indices = numpy_helper.from_array(np.array([0], np.int64), "si")
    model = make_model()
    model.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [2]))
    rejected(model, "'sv' references external data")


def test_external_data_in_training_info_refused() -> None:
    t = _external(numpy_helper.from_array(np.zeros(2, np.float32), "ti"), "../../secret")
    model = make_model()
    info = model.training_info.add()
    info.initialization.CopyFrom(helper.make_graph([], "init", [], [], initializer=[t]))
    rejected(model, "'ti' references external data")


def test_custom_op_inside_loop_body_refused() -> None:
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Evil", ["v_in"], ["v_out"], domain="com.attacker"),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [2]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [2]),
        ],
    )
    trip = numpy_helper.from_array(np.array(3, np.int64), "trip")
    cond = numpy_helper.from_array(np.array(True), "cond")
    loop = helper.make_node("Loop", ["trip", "cond", "x"], ["y"], body=body)
    rejected(make_model([loop], [trip, cond]), "com.attacker::Evil")


def test_model_without_graph_or_opsets_refused() -> None:
    rejected(onnx.ModelProto(ir_version=8), "no graph")
    model = make_model()
    del model.opset_import[:]
    rejected(model, "no opset_import")
