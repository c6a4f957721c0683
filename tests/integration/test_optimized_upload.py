"""Uploads that ask for an optimized graph: checked against the original, reported, stored."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import ModelProto, TensorProto, helper, numpy_helper
from server_process import ServerFactory

import veil
from veil.providers import detect_provider
from veil.server.state import open_state


def mlp() -> ModelProto:
    """x[batch, 64] → MatMul, Add, Relu, × Sqrt(4) (a constant to fold), MatMul → y[batch, 10]."""
    rng = np.random.default_rng(0)
    weights = {
        "w1": rng.standard_normal((64, 256)).astype(np.float32),
        "b1": rng.standard_normal(256).astype(np.float32),
        "w2": rng.standard_normal((256, 10)).astype(np.float32),
        "four": np.array([4.0], np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["h2"]),
        helper.make_node("Relu", ["h2"], ["h3"]),
        helper.make_node("Sqrt", ["four"], ["s"]),
        helper.make_node("Mul", ["h3", "s"], ["h4"]),
        helper.make_node("MatMul", ["h4", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
        initializer=[numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_graph_and_int8_optimizations_are_checked_reported_stored_and_served_after_restart(
    server_factory: ServerFactory,
) -> None:
    model = mlp()
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    expected = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    running = server_factory()
    with running.connect() as client:
        plain = client.upload_model(model, model_id="plain", optimization="off")
        assert plain.optimization is None
        graph = client.upload_model(model, model_id="graph", optimization="graph")
        report = graph.optimization
        assert report is not None
        assert report["mode"] == "graph"
        # Kept only if the probe matched within 1e-4 and it was not slower; either way, said so.
        assert report["max_abs_diff"] <= 1e-4
        assert report["kept"] is (report["reason"] == "")
        graph_kept = report["kept"]
        assert graph.hash == plain.hash  # the upload's hash, whatever graph is served
        got = client.predict("graph", x).output[0].as_numpy()
        np.testing.assert_allclose(got, expected, atol=1e-4)
        int8 = client.upload_model(model, model_id="int8", optimization="int8")
        report = int8.optimization
        assert report is not None
        assert report["mode"] == "int8"
        # Kept when not slower than the original on the probe: timing, so either way here.
        int8_kept = report["kept"]
        assert int8.hash == plain.hash
        # The accuracy change is measured and reported: int8 moves the outputs, a little.
        assert 0 < report["max_abs_diff"] < 0.2 * float(np.abs(expected).max())
        assert 0.0 <= report["top1_agreement"] <= 1.0
        served_int8 = client.predict("int8", x).output[0].as_numpy()
        assert served_int8.shape == expected.shape
        if int8_kept:
            assert float(np.abs(served_int8 - expected).max()) > 1e-4  # the int8 graph answers
        with pytest.raises(veil.BadRequestError, match="expected off, graph or int8"):
            client.upload_model(model, model_id="bad", optimization="fast")
    data_dir = running.data_dir
    assert running.stop() == 0
    # The sealed manifest ties each stored graph to the hash the client pinned.
    provider = detect_provider("simulated", data_dir=data_dir)
    models = open_state(data_dir, provider.sealing_key).current().models
    upload_hash = plain.hash
    kept = {"plain": None, "graph": "graph" if graph_kept else None}
    kept["int8"] = "int8" if int8_kept else None
    for model_id, mode in kept.items():
        meta = models[model_id].meta
        assert (meta.model_hash, meta.optimization) == (upload_hash, mode)
        assert (meta.graph_hash is None) is (mode is None)
        assert meta.graph_hash != upload_hash
    restarted = server_factory(data_dir=data_dir)
    with restarted.connect() as client:
        listed = {m.model_id: m for m in client.list_models()}
        assert sorted(listed) == ["graph", "int8", "plain"]
        assert {m.hash for m in listed.values()} == {plain.hash}
        # Served as before the restart: a kept graph, not the upload.
        for model_id in ("plain", "graph"):
            got = client.predict(model_id, x).output[0].as_numpy()
            np.testing.assert_allclose(got, expected, atol=1e-4)
        got = client.predict("int8", x).output[0].as_numpy()
        np.testing.assert_allclose(got, served_int8, rtol=0, atol=1e-6)
