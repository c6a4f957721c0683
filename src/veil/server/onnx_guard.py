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
4. an initializer or constant whose *declared* size (shape x element size; a sparse tensor
   counts as the dense tensor ONNX Runtime builds from it) exceeds ``max_initializer_bytes``,
   whose declared total exceeds ``max_initializers_total_bytes`` (422), or exceeds
   ``max_load_ratio`` times the model's size (413: a few bytes of sparse tensor, a gigabyte dense);
5. a graph of more than ``max_graph_nodes`` nodes once local functions are inlined, as ONNX
   Runtime does (nested functions double per level), or a local function calling itself; then
   a ``ConstantOfShape``, ``Expand``, ``Tile`` or ``Reshape`` whose shape is a constant above
   ``max_tensor_elements`` / ``max_tensor_bytes``: constants are initializers and ``Constant``
   nodes (``value`` or ``value_ints``) of the same or an outer scope, followed into local
   functions through their arguments;
6. whatever ``onnx.checker.check_model`` refuses.

Every graph is walked: subgraphs of ``If``/``Loop``/``Scan``, local function bodies and
attribute defaults, training-info graphs.

These checks run in the admission child process (`veil.server.admission`), which also measures
what the model costs loaded. `create_session` builds the ``InferenceSession`` with the CPU memory
arena off (freed memory goes back to the system) and ONNX Runtime's constant folding disabled:
constant folding runs *at session creation* and would materialise a ``ConstantOfShape`` of up to
1 GiB per node (ORT's own cap) before any request arrives. Outputs are capped when a run returns
(`veil.server.models`); what a graph allocates while it runs is bounded only by the request
limits and the time-out: hard memory containment of a running graph needs a memory limit on the
server (a cgroup), which is left to the deployment. `run_with_timeout` bounds a run's time: past
``request_timeout_s`` it tells ONNX Runtime to stop (``RunOptions.terminate``, checked between
nodes) and answers 504.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import math
import os
import re
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, final

import onnx
from onnx import (
    AttributeProto,
    FunctionProto,
    GraphProto,
    ModelProto,
    NodeProto,
    SparseTensorProto,
    TensorProto,
)

from veil.errors import ApiError, api_error_for_status
from veil.server.allocator import ConsumedPages
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


def _sparse_dense_bytes(s: SparseTensorProto) -> int:
    if any(d < 0 for d in s.dims):
        raise _invalid(f"sparse tensor {s.values.name!r} has a negative dimension")
    return max(
        math.ceil(math.prod(int(d) for d in s.dims) * _itemsize(s.values.data_type)),
        _declared_bytes(s.values),
    )


def _tensors_of_attribute(
    attr: AttributeProto,
) -> Iterator[tuple[TensorProto | None, SparseTensorProto | None]]:
    if attr.HasField("t"):
        yield attr.t, None
    for t in attr.tensors:
        yield t, None
    if attr.HasField("sparse_tensor"):
        yield None, attr.sparse_tensor
    for sparse in attr.sparse_tensors:
        yield None, sparse


def _subgraphs(node: NodeProto) -> Iterator[GraphProto]:
    for attr in node.attribute:
        if attr.HasField("g"):
            yield attr.g
        yield from attr.graphs


_Item = tuple[NodeProto | None, TensorProto | None, SparseTensorProto | None]


def _walk(model: ModelProto) -> Iterator[_Item]:
    """Every node and every tensor of every graph, once: (node, None, None) for a node,
    (owner, tensor, None) / (owner, None, sparse) for a tensor (owner None outside nodes).

    Covers the main graph, subgraphs in node attributes, local functions (bodies and attribute
    defaults) and training-info graphs.
    """
    graphs: list[GraphProto] = [model.graph]
    for info in model.training_info:
        graphs += [info.initialization, info.algorithm]
    nodes_lists: list[Sequence[NodeProto]] = [f.node for f in model.functions]
    for f in model.functions:
        for attr in f.attribute_proto:
            for t, sparse in _tensors_of_attribute(attr):
                yield None, t, sparse
            graphs.extend([attr.g] if attr.HasField("g") else [])
            graphs.extend(attr.graphs)
    while graphs or nodes_lists:
        if graphs:
            g = graphs.pop()
            for t in g.initializer:
                yield None, t, None
            for s in g.sparse_initializer:
                yield None, None, s
            nodes_lists.append(g.node)
        while nodes_lists:
            for node in nodes_lists.pop():
                yield node, None, None
                for attr in node.attribute:
                    for t, sparse in _tensors_of_attribute(attr):
                        yield node, t, sparse
                graphs.extend(_subgraphs(node))


def _int_vector(t: TensorProto) -> list[int] | None:
    """The values of a 1-D INT64 tensor, or None when it is anything else."""
    if t.data_type != TensorProto.INT64 or len(t.dims) != 1:
        return None
    if t.int64_data:
        return [int(v) for v in t.int64_data]
    if len(t.raw_data) != 8 * t.dims[0]:
        return None
    return [
        int.from_bytes(t.raw_data[i : i + 8], "little", signed=True)
        for i in range(0, len(t.raw_data), 8)
    ]


def _constant_vectors(nodes: Sequence[NodeProto]) -> dict[str, list[int]]:
    """Outputs of ``Constant`` nodes holding a 1-D int64 value (``value`` or ``value_ints``)."""
    found: dict[str, list[int]] = {}
    for node in nodes:
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or not node.output:
            continue
        for attr in node.attribute:
            if attr.name == "value" and attr.HasField("t"):
                vector = _int_vector(attr.t)
                if vector is not None:
                    found[node.output[0]] = vector
            elif attr.name == "value_ints":
                found[node.output[0]] = [int(v) for v in attr.ints]
    return found


def _graph_vectors(g: GraphProto, outer: Mapping[str, list[int]]) -> dict[str, list[int]]:
    scope = dict(outer)  # a subgraph sees its outer scope's names
    for t in g.initializer:
        vector = _int_vector(t)
        if vector is not None:
            scope[t.name] = vector
    scope.update(_constant_vectors(g.node))
    return scope


_FunctionKey = tuple[str, str]


def _callee(
    node: NodeProto, functions: Mapping[_FunctionKey, FunctionProto]
) -> _FunctionKey | None:
    key = (node.domain, node.op_type)
    return key if key in functions else None


def _own_nodes(
    nodes: Sequence[NodeProto], functions: Mapping[_FunctionKey, FunctionProto]
) -> tuple[int, list[_FunctionKey]]:
    """Nodes of `nodes` and their subgraphs that are not calls, and the calls made."""
    own, calls = 0, []
    for node in nodes:
        key = _callee(node, functions)
        if key is None:
            own += 1
        else:
            calls.append(key)
        for g in _subgraphs(node):
            sub_own, sub_calls = _own_nodes(g.node, functions)
            own += sub_own
            calls += sub_calls
    return own, calls


def expanded_node_count(model: ModelProto, limit: int) -> int:
    """Nodes of the main graph once every local function call is replaced by its body, as
    ONNX Runtime inlines them; capped at ``limit + 1``. Nested functions (``f_k`` calling
    ``f_{k-1}`` twice) grow this exponentially in the model's size, which is what is bounded.

    Raises:
        BadRequestError: (422) a local function calls itself, directly or not.
    """
    functions = {(f.domain, f.name): f for f in model.functions}
    cost: dict[_FunctionKey, int] = {}
    on_path: set[_FunctionKey] = set()
    for root in functions:
        # Depth-first without recursion: call chains can be as deep as the model is long.
        stack: list[tuple[_FunctionKey, bool]] = [(root, False)]
        while stack:
            key, finished = stack.pop()
            own, calls = _own_nodes(functions[key].node, functions)
            if finished:
                cost[key] = min(limit + 1, own + sum(cost[c] for c in calls))
                on_path.discard(key)
                continue
            if key in cost:
                continue
            if key in on_path:
                raise _invalid(f"local function {key[1]!r} calls itself")
            on_path.add(key)
            stack.append((key, True))
            stack.extend((c, False) for c in calls if c not in cost)
    own, calls = _own_nodes(model.graph.node, functions)
    return min(limit + 1, own + sum(cost[c] for c in calls))


# Operators whose output size is set by a constant input: (input index, what it holds).
_SHAPE_INPUTS = {"ConstantOfShape": 0, "Expand": 1, "Tile": 1, "Reshape": 1}


def _check_shape_node(node: NodeProto, vector: list[int], limits: Limits) -> None:
    itemsize = 1  # the element type of Expand/Tile/Reshape inputs is not known statically
    dims = vector
    if node.op_type == "ConstantOfShape":
        itemsize = 4  # float unless its 'value' says otherwise
        for attr in node.attribute:
            if attr.name == "value" and attr.HasField("t"):
                itemsize = math.ceil(_itemsize(attr.t.data_type))
    elif node.op_type == "Reshape":
        dims = [d for d in vector if d > 0]  # 0 copies a dimension, -1 infers one
    elif any(d < 0 for d in vector):
        return  # ONNX Runtime refuses a negative shape or repeat count itself
    try:
        limits.check_tensor(dims, itemsize, name=f"{node.op_type} {node.name}".rstrip())
    except ApiError as exc:
        raise _invalid(exc.message) from None


def _check_constant_shapes(model: ModelProto, limits: Limits) -> None:
    """Refuse operators whose output size comes from a constant shape above the tensor limits.

    Constants are initializers, ``Constant`` nodes (``value`` or ``value_ints``) of the same or
    an outer scope, and constant arguments of a local function call, followed into the body.
    Bodies are walked once per call, which `expanded_node_count` has already bounded.
    """
    functions = {(f.domain, f.name): f for f in model.functions}
    scopes: list[tuple[Sequence[NodeProto], dict[str, list[int]]]] = [
        (model.graph.node, _graph_vectors(model.graph, {}))
    ]
    while scopes:
        nodes, vectors = scopes.pop()
        for node in nodes:
            index = _SHAPE_INPUTS.get(node.op_type)
            if index is not None and node.domain in ("", "ai.onnx") and len(node.input) > index:
                vector = vectors.get(node.input[index])
                if vector is not None:
                    _check_shape_node(node, vector, limits)
            key = _callee(node, functions)
            if key is not None:
                body = functions[key]
                bound = {
                    formal: vectors[actual]
                    for formal, actual in zip(body.input, node.input, strict=False)
                    if actual in vectors
                }
                bound.update(_constant_vectors(body.node))
                scopes.append((body.node, bound))
            for g in _subgraphs(node):
                scopes.append((g.node, _graph_vectors(g, vectors)))


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

    total = 0
    for node, tensor, sparse in _walk(model):
        if node is not None and tensor is None and sparse is None:
            # 3b. Operator domains.
            if node.domain not in ALLOWED_DOMAINS and (node.domain, node.op_type) not in (
                local_functions
            ):
                raise _invalid(f"operator {node.domain}::{node.op_type} is not allowed")
            continue
        stored_parts = [tensor] if tensor is not None else []
        if sparse is not None:
            stored_parts += [sparse.values, sparse.indices]
        # 2. External data.
        for stored in stored_parts:
            if stored.data_location == TensorProto.EXTERNAL or len(stored.external_data) > 0:
                raise _invalid(
                    f"tensor {stored.name!r} references external data; "
                    "only self-contained models are accepted"
                )
        # 4. Declared sizes: a sparse tensor counts as the dense tensor ONNX Runtime builds.
        if sparse is not None:
            name, size = sparse.values.name, _sparse_dense_bytes(sparse)
        else:
            name, size = stored_parts[0].name, _declared_bytes(stored_parts[0])
        if size > limits.max_initializer_bytes:
            raise _invalid(
                f"tensor {name!r} declares {size} bytes, exceeds "
                f"max_initializer_bytes={limits.max_initializer_bytes}"
            )
        total += size
        if total > limits.max_initializers_total_bytes:
            raise _invalid(
                "initializers declare more than "
                f"max_initializers_total_bytes={limits.max_initializers_total_bytes}"
            )

    # 4b. Sparse tensors decompress: what they declare against what was sent.
    limits.check_load_ratio(total, len(model_bytes), what="tensors declare")

    # 5. Graph size after function expansion, then constant shapes (walks that expansion).
    nodes = expanded_node_count(model, limits.max_graph_nodes)
    if nodes > limits.max_graph_nodes:
        raise _invalid(
            f"graph expands to more than max_graph_nodes={limits.max_graph_nodes} nodes "
            "(local functions inlined)"
        )
    _check_constant_shapes(model, limits)

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
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Intra-op threads spin after each run by default: on a small machine they steal the cores
    # the event loop needs to decode the next request (DistilBERT seq 8 on 2 busy cores:
    # 23.9 ms spinning, 12.6 ms not).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    # Only ONNX: the ORT flatbuffer format, which bytes could otherwise select, is not what the
    # guard parsed.
    so.add_session_config_entry("session.load_model_format", "ONNX")
    return so


ModelBytes = bytes | bytearray | memoryview


@final
class Handover:
    """Model bytes given up by their holder, to be read once more and freed.

    `create_session` streams handed-over bytes to ONNX Runtime and drops them as soon as it has
    read them, before it builds the model's tensors: the server then holds the serialized model
    and the parsed one at once, then the parsed one and the tensors, never all three. Whoever
    hands bytes over keeps no other reference to them (or the memory stays, harmlessly).
    """

    __slots__ = ("_data", "_size")

    def __init__(self, data: ModelBytes) -> None:
        self._data: ModelBytes | None = data
        self._size = len(data)

    def __len__(self) -> int:
        return self._size

    def __repr__(self) -> str:
        state = "held" if self._data is not None else "taken"
        return f"Handover({self._size} bytes, {state})"

    def view(self) -> ModelBytes:
        """The bytes, still held here (to store or hash them first; keep no reference)."""
        if self._data is None:
            raise RuntimeError("the model bytes were taken already")
        return self._data

    def take(self) -> ModelBytes:
        """The bytes; from now on the caller holds the only reference."""
        data = self.view()
        self._data = None
        return data


_FEED_CHUNK = 1 << 20
_PIPE_PATH = re.compile(r"/proc/self/fd/[0-9]+")


def _write_all(fd: int, data: ModelBytes, pages: ConsumedPages | None, held: int) -> None:
    """Write `data` to the pipe `fd`, which holds at most `held` bytes: telling `pages` (of
    `data`) what its reader has taken out, i.e. all but the last `held` bytes written."""
    with memoryview(data) as view, view.cast("B") as flat:
        offset = 0
        while offset < len(flat):
            offset += os.write(fd, flat[offset : offset + _FEED_CHUNK])
            if pages is not None:
                pages.consumed(offset - held)


def _streamed_session(box: list[ModelBytes], build: Any) -> Any:
    """``build(path)`` on a pipe that the bytes in `box` are written into by another thread,
    which drops them once written: ONNX Runtime parses a model given as a path from the stream,
    where one given as bytes is first copied whole (its Python binding takes a string). Bytes
    held by nothing else (a `Handover`'s) are released page by page as they are written, so
    the serialized model shrinks while ONNX Runtime's parsed copy grows.

    If ONNX Runtime could not read the pipe at all (no ``/proc/self/fd`` on this platform), the
    bytes were not dropped, and the session is built from them as bytes instead.
    """
    read_fd, write_fd = os.pipe()
    with contextlib.suppress(OSError, AttributeError):  # fewer hand-offs; Linux only
        fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, _FEED_CHUNK)
    try:
        held: int | None = fcntl.fcntl(write_fd, fcntl.F_GETPIPE_SZ)
    except (OSError, AttributeError):
        held = None  # how much the pipe holds is unknown: release nothing
    fed = threading.Event()

    def feed() -> None:
        data = box.pop()
        # Held by this frame alone (and getrefcount's argument): no one can read it after.
        sole = sys.getrefcount(data) == 2
        release = sole and held is not None
        pages = ConsumedPages(data) if release and isinstance(data, bytearray) else None
        try:
            # Only bytes that left the pipe are released: a reader took them, and that can only
            # be ONNX Runtime. If it never opened the path, nothing is released, and the bytes
            # are still whole for the fall-back below.
            _write_all(write_fd, data, pages, held or 0)
            fed.set()
        except OSError:  # the reader stopped (a model it refused, or a path it cannot open)
            if pages is None or not pages.released:
                box.append(data)  # intact: it can be loaded from bytes
        finally:
            os.close(write_fd)
            del data

    feeder = threading.Thread(target=feed, name="veil-model-feed", daemon=True)
    feeder.start()
    try:
        try:
            return build(f"/proc/self/fd/{read_fd}")
        finally:
            os.close(read_fd)  # a feeder still writing gets EPIPE and keeps the bytes
            feeder.join()
    except Exception:
        if fed.is_set() or not box:
            raise  # ONNX Runtime read the whole model: its error stands
    # ONNX Runtime stopped reading: refusing the model, or unable to open the path at all. From
    # bytes it either loads it or refuses it with its own reason.
    return build(bytes(box.pop()))


