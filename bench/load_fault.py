"""Load and fault benchmark against a real ``veil serve --platform simulated`` on loopback.

Load run: N clients (the veil SDK, one connection each, simulation mode) send a mix of predict,
upload and delete for T seconds, each client replacing models of a fixed set (so the live models
stay constant once filled). Prints, per operation: requests, successes, 4xx, 5xx, other errors,
p50/p99 latency; and the server's RSS at start, after warm-up, peak and end. The 10-minute soak of
issue 12 is ``--clients 64 --seconds 600 --skip-fault``.

Fault run: a client uploads (and now and then deletes) models while the server is killed with
SIGKILL at a random moment; the server is restarted on the same data directory, and every model
whose upload was acknowledged before the kill must be listed with the same SHA-256 and predict
correctly, no deleted model may come back, the one operation in flight may have gone either way,
and no temporary file may remain. Repeated for a few rounds on the same data directory. The
server keeps models in its sealed store (encrypted under the simulated platform's sealing key):
each restored model must be one ``.sealed`` file, and no plain model file may exist.

    python bench/load_fault.py [--clients 8] [--seconds 20] [--fault-rounds 3]

Everything binds 127.0.0.1 on free ports; the server processes are stopped at exit. Exit status
1 if the fault run found a lost, corrupted or resurrected model, or the load run saw a 5xx.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from onnx import TensorProto, helper, numpy_helper

import veil
from veil.errors import ApiError, SimulationModeWarning, TransportError

warnings.simplefilter("ignore", SimulationModeWarning)


# ---- models ---------------------------------------------------------------------------------


def make_model(n: int, seed: int) -> tuple[bytes, np.ndarray]:
    """y = x + w for x, w of shape [n]; returns the ONNX bytes and w."""
    w = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n])],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString(), w


# ---- server process -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Server:
    data_dir: Path
    ports: tuple[int, int, int] = field(
        default_factory=lambda: (free_port(), free_port(), free_port())
    )
    proc: subprocess.Popen[str] | None = None

    def start(self, timeout: float = 60.0) -> None:
        a, b, c = self.ports
        cmd = [
            sys.executable, "-m", "veil.cli", "serve", "--platform", "simulated",
            "--data-dir", str(self.data_dir), "--host", "127.0.0.1",
            "--unattested-port", str(a), "--attested-port", str(b), "--management-port", str(c),
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        deadline = time.monotonic() + timeout
        lines: list[str] = []
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"server exited during start:\n{''.join(lines[-20:])}")
            lines.append(line)
            if "serving" in line:
                # keep draining so the server never blocks on a full pipe
                threading.Thread(target=self._drain, daemon=True).start()
                return
        self.kill()
        raise RuntimeError("server did not print 'serving' in time")

    def _drain(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        for _ in self.proc.stdout:
            pass

    def connect(self) -> Any:
        a, b, c = self.ports
        return veil.connect(
            "127.0.0.1", simulation=True, unattested_port=a, attested_port=b, management_port=c
        )

    def rss(self) -> int:
        assert self.proc is not None
        try:
            return int(psutil.Process(self.proc.pid).memory_info().rss)
        except psutil.NoSuchProcess:
            return 0

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


@contextlib.contextmanager
def running(data_dir: Path) -> Iterator[Server]:
    server = Server(data_dir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# ---- load run -------------------------------------------------------------------------------


@dataclass
class Stats:
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    outcomes: dict[str, dict[str, int]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(int))
    )
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, op: str, seconds: float, outcome: str) -> None:
        with self.lock:
            self.latencies[op].append(seconds)
            self.outcomes[op][outcome] += 1


def _outcome(exc: BaseException | None) -> str:
    if exc is None:
        return "ok"
    if isinstance(exc, ApiError):
        return "5xx" if exc.status >= 500 else "4xx"
    return "error"


# Each client keeps a fixed set of live models, one per size class, and replaces them (delete, then
# upload a new one of the same size): after the first fill the live set is constant, so RSS at the
# end speaks of leaks and fragmentation, not of how many models happened to be alive at that moment.
SIZE_CLASSES = (1, 16, 256)


def client_loop(
    server: Server, idx: int, deadline: float, stats: Stats, n: int, filled: threading.Semaphore
) -> None:
    rng = random.Random(idx)
    x = np.ones(n, dtype=np.float32)
    live: list[str | None] = [None] * len(SIZE_CLASSES)

    def timed(op: str, call: Any) -> None:
        t0 = time.perf_counter()
        exc: BaseException | None = None
        try:
            call()
        except (ApiError, TransportError) as e:
            exc = e
        stats.record(op, time.perf_counter() - t0, _outcome(exc))

    with server.connect() as client:
        while time.monotonic() < deadline:
            empty = [slot for slot, model_id in enumerate(live) if model_id is None]
            if not empty and rng.random() < 0.75:
                timed("predict", lambda: client.predict("base", x))
                continue
            slot = empty[0] if empty else rng.randrange(len(live))
            old = live[slot]
            if old is not None:
                live[slot] = None
                timed("delete", lambda old=old: client.delete_model(old))
            model_id = f"c{idx}-{rng.getrandbits(32):08x}"
            blob, _ = make_model(SIZE_CLASSES[slot] * n, rng.getrandbits(32))

            def upload(model_id: str = model_id, blob: bytes = blob, slot: int = slot) -> None:
                client.upload_model(blob, model_id=model_id)
                live[slot] = model_id

            timed("upload", upload)
            if empty and len(empty) == 1 and live[slot] is not None:
                filled.release()  # this client's live set is complete


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


# RSS is compared from the moment every client holds its full set of models and at least this
# fraction of the run has passed (allocators reach their working size); on a slow machine the first
# fill can take longer than the fraction.
WARM_UP_FRACTION = 0.25


def load_run(clients: int, seconds: float, n: int) -> bool:
    with tempfile.TemporaryDirectory(prefix="veil-load-") as tmp, running(Path(tmp)) as server:
        with server.connect() as admin:
            admin.upload_model(make_model(n, 0)[0], model_id="base")
            admin.predict("base", np.ones(n, dtype=np.float32))
        rss_start = server.rss()
        peak = [rss_start]
        warm: list[int | None] = [None]
        warm_after = [float("nan")]
        # (seconds since start, RSS) from warm-up on: one sample is taken at a random moment,
        # while uploads of 64 clients come and go; medians over a window are the steady state.
        samples: list[tuple[float, int]] = []
        stop = threading.Event()
        filled = threading.Semaphore(0)
        t0 = time.monotonic()
        warm_at = t0 + seconds * WARM_UP_FRACTION

        def monitor() -> None:
            pending = clients
            while not stop.wait(0.2):
                rss = server.rss()
                peak[0] = max(peak[0], rss)
                while pending and filled.acquire(blocking=False):
                    pending -= 1
                if warm[0] is None and not pending and time.monotonic() >= warm_at:
                    warm[0], warm_after[0] = rss, time.monotonic() - t0
                if warm[0] is not None:
                    samples.append((time.monotonic() - t0, rss))

        stats = Stats()
        deadline = time.monotonic() + seconds
        threads = [
            threading.Thread(target=client_loop, args=(server, i, deadline, stats, n, filled))
            for i in range(clients)
        ]
        mon = threading.Thread(target=monitor, daemon=True)
        mon.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - t0
        stop.set()
        rss_end = server.rss()

    print(
        f"\nLoad run: {clients} clients x {seconds:g} s (server: veil serve --platform simulated)"
    )
    header = (
        f"{'op':<8} {'requests':>9} {'ok':>7} {'4xx':>6} {'5xx':>6} {'error':>6} "
        f"{'p50 ms':>8} {'p99 ms':>8}"
    )
    print(header)
    print("-" * len(header))
    total_5xx = 0
    all_lat: list[float] = []
    for op in ("predict", "upload", "delete"):
        lat, out = stats.latencies.get(op, []), stats.outcomes.get(op, {})
        all_lat += lat
        total_5xx += out.get("5xx", 0)
        print(
            f"{op:<8} {len(lat):>9} {out.get('ok', 0):>7} {out.get('4xx', 0):>6} "
            f"{out.get('5xx', 0):>6} {out.get('error', 0):>6} "
            f"{_pct(lat, 50) * 1e3:>8.1f} {_pct(lat, 99) * 1e3:>8.1f}"
        )
    print(
        f"{'all':<8} {len(all_lat):>9}  ({len(all_lat) / elapsed:.0f} req/s)"
        f"{'':>22}{_pct(all_lat, 50) * 1e3:>8.1f} {_pct(all_lat, 99) * 1e3:>8.1f}"
    )
    if warm[0] is None:
        print(
            f"server RSS: start {rss_start / 2**20:.0f} MiB, peak {peak[0] / 2**20:.0f} MiB, "
            f"end {rss_end / 2**20:.0f} MiB; the clients never all held their models: no steady "
            "state to compare (run longer)"
        )
    else:
        print(
            f"server RSS: start {rss_start / 2**20:.0f} MiB, after warm-up ({warm_after[0]:.0f} s) "
            f"{warm[0] / 2**20:.0f} MiB, peak {peak[0] / 2**20:.0f} MiB, end "
            f"{rss_end / 2**20:.0f} MiB ({(rss_end - warm[0]) / warm[0]:+.1%} since warm-up; "
            "target within 10%)"
        )
        print(_steady_state(samples, elapsed))
    return total_5xx == 0


def _steady_state(samples: list[tuple[float, int]], elapsed: float) -> str:
    """Median RSS over the first and the last window after warm-up (a minute, or a quarter of
    what is left of the run), and the change between them."""
    if not samples:
        return "steady state: no sample after warm-up"
    window = min(60.0, (elapsed - samples[0][0]) / 4)
    first = [rss for t, rss in samples if t <= samples[0][0] + window]
    last = [rss for t, rss in samples if t >= elapsed - window] or [samples[-1][1]]
    a, b = statistics.median(first), statistics.median(last)
    return (
        f"steady state: median RSS over the first {window:.0f} s after warm-up "
        f"{a / 2**20:.0f} MiB, over the last {window:.0f} s {b / 2**20:.0f} MiB "
        f"({(b - a) / a:+.1%}; target within 10%)"
    )


# ---- fault run ------------------------------------------------------------------------------


@dataclass
class Ledger:
    """What the client knows: acknowledged models, and the one operation in flight."""

    acked: dict[str, tuple[str, int, int]] = field(default_factory=dict)  # id -> sha, n, seed
    # (op, id, sha, n, seed) of the operation sent but not acknowledged
    in_flight: tuple[str, str, str, int, int] | None = None


def fault_writer(server: Server, ledger: Ledger, rng: random.Random, counter: list[int]) -> None:
    try:
        with server.connect() as client:
            while True:
                if ledger.acked and rng.random() < 0.2:
                    model_id = rng.choice(sorted(ledger.acked))
                    ledger.in_flight = ("delete", model_id, "", 0, 0)
                    client.delete_model(model_id)
                    del ledger.acked[model_id]
                else:
                    counter[0] += 1
                    model_id = f"f{counter[0]}"
                    n, seed = rng.choice([16, 4096, 262144, 2_097_152]), rng.getrandbits(32)
                    blob, _ = make_model(n, seed)
                    sha = hashlib.sha256(blob).hexdigest()
                    ledger.in_flight = ("upload", model_id, sha, n, seed)
                    client.upload_model(blob, model_id=model_id)
                    ledger.acked[model_id] = (sha, n, seed)
                ledger.in_flight = None
    except (TransportError, ApiError, OSError):
        return  # the server was killed under us


def fault_run(rounds: int, seed: int) -> bool:
    rng = random.Random(seed)
    ok = True
    ledger = Ledger()
    deleted: set[str] = set()
    counter = [0]
    print(f"\nFault run: SIGKILL during uploads/deletes, {rounds} rounds, seed {seed}")
    print(
        f"{'round':>5} {'acked':>6} {'in flight':>22} {'restored':>9} {'sealed':>7} {'verdict':>8}"
    )
    with tempfile.TemporaryDirectory(prefix="veil-fault-") as tmp:
        data_dir = Path(tmp)
        for r in range(rounds):
            server = Server(data_dir)
            server.start()
            writer = threading.Thread(
                target=fault_writer, args=(server, ledger, rng, counter), daemon=True
            )
            before = set(ledger.acked)
            writer.start()
            time.sleep(rng.uniform(1.0, 4.0))
            server.kill()
            writer.join(timeout=60)
            deleted |= before - set(ledger.acked)
            flight = ledger.in_flight
            ledger.in_flight = None

            server = Server(data_dir)
            server.start()
            problems: list[str] = []
            try:
                with server.connect() as client:
                    listed = {m.model_id: m.hash.hex() for m in client.list_models()}
                    for model_id, (sha, n, s) in list(ledger.acked.items()):
                        in_flight_delete = flight is not None and flight[:2] == ("delete", model_id)
                        if in_flight_delete and model_id not in listed:
                            del ledger.acked[model_id]  # the in-flight delete went through
                            deleted.add(model_id)
                            continue
                        if listed.get(model_id) != sha:
                            problems.append(f"{model_id}: acknowledged, not restored intact")
                            continue
                        x = np.ones(n, dtype=np.float32)
                        y = client.predict(model_id, x).output[0].as_numpy()
                        if not np.array_equal(y, x + make_model(n, s)[1]):
                            problems.append(f"{model_id}: wrong prediction after restart")
                    for model_id, sha in listed.items():
                        if model_id in ledger.acked:
                            continue
                        if flight is not None and flight[:2] == ("upload", model_id):
                            if sha != flight[2]:
                                problems.append(f"{model_id}: in-flight upload restored partial")
                            else:  # committed just before the kill: the client adopts it
                                ledger.acked[model_id] = (sha, flight[3], flight[4])
                        elif model_id in deleted:
                            problems.append(f"{model_id}: deleted, came back")
                        else:
                            problems.append(f"{model_id}: unknown model")
                leftovers = [p.name for p in data_dir.rglob(".tmp*")]
                if leftovers:
                    problems.append(f"temporary files left: {leftovers}")
                sealed_files = len(list((data_dir / "sealed").glob("*.sealed")))
                if sealed_files != len(listed):
                    problems.append(f"{sealed_files} sealed files for {len(listed)} models")
                if (data_dir / "models").exists():
                    problems.append("plain model files exist: the store is not sealed")
            finally:
                server.stop()
            flight_s = "-" if flight is None else f"{flight[0]} {flight[1]}"
            verdict = "ok" if not problems else "FAIL"
            print(
                f"{r:>5} {len(ledger.acked):>6} {flight_s:>22} {len(listed):>9} "
                f"{sealed_files:>7} {verdict:>8}"
            )
            for p in problems:
                print(f"      {p}")
            ok = ok and not problems
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--elements", type=int, default=1024, help="input size of the base model")
    parser.add_argument("--fault-rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(4), "big"))
    parser.add_argument("--skip-load", action="store_true")
    parser.add_argument("--skip-fault", action="store_true")
    args = parser.parse_args()
    if (
        not 1 <= args.clients <= 64
        or not 0 < args.seconds <= 600
        or not 0 <= args.fault_rounds <= 20
    ):
        parser.error("bounded run: 1..64 clients, up to 600 s, up to 20 fault rounds")
    ok = True
    if not args.skip_load:
        ok = load_run(args.clients, args.seconds, args.elements) and ok
    if not args.skip_fault and args.fault_rounds:
        ok = fault_run(args.fault_rounds, args.seed) and ok
    print("\nresult:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
