"""Small ONNX models built with onnx.helper, and in-process ONNX Runtime as the reference."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8

# numpy dtype name -> ONNX element type, for the protocol's 11 datum types
ONNX_TYPES = {
    "float32": TensorProto.FLOAT,
    "float64": TensorProto.DOUBLE,
    "int32": TensorProto.INT32,
    "int64": TensorProto.INT64,
    "uint32": TensorProto.UINT32,
    "uint64": TensorProto.UINT64,
    "uint8": TensorProto.UINT8,
    "uint16": TensorProto.UINT16,
    "int8": TensorProto.INT8,
    "int16": TensorProto.INT16,
    "bool": TensorProto.BOOL,
}


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def identity_model(dtype: str, shape: tuple[int, ...] = (2, 3)) -> onnx.ModelProto:
    """y = Identity(x) for one element type: what goes in must come back bit for bit."""
    element = ONNX_TYPES[dtype]
    x = helper.make_tensor_value_info("x", element, list(shape))
    y = helper.make_tensor_value_info("y", element, list(shape))
    return _model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "id", [x], [y]))


def multi_io_model() -> onnx.ModelProto:
    """Inputs a (f32 [2,2]), b (f32 [2,2]), k (i64 [3]); outputs sum=a+b, prod=a*b, twice=k+k."""
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [
        helper.make_tensor_value_info("a", f32, [2, 2]),
        helper.make_tensor_value_info("b", f32, [2, 2]),
        helper.make_tensor_value_info("k", i64, [3]),
    ]
    outputs = [
        helper.make_tensor_value_info("sum", f32, [2, 2]),
        helper.make_tensor_value_info("prod", f32, [2, 2]),
        helper.make_tensor_value_info("twice", i64, [3]),
    ]
    nodes = [
        helper.make_node("Add", ["a", "b"], ["sum"]),
        helper.make_node("Mul", ["a", "b"], ["prod"]),
        helper.make_node("Add", ["k", "k"], ["twice"]),
    ]
    return _model(helper.make_graph(nodes, "multi", inputs, outputs))


def dynamic_batch_model(seed: int = 7) -> onnx.ModelProto:
    """y = Relu(x @ W + c) with x of shape [batch, 4] (batch dynamic), y [batch, 2]."""
    rng = np.random.default_rng(seed)
    weights = numpy_helper.from_array(rng.standard_normal((4, 2)).astype(np.float32), "W")
    bias = numpy_helper.from_array(rng.standard_normal(2).astype(np.float32), "c")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "c"], ["z"]),
        helper.make_node("Relu", ["z"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "dense", [x], [y], initializer=[weights, bias])
    return _model(graph)


def reference(model: onnx.ModelProto, feeds: dict[str, Any]) -> list[npt.NDArray[Any]]:
    """Outputs of in-process ONNX Runtime, in the model's output order."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [np.asarray(v) for v in session.run(None, feeds)]


def random_array(dtype: str, shape: tuple[int, ...], seed: int = 0) -> npt.NDArray[Any]:
    rng = np.random.default_rng(seed)
    if dtype == "bool":
        return rng.integers(0, 2, size=shape).astype(bool)
    if dtype.startswith("float"):
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)


def broadcast_model() -> onnx.ModelProto:
    """c = a + b with a [n] and b [m] both dynamic: only ONNX Runtime sees that n != m fails."""
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n"])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["m"])
    c = helper.make_tensor_value_info("c", TensorProto.FLOAT, ["k"])
    return _model(
        helper.make_graph([helper.make_node("Add", ["a", "b"], ["c"])], "add", [a, b], [c])
    )


def slow_model(steps: int = 40, n: int = 1024) -> onnx.ModelProto:
    """y = x·W·W·…·W (`steps` MatMuls of n×n floats): keeps ONNX Runtime busy for a while
    (about 1 s at the defaults on one core) from one request."""
    nodes, previous = [], "x"
    for i in range(steps):
        out = "y" if i == steps - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [previous, "w"], [out]))
        previous = out
    w = numpy_helper.from_array(np.full((n, n), 1 / n, np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, n])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])
    return _model(helper.make_graph(nodes, "slow", [x], [y], initializer=[w]))


