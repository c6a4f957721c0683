"""Cost of receipts: what ``receipt=True`` adds to a request, in parts and end to end.

    python bench/bench_receipts.py [--n 300] [--log-size 100000] [--threads 8] [--dir DIR]

Prints p50/p90 per part (server: sign the receipt, append it to the log, sign the tree head,
build the inclusion path, fsync the record; client: check both signatures, the evidence digest
and the inclusion path) with a log of `--log-size` earlier receipts; what the fsync of a log
record costs, with one writer and with `--threads` writers sharing fsyncs (group commit), in
`--dir` (default: a temporary directory: put it on the disk the server's data directory is
on); then the p50 of predict with and without
``receipt=True`` against an in-process simulated server (a 1x8 identity model: the delta is the
receipt's cost, the model's own time cancels out).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import TensorProto, helper

import veil
from veil.errors import SimulationModeWarning
from veil.receipts.cose import Signer
from veil.receipts.proof import check_receipt, decode_bundle
from veil.server import receipts as receipts_module
from veil.server.config import ServerConfig
from veil.server.receipts import LOG_FILENAME, ReceiptIssuer, ReceiptLog
from veil.server.runner import prepare_state

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))
from inprocess import listening


def _times(
    call: Callable[[], Any], n: int, clock: Callable[[], float] = time.perf_counter
) -> list[float]:
    samples = []
    for _ in range(n):
        start = clock()
        call()
        samples.append((clock() - start) * 1e3)
    return samples


def _p90(samples: list[float]) -> float:
    return sorted(samples)[int(len(samples) * 0.9) - 1]


def _row(name: str, samples: list[float], cpu: list[float] | None = None) -> None:
    line = f"{name:<44}{statistics.median(samples):>10.3f}{_p90(samples):>10.3f}"
    if cpu is not None:
        line += f"{statistics.median(cpu):>10.3f}"
    print(line)


def parts(n: int, log_size: int, directory: Path) -> None:
    log = ReceiptLog(directory / LOG_FILENAME, b"\x01" * 32)
    for i in range(log_size):
        log.append(i.to_bytes(8, "big"))
    issuer = ReceiptIssuer(Signer(), b"evidence", log)
    digest = b"\x02" * 32
    bundles: list[str] = []
    key = issuer.public_key

    def issue() -> None:
        bundles.append(issuer.issue("predict", "m", digest, inputs=digest, outputs=digest))

    def check() -> None:
        check_receipt(*decode_bundle(bundles[-1]), public_key=key, evidence=b"evidence")

    # Wall time, and this thread's CPU time: on a shared machine the second is what the work
    # itself costs, the first adds the waits for a CPU.
    issued = (_times(issue, n), _times(issue, n, time.thread_time))
    # The receipt's own work, the record's fsync left out (the durability rows below time it).
    plain_fsync = receipts_module._fsync
    receipts_module._fsync = lambda path: None  # type: ignore[assignment]
    try:
        unsynced = (_times(issue, n), _times(issue, n, time.thread_time))
    finally:
        receipts_module._fsync = plain_fsync  # type: ignore[assignment]
    checked = (_times(check, n), _times(check, n, time.thread_time))
    header = f"{'part (log of ' + str(log_size) + ' receipts)':<44}"
    print(header + f"{'p50 ms':>10}{'p90 ms':>10}{'cpu p50':>10}")
    _row("server: issue (sign, append, sign head, path, fsync)", *issued)
    _row("server: issue, without the fsync", *unsynced)
    _row("client: check (2 signatures, digest, path)", *checked)
    # Scale: one bare Ed25519 signature and verification (no COSE), on this machine now.
    raw = Ed25519PrivateKey.generate()
    signature = raw.sign(digest)
    public = raw.public_key()
    _row("reference: bare Ed25519 sign", _times(lambda: raw.sign(digest), n))
    _row("reference: bare Ed25519 verify", _times(lambda: public.verify(signature, digest), n))


def durability(n: int, directory: Path, threads: int) -> None:
    """What the fsync of each receipt's record costs, alone and under group commit."""
    log = ReceiptLog(directory / ("durability-" + LOG_FILENAME), b"\x01" * 32)
    entries = iter(range(10**9))

    def append() -> int:
        with log.lock:
            return log.append(next(entries).to_bytes(8, "big"))

    print(f"{'log record (' + str(directory) + ')':<44}{'p50 ms':>10}{'p90 ms':>10}")
    _row("append only (written, not durable)", _times(append, n))
    _row("append + fsync, one writer", _times(lambda: log.sync(append()), n))
    fsyncs = 0
    plain_fsync = receipts_module._fsync

    def counted(path: Path) -> None:
        nonlocal fsyncs
        fsyncs += 1
        plain_fsync(path)

    receipts_module._fsync = counted  # type: ignore[assignment]
    try:
        per_thread = max(1, n // threads)
        waits: list[float] = []

        def writer() -> None:
            waits.extend(_times(lambda: log.sync(append()), per_thread))

        start = time.perf_counter()
        workers = [threading.Thread(target=writer) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        elapsed = time.perf_counter() - start
    finally:
        receipts_module._fsync = plain_fsync  # type: ignore[assignment]
    _row(f"append + fsync, {threads} writers (group commit)", waits)
    total = per_thread * threads
    print(f"{'  records/s; fsyncs per record':<44}{total / elapsed:>10.0f}{fsyncs / total:>10.2f}")


def end_to_end(n: int, directory: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    x = np.arange(8, dtype=np.float32).reshape(1, 8)
    state, identity = prepare_state(ServerConfig(directory / "data", platform="simulated"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SimulationModeWarning)
        with (
            listening(state, identity) as ports,
            veil.connect("127.0.0.1", simulation=True, **ports) as client,
        ):
            client.upload_model(model, model_id="bench")
            for _ in range(20):  # warm up both paths
                client.predict("bench", x)
                client.predict("bench", x, receipt=True)
            plain: list[float] = []
            signed: list[float] = []
            for _ in range(n):  # interleaved: load changes hit both alike
                plain += _times(lambda: client.predict("bench", x), 1)
                signed += _times(lambda: client.predict("bench", x, receipt=True), 1)
    print(f"{'predict, 1x8 identity, in-process server':<44}{'p50 ms':>10}{'p90 ms':>10}")
    _row("receipt=False", plain)
    _row("receipt=True", signed)
    delta = statistics.median(signed) - statistics.median(plain)
    print(f"{'p50 delta (receipt=True - receipt=False)':<44}{delta:>10.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--log-size", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=8, help="writers in the group-commit row")
    parser.add_argument(
        "--dir", type=Path, default=None, help="where the logs go (default: a temporary directory)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        parts(args.n, args.log_size, Path(tmp))
        print()
        durability(args.n, Path(tmp), args.threads)
        print()
        end_to_end(args.n, Path(tmp))


if __name__ == "__main__":
    main()
