"""The Open Inference Protocol codec: each refusal, its typed error and the words naming it."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from veil.errors import BadRequestError
from veil.server.limits import Limits
from veil.server.oip import HEADER_LENGTH, InferRequest, decode_infer_request
from veil.tensors import DatumType, WireTensor

LIMITS = Limits()


def decode(request: Any, binary: bytes = b"", limits: Limits = LIMITS) -> InferRequest:
    header = json.dumps(request).encode()
    return decode_infer_request(header + binary, len(header) if binary else None, limits)


def refused(request: Any, status: int, words: str, binary: bytes = b"", **limits: Any) -> None:
    with pytest.raises(BadRequestError) as info:
        decode(request, binary, Limits(**limits) if limits else LIMITS)
    assert info.value.status == status
    assert words in info.value.message


def tensor(**fields: Any) -> dict[str, Any]:
    return {"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4], **fields}


def test_flat_and_nested_data_decode_to_the_same_bytes() -> None:
    flat = decode({"inputs": [tensor()]}).inputs[0]
    nested = decode({"inputs": [tensor(data=[[1, 2], [3, 4]])]}).inputs[0]
    expected = np.array([1, 2, 3, 4], dtype="<f4").tobytes()
    assert flat == nested == WireTensor((2, 2), DatumType.F32, "x", expected)


def test_binary_inputs_take_their_bytes_in_order() -> None:
    a = np.arange(4, dtype="<i8")
    b = np.array([True, False])
    request = {
        "id": "r",
        "inputs": [
            tensor(name="a", shape=[4], datatype="INT64", data=None),
            tensor(name="b", shape=[2], datatype="BOOL", data=None),
        ],
        "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
    }
    for item, array in zip(request["inputs"], (a, b), strict=True):
        del item["data"]
        item["parameters"] = {"binary_data_size": array.nbytes}
    decoded = decode(request, a.tobytes() + b.tobytes())
    assert decoded.request_id == "r"
    assert [t.data for t in decoded.inputs] == [a.tobytes(), b.tobytes()]
    assert decoded.outputs == ("y",)
    assert decoded.binary_outputs == frozenset({"y"})
    assert not decoded.binary_all


def test_a_scalar_takes_a_one_element_list() -> None:
    decoded = decode({"inputs": [tensor(shape=[], data=[7])]}).inputs[0]
    assert decoded.shape == ()
    assert np.frombuffer(decoded.data, "<f4").tolist() == [7.0]


def test_uint64_past_int64() -> None:
    values = [0, 1, 2**64 - 1, 2**63]
    decoded = decode({"inputs": [tensor(datatype="UINT64", data=values)]}).inputs[0]
    assert np.frombuffer(decoded.data, "<u8").tolist() == values
    refused({"inputs": [tensor(datatype="UINT64", data=[-1, 2**63, 0, 0])]}, 422, "UINT64's range")
    refused({"inputs": [tensor(datatype="UINT64", data=[0.5, 2**63, 0, 0])]}, 422, "values of")


@pytest.mark.parametrize(
    ("request_", "status", "words"),
    [
        ({"inputs": [tensor(datatype="INT32", data=[1, 2, 3, 4.5])]}, 422, "values of INT32"),
        ({"inputs": [tensor(datatype="INT16", data=[1, 2, 3, 40000])]}, 422, "INT16's range"),
        ({"inputs": [tensor(datatype="BOOL", data=[1, 0, 1, 0])]}, 422, "values of BOOL"),
        ({"inputs": [tensor(datatype="FP32", data=[True, False, True, True])]}, 422, "values"),
        ({"inputs": [tensor(data=[1, 2, "3", 4])]}, 422, "values of FP32"),
        ({"inputs": [tensor(data=[1, 2, None, 4])]}, 422, "values of FP32"),
        ({"inputs": [tensor(data={"a": 1})]}, 400, "data: got dict, expected a list"),
        ({"inputs": [tensor(data=[[1, 2, 3, 4]])]}, 400, "expected 4 (flat) or shape [2, 2]"),
        ({"inputs": [tensor(shape=[2, True])]}, 400, "non-negative ints"),
        ({"inputs": [tensor(shape="2,2")]}, 400, "non-negative ints"),
        ({"inputs": [tensor(datatype=3)]}, 422, "datatype: got '3'"),
        ({"inputs": [tensor(name=5)]}, 400, "name: got int, expected str"),
        ({"inputs": ["x"]}, 400, "inputs[0]: got str, expected an object"),
        ({"inputs": [tensor(parameters=[])]}, 400, "parameters: got list"),
        ({"inputs": [tensor()], "id": 5}, 400, "id: got int, expected a string"),
        ({"inputs": [tensor()], "outputs": "y"}, 400, "outputs: got str, expected list"),
        ({"inputs": [tensor()], "outputs": [5]}, 400, "outputs[0]: got int"),
        ({"inputs": [tensor(parameters={"binary_data_size": 16})]}, 400, "both data and"),
        ({"inputs": [tensor(shape=[1 << 30], data=[1])]}, 422, "max_tensor"),
        ({"inputs": [tensor()] * 65}, 422, "max_inputs"),
        ({}, 400, "inputs: got NoneType, expected list"),
    ],
)
def test_refusals(request_: Any, status: int, words: str) -> None:
    refused(request_, status, words)


def test_binary_refusals() -> None:
    def binary_input(size: Any) -> dict[str, Any]:
        item = tensor(parameters={"binary_data_size": size})
        del item["data"]
        return {"inputs": [item]}

    refused(binary_input(12), 400, "binary_data_size: got 12, expected 16", bytes(16))
    refused(binary_input(True), 400, "binary_data_size: got True", bytes(16))
    refused(binary_input(16), 400, "within the 8 binary bytes left", bytes(8))
    refused(binary_input(16), 400, "binary section: got 20 bytes, inputs use 16", bytes(20))


def test_json_limits_and_framing() -> None:
    body = json.dumps({"inputs": [tensor()]}).encode()
    with pytest.raises(BadRequestError, match="max_json_request_bytes=10"):
        decode_infer_request(body, None, Limits(max_json_request_bytes=10))
    # The JSON part of a binary request counts too; the binary part does not.
    with pytest.raises(BadRequestError, match="max_json_request_bytes=10"):
        decode_infer_request(body + bytes(4), len(body), Limits(max_json_request_bytes=10))
    with pytest.raises(BadRequestError, match=f"{HEADER_LENGTH}: got {len(body) + 1}"):
        decode_infer_request(body, len(body) + 1, LIMITS)
    with pytest.raises(BadRequestError, match="not valid JSON"):
        decode_infer_request(b"[" * 100_000, None, LIMITS)
    with pytest.raises(BadRequestError, match="not valid JSON"):
        decode_infer_request(b"\xff", None, LIMITS)
