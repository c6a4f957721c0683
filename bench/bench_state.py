"""Sealed state benchmark: what the manifest costs per request, per commit and at start.

    .venv/bin/python bench/bench_state.py [--models 100] [--model-kib 64] [--big-mib 64]

In a temporary directory (the machine's disk, fsync included), with `veil.server.state` and
`veil.server.sealing` as the server uses them:

- authenticate: `KeyStore.authenticate` of a valid key while nothing changed (every request);
- authenticate after a commit by another process's state (the reload of the manifest);
- key create: one commit (manifest + witness, each written, fsynced, renamed);
- put: one model of --models-kib, then one of --big-mib (blob, commit, old blob removed);
- start: `SealedState.open` + `SealedModelStore.load_all` of --models models (each blob
  unsealed and hashed) and of the big one.

Prints one table; each row gives the median, p90 and the throughput where it means something.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from veil.server.keys import KeyStore
from veil.server.sealing import SealedModelStore
from veil.server.state import SealedState
from veil.server.store import StoredModel

KEY = os.urandom(32)


def timed(fn: Callable[[], object], repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def row(name: str, samples: list[float], unit: str, scale: float, extra: str = "") -> None:
    median = statistics.median(samples) * scale
    p90 = sorted(samples)[int(len(samples) * 0.9) - 1 if len(samples) >= 10 else -1] * scale
    print(f"{name:<38} {len(samples):>6} {median:>10.3f} {p90:>10.3f} {unit:<3} {extra}")


def model(model_id: str, size: int) -> tuple[StoredModel, bytes]:
    blob = os.urandom(size)
    return StoredModel(model_id, hashlib.sha256(blob).digest(), "bench", size), blob


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=100)
    parser.add_argument("--model-kib", type=int, default=64)
    parser.add_argument("--big-mib", type=int, default=64)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="veil-bench-state-") as tmp:
        data = Path(tmp)
        state = SealedState(data, KEY)
        state.open()
        keys = KeyStore(state)
        for _ in range(20):
            keys.create("user")
        _, secret = keys.create("owner")
        other = KeyStore(SealedState(data, KEY))

        print(f"{'operation':<38} {'n':>6} {'median':>10} {'p90':>10}")
        print("-" * 72)
        row(
            "authenticate (nothing changed)",
            timed(lambda: keys.authenticate(secret), 20000),
            "us",
            1e6,
        )

        reloads: list[float] = []
        for _ in range(30):
            other.create("user")
            start = time.perf_counter()
            keys.authenticate(secret)
            reloads.append(time.perf_counter() - start)
        row(
            "authenticate (after another's commit)",
            reloads,
            "ms",
            1e3,
            f"{len(state.current().keys)} key records",
        )
        row("key create (one commit)", timed(lambda: keys.create("user"), 50), "ms", 1e3)

        store = SealedModelStore(data / "sealed", state)
        size = args.model_kib << 10
        models = [model(f"m{i}", size) for i in range(args.models)]
        it = iter(models)
        puts = timed(lambda: store.put(*next(it)), args.models)
        row(
            f"put {args.model_kib} KiB model",
            puts,
            "ms",
            1e3,
            f"{size / statistics.median(puts) / (1 << 20):.0f} MiB/s",
        )

        def start_up() -> int:
            s = SealedState(data, KEY)
            return sum(len(b) for _, b in SealedModelStore(data / "sealed", s).load_all())

        row(f"start: check {args.models} models", timed(start_up, 5), "ms", 1e3)

        big_meta, big_blob = model("big", args.big_mib << 20)
        put_big = timed(lambda: store.put(big_meta, big_blob), 3)
        row(
            f"put {args.big_mib} MiB model",
            put_big,
            "ms",
            1e3,
            f"{(args.big_mib) / statistics.median(put_big):.0f} MiB/s",
        )
        start_big = timed(start_up, 3)
        total = args.big_mib + args.models * args.model_kib / 1024
        row(
            f"start: check {args.models} + 1 big",
            start_big,
            "ms",
            1e3,
            f"{total / statistics.median(start_big):.0f} MiB/s",
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
