"""Where a null-model round trip spends its time, on the server and on the client.

    .venv/bin/python bench/profile_request.py [--requests 3000] [--rate 250] [--keep DIR]

Starts ``veil serve --platform simulated`` (capacity limits lifted, as bench_inference.py's
``veil`` system), uploads the ``null`` model (``output = Identity(input)``, int64 [1, 8]), starts
a client loop of ``predict`` calls (one thread, one attested connection) in a second process and,
once both are warm, attaches py-spy to each for the loop. Each on-CPU sample (py-spy and `IDLE`
leave out waiting threads) is put in one component by the innermost frame that belongs to a known
module (`COMPONENTS`, first match from the leaf up); the tables give each component's fraction
of the process's samples.

Fractions, not milliseconds: the machine this runs on is usually shared, and py-spy's sampling
is the same for every component. Needs py-spy (the dev extra) and permission to trace another
process (root, or ``kernel.yama.ptrace_scope`` 0).
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _models
import bench_inference as bi

# (component, pattern on "function (file:line)"), tried in order on each frame from the leaf up;
# the first frame with any match names the sample's component.
COMPONENTS: tuple[tuple[str, str], ...] = (
    ("socket send/recv (server: asyncio transport)", r"_SelectorSocketTransport\.(write|_read)"),
    ("TLS (ssl / sslproto; on the client with its send/recv)", r"\((ssl|sslproto)\.py:"),
    ("logging", r"\(logging/"),
    ("metrics (prometheus_client)", r"prometheus_client/|veil/server/metrics\.py"),
    ("ORT run", r"onnxruntime/"),
    ("tensor conversion (numpy, veil.tensors)", r"numpy/|veil/tensors\.py"),
    ("CBOR decode/encode (veil.wire)", r"veil/wire/"),
    ("batcher", r"veil/server/batching\.py"),
    ("connection hygiene (_GuardedHttp)", r"veil/server/connections\.py"),
    ("h11 parser", r"h11/"),
    ("uvicorn protocol", r"uvicorn/"),
    ("starlette routing/request/response", r"starlette/"),
    ("auth/limits/handler (veil.server.app...)", r"veil/server/"),
    (
        "thread hops (executor hand-off, loop wake-ups)",
        r"anyio/|concurrent/|threading\.py|queue\.py|_write_to_self|_read_from_self"
        r"|_process_self_data|call_soon_threadsafe|run_in_executor|wrap_future|_chain_future",
    ),
    (
        "client transport (veil.client.transport, httptools)",
        r"veil/client/transport\.py|httpx/|httpcore/",
    ),
    ("client (veil.client)", r"veil/client/"),
    ("asyncio event loop (tasks, timers, select)", r"asyncio/|selectors\.py"),
    ("socket", r"socket\.py"),
)
OTHER = "other (interpreter, imports, unmatched)"


def classify(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):
        for name, pattern in COMPONENTS:
            if re.search(pattern, frame):
                return name
    return OTHER


def breakdown(raw: Path) -> tuple[collections.Counter[str], int]:
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        if IDLE.match(stack.rpartition(";")[2]):
            continue
        counts[classify(stack)] += int(n)
        total += int(n)
    return counts, total


def table(title: str, counts: collections.Counter[str], total: int, requests: int) -> str:
    lines = [f"{title}: {total} samples over {requests} requests", "", "| component | share |"]
    lines.append("|---|---:|")
    for name, n in counts.most_common():
        lines.append(f"| {name} | {n / total * 100:.1f} % |")
    return "\n".join(lines)


# Threads waiting (py-spy's idle detection misses some of them): not the request's cost.
IDLE = re.compile(
    r"^(EpollSelector\.select \(selectors|Condition\.wait \(threading|_worker \(concurrent/futures/"
    r"thread\.py:81\)|Watchdog\._loop|Event\.wait|Queue\.get)"
)


def pyspy(rate: int, pid: int, out: Path) -> subprocess.Popen[bytes]:
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    argv = [exe, "record", "--format", "raw", "--rate", str(rate), "--output", str(out)]
    return subprocess.Popen([*argv, "--pid", str(pid)], stdout=subprocess.DEVNULL)


def client_loop(ports: bi.VeilPorts, requests: int) -> None:
    """Connect and warm up, say READY, wait for a line on stdin, then time the calls."""
    model = _models.BenchModel("null", Path("null.onnx"), ("input",), 30522)  # inputs only
    feeds = [model.inputs(1, 8, i) for i in range(64)]
    client = bi.veil_connect(ports)
    try:
        for i in range(50):
            client.predict("null", feeds[i % 64])
        print("READY", flush=True)
        sys.stdin.readline()
        start, cpu = time.perf_counter(), time.process_time()
        for i in range(requests):
            client.predict("null", feeds[i % 64])
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        print(f"{seconds / requests * 1e3:.3f} {cpu / requests * 1e3:.3f}", flush=True)
    finally:
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--keep", type=Path, help="keep the raw py-spy stacks in this folder")
    parser.add_argument(
        "--no-spy", action="store_true", help="no profile: only ms per request (for A/B runs)"
    )
    parser.add_argument("--client-loop", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    if args.client_loop:
        client_loop(bi.VeilPorts(*args.client_loop), args.requests)
        return

    workdir = Path(tempfile.mkdtemp(prefix="veil-profile-"))
    out = args.keep or workdir
    out.mkdir(parents=True, exist_ok=True)
    server_raw, client_raw = out / "server.txt", out / "client.txt"
    with bi.veil_server(workdir, "profile") as (server, ports):
        first = bi.veil_connect(ports)
        try:
            model = _models.ensure_model("null", workdir / "models")
            first.upload_model(str(model.path), model_id="null")
        finally:
            first.close()
        loop = [sys.executable, __file__, "--requests", str(args.requests), "--client-loop"]
        loop += [str(ports.unattested), str(ports.attested), str(ports.management)]
        client = subprocess.Popen(
            loop, cwd=bi.REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert client.stdin is not None
        assert client.stdout is not None
        try:
            if client.stdout.readline().strip() != "READY":
                raise RuntimeError("the client loop did not start")
            # Both attached after start-up, upload and warm-up: only the loop is sampled.
            spies = []
            if not args.no_spy:
                spies = [
                    pyspy(args.rate, server.popen.pid, server_raw),
                    pyspy(args.rate, client.pid, client_raw),
                ]
                time.sleep(2)  # py-spy attaching
            server_cpu = bi.cpu_seconds(server.proc)
            client.stdin.write("go\n")
            client.stdin.flush()
            wall_ms, client_ms = map(float, client.stdout.readline().split())
            server_ms = (bi.cpu_seconds(server.proc) - server_cpu) / args.requests * 1e3
            print(
                f"per request: {wall_ms:.3f} ms round trip, CPU {server_ms:.3f} ms server, "
                f"{client_ms:.3f} ms client"
            )
            client.wait(timeout=900)
            for spy in spies:
                spy.send_signal(signal.SIGINT)
                spy.wait(timeout=60)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait()
    if args.no_spy:
        shutil.rmtree(workdir, ignore_errors=True)
        return
    for title, raw in (("server (veil serve)", server_raw), ("client (predict loop)", client_raw)):
        counts, total = breakdown(raw)
        print()
        print(table(title, counts, total, args.requests))
    if args.keep is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
