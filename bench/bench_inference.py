"""Inference benchmark: in-process ONNX Runtime vs veil end to end vs a plain HTTP+JSON server.

    .venv/bin/python bench/bench_inference.py [--quick] [--json out.json] [--systems ...]

All on this machine, in one run, 127.0.0.1 only:

- ``inproc``: ``session.run`` in this process, the floor. Latency at batch 1 and throughput at
  batch 32 (what perfect batching could reach).
- ``batcher``: veil's `DynamicBatcher` around the same session in this process, with N asyncio
  callers (and the same callers unbatched), to show the batching gain without any network.
- ``plain``: bench/plain_server.py, a naive unprotected Starlette + JSON server (one request at a
  time), N client threads each with its own keep-alive connection.
- ``veil``: ``veil serve --platform simulated`` in a subprocess, N client threads each with its own
  attested connection (``veil.connect(..., simulation=True)``).

Workloads: DistilBERT (``DistilBertConfig()`` defaults, ~255 MiB) at batch 1 × seq 8 and seq 128,
all-MiniLM-L6-v2 at seq 8 and seq 128; concurrency 1, 16 and 64. Reported: p50/p90/p99 latency,
throughput (sequences/s), CPU of the server process and of this (client) process, server RSS,
ratios veil/in-process and veil/plain; ``connect()`` time; upload throughput of the DistilBERT file
and the server's peak RSS meanwhile, through veil's client and, if ``.work/blindai-venv`` exists
(scripts/compat-venv builds it), through the genuine BlindAI 0.6.3 client.

Every loop is bounded by a request count and a time limit. Models are built on first use into
``.work/bench-models/`` (needs torch and transformers).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _models

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
ORT_THREADS = 2
SYSTEMS = ("inproc", "batcher", "plain", "veil")
# Not run by default: the plain server with veil's batcher, one per straggler window (ms); and
# ``veildefault``: veil with its default limits, authentication on and every client on ONE API
# key (a deployed service's clients), where errors (429/503) count as errors; ``veilgraph`` and
# ``veilint8``: `veil` serving the model uploaded with that optimization (its report in the note).
EXTRA_SYSTEMS = {"plainbatch0": 0.0, "plainbatch2": 2.0, "plainbatch5": 5.0, "veildefault": 0.0}
OPTIMIZED_SYSTEMS = {"veilgraph": "graph", "veilint8": "int8"}


@dataclass(frozen=True)
class Settings:
    workloads: tuple[tuple[str, int], ...]  # (model, seq); batch is always 1 per request
    concurrency: tuple[int, ...]
    cell_seconds: float
    cell_requests: int
    connect_samples: int
    upload: bool
    blindai_upload: bool  # the 2023 client is slow (minutes for 255 MB): not in --quick


FULL = Settings(
    workloads=(("distilbert", 8), ("distilbert", 128), ("minilm", 8), ("minilm", 128)),
    concurrency=(1, 16, 64),
    cell_seconds=8.0,
    cell_requests=3000,
    connect_samples=20,
    upload=True,
    blindai_upload=True,
)
QUICK = Settings(
    workloads=(("distilbert", 8),),
    concurrency=(1, 16),
    cell_seconds=1.5,
    cell_requests=150,
    connect_samples=5,
    upload=True,
    blindai_upload=False,
)


@dataclass
class Row:
    system: str
    model: str
    seq: int
    concurrency: int
    batch: int = 1
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    seq_per_s: float | None = None
    server_cpu_pct: float | None = None
    client_cpu_pct: float | None = None
    server_rss_mb: float | None = None
    mean_batch: float | None = None
    note: str = ""


@dataclass
class Report:
    machine: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    connect: dict[str, Any] = field(default_factory=dict)
    upload: list[dict[str, Any]] = field(default_factory=list)
    ratios: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


# -- helpers -------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def fill_latency(row: Row, latencies: list[float], seconds: float) -> None:
    row.requests = len(latencies)
    row.seconds = seconds
    if latencies:
        row.p50_ms = percentile(latencies, 50) * 1e3
        row.p90_ms = percentile(latencies, 90) * 1e3
        row.p99_ms = percentile(latencies, 99) * 1e3
        row.seq_per_s = len(latencies) * row.batch / seconds if seconds > 0 else None


def add_row(report: Report, row: Row) -> None:
    report.rows.append(row)
    print(
        f"  {time.strftime('%H:%M:%S')} {row.system} {row.model} seq {row.seq} c={row.concurrency}"
        f" b={row.batch}: n={row.requests} p50={_fmt(row.p50_ms, 2)} ms, "
        f"{_fmt(row.seq_per_s)} seq/s",
        file=sys.stderr,
        flush=True,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system + t.children_user + t.children_system)


def rss_bytes(proc: psutil.Process) -> int:
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += child.memory_info().rss
    return int(total)


class CpuMeter:
    """CPU used by the server process and by this process over a window (100% = one core)."""

    def __init__(self, server: psutil.Process | None) -> None:
        self.server = server
        self.me = psutil.Process()

    def __enter__(self) -> CpuMeter:
        self.t0 = time.perf_counter()
        self.s0 = cpu_seconds(self.server) if self.server else 0.0
        self.c0 = cpu_seconds(self.me)
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self.t0
        self.server_pct = (
            (cpu_seconds(self.server) - self.s0) / wall * 100 if self.server and wall else None
        )
        self.client_pct = (cpu_seconds(self.me) - self.c0) / wall * 100 if wall else None


class PeakRss:
    """Peak RSS of a process (and its children) while the block runs, sampled every 5 ms."""

    def __init__(self, proc: psutil.Process, interval: float = 0.005) -> None:
        self.proc, self.interval = proc, interval
        self.peak = self.process_idle = self.process_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, rss_bytes(self.proc))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRss:
        self.peak = rss_bytes(self.proc)
        # The server process alone: its RSS now, and its kernel high-water mark from now on.
        self.process_idle = self.proc.memory_info().rss
        with contextlib.suppress(OSError):
            Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(psutil.Error):
            self.peak = max(self.peak, rss_bytes(self.proc))
        # Linux keeps the exact high-water mark (since the process started: a fresh server's
        # start-up stays far below an upload's peak), which no sampling can miss.
        self.process_peak = self.process_idle
        with contextlib.suppress(OSError, ValueError, StopIteration):
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
            hwm_kb = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
            self.process_peak = int(hwm_kb.split()[1]) * 1024
            self.peak = max(self.peak, self.process_peak)


def new_session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = ORT_THREADS
    options.inter_op_num_threads = 1  # as veil's server sets it
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_threads(
    clients: list[Any],
    call: Callable[[Any, int], None],
    seconds: float,
    max_requests: int,
    server: psutil.Process | None,
) -> tuple[list[float], int, float, CpuMeter, str]:
    """Each client in its own thread calls `call(client, i)` until the count or time runs out."""
    n = len(clients)
    per_thread = max(1, max_requests // n)
    barrier = threading.Barrier(n + 1)
    stop = threading.Event()
    latencies: list[list[float]] = [[] for _ in range(n)]
    errors = [0] * n
    first_error: list[str] = []
    last_done = [0.0] * n

    def worker(k: int) -> None:
        client = clients[k]
        with contextlib.suppress(Exception):
            call(client, k)  # warm: first request on this connection and shape
        barrier.wait()
        mine = latencies[k]
        for i in range(per_thread):
            if stop.is_set():
                break
            t0 = time.perf_counter()
            try:
                call(client, k * per_thread + i)
            except Exception as exc:
                errors[k] += 1
                if not first_error:
                    first_error.append(f"{type(exc).__name__}: {str(exc)[:160]}")
                continue
            t1 = time.perf_counter()
            mine.append(t1 - t0)
            last_done[k] = t1

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(n)]
    for t in threads:
        t.start()
    barrier.wait(timeout=120)
    with CpuMeter(server) as meter:
        started = time.perf_counter()
        deadline = started + seconds
        for t in threads:
            t.join(timeout=max(0.0, deadline - time.perf_counter()))
        stop.set()
        for t in threads:
            t.join(timeout=60)
    ended = max([started, *last_done])
    return (
        [x for lat in latencies for x in lat],
        sum(errors),
        ended - started,
        meter,
        first_error[0] if first_error else "",
    )


# -- servers -------------------------------------------------------------------------------------


class ServerProcess:
    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log_file = log.open("wb")
        self.popen = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=self.log_file, cwd=REPO, env=env
        )
        self.proc = psutil.Process(self.popen.pid)
        self.log = log

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=15)
        if self.popen.stdout:
            self.popen.stdout.close()
        self.log_file.close()

    def fail(self, what: str) -> RuntimeError:
        tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
        return RuntimeError(f"{what}; server log tail:\n{tail}")


@contextlib.contextmanager
def plain_server(
    model: _models.BenchModel, workdir: Path, batch_delay_ms: float | None = None
) -> Iterator[tuple[ServerProcess, int]]:
    argv = [sys.executable, str(REPO / "bench" / "plain_server.py"), str(model.path)]
    argv += ["--threads", str(ORT_THREADS)]
    if batch_delay_ms is not None:
        argv += ["--batch-delay-ms", str(batch_delay_ms)]
    server = ServerProcess(argv, workdir / f"plain-{model.name}.log")
    try:
        assert server.popen.stdout is not None
        line = server.popen.stdout.readline().decode()
        if not line.startswith("PORT "):
            raise server.fail("plain server did not start")
        port = int(line.split()[1])
        import httpx

        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"http://{HOST}:{port}/health", timeout=2).raise_for_status()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or server.popen.poll() is not None:
                    raise server.fail("plain server not ready") from None
                time.sleep(0.1)
        yield server, port
    finally:
        server.stop()


@dataclass(frozen=True)
class VeilPorts:
    unattested: int
    attested: int
    management: int

    def connect_kwargs(self) -> dict[str, Any]:
        return {
            "simulation": True,
            "unattested_port": self.unattested,
            "attested_port": self.attested,
            "management_port": self.management,
        }


def veil_connect(ports: VeilPorts, api_key: str | None = None) -> Any:
    import veil

    with warnings.catch_warnings():
        # The bench deliberately runs the simulated platform; the warning is printed once at start.
        warnings.simplefilter("ignore", veil.SimulationModeWarning)
        return veil.connect(HOST, api_key=api_key, **ports.connect_kwargs())


def create_owner_key(data: Path) -> str:
    """An owner key in a simulated server's data directory (what ``veil keys create`` does)."""
    from veil.providers import detect_provider
    from veil.server.keys import KeyStore
    from veil.server.state import open_state

    provider = detect_provider("simulated", data_dir=data)
    return KeyStore(open_state(data, provider.sealing_key)).create("owner", name="bench")[1]


