"""Checks on an uploaded ONNX model before ONNX Runtime sees it, and a contained session factory.

An uploaded model is hostile input. `check_model` refuses, with a 413/422 `ApiError`:

1. a model larger than ``max_model_bytes`` (413), or bytes that do not parse as an ONNX
   ModelProto, or have no graph (422);
2. any tensor stored outside the model (``data_location = EXTERNAL`` or ``external_data``
   entries): older ONNX Runtime releases open that path on the server (``../../../etc/passwd``);
   recent ones validate it, but the server does not rely on the installed version;
3. operators or opset imports from domains other than ``""``, ``ai.onnx``, ``ai.onnx.ml`` and
   ``com.microsoft`` (custom-op libraries are never loaded, and unknown domains are refused
   rather than left to fail later), except calls to functions the model defines itself;
4. an initializer or constant whose *declared* size (shape x element size) exceeds
   ``max_initializer_bytes``, or whose declared total exceeds ``max_initializers_total_bytes``;
5. a ``ConstantOfShape`` whose shape is a constant above ``max_tensor_elements`` /
   ``max_tensor_bytes`` (a model that allocates gigabytes from a few bytes);
6. whatever ``onnx.checker.check_model`` refuses.

Every graph is walked: subgraphs of ``If``/``Loop``/``Scan``, local function bodies and
attribute defaults, training-info graphs.

`create_session` then builds the ``InferenceSession`` with the CPU memory arena off (freed memory
goes back to the system) and ONNX Runtime's constant folding disabled: constant folding runs
*at session creation* and would materialise a ``ConstantOfShape`` of up to 1 GiB per node (ORT's
own cap) before any request arrives. Shapes computed at run time are bounded only by the
request limits, the per-request timeout and the concurrency limit: hard memory containment of a
running graph needs process isolation (a cgroup memory limit on the server), which is left to
the deployment. `run_with_timeout` bounds a run's time: past ``request_timeout_s`` it tells ONNX
Runtime to stop (``RunOptions.terminate``, checked between nodes) and answers 504.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import onnx
from onnx import AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto

from veil.errors import ApiError, api_error_for_status
from veil.server.limits import Limits

__all__ = [
    "ALLOWED_DOMAINS",
    "check_model",
    "check_model_lean",
    "create_session",
    "run_with_timeout",
    "session_options",
]

ALLOWED_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})

# Element sizes in bytes by TensorProto data type; strings are counted by their stored bytes.
_ITEMSIZE: dict[int, float] = {
    TensorProto.FLOAT: 4,
    TensorProto.UINT8: 1,
    TensorProto.INT8: 1,
    TensorProto.UINT16: 2,
    TensorProto.INT16: 2,
    TensorProto.INT32: 4,
    TensorProto.INT64: 8,
    TensorProto.BOOL: 1,
    TensorProto.FLOAT16: 2,
    TensorProto.DOUBLE: 8,
    TensorProto.UINT32: 4,
    TensorProto.UINT64: 8,
    TensorProto.COMPLEX64: 8,
    TensorProto.COMPLEX128: 16,
    TensorProto.BFLOAT16: 2,
}


def _invalid(message: str) -> ApiError:
    return api_error_for_status(422, f"invalid ONNX model: {message}")


def _itemsize(data_type: int) -> float:
    return _ITEMSIZE.get(data_type, 1)  # 8-bit float and 4-bit types: at least 1/2 byte, use 1


def _declared_bytes(t: TensorProto) -> int:
    if any(d < 0 for d in t.dims):
        raise _invalid(f"tensor {t.name!r} has a negative dimension")
    if t.data_type == TensorProto.STRING:
        return int(sum(len(s) for s in t.string_data))
    elements: int = math.prod(int(d) for d in t.dims)
    return math.ceil(elements * _itemsize(t.data_type))


def _tensors_of_attribute(attr: AttributeProto) -> Iterator[TensorProto]:
    if attr.HasField("t"):
        yield attr.t
    yield from attr.tensors
    for sparse in ([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []) + list(
        attr.sparse_tensors
    ):
        yield sparse.values
        yield sparse.indices


def _subgraphs(node: NodeProto) -> Iterator[GraphProto]:
    for attr in node.attribute:
        if attr.HasField("g"):
            yield attr.g
        yield from attr.graphs


def _walk(model: ModelProto) -> Iterator[tuple[str, NodeProto | None, TensorProto | None]]:
    """Every node and every tensor of every graph: ('node', n, None) / ('tensor', owner, t).

    Covers the main graph, subgraphs in node attributes, local functions (bodies and attribute
    defaults) and training-info graphs.
    """
    graphs: list[GraphProto] = [model.graph]
    for info in model.training_info:
        graphs += [info.initialization, info.algorithm]
    nodes_lists: list[Sequence[NodeProto]] = [f.node for f in model.functions]
    for f in model.functions:
        for attr in f.attribute_proto:
            for t in _tensors_of_attribute(attr):
                yield "tensor", None, t
            graphs.extend([attr.g] if attr.HasField("g") else [])
            graphs.extend(attr.graphs)
    while graphs:
        g = graphs.pop()
        for t in g.initializer:
            yield "tensor", None, t
        for s in g.sparse_initializer:
            yield "tensor", None, s.values
            yield "tensor", None, s.indices
        nodes_lists.append(g.node)
        while nodes_lists:
            for node in nodes_lists.pop():
                yield "node", node, None
                for attr in node.attribute:
                    for t in _tensors_of_attribute(attr):
                        yield "tensor", node, t
                graphs.extend(_subgraphs(node))


def _constant_shape(model_graph_consts: dict[str, TensorProto], name: str) -> list[int] | None:
    t = model_graph_consts.get(name)
    if t is None or t.data_type != TensorProto.INT64 or len(t.dims) != 1:
        return None
    values = list(t.int64_data) if t.int64_data else None
    if values is None and t.raw_data:
        if len(t.raw_data) != 8 * t.dims[0]:
            return None
        values = [
            int.from_bytes(t.raw_data[i : i + 8], "little", signed=True)
            for i in range(0, len(t.raw_data), 8)
        ]
    return values


def check_model(model_bytes: bytes, limits: Limits) -> ModelProto:
    """Refuse a hostile or malformed ONNX model; return the parsed model when it passes.

    Raises:
        BadRequestError: status 413 when larger than ``limits.max_model_bytes``, else 422, with
            a message naming the rule (never any model content beyond names of tensors/ops).
    """
    model = _check_parsed(model_bytes, limits)
    _run_onnx_checker(model_bytes)
    return model


def check_model_lean(model_bytes: bytes, limits: Limits) -> None:
    """`check_model` holding less memory: the parsed model is freed before step 6 parses the
    bytes again, so at most the bytes and one parsed copy exist at once (about 2x the model,
    not 3x). Same checks, same errors."""
    _check_parsed(model_bytes, limits)
    _run_onnx_checker(model_bytes)


def _check_parsed(model_bytes: bytes, limits: Limits) -> ModelProto:
    """Steps 1-5 on the parsed model."""
    limits.check_model_bytes(len(model_bytes))
    # 1. Parse. onnx.load_from_string never follows external-data references.
    try:
        model = onnx.load_from_string(model_bytes)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise _invalid(f"does not parse as ONNX ({type(exc).__name__})") from None
    if not model.HasField("graph"):
        raise _invalid("no graph")
    if not model.opset_import:
        raise _invalid("no opset_import")

    # 3a. Opset domains.
    local_functions = {(f.domain, f.name) for f in model.functions}
    local_domains = {f.domain for f in model.functions}
    for opset in model.opset_import:
        if opset.domain not in ALLOWED_DOMAINS and opset.domain not in local_domains:
            raise _invalid(f"opset domain {opset.domain!r} is not allowed")

    # Constants whose values we can read statically: initializers and Constant nodes' values.
    consts: dict[str, TensorProto] = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
            for attr in node.attribute:
                if attr.name == "value" and attr.HasField("t"):
                    consts[node.output[0]] = attr.t

    total = 0
    for kind, node, tensor in _walk(model):
        if kind == "node":
            assert node is not None
            # 3b. Operator domains.
            if node.domain not in ALLOWED_DOMAINS and (node.domain, node.op_type) not in (
                local_functions
            ):
                raise _invalid(f"operator {node.domain}::{node.op_type} is not allowed")
            # 5. ConstantOfShape of a constant huge shape.
            if node.op_type == "ConstantOfShape" and node.domain in ("", "ai.onnx") and node.input:
                shape = _constant_shape(consts, node.input[0])
                if shape is not None:
                    itemsize = 4  # float unless its 'value' says otherwise
                    for attr in node.attribute:
                        if attr.name == "value" and attr.HasField("t"):
                            itemsize = math.ceil(_itemsize(attr.t.data_type))
                    try:
                        limits.check_tensor(shape, itemsize, name=f"ConstantOfShape {node.name}")
                    except ApiError as exc:
                        raise _invalid(exc.message) from None
            continue
        assert tensor is not None
        # 2. External data.
        if tensor.data_location == TensorProto.EXTERNAL or len(tensor.external_data) > 0:
            raise _invalid(
                f"tensor {tensor.name!r} references external data; "
                "only self-contained models are accepted"
            )
        # 4. Declared sizes.
        size = _declared_bytes(tensor)
        if size > limits.max_initializer_bytes:
            raise _invalid(
                f"tensor {tensor.name!r} declares {size} bytes, exceeds "
                f"max_initializer_bytes={limits.max_initializer_bytes}"
            )
        total += size
        if total > limits.max_initializers_total_bytes:
            raise _invalid(
                "initializers declare more than "
                f"max_initializers_total_bytes={limits.max_initializers_total_bytes}"
            )

    return model


def _run_onnx_checker(model_bytes: bytes) -> None:
    # 6. The ONNX checker (structure, types, opset versions), given the bytes: handed a parsed
    # model it would serialize it again first, one more copy of the whole model.
    try:
        onnx.checker.check_model(bytes(model_bytes))
    except (onnx.checker.ValidationError, ValueError, RuntimeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _invalid(f"onnx.checker: {first_line[:300]}") from None


def session_options(*, intra_op_threads: int = 0) -> Any:
    """``onnxruntime.SessionOptions`` for untrusted models (arena off, no custom-op libraries)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_cpu_mem_arena = False
    so.intra_op_num_threads = intra_op_threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return so


