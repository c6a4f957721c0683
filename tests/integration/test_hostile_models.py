"""Hostile ONNX uploads against a real server: each is refused (or contained) and the server
keeps serving."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx
import psutil
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_models import identity_model
from server_process import RawClient, VeilServer, start_server

import veil

X = np.arange(6, dtype=np.float32).reshape(2, 3)


def model(
    nodes: list[onnx.NodeProto],
    initializers: list[onnx.TensorProto] = (),  # type: ignore[assignment]
    *,
    out: str = "y",
    opsets: tuple[tuple[str, int], ...] = (("", 17),),
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, [2])],
        initializer=list(initializers),
    )
    built = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    built.ir_version = 8
    return built


def external_data() -> bytes:
    w = numpy_helper.from_array(np.zeros(2, np.float32), "w")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "../../../../etc/passwd"), ("offset", "0"), ("length", "8")):
        entry = w.external_data.add()
        entry.key, entry.value = k, v
    return model([helper.make_node("Add", ["x", "w"], ["y"])], [w]).SerializeToString()


def custom_domain() -> bytes:
    node = helper.make_node("Evil", ["x"], ["y"], domain="com.attacker")
    return model([node], opsets=(("", 17), ("com.attacker", 1))).SerializeToString()


def gigantic_initializer() -> bytes:
    # declares 2^40 floats (4 TiB) while storing 8 bytes
    w = numpy_helper.from_array(np.zeros(2, np.float32), "w")
    w.ClearField("dims")
    w.dims.extend([1 << 20, 1 << 20])
    return model([helper.make_node("Add", ["x", "w"], ["y"])], [w]).SerializeToString()


def constant_of_shape_bomb() -> bytes:
    shape = numpy_helper.from_array(np.array([1 << 16, 1 << 16], np.int64), "shape")
    value = helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])
    nodes = [
        helper.make_node("ConstantOfShape", ["shape"], ["big"], value=value),
        helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0),
        helper.make_node("Add", ["x", "s"], ["y"]),
    ]
    return model(nodes, [shape]).SerializeToString()


def checker_failure() -> bytes:
    return model([helper.make_node("Relu", ["nowhere"], ["y"])]).SerializeToString()


HOSTILE = {
    "garbage": (b"\xff" * 64, "invalid ONNX model: does not parse as ONNX"),
    "truncated": (identity_model("float32").SerializeToString()[:40], "invalid ONNX model"),
    "external data": (external_data(), "'w' references external data"),
    "custom domain": (custom_domain(), "opset domain 'com.attacker' is not allowed"),
    "gigantic initializer": (gigantic_initializer(), "exceeds max_initializer_bytes"),
    "ConstantOfShape bomb": (constant_of_shape_bomb(), "exceeds max_tensor_elements"),
    "checker": (checker_failure(), "onnx.checker"),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VeilServer]:
    root = tmp_path_factory.mktemp("veil-hostile")
    running = start_server(root / "data", root / "log")
    with running.connect() as client:
        client.upload_model(identity_model("float32"), model_id="ok")
    yield running
    assert running.stop() == 0, running.stderr()[-3000:]


def alive(server: VeilServer) -> None:
    raw = RawClient(server)
    try:
        assert raw.get("unattested", "/healthz").status_code == 200
    finally:
        raw.close()
    with server.connect() as client:
        assert np.array_equal(client.predict("ok", X).output[0].as_numpy(), X)
    assert server.process.poll() is None


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_model_refused(server: VeilServer, name: str) -> None:
    blob, expected = HOSTILE[name]
    with server.connect() as client:
        with pytest.raises(veil.BadRequestError) as info:
            client.upload_model(blob, model_id="hostile")
        assert info.value.status == 422
        assert expected in info.value.message
        assert "hostile" not in {m.model_id for m in client.list_models()}
    alive(server)


def test_computed_shape_bomb_is_not_built_at_load(server: VeilServer) -> None:
    # Shapes computed from constants escape the static check; with ONNX Runtime's constant
    # folding they would still be materialised when the session is created (3 x 256 MiB here).
    nodes, inits, prev = [], [], "x"
    for i in range(3):
        inits += [
            numpy_helper.from_array(np.array([64], np.int64), f"a{i}"),
            numpy_helper.from_array(np.array([1024, 1024], np.int64), f"b{i}"),
        ]
        value = helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])
        nodes += [
            helper.make_node("Concat", [f"a{i}", f"b{i}"], [f"shape{i}"], axis=0),
            helper.make_node("ConstantOfShape", [f"shape{i}"], [f"big{i}"], value=value),
            helper.make_node("ReduceSum", [f"big{i}"], [f"s{i}"], keepdims=0),
            helper.make_node("Add", [prev, f"s{i}"], [f"o{i}"]),
        ]
        prev = f"o{i}"
    blob = model(nodes, inits, out=prev).SerializeToString()
    process = psutil.Process(server.process.pid)
    before = process.memory_info().rss
    with server.connect() as client:
        client.upload_model(blob, model_id="computed-bomb")
    grown = process.memory_info().rss - before
    assert grown < 150 << 20, f"server grew by {grown >> 20} MiB loading the model"
    alive(server)
