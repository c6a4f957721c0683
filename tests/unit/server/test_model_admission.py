"""What the static guard now counts, and the admission child: each rule with a mutated model."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from veil.errors import ApiError, BadRequestError
from veil.server.admission import Admitter, _parse_header
from veil.server.limits import Limits
from veil.server.models import MEASUREMENT_NOISE_BYTES, load_model
from veil.server.onnx_guard import check_model, expanded_node_count

OPSETS = [helper.make_opsetid("", 17), helper.make_opsetid("local", 1)]
RELAXED = Limits(max_load_ratio=1e9)


def model(
    nodes: list[onnx.NodeProto],
    *,
    initializers: list[onnx.TensorProto] = (),  # type: ignore[assignment]
    sparse: list[onnx.SparseTensorProto] = (),  # type: ignore[assignment]
    functions: list[onnx.FunctionProto] = (),  # type: ignore[assignment]
) -> bytes:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        initializer=list(initializers),
        sparse_initializer=list(sparse),
    )
    opsets = OPSETS if functions else OPSETS[:1]
    built = helper.make_model(graph, opset_imports=opsets, functions=list(functions))
    built.ir_version = 8
    return built.SerializeToString()


def sparse_sum(elements: int) -> bytes:
    values = numpy_helper.from_array(np.array([1.0], np.float32), "w")
    indices = numpy_helper.from_array(np.array([0], np.int64), "w_indices")
    w = helper.make_sparse_tensor(values, indices, [elements])
    nodes = [
        helper.make_node("ReduceSum", ["w"], ["s"], keepdims=1),
        helper.make_node("Add", ["x", "s"], ["y"]),
    ]
    return model(nodes, sparse=[w])


def shape_then(op: str, shape_node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """`shape_node` makes 'shape'; `op` uses it; the result is summed into y."""
    value = helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])
    uses = {
        "ConstantOfShape": helper.make_node("ConstantOfShape", ["shape"], ["big"], value=value),
        "Expand": helper.make_node("Expand", ["x", "shape"], ["big"]),
        "Tile": helper.make_node("Tile", ["x", "shape"], ["big"]),
    }
    return [
        shape_node,
        uses[op],
        helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0),
        helper.make_node("Add", ["x", "s"], ["y"]),
    ]


def value_ints(dims: list[int]) -> onnx.NodeProto:
    return helper.make_node("Constant", [], ["shape"], value_ints=dims)


def refused(blob: bytes, match: str, limits: Limits = RELAXED) -> int:
    with pytest.raises(BadRequestError, match=match) as info:
        check_model(blob, limits)
    return info.value.status


# --- sparse tensors count as the dense tensors they become ------------------------------------


def test_sparse_initializer_counts_its_dense_size() -> None:
    check_model(sparse_sum(1 << 10), RELAXED)
    limits = Limits(max_load_ratio=1e9, max_initializer_bytes=1 << 20)
    assert refused(sparse_sum(1 << 20), "declares 4194304 bytes, exceeds max_initializer", limits)


def test_sparse_initializer_ratio_to_upload_refused() -> None:
    check_model(sparse_sum(1 << 20), Limits())  # 4 MiB: under the 64 MiB floor
    blob = sparse_sum(1 << 28)
    assert len(blob) < 400
    assert refused(blob, r"tensors declare 1073741824 bytes .* max_load_ratio=16", Limits()) == 413


def test_sparse_constant_attribute_counts_its_dense_size() -> None:
    values = numpy_helper.from_array(np.array([1.0], np.float32), "c")
    indices = numpy_helper.from_array(np.array([0], np.int64), "c_indices")
    sparse = helper.make_sparse_tensor(values, indices, [1 << 20])
    nodes = [
        helper.make_node("Constant", [], ["c"], sparse_value=sparse),
        helper.make_node("ReduceSum", ["c"], ["s"], keepdims=1),
        helper.make_node("Add", ["x", "s"], ["y"]),
    ]
    limits = Limits(max_load_ratio=1e9, max_initializer_bytes=1 << 20)
    refused(model(nodes), "'c' declares 4194304 bytes", limits)


# --- shapes from Constant(value_ints), and into and inside local functions ---------------------


@pytest.mark.parametrize("op", ["ConstantOfShape", "Expand", "Tile"])
def test_shape_from_constant_value_ints(op: str) -> None:
    check_model(model(shape_then(op, value_ints([4, 4]))), RELAXED)
    status = refused(model(shape_then(op, value_ints([1 << 16, 1 << 16]))), "max_tensor_elements")
    assert status == 422


def test_reshape_shape_ignores_copied_and_inferred_dimensions() -> None:
    nodes = [
        helper.make_node("Constant", [], ["shape"], value_ints=[1, -1, 0]),
        helper.make_node("Reshape", ["x", "shape"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"], axis=0),
        helper.make_node("ReduceSum", ["f"], ["y"], keepdims=0),
    ]
    check_model(model(nodes), RELAXED)
    nodes[0] = helper.make_node("Constant", [], ["shape"], value_ints=[1 << 25, -1])
    refused(model(nodes), "tensor 'Reshape' .*max_tensor_elements")


def function(name: str, nodes: list[onnx.NodeProto], inputs: list[str]) -> onnx.FunctionProto:
    return helper.make_function("local", name, inputs, ["b"], nodes, OPSETS)


def test_shape_made_inside_a_function() -> None:
    body = [
        helper.make_node("Constant", [], ["shape"], value_ints=[1 << 16, 1 << 16]),
        helper.make_node("Expand", ["a", "shape"], ["b"]),
    ]
    call = helper.make_node("Grow", ["x"], ["big"], domain="local")
    nodes = [call, helper.make_node("ReduceSum", ["big"], ["y"], keepdims=0)]
    grow = function("Grow", body, ["a"])
    refused(model(nodes, functions=[grow]), "tensor 'Expand' .*max_tensor_elements")


def test_shape_passed_into_a_function() -> None:
    value = helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])
    body = [helper.make_node("ConstantOfShape", ["dims"], ["b"], value=value)]
    shape = numpy_helper.from_array(np.array([1 << 16, 1 << 16], np.int64), "shape")
    nodes = [
        helper.make_node("Fill", ["shape"], ["big"], domain="local"),
        helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0),
        helper.make_node("Add", ["x", "s"], ["y"]),
    ]
    fill = function("Fill", body, ["dims"])
    refused(model(nodes, initializers=[shape], functions=[fill]), "max_tensor_elements")
    small = numpy_helper.from_array(np.array([2, 2], np.int64), "shape")
    check_model(model(nodes, initializers=[small], functions=[fill]), RELAXED)


# --- local functions: expansion bounded, recursion refused -------------------------------------


def nested(depth: int) -> bytes:
    functions = [function("f0", [helper.make_node("Relu", ["a"], ["b"])], ["a"])]
    for k in range(1, depth + 1):
        body = [
            helper.make_node(f"f{k - 1}", ["a"], ["t"], domain="local"),
            helper.make_node(f"f{k - 1}", ["t"], ["b"], domain="local"),
        ]
        functions.append(function(f"f{k}", body, ["a"]))
    return model([helper.make_node(f"f{depth}", ["x"], ["y"], domain="local")], functions=functions)


def test_nested_functions_counted_expanded() -> None:
    assert expanded_node_count(onnx.load_from_string(nested(5)), 1000) == 32
    assert expanded_node_count(onnx.load_from_string(nested(60)), 1000) == 1001
    check_model(nested(5), Limits(max_graph_nodes=32))
    assert refused(nested(5), "max_graph_nodes=31", Limits(max_graph_nodes=31)) == 422
    refused(nested(60), "max_graph_nodes=500000", Limits())


def test_recursive_function_refused() -> None:
    body = [helper.make_node("Loop1", ["a"], ["b"], domain="local")]
    nodes = [helper.make_node("Loop1", ["x"], ["y"], domain="local")]
    blob = model(nodes, functions=[function("Loop1", body, ["a"])])
    refused(blob, "local function 'Loop1' calls itself")


# --- the admission child ------------------------------------------------------------------------


def test_admission_measures_the_loaded_size() -> None:
    admitted = Admitter(RELAXED).admit(sparse_sum(1 << 24))  # 64 MiB dense
    assert admitted.loaded_bytes >= 60 << 20
    assert admitted.graph.view() == sparse_sum(1 << 24)
    loaded = load_model(
        admitted.graph, model_id="m", model_name="", threads=1, loaded_bytes=admitted.loaded_bytes
    )
    assert loaded.cost == admitted.loaded_bytes


def test_admission_refuses_what_the_guard_refuses() -> None:
    with pytest.raises(ApiError, match="max_load_ratio=16") as info:
        Admitter(Limits()).admit(sparse_sum(1 << 28))
    assert info.value.status == 413


def test_admission_memory_limit() -> None:
    limits = Limits(max_load_ratio=1e9, max_model_memory_bytes=32 << 20)
    with pytest.raises(ApiError, match="max_model_memory_bytes=33554432") as info:
        Admitter(limits).admit(sparse_sum(1 << 24))
    assert info.value.status == 413


def test_admission_wall_clock_limit() -> None:
    limits = Limits(max_graph_nodes=10**12, admission_timeout_s=0.5)
    with pytest.raises(ApiError, match=r"exceeded admission_timeout_s=0\.5") as info:
        Admitter(limits).admit(nested(24))
    assert info.value.status == 422


def test_noise_in_measured_size_is_not_charged() -> None:
    blob = sparse_sum(4)
    base = load_model(blob, model_id="m", model_name="", threads=1)
    noisy = load_model(
        blob, model_id="m", model_name="", threads=1, loaded_bytes=MEASUREMENT_NOISE_BYTES
    )
    assert base.cost == noisy.cost == len(blob)
    heavy = load_model(
        blob,
        model_id="m",
        model_name="",
        threads=1,
        loaded_bytes=len(blob) + MEASUREMENT_NOISE_BYTES + 1,
    )
    assert heavy.cost == len(blob) + MEASUREMENT_NOISE_BYTES + 1


GOOD = {"status": 200, "message": "", "loaded_bytes": 5, "graph": False}


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[]",
        b'{"status": 200}',
        *(
            json.dumps({**GOOD, key: bad}).encode()
            for key, bad in [
                ("status", 500),
                ("status", "200"),
                ("message", 7),
                ("loaded_bytes", -1),
                ("loaded_bytes", 1.5),
                ("loaded_bytes", True),
                ("graph", 1),
            ]
        ),
    ],
)
def test_child_answer_checked_field_by_field(raw: bytes) -> None:
    with pytest.raises(ApiError, match="admission gave no answer") as info:
        _parse_header(raw)
    assert info.value.status == 422


def test_child_answer_accepted() -> None:
    assert _parse_header(json.dumps(GOOD).encode())["loaded_bytes"] == 5
