"""The Open Inference Protocol v2 on the attested port, and JSON /livez /readyz on the plain one.

One server with an API key (auth on): the same models, keys, limits and errors as the CBOR routes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import cbor2
import httpx
import numpy as np
import pytest
from onnx_models import dynamic_batch_model, identity_model, multi_io_model, random_array
from server_process import SNI, VeilServer, create_key, start_server

from veil.server.oip import datatype_name
from veil.tensors import datum_type_of
from veil.tls import pinned_client_context

DTYPES = ("float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32")
DTYPES += ("uint64", "bool")


class Oip:
    """Plain HTTPS to the attested port (pinned), with or without the API key."""

    def __init__(self, server: VeilServer, secret: str) -> None:
        self.data_dir = server.data_dir
        self.server = server
        certificate = httpx.get(f"http://127.0.0.1:{server.unattested_port}/").content
        context = pinned_client_context(cbor2.loads(certificate))
        self.base = f"https://127.0.0.1:{server.attested_port}"
        self.plain = f"http://127.0.0.1:{server.unattested_port}"
        self.client = httpx.Client(verify=context, timeout=30, headers={"X-Veil-Api-Key": secret})
        self.anonymous = httpx.Client(verify=context, timeout=30)

    def get(self, path: str, *, key: bool = True) -> httpx.Response:
        client = self.client if key else self.anonymous
        return client.get(self.base + path, extensions=SNI)

    def post(self, path: str, body: Any, *, key: bool = True, **kwargs: Any) -> httpx.Response:
        client = self.client if key else self.anonymous
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return client.post(self.base + path, content=content, extensions=SNI, **kwargs)


@pytest.fixture(scope="module")
def oip(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Oip]:
    root = tmp_path_factory.mktemp("veil-oip")
    _, secret = create_key(root / "data", "owner", "alice")
    server = start_server(
        root / "data", root / "log", "--log-level", "info", "--max-json-request-bytes", "65536"
    )
    with server.connect(api_key=secret) as client:
        for dtype in DTYPES:
            client.upload_model(identity_model(dtype).SerializeToString(), model_id=f"id-{dtype}")
        client.upload_model(multi_io_model().SerializeToString(), model_id="multi")
        client.upload_model(dynamic_batch_model().SerializeToString(), model_id="dense")
    tester = Oip(server, secret)
    yield tester
    tester.client.close()
    tester.anonymous.close()
    assert server.stop() == 0, server.stderr()[-3000:]


def _tensor(name: str, array: np.ndarray[Any, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "shape": list(array.shape),
        "datatype": datatype_name(datum_type_of(array.dtype)),
        "data": array.reshape(-1).tolist(),
    }


@pytest.mark.parametrize("dtype", DTYPES)
def test_json_round_trip_of_every_datatype(oip: Oip, dtype: str) -> None:
    x = random_array(dtype, (2, 3), seed=3)
    reply = oip.post(f"/v2/models/id-{dtype}/infer", {"id": "r1", "inputs": [_tensor("x", x)]})
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"] == "application/json"
    body = reply.json()
    assert body["model_name"] == f"id-{dtype}"
    assert body["id"] == "r1"
    (out,) = body["outputs"]
    assert out["name"] == "y"
    assert out["shape"] == [2, 3]
    assert out["datatype"] == datatype_name(datum_type_of(x.dtype))
    assert np.array_equal(np.array(out["data"], dtype=dtype).reshape(2, 3), x)


def test_nested_data_and_selected_outputs(oip: Oip) -> None:
    a = np.array([[1, 2], [3, 4]], dtype=np.float32)
    request = {
        "inputs": [
            {"name": "a", "shape": [2, 2], "datatype": "FP32", "data": a.tolist()},
            {"name": "b", "shape": [2, 2], "datatype": "FP32", "data": [[1, 1], [1, 1]]},
            {"name": "k", "shape": [3], "datatype": "INT64", "data": [1, 2, 3]},
        ],
        "outputs": [{"name": "twice"}, {"name": "sum"}],
    }
    reply = oip.post("/v2/models/multi/infer", request)
    assert reply.status_code == 200, reply.text
    outputs = reply.json()["outputs"]
    assert [o["name"] for o in outputs] == ["twice", "sum"]
    assert outputs[0]["data"] == [2, 4, 6]
    assert outputs[1]["data"] == [2.0, 3.0, 4.0, 5.0]


def test_binary_tensor_extension(oip: Oip) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [2, 4],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    reply = oip.post(
        "/v2/models/dense/infer",
        header + x.tobytes(),
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert reply.status_code == 200, reply.text
    split = int(reply.headers["inference-header-content-length"])
    described = json.loads(reply.content[:split])
    (out,) = described["outputs"]
    assert out["shape"] == [2, 2]
    assert out["parameters"]["binary_data_size"] == 16
    y = np.frombuffer(reply.content[split:], dtype="<f4").reshape(2, 2)
    as_json = oip.post("/v2/models/dense/infer", {"inputs": [_tensor("x", x)]}).json()
    assert np.array_equal(
        y, np.array(as_json["outputs"][0]["data"], dtype=np.float32).reshape(2, 2)
    )


def test_metadata_and_readiness(oip: Oip) -> None:
    server = oip.get("/v2").json()
    assert server["name"] == "veil"
    assert "binary_tensor_data" in server["extensions"]
    assert oip.get("/v2/health/live").json() == {"live": True}
    assert oip.get("/v2/health/ready").json() == {"ready": True}
    meta = oip.get("/v2/models/dense").json()
    assert meta["name"] == "dense"
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}]
    assert oip.get("/v2/models/dense/ready").json() == {"name": "dense", "ready": True}


def test_json_health_on_the_plain_port(oip: Oip) -> None:
    live = httpx.get(oip.plain + "/livez")
    assert live.status_code == 200
    assert live.json() == {"live": True}
    ready = httpx.get(oip.plain + "/readyz")
    assert ready.status_code == 200
    assert ready.headers["content-type"] == "application/json"
    body = ready.json()
    assert body["ready"] is True
    assert body["simulated"] is True
    assert body["collateral"]["state"] in ("ok", "degraded")


GOOD_X = {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (b"{not json", 400, "not valid JSON"),
        ([], 400, "expected an object"),
        ({"inputs": "x"}, 400, "inputs: got str, expected list"),
        ({"inputs": [{**GOOD_X, "datatype": "BYTES"}]}, 422, "datatype: got 'BYTES'"),
        ({"inputs": [{**GOOD_X, "datatype": "FP16"}]}, 422, "datatype: got 'FP16'"),
        ({"inputs": [{**GOOD_X, "data": [1, 2, 3]}]}, 400, "expected 4 (flat)"),
        ({"inputs": [{**GOOD_X, "data": [[1, 2], [3]]}]}, 400, "not a rectangular array"),
        ({"inputs": [{**GOOD_X, "data": ["a", "b", "c", "d"]}]}, 422, "expected values of FP32"),
        ({"inputs": [{**GOOD_X, "shape": [1, -4]}]}, 400, "non-negative ints"),
        ({"inputs": [{**GOOD_X, "shape": [1, 5], "data": [1] * 5}]}, 422, "shape got [1, 5]"),
        ({"inputs": [{**GOOD_X, "name": "nope"}]}, 422, "no such input"),
        ({"inputs": [GOOD_X], "outputs": [{"name": "zz"}]}, 400, "outputs: got 'zz'"),
        ({"inputs": [{**GOOD_X, "shape": [1] * 40, "data": [1]}]}, 422, "max_tensor_rank"),
    ],
)
def test_refusals_are_json_errors(oip: Oip, body: Any, status: int, words: str) -> None:
    reply = oip.post("/v2/models/dense/infer", body)
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"] == "application/json"
    assert words in reply.json()["error"]


def test_integer_values_are_exact(oip: Oip) -> None:
    tensor = {"name": "x", "shape": [2, 3], "datatype": "INT8", "data": [1, 2, 3, 4, 5, 300]}
    reply = oip.post("/v2/models/id-int8/infer", {"inputs": [tensor]})
    assert reply.status_code == 422
    assert "outside INT8's range" in reply.json()["error"]
    tensor = {**tensor, "data": [1, 2, 3, 4, 5, 6.5]}
    reply = oip.post("/v2/models/id-int8/infer", {"inputs": [tensor]})
    assert reply.status_code == 422
    assert "expected values of INT8" in reply.json()["error"]


def test_binary_sizes_must_match(oip: Oip) -> None:
    header = json.dumps(
        {"inputs": [{**GOOD_X, "data": None, "parameters": {"binary_data_size": 12}}]}
    )
    header = header.replace(', "data": null', "")
    reply = oip.post(
        "/v2/models/dense/infer",
        header.encode() + bytes(16),
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert reply.status_code == 400
    assert "binary_data_size: got 12" in reply.json()["error"]
    reply = oip.post(
        "/v2/models/dense/infer",
        b"{}",
        headers={"Inference-Header-Content-Length": "99"},
    )
    assert reply.status_code == 400
    assert "expected 0..2" in reply.json()["error"]


def test_json_body_limit(oip: Oip) -> None:
    padding = {"inputs": [GOOD_X], "id": "p" * 70_000}
    reply = oip.post("/v2/models/dense/infer", padding)
    assert reply.status_code == 413
    assert "max_json_request_bytes=65536" in reply.json()["error"]


def test_keys_and_unknown_models(oip: Oip) -> None:
    wrong = {"X-Veil-Api-Key": "veil_0123456789abcdef_" + "0" * 64}
    reply = oip.post("/v2/models/dense/infer", {"inputs": [GOOD_X]}, headers=wrong)
    assert reply.status_code == 401
    assert "API key" in reply.json()["error"]
    assert oip.get("/v2/models/dense", key=False).status_code == 404
    # No key at all is anonymous, as on /run: public models only, a restricted one is unknown.
    reply = oip.post("/v2/models/dense/infer", {"inputs": [GOOD_X]}, key=False)
    assert reply.status_code == 404
    assert reply.json() == {"error": "unknown model id 'dense'"}
    for path in ("/v2/models/ghost", "/v2/models/ghost/ready"):
        reply = oip.get(path)
        assert reply.status_code == 404
        assert reply.json() == {"error": "unknown model id 'ghost'"}
    assert oip.post("/v2/models/ghost/infer", {"inputs": [GOOD_X]}).status_code == 404


def test_a_restricted_model_is_invisible_to_another_key(oip: Oip) -> None:
    # The module's models are restricted to their uploader (auth on): another key gets the
    # same 404 as for a model that does not exist.
    _, secret = create_key(oip.data_dir, "owner", "bob")
    reply = oip.post(
        "/v2/models/dense/infer", {"inputs": [GOOD_X]}, headers={"X-Veil-Api-Key": secret}
    )
    assert reply.status_code == 404
    assert reply.json() == {"error": "unknown model id 'dense'"}


def test_metrics_count_oip_routes_by_template(oip: Oip) -> None:
    assert oip.post("/v2/models/dense/infer", {"inputs": [GOOD_X]}).status_code == 200
    metrics = httpx.get(oip.plain + "/metrics").text
    assert 'route="/v2/models/{name}/infer"' in metrics
    assert "dense" not in metrics


def test_names_resolve_per_owner(oip: Oip) -> None:
    # Ids belong to their owners: bob's "dense" is not alice's; a key that may run several
    # models of one name is told to say which (409), never handed one of them.
    _, bob = create_key(oip.data_dir, "owner", "bob-oip")
    _, carol = create_key(oip.data_dir, "user", "carol-oip")

    def shape(secret: str | None, name: str) -> Any:
        headers = {} if secret is None else {"X-Veil-Api-Key": secret}
        reply = oip.client.get(f"{oip.base}/v2/models/{name}", headers=headers, extensions=SNI)
        return reply.json()["inputs"][0]["shape"] if reply.status_code == 200 else reply

    with oip.server.connect(api_key=bob) as client:
        model = identity_model("float32").SerializeToString()
        client.upload_model(model, model_id="dense", visibility="public")
        client.upload_model(model, model_id="pub", visibility="public")
        try:
            assert shape(bob, "dense") == [2, 3]  # his own
            assert shape(None, "dense") == [-1, 4]  # the client's key: alice's own
            assert shape(carol, "dense") == [2, 3]  # the one carol may run
            with oip.server.connect(api_key=oip.client.headers["X-Veil-Api-Key"]) as alice:
                alice.upload_model(model, model_id="pub", visibility="public")
                try:
                    refused = shape(carol, "pub")
                    assert refused.status_code == 409
                    assert "is ambiguous: 2 models you may use have it" in refused.json()["error"]
                    assert shape(bob, "pub") == [2, 3]
                finally:
                    alice.delete_model("pub")
        finally:
            client.delete_model("dense")
            client.delete_model("pub")
