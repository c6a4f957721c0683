"""ONNX Runtime sessions: admit a model, load it, check inputs against it, run it.

A model is admitted by a child process first (`veil.server.admission`), then loaded here from
the graph the child accepted. Inputs are viewed in place (``np.frombuffer``), checked for name,
type, rank and fixed dimensions, and handed to ONNX Runtime; each output is checked against
``max_tensor_bytes`` / ``max_tensor_elements`` as soon as the run returns, before it is copied
or encoded, and the copy and encoding happen inside the request's time-out, off the event loop.

Isolation: each model runs one ONNX Runtime call at a time (its batcher), on a pool shared by
all models of ``max_concurrent_runs`` threads, so a model stuck in one long operator (which
``RunOptions.terminate`` cannot interrupt: it acts between nodes) holds one thread and the
other models keep theirs; a run longer than ``demote_runs_after_s`` is demoted to the lowest CPU
priority, with its session's worker threads (`veil.server.demotion`), so that the other models
also keep the cores. No tensor content is ever logged or put in an error message.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sys
import threading
import time
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from veil.errors import (
    ApiError,
    BadRequestError,
    ConflictError,
    NotFoundError,
    ServiceUnavailableError,
    TensorError,
    api_error_for_status,
)
from veil.server.admission import AdmittedModel, Admitter
from veil.server.allocator import note_unload
from veil.server.batching import BatchingConfig, DynamicBatcher, has_dynamic_batch_axis
from veil.server.demotion import WATCHDOG, HeavyFlag, capture_new_threads
from veil.server.limits import Limits
from veil.server.onnx_guard import Handover, ModelBytes, create_session
from veil.server.store import scoped_key
from veil.tensors import (
    DatumType,
    WireTensor,
    datum_type_from_onnx,
    datum_type_of,
    decode_array,
    format_shape,
)

__all__ = ["LoadedModel", "ModelRegistry", "TensorSpec", "cost_of", "load_model"]

Dim = int | None
# A session's own overhead (ORT thread pools, arenas) measured 1.0-1.1 MiB for a 10 kB model.
MEASUREMENT_NOISE_BYTES = 8 << 20
_T = typing.TypeVar("_T")
# Outputs up to this many bytes in all are encoded on the event loop (as small request bodies
# are decoded there, veil.server.app).
_INLINE_FINISH_BYTES = 4 << 10
# Byte orders an output leaves in as it is: little-endian on the wire ("|": single bytes).
_LITTLE_ENDIAN = ("<", "|", "=") if sys.byteorder == "little" else ("<", "|")


def _small(results: Sequence[Any]) -> bool:
    total = 0
    for value in results:
        if not isinstance(value, np.ndarray):
            return False
        total += value.nbytes
    return total <= _INLINE_FINISH_BYTES


def cost_of(size: int, loaded_bytes: int) -> int:
    """`LoadedModel.cost` of a graph of `size` bytes that admission measured at `loaded_bytes`."""
    return size if loaded_bytes <= size + MEASUREMENT_NOISE_BYTES else loaded_bytes


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A model input or output: name, element type, dimensions (None where dynamic)."""

    name: str
    datum_type: DatumType
    shape: tuple[Dim, ...]
    # The model's names for its dynamic dimensions ("batch"), None where it has none: messages
    # show [batch, 8] rather than [-1, 8].
    dim_names: tuple[str | None, ...] = ()

    def shown_shape(self) -> str:
        names = self.dim_names or (None,) * len(self.shape)
        return format_shape(
            [name if d is None and name else d for d, name in zip(self.shape, names, strict=True)]
        )

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "datum_type": int(self.datum_type), "shape": list(self.shape)}