# The server's protective limits (32 requests in progress, then a bounded queue; 500 requests a
# second per key) bound what `veil` measures: it measures capacity, so it lifts them
# (`veildefault` keeps them).
_CAPACITY_FLAGS = {
    "--max-concurrent-requests": "1024",
    "--requests-per-second": "1000000",
    "--burst": "1000000",
}


def capacity_flags() -> list[str]:
    """The `_CAPACITY_FLAGS` this version of `veil serve` knows."""
    done = subprocess.run(
        [sys.executable, "-m", "veil.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
    )
    flags: list[str] = []
    for flag, value in _CAPACITY_FLAGS.items():
        if flag in done.stdout:
            flags += [flag, value]
    return flags


@contextlib.contextmanager
def veil_server(
    workdir: Path, tag: str, api_key: str | None = None
) -> Iterator[tuple[ServerProcess, VeilPorts]]:
    """A simulated `veil serve`; with `api_key` (made in its data directory first) it keeps its
    default limits and asks for keys, else its limits are lifted (`capacity_flags`)."""
    ports = VeilPorts(free_port(), free_port(), free_port())
    data = workdir / f"veil-data-{tag}"
    data.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "veil.cli", "serve", "--platform", "simulated"]
    argv += ["--data-dir", str(data), "--host", HOST, "--threads", str(ORT_THREADS)]
    argv += ["--unattested-port", str(ports.unattested), "--attested-port", str(ports.attested)]
    argv += ["--management-port", str(ports.management)]
    argv += [] if api_key is not None else capacity_flags()
    server = ServerProcess(argv, workdir / f"veil-{tag}.log")
    try:
        # The simulated measurement hashes veil's sources and is cached per process; while the
        # tree is being edited, a long run would pin a stale value. Re-read it for this server.
        with contextlib.suppress(ImportError, AttributeError):
            from veil.providers.measurement import simulated_measurement

            simulated_measurement.cache_clear()
        deadline = time.monotonic() + 90
        while True:
            if server.popen.poll() is not None:
                raise server.fail(f"veil serve exited with {server.popen.returncode}")
            try:
                veil_connect(ports, api_key).close()
                break
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise server.fail(
                        f"veil serve not ready: {type(exc).__name__}: {exc}"
                    ) from None
                time.sleep(0.2)
        yield server, ports
    finally:
        server.stop()
        shutil.rmtree(data, ignore_errors=True)


