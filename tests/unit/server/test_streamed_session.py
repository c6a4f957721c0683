"""Model bytes streamed to ONNX Runtime and freed as read (`onnx_guard.Handover`,
`allocator.ConsumedPages`), and an upload stored while it is admitted, unstored when it fails."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from starlette.testclient import TestClient

from veil import wire
from veil.errors import BadRequestError, SimulationModeWarning
from veil.server import onnx_guard
from veil.server.admission import Admitter
from veil.server.allocator import ConsumedPages
from veil.server.app import build_apps
from veil.server.config import ServerConfig
from veil.server.limits import Limits
from veil.server.models import ModelRegistry
from veil.server.onnx_guard import Handover, ModelBytes, create_session
from veil.server.runner import prepare_state
from veil.server.store import StoredModel

LIMITS = Limits()
PAGE = 4096


def scale_model(n: int = 1 << 18) -> bytes:
    """y = x * w with `n` float weights (1 MiB by default: several pipe writes, many pages)."""
    w = numpy_helper.from_array(np.arange(n, dtype=np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [n])
    graph = helper.make_graph([helper.make_node("Mul", ["x", "w"], ["y"])], "g", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def assert_runs(session: Any, n: int = 1 << 18) -> None:
    (out,) = session.run(None, {"x": np.full(n, 2.0, dtype=np.float32)})
    np.testing.assert_array_equal(out, 2.0 * np.arange(n, dtype=np.float32))


def test_handed_over_bytes_are_taken_and_the_session_runs() -> None:
    handover = Handover(bytearray(scale_model()))
    session = create_session(handover, LIMITS, checked=True, intra_op_threads=1)
    assert_runs(session)
    with pytest.raises(RuntimeError, match="taken already"):
        handover.view()
    assert "taken" in repr(handover)


def test_bytes_someone_else_holds_are_left_intact() -> None:
    data = bytearray(scale_model())
    original = bytes(data)
    assert_runs(create_session(data, LIMITS, checked=True, intra_op_threads=1))
    assert data == original  # never released: the caller still reads them


def test_consumed_pages_read_as_zeros_and_the_rest_stays() -> None:
    buffer = bytearray(b"\xff" * (64 * PAGE))
    pages = ConsumedPages(buffer)
    assert not pages.released
    pages.consumed(32 * PAGE + 100)
    assert pages.released
    # Released pages lie inside the consumed prefix; everything past it is untouched.
    assert buffer[32 * PAGE + 100 :] == b"\xff" * (len(buffer) - 32 * PAGE - 100)
    assert buffer.count(0) >= 30 * PAGE
    assert buffer.find(0) >= 0
    assert buffer.rfind(0) < 32 * PAGE + 100
    pages.consumed(10 * PAGE)  # going back releases nothing more
    assert buffer[32 * PAGE + 100 :] == b"\xff" * (len(buffer) - 32 * PAGE - 100)


def test_consumed_pages_leave_a_small_buffer_alone() -> None:
    buffer = bytearray(b"\xff" * PAGE)
    pages = ConsumedPages(buffer)
    pages.consumed(PAGE)
    assert not pages.released
    assert buffer == b"\xff" * PAGE


@pytest.mark.parametrize("wait_s", [0.0, 0.3])
def test_a_path_onnx_runtime_cannot_open_falls_back_to_the_bytes(wait_s: float) -> None:
    seen: list[str | bytes] = []

    def build(source: str | bytes) -> str:
        seen.append(source)
        if isinstance(source, str):
            # As where /proc/self/fd does not exist; meanwhile the writer fills the pipe, and
            # what sits in the pipe was never read: none of it may be released.
            time.sleep(wait_s)
            raise RuntimeError("cannot open")
        return "from bytes"

    model = scale_model(1 << 20)  # 4 MiB: more than the pipe holds
    data = bytearray(model)
    box: list[ModelBytes] = [data]
    del data
    assert onnx_guard._streamed_session(box, build) == "from bytes"
    assert isinstance(seen[0], str)
    assert seen[1] == model


def test_an_error_after_the_whole_model_was_read_stands() -> None:
    def build(source: str | bytes) -> str:
        assert isinstance(source, str)
        with open(source, "rb") as stream:
            while stream.read(1 << 16):
                pass
        raise RuntimeError("refused after reading it all")

    box: list[ModelBytes] = [bytearray(scale_model())]
    with pytest.raises(RuntimeError, match="refused after reading"):
        onnx_guard._streamed_session(box, build)
    assert box == []  # dropped, never loaded again from bytes


def test_a_refused_model_names_no_pipe_path() -> None:
    # Passes the structural guard (checked=True skips it here) but not ONNX Runtime.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    graph = helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    with pytest.raises(BadRequestError, match="ONNX Runtime refused the model") as info:
        create_session(Handover(bytearray(model.SerializeToString())), LIMITS, checked=True)
    assert info.value.status == 422
    assert "/proc/" not in info.value.message


def test_no_pipe_is_left_open() -> None:
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        create_session(Handover(bytearray(scale_model(16))), LIMITS, checked=True)
    assert len(os.listdir("/proc/self/fd")) <= before


class RecordingStore:
    """A store that keeps what it is given, in memory."""

    def __init__(self) -> None:
        self.stored: dict[str, bytes] = {}

    def put(self, meta: StoredModel, blob: bytes) -> None:
        self.stored[meta.key] = bytes(blob)

    def put_stream(
        self, meta: StoredModel, chunks: Iterable[bytes], *, exclusive: bool = False
    ) -> int:
        self.stored[meta.key] = b"".join(bytes(chunk) for chunk in chunks)
        return len(self.stored[meta.key])

    def delete(self, key: str) -> None:
        self.stored.pop(key, None)

    def load_all(self) -> Iterator[tuple[StoredModel, bytes]]:
        return iter(())


def _overlap_app(tmp_path: Path, store: RecordingStore) -> tuple[Any, Any]:
    config = ServerConfig(data_dir=tmp_path, platform="simulated", no_auth=True)
    with pytest.warns(SimulationModeWarning):
        state, _ = prepare_state(config, store=store)
    return state, build_apps(state)[2]


def test_an_upload_whose_load_fails_after_storing_is_unstored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = RecordingStore()
    state, management = _overlap_app(tmp_path, store)

    def failing_load(self: ModelRegistry, *args: Any, **kwargs: Any) -> Any:
        assert store.stored, "the model is stored before the server loads it"
        raise BadRequestError(422, "invalid ONNX model: ONNX Runtime refused the model: test")

    monkeypatch.setattr(ModelRegistry, "load_admitted", failing_load)
    body = wire.encode_upload_request(
        scale_model(16), model_name="m", model_id="m1", client_info={}
    )
    with TestClient(management) as client:
        refused = client.post("/upload", content=body)
        assert refused.status_code == 422
        assert store.stored == {}
        assert "m1" not in state.access
        monkeypatch.undo()
        accepted = client.post("/upload", content=body)  # the id is free again
    assert accepted.status_code == 200
    assert list(store.stored) == ["m1"]


class GatedStore(RecordingStore):
    """A RecordingStore whose writes start when asked and wait for `release` to finish."""

    def __init__(self) -> None:
        super().__init__()
        self.started = threading.Event()
        self.release = threading.Event()
        self.finished = threading.Event()

    def put_stream(
        self, meta: StoredModel, chunks: Iterable[bytes], *, exclusive: bool = False
    ) -> int:
        self.started.set()
        assert self.release.wait(30), "the test never released the store"
        try:
            return super().put_stream(meta, chunks, exclusive=exclusive)
        finally:
            self.finished.set()


def test_an_upload_is_stored_while_it_is_admitted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = GatedStore()
    state, management = _overlap_app(tmp_path, store)
    admit = Admitter.admit
    seen: list[bool] = []

    def admit_once_storing(self: Admitter, blob: Any, optimization: str = "off") -> Any:
        # Admission waits for the store to have begun: both run at once.
        seen.append(store.started.wait(30))
        store.release.set()
        return admit(self, blob, optimization)

    monkeypatch.setattr(Admitter, "admit", admit_once_storing)
    body = wire.encode_upload_request(
        scale_model(16), model_name="m", model_id="m1", client_info={}
    )
    with TestClient(management) as client:
        accepted = client.post("/upload", content=body)
        assert accepted.status_code == 200
        assert seen == [True]
    assert list(store.stored) == ["m1"]
    assert "m1" in state.access


def test_an_upload_refused_by_admission_while_being_stored_is_unstored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = GatedStore()
    state, management = _overlap_app(tmp_path, store)

    def refuse_then_let_the_store_finish(
        self: Admitter, blob: Any, optimization: str = "off"
    ) -> Any:
        assert store.started.wait(30)
        # The store finishes only after admission has refused: the upload must wait for it
        # and remove what it wrote.
        threading.Timer(0.2, store.release.set).start()
        raise BadRequestError(422, "invalid ONNX model: refused by the test")

    monkeypatch.setattr(Admitter, "admit", refuse_then_let_the_store_finish)
    body = wire.encode_upload_request(
        scale_model(16), model_name="m", model_id="m1", client_info={}
    )
    with TestClient(management) as client:
        refused = client.post("/upload", content=body)
    assert refused.status_code == 422
    assert wire.decode_error(refused.content) == "invalid ONNX model: refused by the test"
    # The answer came after the store's write ended (nothing writes behind it).
    assert store.finished.is_set()
    assert store.stored == {}
    assert "m1" not in state.access


def test_an_optimized_upload_is_stored_after_admission(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The stored graph depends on what admission keeps: nothing is written before it answers.
    store = RecordingStore()
    _, management = _overlap_app(tmp_path, store)
    admit = Admitter.admit
    stored_before: list[dict[str, bytes]] = []

    def admit_and_look(self: Admitter, blob: Any, optimization: str = "off") -> Any:
        stored_before.append(dict(store.stored))
        return admit(self, blob, optimization)

    monkeypatch.setattr(Admitter, "admit", admit_and_look)
    body = wire.encode_upload_request(
        scale_model(16), model_name="m", model_id="m1", client_info={}, optimization="graph"
    )
    with TestClient(management) as client:
        accepted = client.post("/upload", content=body)
    assert accepted.status_code == 200
    assert stored_before == [{}]
    assert list(store.stored) == ["m1"]
