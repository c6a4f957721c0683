"""The baseline: a naive, unprotected HTTP + JSON server around the same ONNX Runtime session.

No TLS, no attestation, no batching. ``POST /predict`` takes ``{"inputs": {name: nested list}}``
and answers ``{"outputs": [nested list, ...]}``. The handler is ``async`` and calls
``session.run`` directly, so requests run one at a time on the event loop: what a plain
FastAPI/Starlette wrapper written in a hurry does.

    python bench/plain_server.py MODEL.onnx [--threads 2] [--port 0] [--batch-delay-ms D]

``--batch-delay-ms`` (not the baseline) instead sends every request through veil's
`DynamicBatcher` with that straggler window: the batcher's gain over real HTTP, without TLS.

Binds 127.0.0.1 only and prints ``PORT <n>`` once it listens (port 0 picks a free one).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
from typing import Any

import numpy as np
import onnxruntime as ort
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

_DTYPES = {
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(bool)": np.bool_,
}


def build_app(model_path: str, threads: int, batch_delay_ms: float | None = None) -> Starlette:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
    dtypes = {i.name: _DTYPES[i.type] for i in session.get_inputs()}
    batcher = None
    if batch_delay_ms is not None:
        from veil.server.batching import BatchingConfig, DynamicBatcher, has_dynamic_batch_axis

        def run(feeds: dict[str, Any]) -> list[Any]:
            return list(session.run(None, feeds))

        batcher = DynamicBatcher(
            run,
            config=BatchingConfig(max_delay_ms=batch_delay_ms),
            dynamic_batch_axis=has_dynamic_batch_axis(session.get_inputs(), session.get_outputs()),
        )

    async def predict(request: Request) -> Response:
        body: Any = json.loads(await request.body())
        try:
            feeds = {name: np.asarray(v, dtype=dtypes[name]) for name, v in body["inputs"].items()}
            if batcher is not None:
                outputs = await batcher.submit(feeds)
            else:
                outputs = session.run(None, feeds)  # blocks the loop: one request at a time
        except (KeyError, TypeError, ValueError, ort.capi.onnxruntime_pybind11_state.Fail) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse({"outputs": [o.tolist() for o in outputs]})

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def stats(request: Request) -> Response:
        if batcher is None:
            return JSONResponse({})
        st = batcher.stats()
        return JSONResponse({"runs": st.runs, "requests": st.requests})

    return Starlette(
        routes=[
            Route("/predict", predict, methods=["POST"]),
            Route("/health", health),
            Route("/stats", stats),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--batch-delay-ms", type=float, help="batch with veil's DynamicBatcher")
    args = parser.parse_args(argv)

    app = build_app(args.model, args.threads, args.batch_delay_ms)
    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on accepted sockets whose proto says TCP;
    # with proto 0 every keep-alive response stalls ~40 ms on Nagle + delayed ACK, a handicap
    # uvicorn's own `--port` binding does not have.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, backlog=1024)
    asyncio.run(uvicorn.Server(config).serve(sockets=[sock]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