def create_session(
    model: ModelBytes | Handover,
    limits: Limits,
    *,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    intra_op_threads: int = 0,
    checked: bool = False,
) -> Any:
    """Check `model` (unless `checked`) and build an ``InferenceSession`` for it.

    Constant folding is disabled so that session creation cannot be made to allocate
    large constants; other graph optimisations stay on. A failure of ONNX Runtime to build the
    session (unsupported op, bad types) becomes a 422. A `Handover` is consumed: its bytes are
    freed once ONNX Runtime has read them.
    """
    import onnxruntime as ort

    box = [model.take() if isinstance(model, Handover) else model]
    del model
    if not checked:
        check_model(bytes(box[0]), limits)
    options = session_options(intra_op_threads=intra_op_threads)

    def build(source: str | bytes) -> Any:
        return ort.InferenceSession(
            source, options, providers=list(providers), disabled_optimizers=["ConstantFolding"]
        )

    try:
        session = _streamed_session(box, build)
    except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        message = _PIPE_PATH.sub("the model", message)
        raise _invalid(f"ONNX Runtime refused the model: {message[:300]}") from None
    _drop_model_bytes(session)
    return session


def _drop_model_bytes(session: Any) -> None:
    """Let go of the serialized model ONNX Runtime's Python wrapper keeps for the session's life.

    The C++ session holds its own tensors; the wrapper keeps the bytes only to build the session
    again on an execution-provider fallback, which a CPU-only session never does (its source
    says as much: "holding the memory indefinitely"). Kept, they double a loaded model's memory
    and keep the upload's buffer alive after it was stored.
    """
    if getattr(session, "_model_bytes", None) is not None:
        session._model_bytes = None


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
