"""Request decoding cost: time and peak traced memory of the strict decoder per body layout.

    python bench/bench_decode.py [--mib 16]

Prints one row per layout: body size, decode time, throughput and tracemalloc's peak (the
model itself included). Uploads are fed in 1 MiB pieces, as the server does.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import cbor2
import numpy as np

from veil import wire
from veil.tensors import DatumType, WireTensor


def _stream(body: bytes) -> Any:
    decoder = wire.UploadStreamDecoder(max_model_bytes=1 << 32, size=len(body))
    for start in range(0, len(body), 1 << 20):
        decoder.feed(body[start : start + (1 << 20)])
    return decoder.finish()


def _measure(call: Callable[[], Any]) -> tuple[float, int]:
    tracemalloc.start()
    start = time.perf_counter()
    call()
    elapsed = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return elapsed, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=16, help="model / tensor size in MiB")
    args = parser.parse_args()
    size = args.mib << 20
    model = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes()
    tensor = WireTensor((size // 4,), DatumType.F32, "x", model)
    cases: list[tuple[str, bytes, Callable[[bytes], Any]]] = [
        (
            "upload, bytes (veil)",
            wire.encode_upload_request(model, model_name="m", model_id="m", client_info={}),
            _stream,
        ),
        (
            "upload, int array (BlindAI)",
            cbor2.dumps({"model": list(model), "length": size, "model_name": "m"}),
            _stream,
        ),
        (
            "run, one tensor",
            wire.encode_run_request(model_id="m", model_hash=None, inputs=[tensor], client_info={}),
            wire.decode_run_request,
        ),
    ]
    print(f"{'layout':<30} {'body MiB':>9} {'time s':>8} {'MiB/s':>8} {'peak MiB':>9}")
    for name, body, decode in cases:
        elapsed, peak = _measure(lambda body=body, decode=decode: decode(body))  # type: ignore[misc]
        mib = len(body) / (1 << 20)
        print(
            f"{name:<30} {mib:>9.1f} {elapsed:>8.3f} {mib / elapsed:>8.1f} {peak / (1 << 20):>9.1f}"
        )


if __name__ == "__main__":
    main()