def _spec(node: Any, role: str) -> TensorSpec:
    datum_type = datum_type_from_onnx(node.type)
    if datum_type is None:
        raise BadRequestError(
            422,
            f"invalid model: {role} {node.name!r} has type {node.type}, "
            f"the protocol carries {', '.join(t.label for t in DatumType)}",
        )
    dims = tuple(node.shape or ())
    shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in dims)
    names = tuple(d if isinstance(d, str) and d else None for d in dims)
    return TensorSpec(node.name, datum_type, shape, names)


class _InFlight:
    """The ONNX Runtime call running now for one model: when it started, how to stop it."""

    __slots__ = ("options", "started")

    def __init__(self, options: ort.RunOptions, started: float) -> None:
        self.options = options
        self.started = started


@dataclass(frozen=True, slots=True, eq=False)
class LoadedModel:
    """A model ready to run.

    Predictions go through `predict` (the event loop): concurrent requests with compatible
    shapes are merged by the model's `DynamicBatcher` when the model has a free batch axis, and
    each request is bounded by a time-out. `run` is the plain blocking path, one request alone.
    """

    model_id: str
    model_name: str
    model_hash: bytes
    size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    session: ort.InferenceSession
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    # The key id that uploaded it (None: authentication off): ids are unique per owner.
    owner: str | None = None
    executor: Executor | None = None
    # Resident bytes the session cost when admitted (0: not measured) and the output limits.
    loaded_bytes: int = 0
    limits: Limits = field(default_factory=Limits)
    # Native ids of the session's intra-op worker threads (demoted with a long run).
    session_tids: frozenset[int] = frozenset()
    heavy: HeavyFlag = field(default_factory=HeavyFlag)
    # Made in __post_init__ (frozen: set through object.__setattr__).
    batcher: DynamicBatcher = field(init=False)
    _inflight: list[_InFlight | None] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_inflight", [None])
        object.__setattr__(
            self,
            "batcher",
            DynamicBatcher(
                self._run_feeds,
                config=self.batching,
                dynamic_batch_axis=has_dynamic_batch_axis(
                    self.session.get_inputs(), self.session.get_outputs()
                ),
                executor=self.executor,
            ),
        )

    def __repr__(self) -> str:
        return f"LoadedModel(model_id={self.model_id!r}, hash={self.model_hash.hex()})"

    @property
    def key(self) -> str:
        """Owner and id (`veil.server.store.scoped_key`): unique among the loaded models."""
        return scoped_key(self.owner, self.model_id)

    @property
    def cost(self) -> int:
        """Bytes the storage quota counts: the measured loaded size, at least the model's.

        Resident memory moves by pages, allocator noise and each session's fixed overhead (about
        1 MiB): a measured size within `MEASUREMENT_NOISE_BYTES` of the model's is counted as the
        model's, so that the quota of ordinary models does not depend on either.
        """
        return cost_of(self.size, self.loaded_bytes)

    def feeds(self, tensors: Sequence[WireTensor]) -> dict[str, npt.NDArray[Any]]:
        """Match request tensors to the model's inputs and view them as arrays.

        Named tensors go to that input; unnamed ones fill the inputs in order.

        Raises:
            BadRequestError: (422) unknown, missing or repeated inputs, wrong type or shape.
        """
        expected = ", ".join(spec.name for spec in self.inputs)
        if len(tensors) != len(self.inputs):
            raise BadRequestError(
                422, f"inputs: got {len(tensors)}, expected {len(self.inputs)} ({expected})"
            )
        by_name = {spec.name: spec for spec in self.inputs}
        feeds: dict[str, npt.NDArray[Any]] = {}
        for position, tensor in enumerate(tensors):
            if tensor.name is None:
                spec = self.inputs[position]
            elif tensor.name in by_name:
                spec = by_name[tensor.name]
            else:
                raise BadRequestError(
                    422, f"input {tensor.name!r}: no such input, expected one of {expected}"
                )
            if spec.name in feeds:
                raise BadRequestError(422, f"input {spec.name!r}: given twice")
            feeds[spec.name] = self._check(spec, tensor)
        return feeds

    @staticmethod
    def _check(spec: TensorSpec, tensor: WireTensor) -> npt.NDArray[Any]:
        if tensor.datum_type != spec.datum_type:
            raise BadRequestError(
                422,
                f"input {spec.name!r}: dtype got {tensor.datum_type.label}, "
                f"expected {spec.datum_type.label}",
            )
        fits = len(tensor.shape) == len(spec.shape) and all(
            want is None or want == got for got, want in zip(tensor.shape, spec.shape, strict=True)
        )
        if not fits:
            raise BadRequestError(
                422,
                f"input {spec.name!r}: shape got {format_shape(tensor.shape)}, "
                f"expected {spec.shown_shape()}",
            )
        try:
            return decode_array(tensor.data, tensor.datum_type, tensor.shape)
        except TensorError as exc:
            raise BadRequestError(422, f"input {spec.name!r}: {exc}") from None

    def _run_feeds(self, feeds: dict[str, npt.NDArray[Any]]) -> list[npt.NDArray[Any]]:
        """One ONNX Runtime call (worker thread; the batcher never makes two at once)."""
        names = [spec.name for spec in self.outputs]
        options = ort.RunOptions()
        self._inflight[0] = _InFlight(options, time.monotonic())
        watched = WATCHDOG.start(self.session_tids, self.heavy, self.limits.demote_runs_after_s)
        try:
            results: list[npt.NDArray[Any]] = self.session.run(names, feeds, options)
        except Exception as exc:
            if options.terminate:
                raise api_error_for_status(504, "inference stopped: request_timeout_s") from None
            # ONNX Runtime refuses inputs that pass the declared shapes but not the graph (two
            # dynamic dims that must agree, a Reshape that cannot apply). Its messages name
            # nodes and dims, never tensor values.
            detail = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            raise BadRequestError(422, f"inference failed: {detail}") from None
        finally:
            WATCHDOG.end(watched)
            self._inflight[0] = None
        return results

    def _wire(self, results: Sequence[Any]) -> list[WireTensor]:
        """Outputs as wire tensors, each checked against the tensor limits before its copy."""
        for spec, value in zip(self.outputs, results, strict=True):
            try:
                self.limits.check_tensor(value.shape, value.dtype.itemsize, name=spec.name)
            except ApiError as exc:
                raise BadRequestError(422, f"model output: {exc.message}") from None
        outputs = []
        for spec, value in zip(self.outputs, results, strict=True):
            array = np.asarray(value)
            datum_type = datum_type_of(array.dtype)
            if not (array.flags.c_contiguous and array.dtype.byteorder in _LITTLE_ENDIAN):
                # Not np.ascontiguousarray: it turns a scalar output (shape []) into shape [1].
                array = np.asarray(array, dtype=array.dtype.newbyteorder("<"), order="C")
            outputs.append(WireTensor(tuple(array.shape), datum_type, spec.name, array.tobytes()))
        return outputs

    def run(self, tensors: Sequence[WireTensor]) -> list[WireTensor]:
        """Run the model on one request alone (blocking: call it from a worker thread)."""
        return self._wire(self._run_feeds(self.feeds(tensors)))

    async def predict(self, tensors: Sequence[WireTensor], timeout_s: float) -> list[WireTensor]:
        """Run one request through the model's batcher, within `timeout_s` (event loop).

        Past `timeout_s` the request is withdrawn: still queued, it never runs; in the ONNX
        Runtime call running now, that call is stopped (``RunOptions.terminate``) once no request
        in it can still be waiting, i.e. `timeout_s` after it started, and the batcher reruns
        alone any other request it held that is still waiting.

        Raises:
            BadRequestError: (422) inputs that do not fit the model, or that it refuses.
            ApiError: (504) the time-out passed, naming ``request_timeout_s``.
        """
        return await self._predict(tensors, timeout_s, self._wire)

    async def predict_encoded(
        self,
        tensors: Sequence[WireTensor],
        timeout_s: float,
        encode: Callable[[list[WireTensor]], bytes],
    ) -> bytes:
        """`predict`, then `encode` the outputs, all within `timeout_s` (a reply body)."""
        return await self._predict(tensors, timeout_s, lambda results: encode(self._wire(results)))

    async def _predict(
        self,
        tensors: Sequence[WireTensor],
        timeout_s: float,
        finish: Callable[[list[npt.NDArray[Any]]], _T],
    ) -> _T:
        feeds = self.feeds(tensors)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout_s):
                results = await self.batcher.submit(feeds)
                if _small(results):
                    # Copied and encoded in less time than a hop to a thread and back costs.
                    return finish(results)
                # Off the event loop: copying and encoding outputs takes time per byte.
                return await loop.run_in_executor(None, finish, results)
        except RuntimeError:
            if self.batcher.closed:  # deleted while this request was on its way
                raise NotFoundError(404, f"unknown model id {self.model_id!r}") from None
            raise
        except TimeoutError:
            self._stop_stale_run(timeout_s)
            raise api_error_for_status(
                504, f"inference exceeded request_timeout_s={timeout_s:g}"
            ) from None

    def _stop_stale_run(self, timeout_s: float) -> None:
        # Every request in a run was queued before it started, so `timeout_s` after its start
        # none is still waiting: then stop it. Earlier, other requests in it may still have time.
        inflight = self._inflight[0]
        if inflight is None:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, inflight.started + timeout_s - time.monotonic())

        def stop() -> None:
            if self._inflight[0] is inflight:
                inflight.options.terminate = True

        if delay == 0.0:
            stop()
        else:
            loop.call_later(delay, stop)

    async def close(self) -> None:
        """Refuse new predictions and let the queued ones finish."""
        await self.batcher.close()
        note_unload()