# --- hostile models that pass a purely static guard (veil.server.admission) ---------------------


def _scalar_graph_model(
    nodes: list[onnx.NodeProto],
    *,
    sparse: list[onnx.SparseTensorProto] = (),  # type: ignore[assignment]
    functions: list[onnx.FunctionProto] = (),  # type: ignore[assignment]
    opsets: tuple[tuple[str, int], ...] = (("", OPSET),),
) -> bytes:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        sparse_initializer=list(sparse),
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid(d, v) for d, v in opsets],
        functions=list(functions),
    )
    model.ir_version = IR_VERSION
    return model.SerializeToString()


def sparse_initializer_model(elements: int) -> bytes:
    """y = x + sum(w), w a sparse float vector of `elements` with ONE value stored: ~150 bytes
    that ONNX Runtime turns into a dense tensor of 4 x `elements` bytes when it loads them."""
    values = numpy_helper.from_array(np.array([1.0], np.float32), "w")
    indices = numpy_helper.from_array(np.array([0], np.int64), "w_indices")
    w = helper.make_sparse_tensor(values, indices, [elements])
    nodes = [
        helper.make_node("ReduceSum", ["w"], ["s"], keepdims=1),
        helper.make_node("Add", ["x", "s"], ["y"]),
    ]
    return _scalar_graph_model(nodes, sparse=[w])


def nested_function_model(depth: int) -> bytes:
    """y = f_depth(x) with f_0 = Relu and f_k = f_{k-1} o f_{k-1}: 2^depth nodes once ONNX
    Runtime inlines the functions, from ~40 bytes a level."""
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("nest", 1)]
    functions = [
        helper.make_function(
            "nest", "f0", ["a"], ["b"], [helper.make_node("Relu", ["a"], ["b"])], opsets
        )
    ]
    for k in range(1, depth + 1):
        body = [
            helper.make_node(f"f{k - 1}", ["a"], ["t"], domain="nest"),
            helper.make_node(f"f{k - 1}", ["t"], ["b"], domain="nest"),
        ]
        functions.append(helper.make_function("nest", f"f{k}", ["a"], ["b"], body, opsets))
    node = helper.make_node(f"f{depth}", ["x"], ["y"], domain="nest")
    return _scalar_graph_model([node], functions=functions, opsets=(("", OPSET), ("nest", 1)))


def expand_model() -> onnx.ModelProto:
    """y = Expand(x, shape): a float32 [1] and an int64 [2] input, as large an output as asked."""
    graph = helper.make_graph(
        [helper.make_node("Expand", ["x", "shape"], ["y"])],
        "expand",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1]),
            helper.make_tensor_value_info("shape", TensorProto.INT64, [2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a", "b"])],
    )
    return _model(graph)


def matmul_model() -> onnx.ModelProto:
    """y = sum(a @ a), a = Expand(x, shape): ONE MatMul operator, n^3 multiply-adds for a shape
    [n, n] sent in 16 bytes (n = 4000: seconds on one thread)."""
    graph = helper.make_graph(
        [
            helper.make_node("Expand", ["x", "shape"], ["a"]),
            helper.make_node("MatMul", ["a", "a"], ["m"]),
            helper.make_node("ReduceSum", ["m"], ["y"], keepdims=0),
        ],
        "matmul",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1]),
            helper.make_tensor_value_info("shape", TensorProto.INT64, [2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
    )
    return _model(graph)


def add_weights_model(n: int, seed: int) -> tuple[bytes, npt.NDArray[np.float32]]:
    """y = x + w for float32 [n], w random from `seed`: models of one shape that differ in bytes
    and in answer (a prediction tells which one ran). Returns the model and w."""
    w = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n])],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    return _model(graph).SerializeToString(), w
