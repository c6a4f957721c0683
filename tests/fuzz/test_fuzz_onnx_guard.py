"""The ONNX guard on hostile bytes: only a 413/422 BadRequestError, never a crash."""

from __future__ import annotations

import numpy as np
from fuzz_mutations import mutated
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from veil.errors import BadRequestError
from veil.server.limits import Limits
from veil.server.onnx_guard import check_model

FUZZ = settings.get_profile("veil-fuzz")
LIMITS = Limits(max_initializer_bytes=1 << 20, max_initializers_total_bytes=1 << 21)


def _seed() -> bytes:
    w = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "w")
    shape = numpy_helper.from_array(np.array([2, 3], np.int64), "shape")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("ConstantOfShape", ["shape"], ["c"]),
        helper.make_node("Relu", ["h"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        initializer=[w, shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


SEEDS = [_seed()]


def _check(data: bytes) -> None:
    status = None
    try:
        check_model(data, LIMITS)
    except BadRequestError as exc:
        status = exc.status
    assert status in (None, 413, 422)


def test_seed_is_accepted() -> None:
    check_model(SEEDS[0], LIMITS)


@settings(parent=FUZZ)
@given(data=st.binary(max_size=512))
def test_arbitrary_bytes(data: bytes) -> None:
    _check(data)


@settings(parent=FUZZ)
@given(data=st.data())
def test_mutated_model(data: st.DataObject) -> None:
    _check(data.draw(mutated(SEEDS)))
