"""Graph optimization in the admission child: refusal paths fall back to the original."""

from __future__ import annotations

import tempfile
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from veil.errors import ApiError
from veil.server import optimize
from veil.server.admission import _parse_report
from veil.server.limits import Limits
from veil.server.onnx_guard import check_model_lean


def _linear(scale: float = 1.0) -> bytes:
    w = numpy_helper.from_array(np.full((4, 3), 0.5 * scale, np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def test_off_does_nothing_and_unknown_modes_are_refused() -> None:
    assert optimize.optimize_graph(_linear(), "off", Limits()) == (None, {})
    with pytest.raises(ValueError, match="expected one of off, graph, int8"):
        optimize.optimize_graph(_linear(), "fast", Limits())


def test_outputs_that_move_past_the_tolerance_keep_the_original(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    moved = _linear(scale=1.001)  # outputs differ by ~1e-3 on normal inputs
    monkeypatch.setattr(optimize, "_graph_optimized", lambda blob, workdir: moved)
    graph, report = optimize.optimize_graph(_linear(), "graph", Limits())
    assert graph is None
    assert report["kept"] is False
    assert report["max_abs_diff"] > optimize.GRAPH_TOLERANCE
    assert report["reason"].startswith("outputs moved by")


def test_a_failing_optimization_keeps_the_original(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(blob: bytes, workdir: str) -> bytes:
        raise MemoryError  # what RLIMIT_AS turns a folding bomb into

    monkeypatch.setattr(optimize, "_graph_optimized", fail)
    graph, report = optimize.optimize_graph(_linear(), "graph", Limits())
    assert graph is None
    assert report == {
        "mode": "graph",
        "kept": False,
        "reason": "optimization failed (MemoryError); serving the original",
        "fusions": "",  # no attention here: the transformer rewrites had nothing to do
    }


def test_probe_inputs_follow_the_declared_inputs() -> None:
    class Node:
        def __init__(self, name: str, kind: str, shape: list[Any]) -> None:
            self.name, self.type, self.shape = name, kind, shape

    class Session:
        def get_inputs(self) -> list[Node]:
            return [
                Node("ids", "tensor(int64)", ["batch", "seq"]),
                Node("x", "tensor(float)", [None, 5]),
            ]

    feeds = optimize.probe_inputs(Session(), seed=0)
    assert feeds["ids"].shape == (1, 8)
    assert feeds["ids"].dtype == np.int64
    assert not feeds["ids"].any()  # zeros index any table
    assert feeds["x"].shape == (1, 5)
    assert feeds["x"].dtype == np.float32
    assert np.array_equal(feeds["x"], optimize.probe_inputs(Session(), seed=0)["x"])


@pytest.mark.parametrize(
    "report",
    [
        {"mode": "fast", "kept": True},
        {"mode": "graph", "kept": 1},
        {"mode": "graph", "kept": True, "speedup": "2x"},
        {"mode": "graph", "kept": True, "reason": 7},
        ["graph"],
    ],
)
def test_a_malformed_report_from_the_child_is_refused(report: Any) -> None:
    with pytest.raises(ApiError, match="admission gave no answer") as info:
        _parse_report(report)
    assert info.value.status == 422


def test_a_report_keeps_only_known_fields() -> None:
    parsed = _parse_report({"mode": "int8", "kept": False, "top1_agreement": 1.0, "x": "y"})
    assert parsed == {"mode": "int8", "kept": False, "top1_agreement": 1.0}
    assert _parse_report(None) is None
    assert _parse_report({}) is None


def test_a_saved_graph_declares_only_the_opsets_it_uses_and_passes_the_checks() -> None:
    # ONNX Runtime saves every domain it knows (ai.onnx.training…), which the checks refuse; a
    # graph kept is admitted again at every start, so it must pass them as an upload does.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    b = numpy_helper.from_array(np.ones(3, np.float32), "b")
    w = numpy_helper.from_array(np.full((4, 3), 0.5, np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"]),
            helper.make_node("Add", ["h", "b"], ["h2"]),
            helper.make_node("Relu", ["h2"], ["y"]),
        ],
        "fusable",
        [x],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=[w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    with tempfile.TemporaryDirectory() as workdir:
        saved = optimize._graph_optimized(model.SerializeToString(), workdir)
    parsed = onnx.load_from_string(saved)
    assert {n.domain for n in parsed.graph.node} == {"com.microsoft"}  # fused by ONNX Runtime
    assert {o.domain for o in parsed.opset_import} == {"", "com.microsoft"}
    check_model_lean(saved, Limits())


def test_a_graph_that_fails_the_checks_keeps_the_original(monkeypatch: pytest.MonkeyPatch) -> None:
    unchecked = onnx.load_from_string(_linear())
    unchecked.opset_import.append(helper.make_opsetid("ai.onnx.training", 1))
    monkeypatch.setattr(
        optimize, "_graph_optimized", lambda blob, workdir: unchecked.SerializeToString()
    )
    graph, report = optimize.optimize_graph(_linear(), "graph", Limits())
    assert graph is None
    assert report["reason"] == "optimization failed (BadRequestError); serving the original"
