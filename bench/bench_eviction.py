"""What eviction under ``--models-memory-budget-bytes`` costs a request: a run of a loaded model
against the first run of a model that was evicted (loaded again from the sealed store: unseal,
admission in the child process, session), by model size.

    .venv/bin/python bench/bench_eviction.py            # ~30 s on 2 cores
    .venv/bin/python bench/bench_eviction.py --sizes-mib 1 16

In process (the app through Starlette's test client, no TLS, simulated platform, one data
directory in a temporary folder); the budget holds one model, two are used in turn, so every
other request reloads.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper
from starlette.testclient import TestClient

from veil import wire
from veil.errors import SimulationModeWarning
from veil.server.app import build_apps
from veil.server.config import ServerConfig
from veil.server.limits import Limits
from veil.server.runner import prepare_state
from veil.tensors import DatumType, WireTensor

N = 256


def model(mib: int, seed: int) -> bytes:
    """y = x @ W[0] (W of `mib` MiB float32, [k, N, N]): the weights dominate the size."""
    k = max(1, (mib << 20) // (N * N * 4))
    w = np.random.default_rng(seed).standard_normal((k, N, N)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["w", "zero"], ["w0"], axis=0),
        helper.make_node("MatMul", ["x", "w0"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, N])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, N])],
        initializer=[
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(np.array(0, dtype=np.int64), "zero"),
        ],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


def measure(mib: int, rounds: int) -> tuple[float, float, int]:
    blobs = [model(mib, seed) for seed in (1, 2)]
    budget = max(len(b) for b in blobs) * 3 // 2  # one at a time
    with tempfile.TemporaryDirectory() as tmp:
        config = ServerConfig(
            data_dir=Path(tmp),
            platform="simulated",
            no_auth=True,
            limits=Limits(models_memory_budget_bytes=budget),
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SimulationModeWarning)
            state, _ = prepare_state(config)
        _, attested, _ = build_apps(state)
        x = WireTensor((1, N), DatumType.F32, "x", np.ones((1, N), np.float32).tobytes())
        warm, reload = [], []
        with TestClient(attested) as client:
            for i, blob in enumerate(blobs):
                body = wire.encode_upload_request(
                    blob, model_name="m", model_id=f"m{i}", client_info={}
                )
                assert client.post("/upload", content=body).status_code == 200

            def run(model_id: str) -> float:
                body = wire.encode_run_request(
                    model_id=model_id, model_hash=None, inputs=[x], client_info={}
                )
                start = time.perf_counter()
                reply = client.post("/run", content=body)
                assert reply.status_code == 200, wire.decode_error(reply.content)
                return time.perf_counter() - start

            for r in range(rounds):
                model_id = f"m{r % 2}"
                reload.append(run(model_id))  # the other one was used last: this one evicted
                warm.append(run(model_id))
        state.registry.executor.shutdown()
    return statistics.median(warm), statistics.median(reload), len(blobs[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    print(f"{'model':>10} {'loaded p50':>12} {'evicted p50':>12}  (first run after eviction)")
    for mib in args.sizes_mib:
        warm, reload, size = measure(mib, args.rounds)
        print(f"{size / (1 << 20):>7.1f} MiB {warm * 1e3:>9.1f} ms {reload * 1e3:>9.1f} ms")


if __name__ == "__main__":
    main()