# -- systems -------------------------------------------------------------------------------------


def bench_inproc(model: _models.BenchModel, seq: int, s: Settings, report: Report) -> None:
    session = new_session(model.path)
    for batch in (1, 32):
        feeds = model.inputs(batch, seq)
        for _ in range(3):
            session.run(None, feeds)
        latencies: list[float] = []
        budget = s.cell_seconds if batch == 1 else s.cell_seconds / 2
        count = s.cell_requests if batch == 1 else max(5, s.cell_requests // 32)
        with CpuMeter(None) as meter:
            started = time.perf_counter()
            while len(latencies) < count and time.perf_counter() - started < budget:
                t0 = time.perf_counter()
                session.run(None, feeds)
                latencies.append(time.perf_counter() - t0)
            seconds = time.perf_counter() - started
        row = Row("inproc", model.name, seq, 1, batch=batch)
        fill_latency(row, latencies, seconds)
        row.client_cpu_pct = meter.client_pct
        row.note = "floor" if batch == 1 else "one batch of 32 per call"
        add_row(report, row)
    bench_inproc_paced(session, model, seq, s, report)


PACE_S = 0.002


def bench_inproc_paced(
    session: ort.InferenceSession, model: _models.BenchModel, seq: int, s: Settings, report: Report
) -> None:
    """Batch 1 with the CPUs idle for `PACE_S` before each run, as a server's run sees them at
    concurrency 1 (the request's round trip in between): caches and idle cores cool, and the
    same run takes longer than back to back. Not a target; it shows what of a served request's
    time is the model's own."""
    feeds = model.inputs(1, seq)
    for _ in range(3):
        session.run(None, feeds)
    latencies: list[float] = []
    with CpuMeter(None) as meter:
        started = time.perf_counter()
        while len(latencies) < s.cell_requests and time.perf_counter() - started < s.cell_seconds:
            time.sleep(PACE_S)
            t0 = time.perf_counter()
            session.run(None, feeds)
            latencies.append(time.perf_counter() - t0)
        seconds = time.perf_counter() - started
    row = Row("inprocpaced", model.name, seq, 1, batch=1)
    fill_latency(row, latencies, seconds)
    row.client_cpu_pct = meter.client_pct
    row.note = f"{PACE_S * 1000:g} ms idle before each run"
    add_row(report, row)


async def drive_batcher(
    batcher: Any, requests: list[dict[str, np.ndarray]], n: int, count: int, seconds: float
) -> tuple[list[float], float]:
    """n asyncio callers, each submitting up to `count` requests in a row until time is up."""
    out: list[float] = []
    # warm: one request per caller, before the clock starts
    await asyncio.gather(*(batcher.submit(requests[k % len(requests)]) for k in range(n)))
    started = time.perf_counter()
    deadline = started + seconds

    async def caller(k: int) -> None:
        for _ in range(count):
            if time.perf_counter() > deadline:
                return
            t0 = time.perf_counter()
            await batcher.submit(requests[k % len(requests)])
            out.append(time.perf_counter() - t0)

    await asyncio.gather(*(caller(k) for k in range(n)))
    return out, time.perf_counter() - started


def bench_batcher(model: _models.BenchModel, seq: int, s: Settings, report: Report) -> None:
    from veil.server.batching import BatchingConfig, DynamicBatcher, has_dynamic_batch_axis

    session = new_session(model.path)
    dynamic = has_dynamic_batch_axis(session.get_inputs(), session.get_outputs())
    pool = ThreadPoolExecutor(max_workers=1)

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return list(session.run(None, feeds))

    requests = [model.inputs(1, seq, seed=i) for i in range(64)]
    for r in requests[:2]:
        session.run(None, r)

    variants = [(c, True) for c in s.concurrency] + [(max(s.concurrency), False)]
    for concurrency, enabled in variants:
        batcher = DynamicBatcher(
            run, config=BatchingConfig(enabled=enabled), dynamic_batch_axis=dynamic, executor=pool
        )
        per_caller = max(1, s.cell_requests // concurrency)

        with CpuMeter(None) as meter:
            latencies, seconds = asyncio.run(
                drive_batcher(batcher, requests, concurrency, per_caller, s.cell_seconds)
            )
        row = Row("batcher" if enabled else "unbatched", model.name, seq, concurrency)
        fill_latency(row, latencies, seconds)
        row.client_cpu_pct = meter.client_pct
        row.mean_batch = batcher.stats().mean_batch_size
        row.note = "in-process asyncio callers; mean batch includes the warm-up"
        add_row(report, row)
    pool.shutdown()


def bench_plain(
    model: _models.BenchModel,
    seqs: list[int],
    s: Settings,
    report: Report,
    workdir: Path,
    system: str = "plain",
) -> None:
    import httpx

    delay = EXTRA_SYSTEMS.get(system)
    with plain_server(model, workdir, delay) as (server, port):
        url = f"http://{HOST}:{port}/predict"
        for seq in seqs:
            bodies = [
                json.dumps({"inputs": {k: v.tolist() for k, v in model.inputs(1, seq, i).items()}})
                for i in range(64)
            ]
            for concurrency in s.concurrency:
                clients = [httpx.Client(timeout=120) for _ in range(concurrency)]

                def call(client: httpx.Client, i: int, bodies: list[str] = bodies) -> None:
                    r = client.post(
                        url,
                        content=bodies[i % len(bodies)],
                        headers={"content-type": "application/json"},
                    )
                    r.raise_for_status()
                    r.json()

                before = httpx.get(f"http://{HOST}:{port}/stats").json()
                try:
                    lat, errors, seconds, meter, first = run_threads(
                        clients, call, s.cell_seconds, s.cell_requests, server.proc
                    )
                finally:
                    for c in clients:
                        c.close()
                after = httpx.get(f"http://{HOST}:{port}/stats").json()
                row = Row(system, model.name, seq, concurrency, errors=errors, note=first)
                if after and after["runs"] > before["runs"]:
                    # includes each client's warm-up request
                    runs = after["runs"] - before["runs"]
                    row.mean_batch = (after["requests"] - before["requests"]) / runs
                fill_latency(row, lat, seconds)
                row.server_cpu_pct, row.client_cpu_pct = meter.server_pct, meter.client_pct
                row.server_rss_mb = rss_bytes(server.proc) / 2**20
                add_row(report, row)


def bench_veil(
    model: _models.BenchModel,
    seqs: list[int],
    s: Settings,
    report: Report,
    workdir: Path,
    system: str = "veil",
) -> None:
    key = None
    if system == "veildefault":
        data = workdir / f"veil-data-{system}-{model.name}"
        data.mkdir(parents=True, exist_ok=True)
        key = create_owner_key(data)
    optimization = OPTIMIZED_SYSTEMS.get(system)
    upload_note = ""
    with veil_server(workdir, f"{system}-{model.name}", key) as (server, ports):
        first = veil_connect(ports, key)
        try:
            reply = first.upload_model(
                str(model.path), model_id=model.name, optimization=optimization
            )
            if optimization is not None:
                upload_note = f"{optimization}: {reply.optimization}"
                print(f"  {system} {model.name} upload: {upload_note}", flush=True)
        finally:
            first.close()
        max_conc = max(s.concurrency)
        clients = []
        try:
            for _ in range(max_conc):
                clients.append(veil_connect(ports, key))
            for seq in seqs:
                feeds = [model.inputs(1, seq, i) for i in range(64)]
                for concurrency in s.concurrency:

                    def call(client: Any, i: int, feeds: list[Any] = feeds) -> None:
                        client.predict(model.name, feeds[i % len(feeds)])

                    lat, errors, seconds, meter, first = run_threads(
                        clients[:concurrency], call, s.cell_seconds, s.cell_requests, server.proc
                    )
                    note = first or upload_note
                    row = Row(system, model.name, seq, concurrency, errors=errors, note=note)
                    fill_latency(row, lat, seconds)
                    row.server_cpu_pct, row.client_cpu_pct = meter.server_pct, meter.client_pct
                    row.server_rss_mb = rss_bytes(server.proc) / 2**20
                    add_row(report, row)
        finally:
            for c in clients:
                with contextlib.suppress(Exception):
                    c.close()


def bench_connect(s: Settings, report: Report, workdir: Path) -> None:
    with veil_server(workdir, "connect") as (_server, ports):
        times = []
        for _ in range(s.connect_samples):
            t0 = time.perf_counter()
            conn = veil_connect(ports)
            times.append(time.perf_counter() - t0)
            conn.close()
        report.connect = {
            "samples": len(times),
            "p50_ms": percentile(times, 50) * 1e3,
            "p90_ms": percentile(times, 90) * 1e3,
            "max_ms": max(times) * 1e3,
            "note": "full verification: evidence fetch, quote + collateral checks, pinned TLS",
        }


_BLINDAI_UPLOAD = r"""
import json, sys, time, warnings
import blindai.core
addr, path = sys.argv[1], sys.argv[5]
up, ap, mp = (int(a) for a in sys.argv[2:5])
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    conn = blindai.core.connect(addr, unattested_server_port=up, attested_server_port=ap,
        model_management_port=mp, hazmat_http_on_unattested_port=True, simulation_mode=True)
t0 = time.perf_counter()
reply = conn.upload_model(path, model_name="bench.onnx")
print(json.dumps({"seconds": time.perf_counter() - t0, "model_id": reply.model_id}))
"""


def bench_upload(s: Settings, report: Report, workdir: Path) -> None:
    model = _models.ensure_model("distilbert")
    size = model.path.stat().st_size
    # A fresh server per client, so each peak RSS starts from the same idle baseline.
    with veil_server(workdir, "upload-veil") as (server, ports):
        conn = veil_connect(ports)
        try:
            idle = rss_bytes(server.proc)
            with PeakRss(server.proc) as peak:
                t0 = time.perf_counter()
                conn.upload_model(str(model.path), model_id="upload-bench")
                seconds = time.perf_counter() - t0
        finally:
            conn.close()
        report.upload.append(_upload_row("veil", size, seconds, idle, peak))

    blindai_python = REPO / ".work" / "blindai-venv" / "bin" / "python"
    if not s.blindai_upload:
        report.skipped.append("upload via BlindAI 0.6.3 client: not in --quick")
        return
    if not blindai_python.exists():
        report.skipped.append("upload via BlindAI 0.6.3 client: .work/blindai-venv not built")
        return
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        env.pop(name, None)
    env["PYTHONPATH"] = str(REPO / "tests" / "compat" / "stubs")
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    with veil_server(workdir, "upload-blindai") as (server, ports):
        idle = rss_bytes(server.proc)
        argv = [str(blindai_python), "-c", _BLINDAI_UPLOAD, HOST]
        argv += [str(ports.unattested), str(ports.attested), str(ports.management)]
        argv += [str(model.path)]
        with PeakRss(server.proc) as peak:
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=600, env=env, check=False
            )
        if done.returncode != 0:
            report.skipped.append(f"upload via BlindAI client failed: {done.stderr[-800:]}")
            return
        seconds = float(json.loads(done.stdout.strip().splitlines()[-1])["seconds"])
        report.upload.append(_upload_row("blindai-0.6.3", size, seconds, idle, peak))


def _upload_row(client: str, size: int, seconds: float, idle: int, peak: PeakRss) -> dict[str, Any]:
    return {
        "client": client,
        "model_mb": size / 1e6,
        "seconds": seconds,
        "mb_per_s": size / 1e6 / seconds,
        "server_idle_rss_mb": idle / 2**20,
        "server_peak_rss_mb": peak.peak / 2**20,
        "peak_rss_over_model": peak.peak / size,
        # The figure the target is about: the server process's growth over the model's size.
        "process_growth_over_model": (peak.process_peak - peak.process_idle) / size,
    }


# -- report --------------------------------------------------------------------------------------


def _find(rows: list[Row], **match: Any) -> Row | None:
    for row in rows:
        if all(getattr(row, k) == v for k, v in match.items()):
            return row
    return None


# The Performance issue's targets at one client: served p50 over in-process p50.
C1_TARGETS = {("distilbert", 8): "<= 1.10", ("distilbert", 128): "<= 1.03", ("minilm", 8): "<= 1.5"}


def compute_ratios(report: Report) -> None:
    def add(name: str, value: float | None, target: str) -> None:
        report.ratios.append({"ratio": name, "value": value, "target": target})

    for model, seq in sorted({(r.model, r.seq) for r in report.rows}):
        floor = _find(report.rows, system="inproc", model=model, seq=seq, batch=1)
        b32 = _find(report.rows, system="inproc", model=model, seq=seq, batch=32)
        veil1 = _find(report.rows, system="veil", model=model, seq=seq, concurrency=1)
        paced = _find(report.rows, system="inprocpaced", model=model, seq=seq)
        default1 = _find(report.rows, system="veildefault", model=model, seq=seq, concurrency=1)
        plain1 = _find(report.rows, system="plain", model=model, seq=seq, concurrency=1)
        tag = f"{model} seq {seq}"
        target = C1_TARGETS.get((model, seq), "")
        for system, wanted in (("veilgraph", "<= 1.0"), ("veilint8", "<= 0.4 (2.5x faster)")):
            optimized = _find(report.rows, system=system, model=model, seq=seq, concurrency=1)
            if optimized and floor and optimized.p50_ms and floor.p50_ms:
                add(
                    f"{tag}: {system} p50 / in-process fp32 p50 (c=1)",
                    optimized.p50_ms / floor.p50_ms,
                    wanted,
                )
        for name, served in (("veil", veil1), ("veildefault", default1)):
            if served is None or not served.p50_ms:
                continue
            if floor and floor.p50_ms:
                add(
                    f"{tag}: {name} p50 / in-process p50 (c=1)",
                    served.p50_ms / floor.p50_ms,
                    target,
                )
            if paced and paced.p50_ms:
                add(
                    f"{tag}: {name} p50 / in-process paced p50 (c=1)",
                    served.p50_ms / paced.p50_ms,
                    "",
                )
            if plain1 and plain1.p50_ms:
                add(f"{tag}: {name} p50 / plain p50 (c=1)", served.p50_ms / plain1.p50_ms, "<= 1.0")
        for conc in sorted({r.concurrency for r in report.rows if r.concurrency > 1}):
            v = _find(report.rows, system="veil", model=model, seq=seq, concurrency=conc)
            p = _find(report.rows, system="plain", model=model, seq=seq, concurrency=conc)
            b = _find(report.rows, system="batcher", model=model, seq=seq, concurrency=conc)
            if v and p and v.seq_per_s and p.seq_per_s:
                add(
                    f"{tag}: veil / plain throughput (c={conc})",
                    v.seq_per_s / p.seq_per_s,
                    ">= 2.5",
                )
            if v and b32 and v.seq_per_s and b32.seq_per_s:
                add(
                    f"{tag}: veil / in-process batch-32 throughput (c={conc})",
                    v.seq_per_s / b32.seq_per_s,
                    ">= 0.75",
                )
            if b and b32 and b.seq_per_s and b32.seq_per_s:
                add(
                    f"{tag}: in-process batcher / batch-32 throughput (c={conc})",
                    b.seq_per_s / b32.seq_per_s,
                    "",
                )
            for extra in EXTRA_SYSTEMS:
                e = _find(report.rows, system=extra, model=model, seq=seq, concurrency=conc)
                if e and p and e.seq_per_s and p.seq_per_s:
                    add(
                        f"{tag}: {extra} / plain throughput (c={conc})",
                        e.seq_per_s / p.seq_per_s,
                        "",
                    )
            d = _find(report.rows, system="veildefault", model=model, seq=seq, concurrency=conc)
            if d and b32 and d.seq_per_s and b32.seq_per_s:
                add(
                    f"{tag}: veildefault (1 key) / in-process batch-32 (c={conc}, "
                    f"{d.errors} errors)",
                    d.seq_per_s / b32.seq_per_s,
                    ">= 0.9, 0 errors",
                )
            u = _find(report.rows, system="unbatched", model=model, seq=seq, concurrency=conc)
            if b and u and b.seq_per_s and u.seq_per_s:
                add(
                    f"{tag}: batcher / unbatched throughput (c={conc})",
                    b.seq_per_s / u.seq_per_s,
                    "",
                )


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_report(report: Report) -> None:
    m = report.machine
    print(
        f"\nmachine: {m['cpus']} CPUs, {m['cpu']}, onnxruntime {m['onnxruntime']}, "
        f"ORT intra-op threads {m['ort_threads']}, python {m['python']}"
    )
    head = (
        f"{'system':<12}{'model':<11}{'seq':>4}{'conc':>5}{'batch':>6}{'n':>6}{'err':>6}"
        f"{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'seq/s':>9}{'srvCPU%':>8}{'cliCPU%':>8}"
        f"{'RSS MB':>8}{'mean b':>7}"
    )
    print(head)
    print("-" * len(head))
    for r in report.rows:
        print(
            f"{r.system:<12}{r.model:<11}{r.seq:>4}{r.concurrency:>5}{r.batch:>6}{r.requests:>6}"
            f" {r.errors:>5}{_fmt(r.p50_ms, 2):>9}{_fmt(r.p90_ms, 2):>9}{_fmt(r.p99_ms, 2):>9}"
            f"{_fmt(r.seq_per_s):>9}{_fmt(r.server_cpu_pct, 0):>8}{_fmt(r.client_cpu_pct, 0):>8}"
            f"{_fmt(r.server_rss_mb, 0):>8}{_fmt(r.mean_batch, 1):>7}"
        )
    for r in report.rows:
        if r.errors:
            print(f"  errors {r.system} {r.model} seq {r.seq} c={r.concurrency}: first: {r.note}")
    if report.ratios:
        print("\nratios")
        for item in report.ratios:
            print(f"  {item['ratio']:<66} {_fmt(item['value'], 2):>7}  {item['target']}")
    if report.connect:
        c = report.connect
        print(
            f"\nconnect(): p50 {c['p50_ms']:.1f} ms, p90 {c['p90_ms']:.1f} ms over "
            f"{c['samples']} (target p50 <= 50 ms)"
        )
    for u in report.upload:
        print(
            f"upload {u['model_mb']:.0f} MB via {u['client']}: {u['mb_per_s']:.0f} MB/s "
            f"({u['seconds']:.2f} s); server process (peak - idle) = "
            f"{u['process_growth_over_model']:.2f}x model (targets >= 150 MB/s, <= 2x); "
            f"with the admission child and idle: idle {u['server_idle_rss_mb']:.0f} MB, "
            f"peak {u['server_peak_rss_mb']:.0f} MB = {u['peak_rss_over_model']:.2f}x model"
        )
    for line in report.skipped:
        print(f"skipped: {line}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run (~1 minute)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help=f"comma-separated subset of {','.join(SYSTEMS)} (default: all), "
        f"or extra ones: {','.join([*EXTRA_SYSTEMS, *OPTIMIZED_SYSTEMS])} (see the module)",
    )
    parser.add_argument("--no-upload", action="store_true", help="skip connect/upload measurements")
    parser.add_argument("--seconds", type=float, help="time limit per measurement cell")
    parser.add_argument("--concurrency", help="comma-separated client counts, e.g. 1,16,64")
    parser.add_argument("--workloads", help="comma-separated model:seq, e.g. distilbert:8,minilm:8")
    args = parser.parse_args(argv)

    s = QUICK if args.quick else FULL
    if args.seconds:
        s = Settings(**{**asdict(s), "cell_seconds": args.seconds})
    if args.concurrency:
        s = Settings(
            **{**asdict(s), "concurrency": tuple(int(c) for c in args.concurrency.split(","))}
        )
    if args.workloads:
        pairs = tuple((w.split(":")[0], int(w.split(":")[1])) for w in args.workloads.split(","))
        s = Settings(**{**asdict(s), "workloads": pairs})
    systems = [x for x in args.systems.split(",") if x]
    unknown = set(systems) - set(SYSTEMS) - set(EXTRA_SYSTEMS) - set(OPTIMIZED_SYSTEMS)
    if unknown:
        parser.error(
            f"unknown systems {sorted(unknown)}, expected some of {[*SYSTEMS, *EXTRA_SYSTEMS]}"
        )

    report = Report(
        machine={
            "cpus": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(),
            "onnxruntime": ort.__version__,
            "ort_threads": ORT_THREADS,
            "python": platform.python_version(),
            "quick": args.quick,
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        }
    )
    if "veil" in systems:
        report.machine["veil_serve_extra_flags"] = capacity_flags()
        print(
            "note: veil runs with --platform simulated (no TEE): a speed measurement only",
            file=sys.stderr,
        )

    by_model: dict[str, list[int]] = {}
    for name, seq in s.workloads:
        by_model.setdefault(name, []).append(seq)

    with tempfile.TemporaryDirectory(prefix="veil-bench-") as tmp:
        workdir = Path(tmp)
        for name, seqs in by_model.items():
            model = _models.ensure_model(name)
            for seq in seqs:
                if "inproc" in systems:
                    bench_inproc(model, seq, s, report)
                if "batcher" in systems:
                    bench_batcher(model, seq, s, report)
            for system in systems:  # in the order given: lets repeated runs swap the order
                if system == "veildefault" or system in OPTIMIZED_SYSTEMS:
                    try:
                        bench_veil(model, seqs, s, report, workdir, system)
                    except Exception as exc:
                        report.skipped.append(f"{system} {name}: {type(exc).__name__}: {exc}")
                elif system == "plain" or system in EXTRA_SYSTEMS:
                    bench_plain(model, seqs, s, report, workdir, system)
            if "veil" in systems:
                try:
                    bench_veil(model, seqs, s, report, workdir)
                except Exception as exc:
                    report.skipped.append(f"veil {name}: {type(exc).__name__}: {exc}")
        if "veil" in systems and s.upload and not args.no_upload:
            try:
                bench_connect(s, report, workdir)
                bench_upload(s, report, workdir)
            except Exception as exc:
                report.skipped.append(f"connect/upload: {type(exc).__name__}: {exc}")

    report.machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    compute_ratios(report)
    print_report(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(asdict(report), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