def load_model(
    blob: ModelBytes | Handover,
    *,
    model_id: str,
    model_name: str,
    threads: int,
    model_hash: bytes | None = None,
    batching: BatchingConfig | None = None,
    executor: Executor | None = None,
    limits: Limits | None = None,
    loaded_bytes: int = 0,
    owner: str | None = None,
) -> LoadedModel:
    """Build an ONNX Runtime session from model bytes already admitted (blocking).

    `batching` configures the model's `DynamicBatcher` (default `BatchingConfig()`); `executor`
    is where its ONNX Runtime calls run (the event loop's default executor if None); `limits`
    bound its outputs; `loaded_bytes` is what admission measured. Untrusted bytes are admitted
    first (`ModelRegistry.admitter`), then loaded with `ModelRegistry.load_admitted`. Bytes
    handed over are freed once ONNX Runtime has read them (`veil.server.onnx_guard.Handover`).

    Raises:
        BadRequestError: (422) the bytes are not a model ONNX Runtime can load, or it has inputs
            or outputs of a type the protocol cannot carry.
    """
    limits = limits if limits is not None else Limits()
    size = len(blob)
    if model_hash is None:
        model_hash = hashlib.sha256(blob.view() if isinstance(blob, Handover) else blob).digest()
    session, session_tids = capture_new_threads(
        lambda: create_session(blob, limits, intra_op_threads=threads, checked=True)
    )
    inputs = tuple(_spec(node, "input") for node in session.get_inputs())
    outputs = tuple(_spec(node, "output") for node in session.get_outputs())
    return LoadedModel(
        model_id=model_id,
        model_name=model_name,
        model_hash=model_hash,
        size=size,
        inputs=inputs,
        outputs=outputs,
        session=session,
        session_tids=session_tids,
        batching=batching if batching is not None else BatchingConfig(),
        executor=executor,
        loaded_bytes=loaded_bytes,
        limits=limits,
        owner=owner,
    )


