"""`ModelRegistry.make_room`: the memory budget evicts the least recently used models that no
request holds (`lease`), keeps their descriptions, and refuses what cannot fit."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from veil.errors import ApiError, ServiceUnavailableError
from veil.server.limits import Limits
from veil.server.models import LoadedModel, ModelRegistry, cost_of, load_model

N = 1024


def add_model(seed: int) -> bytes:
    w = numpy_helper.from_array(np.full(N, seed, dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [N])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [N])],
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


COST = len(add_model(0))  # small models cost their size (`cost_of`)


@pytest.fixture
def registry() -> Iterator[ModelRegistry]:
    r = ModelRegistry(limits=Limits(models_memory_budget_bytes=2 * COST + COST // 2))
    try:
        yield r
    finally:
        r.executor.shutdown()


def load(registry: ModelRegistry, model_id: str, seed: int = 1) -> LoadedModel:
    blob = add_model(seed)
    assert cost_of(len(blob), 0) == COST
    registry.make_room(COST)
    model = load_model(blob, model_id=model_id, model_name="", threads=1)
    registry.add(model, room=COST)
    return model


def loaded_ids(registry: ModelRegistry) -> list[str]:
    return [m.model_id for m in registry.all()]


def test_the_least_recently_used_model_is_evicted_and_stays_listed(
    registry: ModelRegistry,
) -> None:
    a, b = load(registry, "a"), load(registry, "b")
    with registry.lease(a):  # a used after b: b is now the least recently used
        pass
    evicted = registry.make_room(COST)
    assert evicted == [b]
    assert registry.evicted("b")
    assert not registry.evicted("a")
    registry.add(load_model(add_model(3), model_id="c", model_name="", threads=1), room=COST)
    assert loaded_ids(registry) == ["a", "c"]
    assert sorted(str(d["model_id"]) for d in registry.describe().values()) == ["a", "b", "c"]
    assert registry.costs() == {"a": COST, "b": COST, "c": COST}
    assert registry.loaded_cost == 2 * COST
    # loaded again: no longer evicted; the least recently used (a) makes room for it
    assert registry.make_room(COST) == [a]
    registry.add(load_model(add_model(1), model_id="b", model_name="", threads=1), room=COST)
    assert not registry.evicted("b")
    assert registry.evicted("a")


def test_a_model_in_use_is_never_evicted(registry: ModelRegistry) -> None:
    a, b = load(registry, "a"), load(registry, "b")
    with registry.lease(a), registry.lease(b):
        with pytest.raises(ServiceUnavailableError, match="models_memory_budget_bytes") as err:
            registry.make_room(COST)
        assert err.value.status == 503
        assert err.value.retry_after is not None
        assert loaded_ids(registry) == ["a", "b"]  # nothing evicted for a refused load
    with registry.lease(a):
        assert registry.make_room(COST) == [b]


def test_a_model_over_the_whole_budget_is_refused(registry: ModelRegistry) -> None:
    load(registry, "a")
    budget = registry.limits.models_memory_budget_bytes
    with pytest.raises(ApiError, match=f"over models_memory_budget_bytes={budget}") as err:
        registry.make_room(budget + 1)
    assert err.value.status == 413
    assert loaded_ids(registry) == ["a"]


def test_reserved_room_counts_until_the_model_is_added_or_released(
    registry: ModelRegistry,
) -> None:
    load(registry, "a")
    registry.make_room(COST)  # a load in progress holds its room
    with pytest.raises(ServiceUnavailableError):
        registry.make_room(COST, evict=False)
    registry.release_room(COST)
    assert registry.make_room(COST, evict=False) == []


def test_without_eviction_a_full_budget_refuses(registry: ModelRegistry) -> None:
    load(registry, "a")
    load(registry, "b")
    with pytest.raises(ServiceUnavailableError):
        registry.make_room(COST, evict=False)
    assert loaded_ids(registry) == ["a", "b"]


def test_forget_removes_a_loaded_or_evicted_model(registry: ModelRegistry) -> None:
    a, _ = load(registry, "a"), load(registry, "b")
    registry.make_room(COST)  # evicts a
    assert registry.forget("a") is None
    assert not registry.evicted("a")
    assert "a" not in registry.costs()
    assert registry.forget("b") is not None
    assert registry.describe() == {}
    assert registry.costs() == {}
    assert a.model_id == "a"
