"""Upload, predict, list and delete against a real server; outputs equal in-process ONNX Runtime."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_models import (
    IR_VERSION,
    ONNX_TYPES,
    OPSET,
    dynamic_batch_model,
    identity_model,
    multi_io_model,
    random_array,
    reference,
)
from server_process import VeilServer

import veil

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("dtype", sorted(ONNX_TYPES))
def test_every_datum_type_round_trips(client: veil.Connection, dtype: str) -> None:
    model = identity_model(dtype)
    up = client.upload_model(model, model_id=f"identity-{dtype}")
    assert up.model_id == f"identity-{dtype}"
    assert up.hash == hashlib.sha256(model.SerializeToString()).digest()
    x = random_array(dtype, (2, 3), seed=len(dtype))

    result = client.predict(f"identity-{dtype}", x)

    (out,) = result.output
    (expected,) = reference(model, {"x": x})
    assert out.name == "y"
    assert out.shape == (2, 3)
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out.as_numpy(), expected)
    assert out.as_numpy().dtype == np.dtype(dtype)
    assert out.as_flat() == expected.reshape(-1).tolist()


def test_a_scalar_goes_and_comes_back_with_shape_empty(client: veil.Connection) -> None:
    client.upload_model(identity_model("int64", shape=()), model_id="scalar")

    (out,) = client.predict("scalar", {"x": np.array(42)}).output

    assert out.shape == ()
    assert out.as_numpy().shape == ()
    assert int(out.as_numpy()) == 42


def test_several_named_inputs_and_outputs(client: veil.Connection) -> None:
    model = multi_io_model()
    client.upload_model(model.SerializeToString(), model_id="multi")
    a = np.arange(4, dtype=np.float32).reshape(2, 2)
    b = np.full((2, 2), 1.5, dtype=np.float32)
    k = np.array([1, -2, 3], dtype=np.int64)
    expected = reference(model, {"a": a, "b": b, "k": k})

    by_name = client.predict("multi", {"k": k, "b": b, "a": a})  # any order by name
    positional = client.predict("multi", [a, b, k])

    for result in (by_name, positional):
        assert [t.name for t in result.output] == ["sum", "prod", "twice"]
        for got, want in zip(result.output, expected, strict=True):
            np.testing.assert_array_equal(got.as_numpy(), want)
            assert got.as_numpy().dtype == want.dtype


def test_dynamic_batch_axis(client: veil.Connection) -> None:
    model = dynamic_batch_model()
    client.upload_model(model, model_id="dense")
    for batch in (1, 5, 32):
        x = np.random.default_rng(batch).standard_normal((batch, 4)).astype(np.float32)
        (out,) = client.predict("dense", x).output
        (expected,) = reference(model, {"x": x})
        assert out.shape == (batch, 2)
        np.testing.assert_allclose(out.as_numpy(), expected, rtol=1e-6)


def test_flat_list_with_dtype_and_shape(client: veil.Connection) -> None:
    client.upload_model(identity_model("int16"), model_id="flat-int16")
    values = [1, -2, 3, -4, 5, -6]
    (out,) = client.predict("flat-int16", values, dtype="int16", shape=(2, 3)).output
    assert out.as_flat() == values
    assert out.shape == (2, 3)


@pytest.mark.torch
def test_torch_inputs_and_outputs(client: veil.Connection) -> None:
    torch = pytest.importorskip("torch")
    client.upload_model(identity_model("float32"), model_id="torch-f32")
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    (out,) = client.predict("torch-f32", x).output
    assert torch.equal(out.as_torch(), x)


def test_run_model_by_hash_blindai_style(client: veil.Connection) -> None:
    model = identity_model("uint8")
    up = client.upload_model(model, model_id="by-hash")
    x = np.arange(6, dtype=np.uint8).reshape(2, 3)
    (out,) = client.run_model(model_hash=up.hash.hex(), input_tensors=[x]).output
    np.testing.assert_array_equal(out.as_numpy(), x)
    with pytest.raises(ValueError, match="exactly one"):
        client.run_model(model_id="by-hash", model_hash=up.hash.hex(), input_tensors=[x])


def test_server_chooses_an_id_and_lists_models(client: veil.Connection) -> None:
    up = client.upload_model(identity_model("int8"), model_name="anonymous.onnx")
    assert up.model_id
    listed = {m.model_id: m for m in client.list_models()}
    assert listed[up.model_id].model_name == "anonymous.onnx"
    assert listed[up.model_id].hash == up.hash
    assert listed[up.model_id].inputs[0]["name"] == "x"


def test_delete_then_unknown(client: veil.Connection) -> None:
    client.upload_model(identity_model("float64"), model_id="to-delete")
    client.delete_model("to-delete")
    assert "to-delete" not in {m.model_id for m in client.list_models()}
    with pytest.raises(veil.NotFoundError):
        client.predict("to-delete", np.zeros((2, 3)))
    with pytest.raises(veil.NotFoundError):
        client.delete_model("to-delete")


def test_upload_from_path_uses_file_name(client: veil.Connection, tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "relu.onnx"
    path.write_bytes(identity_model("int32").SerializeToString())
    up = client.upload_model(path, model_id="from-path")
    assert {m.model_id: m.model_name for m in client.list_models()}[up.model_id] == "relu.onnx"


def test_api_key_header_is_accepted(server: VeilServer) -> None:
    with server.connect(api_key="not-checked-yet") as connection:
        connection.upload_model(identity_model("bool"), model_id="with-key")
        x = np.array([[True, False, True], [False, False, True]])
        np.testing.assert_array_equal(connection.predict("with-key", x).output[0].as_numpy(), x)


def test_upload_reports_progress(client: veil.Connection, tmp_path: Path) -> None:
    from veil.client.connection import _UPLOAD_CHUNK

    # Two pieces (the module's server takes uploads up to 2 MiB): y = x + w, w of 1.5 MiB.
    n = 3 * _UPLOAD_CHUNK // 8
    w = numpy_helper.from_array(np.zeros(n, np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [n])
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    path = tmp_path / "big.onnx"
    path.write_bytes(model.SerializeToString())
    size = path.stat().st_size
    seen: list[tuple[int, int]] = []

    client.upload_model(path, model_id="progress-file", progress=lambda a, b: seen.append((a, b)))

    assert len(seen) == -(-size // _UPLOAD_CHUNK)
    assert seen[-1] == (size, size)
    assert [sent for sent, _ in seen] == sorted({sent for sent, _ in seen})
    seen.clear()
    client.upload_model(
        model.SerializeToString(),
        model_id="progress-bytes",
        progress=lambda a, b: seen.append((a, b)),
    )
    assert seen[-1] == (size, size)


def test_progress_bar_only_on_a_terminal(
    client: veil.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    plain = io.StringIO()
    monkeypatch.setattr("sys.stderr", plain)
    client.upload_model(identity_model("uint8"), model_id="bar-plain", progress=True)
    assert plain.getvalue() == ""

    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    client.upload_model(identity_model("uint8"), model_id="bar-tty", progress=True)
    assert "upload bar-tty" in terminal.getvalue()
    assert "100%" in terminal.getvalue()
