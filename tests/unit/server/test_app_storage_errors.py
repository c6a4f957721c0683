"""A failed disk write while storing an upload: a clear 5xx, one log line, no traceback."""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from onnx import TensorProto, helper
from starlette.testclient import TestClient

from veil import wire
from veil.errors import SimulationModeWarning
from veil.server.app import build_apps
from veil.server.config import ServerConfig
from veil.server.runner import prepare_state
from veil.server.store import StoredModel


class FailingStore:
    """A store whose disk fails with `code` on every write."""

    def __init__(self, code: int) -> None:
        self.code = code

    def put(self, meta: StoredModel, blob: bytes) -> None:
        raise OSError(self.code, "write failed", "/somewhere/secret-model-path")

    def put_stream(
        self, meta: StoredModel, chunks: Iterable[bytes], *, exclusive: bool = False
    ) -> int:
        raise OSError(self.code, "write failed", "/somewhere/secret-model-path")

    def delete(self, model_id: str) -> None:
        return None

    def load_all(self) -> Iterator[tuple[StoredModel, bytes]]:
        return iter(())


def _model() -> bytes:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


@pytest.mark.parametrize(
    ("code", "status", "message"),
    [
        (errno.ENOSPC, 507, "insufficient storage: the model was not stored"),
        (errno.EDQUOT, 507, "insufficient storage: the model was not stored"),
        (errno.EIO, 500, "storing the model failed"),
    ],
)
def test_failed_write(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, code: int, status: int, message: str
) -> None:
    config = ServerConfig(data_dir=tmp_path, platform="simulated", no_auth=True)
    with pytest.warns(SimulationModeWarning):
        state, _ = prepare_state(config, store=FailingStore(code))
    _, _, management = build_apps(state)
    body = wire.encode_upload_request(_model(), model_name="m", model_id="m1", client_info={})
    with caplog.at_level(logging.INFO), TestClient(management) as client:
        response = client.post("/upload", content=body)
    assert response.status_code == status
    assert wire.decode_error(response.content) == message
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == [f"storing model m1 failed: {errno.errorcode[code]}"]
    assert all(r.exc_info is None for r in caplog.records)
    assert "secret-model-path" not in caplog.text
    # nothing half-registered: the id is free again
    assert "m1" not in state.access
