"""Transformer rewrites of `optimization="graph"` on a tiny DistilBERT built here (seed 0)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from veil.server import fusion, optimize
from veil.server.limits import Limits
from veil.server.onnx_guard import check_model_lean

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("sympy")  # ONNX Runtime's symbolic shape inference, for SDPA's reshape

pytestmark = pytest.mark.torch

LAYERS = 2


def _tiny_distilbert(path: Path, attention: str) -> bytes:
    import torch
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    from veil.export import export_transformers_model

    config: Any = DistilBertConfig(
        vocab_size=100,
        dim=32,
        n_layers=LAYERS,
        n_heads=4,
        hidden_dim=64,
        max_position_embeddings=64,
        attn_implementation=attention,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DistilBertForSequenceClassification(config).eval()
    ids = torch.randint(5, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    export_transformers_model(model, path, example_inputs={"input": ids}, opset=17)
    return path.read_bytes()


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    return _tiny_distilbert(folder / "model.onnx", request.param)


def _outputs(blob: bytes, ids: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"input": ids})[0])


def _worst_diff(original: bytes, rewritten: bytes) -> float:
    rng = np.random.default_rng(1)
    worst = 0.0
    for batch, seq in ((1, 1), (1, 8), (3, 17), (2, 64)):
        ids = rng.integers(5, 100, size=(batch, seq), dtype=np.int64)
        diff = np.abs(_outputs(original, ids) - _outputs(rewritten, ids)).max()
        worst = max(worst, float(diff))
    return worst


def test_the_last_layer_runs_one_query_row(tiny: bytes) -> None:
    model, report = fusion.fuse_transformer(onnx.load_from_string(tiny))
    assert model is not None
    assert report == {"Attention": 1, "query_rows_pruned": 1}
    ops = [(n.domain, n.op_type) for n in model.graph.node]
    assert ops.count(("com.microsoft", "Attention")) == 0  # the others stay ONNX Runtime's
    assert ops.count(("com.microsoft", "MultiHeadAttention")) == 1
    assert ops.count(("", "Softmax")) == LAYERS - 1
    rewritten = model.SerializeToString()
    check_model_lean(rewritten, Limits())  # a kept graph is admitted again at every start
    assert _worst_diff(tiny, rewritten) <= optimize.GRAPH_TOLERANCE


def test_the_graph_mode_reports_the_fusions(tiny: bytes) -> None:
    graph, report = optimize.optimize_graph(tiny, "graph", Limits())
    assert report["fusions"] == "Attention 1, query_rows_pruned 1"
    assert report["max_abs_diff"] <= optimize.GRAPH_TOLERANCE
    # Kept or not is the speed check's call (timing): when kept, it is the rewritten graph.
    if graph is not None:
        ops = {n.op_type for n in onnx.load_from_string(graph).graph.node}
        assert "MultiHeadAttention" in ops


def test_heads_are_read_from_the_reshapes(tiny: bytes) -> None:
    assert fusion.attention_heads(onnx.load_from_string(tiny)) == (4, 32)


def _head(model: onnx.ModelProto) -> onnx.NodeProto:
    """The classifier's ``Gather(hidden, 0, axis=1)``."""
    (head,) = [
        n
        for n in model.graph.node
        if n.op_type == "Gather" and any(a.name == "axis" and a.i == 1 for a in n.attribute)
    ]
    return head


def _fused_only(blob: bytes) -> onnx.ModelProto:
    """Steps 1 and 2, not 3."""
    model = onnx.load_from_string(blob)
    assert fusion.divide_last_attention_scores(model)
    model, fused = fusion._bert_fused(model, 4, 32)
    assert fused["Attention"] == 1
    return model


def test_a_head_reading_another_token_keeps_every_row(tiny: bytes) -> None:
    model = _fused_only(tiny)
    assert fusion.prune_query_rows(_fused_only(tiny)) == 1
    head = _head(model)
    one = numpy_helper.from_array(np.array(1, np.int64), "token_one")
    model.graph.initializer.append(one)
    head.input[1] = "token_one"
    assert fusion.prune_query_rows(model) == 0


def test_a_last_layer_read_elsewhere_keeps_every_row(tiny: bytes) -> None:
    model = _fused_only(tiny)
    hidden = _head(model).input[0]  # every token of the last layer: now an output too
    model.graph.output.append(helper.make_empty_tensor_value_info(hidden))
    assert fusion.prune_query_rows(model) == 0


def test_an_attention_with_a_mask_keeps_every_row() -> None:
    attention = helper.make_node(
        "Attention", ["x", "w", "b", "mask"], ["y"], domain="com.microsoft", num_heads=2
    )
    constants = {"w": np.zeros((4, 12), np.float32), "b": np.zeros(12, np.float32)}
    assert fusion._one_row_attention(attention, "x", constants) is None
    attention = helper.make_node(
        "Attention", ["x", "w", "b"], ["y"], domain="com.microsoft", num_heads=2, unidirectional=1
    )
    assert fusion._one_row_attention(attention, "x", constants) is None


def test_a_graph_without_attention_is_left_alone() -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "plain",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert fusion.fuse_transformer(model) == (None, {})


def test_a_failing_rewrite_still_runs_onnx_runtimes_part(
    tiny: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(model: Any) -> Any:
        raise RuntimeError("a pattern the rewrites mishandle")

    monkeypatch.setattr(optimize, "fuse_transformer", fail)
    _, report = optimize.optimize_graph(tiny, "graph", Limits())
    assert report["fusions"] == "failed (RuntimeError)"
    assert report["max_abs_diff"] <= optimize.GRAPH_TOLERANCE


def test_a_masked_attention_is_left_to_onnx_runtime(tiny: bytes) -> None:
    # A zero-mask probe could not tell a mask handled wrongly: no rewrite at all, not even step 1.
    model = onnx.load_from_string(tiny)
    softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(1, np.float32), "mask"))
    masked = helper.make_node("Add", [softmax.input[0], "mask"], ["masked_scores"])
    model.graph.node.insert(list(model.graph.node).index(softmax), masked)
    softmax.input[0] = "masked_scores"
    before = model.SerializeToString()
    assert fusion.fuse_transformer(model) == (None, {})
    assert model.SerializeToString() == before