def create_session(
    model_bytes: bytes,
    limits: Limits,
    *,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    intra_op_threads: int = 0,
    checked: bool = False,
) -> Any:
    """Check `model_bytes` (unless `checked`) and build an ``InferenceSession`` for it.

    Constant folding is disabled so that session creation cannot be made to allocate
    large constants; other graph optimisations stay on. A failure of ONNX Runtime to build the
    session (unsupported op, bad types) becomes a 422.
    """
    import onnxruntime as ort

    if not checked:
        check_model(model_bytes, limits)
    try:
        return ort.InferenceSession(
            model_bytes,
            session_options(intra_op_threads=intra_op_threads),
            providers=list(providers),
            disabled_optimizers=["ConstantFolding"],
        )
    except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _invalid(f"ONNX Runtime refused the model: {message[:300]}") from None


async def run_with_timeout(
    session: Any,
    feeds: Mapping[str, Any],
    timeout_s: float,
    *,
    output_names: Sequence[str] | None = None,
    executor: concurrent.futures.Executor | None = None,
) -> list[Any]:
    """Run `session` in `executor` (default: the loop's) and stop it after `timeout_s` seconds.

    On time-out the run is terminated (ONNX Runtime stops at the next node boundary, so one very
    long node still finishes first) and an `ApiError` with status 504 is raised, naming
    ``request_timeout_s``.
    """
    import onnxruntime as ort

    run_options = ort.RunOptions()
    loop = asyncio.get_running_loop()
    future = loop.run_in_executor(
        executor,
        lambda: session.run(list(output_names) if output_names else None, dict(feeds), run_options),
    )
    try:
        outputs: list[Any] = await asyncio.wait_for(asyncio.shield(future), timeout_s)
    except TimeoutError:
        run_options.terminate = True
        # ORT raises once it notices; swallow that so no "exception never retrieved" is logged.
        future.add_done_callback(lambda f: f.exception())
        raise api_error_for_status(
            504, f"inference exceeded request_timeout_s={timeout_s:g}"
        ) from None
    return outputs
