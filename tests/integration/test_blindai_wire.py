"""The exact messages of the BlindAI 0.6.3 client (its client.py, read for the wire facts).

The genuine client itself runs in tests/compat; these tests pin the byte-level shapes it sends
and parses: the model as a CBOR array of ints, IntEnum datum types, tuple shapes, empty-string
model_id/model_hash, node_name None, client_info, and replies whose tensor info holds exactly
fact, datum_type and node_name.
"""

from __future__ import annotations

import enum
import hashlib
from typing import Any

import cbor2
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_models import IR_VERSION, OPSET, multi_io_model, reference
from server_process import RawClient

pytestmark = pytest.mark.slow

CLIENT_INFO = {
    "uid": "0" * 64,
    "platform_name": "Linux",
    "platform_arch": "x86_64",
    "platform_version": "#1 SMP",
    "platform_release": "6.1",
    "user_agent": "blindai_python",
    "user_agent_version": "0.6.3",
    "is_colab": False,
}


class ModelDatumType(enum.IntEnum):  # as BlindAI defines it; cbor2 sends the int
    F32 = 0
    I64 = 3


def blindai_tensor(array: np.ndarray, datum_type: ModelDatumType) -> dict[str, Any]:
    return {
        "info": {"fact": array.shape, "datum_type": datum_type, "node_name": None},
        "bytes_data": array.tobytes(),
    }


def upload_as_blindai(raw: RawClient, port: str, model: bytes) -> dict[str, Any]:
    body = cbor2.dumps(
        {
            "model": list(model),
            "length": len(model),
            "model_name": "model.onnx",
            "optimize": True,
            "client_info": CLIENT_INFO,
        }
    )
    response = raw.post(port, "/upload", body)
    assert response.status_code == 200, cbor2.loads(response.content)
    reply = cbor2.loads(response.content)
    assert set(reply) == {"hash", "model_id"}
    assert reply["hash"] == hashlib.sha256(model).digest()
    return reply


def big_model() -> bytes:
    """~400 kB of float32 weights: a long int array with every byte value, many 0x18 runs."""
    rng = np.random.default_rng(1)
    weights = rng.standard_normal(100_000).astype(np.float32)
    weights[:64] = np.frombuffer(b"\x18" * 256, dtype=np.float32)
    w = numpy_helper.from_array(weights, "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [100_000])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [100_000])
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    return model.SerializeToString()


def test_attested_handshake(raw: RawClient) -> None:
    assert raw.get("attested", "/").status_code == 200


@pytest.mark.parametrize("port", ["management", "attested"])
def test_blindai_upload_run_delete(raw: RawClient, port: str) -> None:
    model = multi_io_model()
    reply = upload_as_blindai(raw, port, model.SerializeToString())
    a = np.arange(4, dtype=np.float32).reshape(2, 2)
    b = np.ones((2, 2), dtype=np.float32)
    k = np.array([5, 6, 7], dtype=np.int64)
    expected = reference(model, {"a": a, "b": b, "k": k})

    for model_id, model_hash in ((reply["model_id"], ""), ("", reply["hash"].hex())):
        run = {
            "model_id": model_id,
            "model_hash": model_hash,
            "inputs": [
                blindai_tensor(a, ModelDatumType.F32),
                blindai_tensor(b, ModelDatumType.F32),
                blindai_tensor(k, ModelDatumType.I64),
            ],
            "client_info": CLIENT_INFO,
        }
        response = raw.post("attested", "/run", cbor2.dumps(run))
        assert response.status_code == 200
        outputs = cbor2.loads(response.content)["outputs"]
        for output, want in zip(outputs, expected, strict=True):
            # BlindAI builds TensorInfo(**info): any extra key would break it
            assert set(output["info"]) == {"fact", "datum_type", "node_name"}
            assert output["info"]["fact"] == list(want.shape)
            dtype = {0: np.float32, 3: np.int64}[output["info"]["datum_type"]]
            got = np.frombuffer(output["bytes_data"], dtype=dtype).reshape(want.shape)
            np.testing.assert_array_equal(got, want)
        assert [o["info"]["node_name"] for o in outputs] == ["sum", "prod", "twice"]

    response = raw.post(port, "/delete", cbor2.dumps({"model_id": reply["model_id"]}))
    assert response.status_code == 200
    assert cbor2.loads(response.content) is None


def test_datum_type_by_name_and_unknown_keys(raw: RawClient) -> None:
    reply = upload_as_blindai(raw, "management", multi_io_model().SerializeToString())
    a = np.ones((2, 2), np.float32)
    k = np.ones(3, np.int64)

    def named(array: np.ndarray, name: str, datum_type: str) -> dict[str, Any]:
        info = {"fact": list(array.shape), "datum_type": datum_type, "node_name": name}
        return {"info": info, "bytes_data": array.tobytes(), "future_field": 1}

    run = {
        "model_id": reply["model_id"],
        "inputs": [named(k, "k", "I64"), named(a, "b", "F32"), named(a, "a", "F32")],
        "something_new": {"x": 1},
    }
    response = raw.post("attested", "/run", cbor2.dumps(run))
    assert response.status_code == 200
    outputs = cbor2.loads(response.content)["outputs"]
    assert np.frombuffer(outputs[0]["bytes_data"], np.float32).tolist() == [2.0] * 4


def test_large_model_as_int_array(raw: RawClient) -> None:
    model = big_model()
    reply = upload_as_blindai(raw, "management", model)
    x = np.zeros(100_000, np.float32)
    run = {"model_id": reply["model_id"], "model_hash": "", "inputs": [blindai_tensor(x, 0)]}
    response = raw.post("attested", "/run", cbor2.dumps(run))
    assert response.status_code == 200
    (output,) = cbor2.loads(response.content)["outputs"]
    weights = np.frombuffer(output["bytes_data"], np.float32)
    assert weights[:64].tobytes() == b"\x18" * 256