class ModelRegistry:
    """The loaded models by key (owner and id, `LoadedModel.key`); safe to use from the event
    loop and worker threads.

    `executor` is where every model's ONNX Runtime calls run: ``max_concurrent_runs`` threads
    shared by all models, each model using at most one at a time (its batcher), so one model
    stuck in a long operator does not stall the others. `admitter` admits new models.
    """

    def __init__(self, models: Iterable[LoadedModel] = (), *, limits: Limits | None = None) -> None:
        self.limits = limits if limits is not None else Limits()
        self.executor: Executor = ThreadPoolExecutor(
            max_workers=self.limits.max_concurrent_runs, thread_name_prefix="veil-ort"
        )
        self.admitter = Admitter(self.limits)
        self._lock = threading.Lock()
        # Loaded models by key, least recently used first (`get` and `lease` move one to the end).
        self._models: dict[str, LoadedModel] = {m.key: m for m in models}
        self._reserved: set[str] = set()
        # Evicted under the memory budget: their description, until they are loaded again.
        self._evicted: dict[str, Mapping[str, Any]] = {}
        self._evicted_cost: dict[str, int] = {}
        self._leases: dict[str, int] = {}
        self._room_reserved = 0  # budget bytes held for models being loaded
        self.on_run: Callable[[int, int], None] | None = None
        """Given to the batcher of every model added from now on (`DynamicBatcher.on_run`)."""

    def load_admitted(
        self,
        admitted: AdmittedModel,
        *,
        model_id: str,
        model_name: str,
        threads: int,
        model_hash: bytes,
        batching: BatchingConfig | None = None,
        owner: str | None = None,
    ) -> LoadedModel:
        """Load the graph `admitter` accepted (blocking); `model_hash` is the upload's (what
        the client pins, whatever graph admission returned). The model is not added.

        Raises:
            BadRequestError: (422) ONNX Runtime refuses the graph.
        """
        return load_model(
            admitted.graph,
            model_id=model_id,
            model_name=model_name,
            threads=threads,
            model_hash=model_hash,
            batching=batching,
            executor=self.executor,
            limits=self.limits,
            loaded_bytes=admitted.loaded_bytes,
            owner=owner,
        )

    def reserve(self, owner: str | None, model_id: str) -> None:
        """Claim `owner`'s id for an upload in progress. Only the owner's own models count:
        whether another owner uses the id is never told.

        Raises:
            ConflictError: (409) the owner's id is taken or being uploaded.
        """
        key = scoped_key(owner, model_id)
        with self._lock:
            if key in self._models or key in self._reserved:
                raise ConflictError(409, f"model id {model_id!r} is already taken")
            self._reserved.add(key)

    def release(self, owner: str | None, model_id: str) -> None:
        with self._lock:
            self._reserved.discard(scoped_key(owner, model_id))

    def add(self, model: LoadedModel, *, room: int = 0) -> None:
        """Serve `model`; `room` is what `make_room` reserved for it (now counted as loaded)."""
        model.batcher.on_run = self.on_run
        with self._lock:
            self._reserved.discard(model.key)
            self._evicted.pop(model.key, None)
            self._evicted_cost.pop(model.key, None)
            self._models[model.key] = model
            self._room_reserved -= room

    def costs(self) -> dict[str, int]:
        """`LoadedModel.cost` of every model, loaded or evicted, by key."""
        with self._lock:
            return {**self._evicted_cost, **{k: m.cost for k, m in self._models.items()}}

    @property
    def loaded_cost(self) -> int:
        """What the loaded models cost together (`LoadedModel.cost`), as the budget counts."""
        with self._lock:
            return sum(m.cost for m in self._models.values())

    def make_room(self, cost: int, *, evict: bool = True) -> list[LoadedModel]:
        """Reserve `cost` bytes of ``models_memory_budget_bytes`` for a model about to be
        loaded, evicting the least recently used loaded models that no request holds
        (`lease`) until it fits; returns the evicted ones (their descriptions stay listed). The
        caller passes `cost` to `add`, or to `release_room` if the load fails. Without `evict`
        (a store that cannot load a model again) nothing is evicted.

        Raises:
            ApiError: 413 when the model alone exceeds the budget; 503 (with ``Retry-After``)
                when the models in use leave no room now.
        """
        budget = self.limits.models_memory_budget_bytes
        if cost > budget:
            raise api_error_for_status(
                413, f"model costs {cost} bytes loaded, over models_memory_budget_bytes={budget}"
            )
        evicted: list[LoadedModel] = []
        with self._lock:
            used = sum(m.cost for m in self._models.values()) + self._room_reserved
            for key in list(self._models):
                if used + cost <= budget:
                    break
                if not evict or self._leases.get(key):
                    continue  # running or about to: never evicted mid-run
                model = self._models.pop(key)
                self._evicted[key] = _description(model)
                self._evicted_cost[key] = model.cost
                used -= model.cost
                evicted.append(model)
            if used + cost > budget:
                for model in evicted:  # nothing evicted for a load that cannot happen
                    self._evicted.pop(model.key, None)
                    self._evicted_cost.pop(model.key, None)
                    self._models[model.key] = model
                raise ServiceUnavailableError(
                    503,
                    "models_memory_budget_bytes: the models in use leave no room to load "
                    "another now",
                    retry_after=self.limits.retry_after_s,
                )
            self._room_reserved += cost
        return evicted

    def release_room(self, cost: int) -> None:
        with self._lock:
            self._room_reserved -= cost

    def evicted(self, key: str) -> bool:
        with self._lock:
            return key in self._evicted

    def loaded(self, key: str) -> bool:
        with self._lock:
            return key in self._models

    @contextlib.contextmanager
    def lease(self, model: LoadedModel) -> Iterator[None]:
        """Hold `model` loaded while a request uses it: `make_room` never evicts it meanwhile.
        Take it on the event loop with no await since the model was looked up."""
        key = model.key
        with self._lock:
            self._leases[key] = self._leases.get(key, 0) + 1
            if self._models.get(key) is model:
                self._models[key] = self._models.pop(key)  # most recently used
        try:
            yield
        finally:
            with self._lock:
                left = self._leases[key] - 1
                if left:
                    self._leases[key] = left
                else:
                    del self._leases[key]

    def get(self, key: str) -> LoadedModel:
        """The model of `key` (`LoadedModel.key`).

        Raises:
            NotFoundError: (404) no such model.
        """
        with self._lock:
            model = self._models.get(key)
        if model is None:
            raise NotFoundError(404, f"unknown model id {key.rpartition('/')[2]!r}")
        return model

    def remove(self, key: str) -> LoadedModel:
        with self._lock:
            model = self._models.pop(key, None)
        if model is None:
            raise NotFoundError(404, f"unknown model id {key.rpartition('/')[2]!r}")
        return model

    def forget(self, key: str) -> LoadedModel | None:
        """Remove the model of `key`, loaded or evicted; the loaded one, if it was."""
        with self._lock:
            self._evicted.pop(key, None)
            self._evicted_cost.pop(key, None)
            return self._models.pop(key, None)

    def all(self) -> list[LoadedModel]:
        with self._lock:
            return list(self._models.values())

    def describe(self) -> dict[str, Mapping[str, Any]]:
        """What ``GET /models`` says of every model, loaded or evicted, by key."""
        with self._lock:
            loaded = {k: _description(m) for k, m in self._models.items()}
            evicted = dict(self._evicted)
        return {**loaded, **evicted}


def _description(m: LoadedModel) -> Mapping[str, Any]:
    return {
        "model_id": m.model_id,
        "model_name": m.model_name,
        "hash": m.model_hash,
        "size": m.size,
        "inputs": [s.describe() for s in m.inputs],
        "outputs": [s.describe() for s in m.outputs],
    }
