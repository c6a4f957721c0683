"""Attack table: each resource attack of the hardening review against a live server, while a
well-behaved client keeps predicting.

Starts ``veil serve --platform simulated`` with its DEFAULT settings (authentication on: the
harness makes an owner, a user and an attacker key), uploads a small public model, and runs a
victim client that predicts it continuously, paced at ``--victim-rps`` (under the default
per-key rate limit). The victim alone first gives the baseline; then each attack runs for a
bounded window, from 127.0.0.1 (or other 127.0.0.0/8 source addresses), one row at a time:

    tag36-body, empty-maps-60MiB, indefinite-map-upload, declared-size-held-x8, slow-body-x8,
    idle-tcp-flood, sparse-initializer-bomb, expand-output-bomb, constant-shape-bomb,
    function-shape-bomb, nested-function-cpu-bomb, long-matmul,
    quote-flood and quote-drip (against a client: a hostile plain-HTTP evidence port)

Columns: victim p99 latency during the window, victim errors, victim throughput in percent of
the baseline, peak RSS of the attacked process (the server with its children; for the quote rows
the client), and the verdict: pass when the victim keeps >= 90 % of its throughput with 0 errors
and the peak RSS stays under 1.5 GiB (quote rows are judged by the client alone: it gives up
within its time-out plus 2 s, under 1.5 GiB). Rows are independent: a row that kills, freezes or
bloats the server fails, and the next row starts on a fresh server. A watchdog kills any
attacked process past 2.5 GiB.

    python bench/attack_table.py                  # about 14 x 10 s
    python bench/attack_table.py --quick          # short windows, smaller floods
    python bench/attack_table.py --only slow-body-x8,idle-tcp-flood --json out.json

Exit status 1 when any row fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cbor2
import httpx
import numpy as np
import psutil
from onnx import TensorProto, helper, numpy_helper

import veil
from veil.errors import SimulationModeWarning
from veil.providers import detect_provider
from veil.server.keys import API_KEY_HEADER, KeyStore
from veil.server.ready import ReadyLine
from veil.server.state import open_state
from veil.tls import SERVER_NAME, pinned_client_context

warnings.simplefilter("ignore", SimulationModeWarning)

MiB = 1 << 20
GiB = 1 << 30
RSS_LIMIT = int(1.5 * GiB)  # the verdict's bound
WATCHDOG = int(2.5 * GiB)  # past this the attacked process is killed (this machine is shared)
THROUGHPUT_FLOOR = 0.90
SNI = {"sni_hostname": SERVER_NAME}


# ---- the server ------------------------------------------------------------------------------


class Server:
    """`veil serve --platform simulated` with default settings, keys made before it starts."""

    def __init__(self, root: Path) -> None:
        self.data_dir = root / "data"
        self.log = root / "server.log"
        provider = detect_provider("simulated", data_dir=self.data_dir)
        store = KeyStore(open_state(self.data_dir, provider.sealing_key))
        self.owner = store.create("owner", name="owner")[1]
        self.user = store.create("user", name="victim")[1]
        self.attacker = store.create("user", name="attacker")[1]
        self.attacker_owner = store.create("owner", name="attacker-owner")[1]
        self.proc: subprocess.Popen[bytes] | None = None
        self.ports = (0, 0, 0)
        self.certificate = b""

    def start(self) -> None:
        out = self.log.with_suffix(".out")
        command = [
            sys.executable, "-m", "veil.cli", "serve", "--platform", "simulated",
            "--data-dir", str(self.data_dir), "--host", "127.0.0.1",
            "--unattested-port", "0", "--attested-port", "0", "--management-port", "0",
        ]  # fmt: skip
        with out.open("wb") as o, self.log.open("ab") as e:
            self.proc = subprocess.Popen(command, stdout=o, stderr=e)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and self.proc.poll() is None:
            ready = ReadyLine.find(out.read_text(errors="replace"))
            if ready:
                self.ports = (ready.unattested_port, ready.attested_port, ready.management_port)
                self.certificate = cbor2.loads(
                    httpx.get(f"http://127.0.0.1:{self.ports[0]}/", timeout=10).content
                )
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"veil serve did not start:\n{self.log.read_text()[-2000:]}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def connect(self, key: str, timeout: float = 30.0) -> veil.Connection:
        a, b, c = self.ports
        return veil.connect(
            "127.0.0.1", simulation=True, api_key=key, unattested_port=a, attested_port=b,
            management_port=c, timeout=timeout, upload_timeout=timeout,
        )  # fmt: skip

    def pinned(self, timeout: float) -> httpx.Client:
        return httpx.Client(verify=pinned_client_context(self.certificate), timeout=timeout)

    def url(self, port: int, path: str) -> str:
        return f"https://127.0.0.1:{self.ports[port]}{path}"

    def tls_socket(self, port: int, source: str = "127.0.0.1") -> ssl.SSLSocket:
        sock = open_tcp(self.ports[port], source)
        return pinned_client_context(self.certificate).wrap_socket(
            sock, server_hostname=SERVER_NAME
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)


def open_tcp(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return sock


def tree_rss(pid: int) -> int:
    """RSS of a process and its children (a model loader may run in one)."""
    try:
        proc = psutil.Process(pid)
        total = proc.memory_info().rss
        for child in proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += child.memory_info().rss
        return int(total)
    except psutil.Error:
        return 0


class RssMonitor:
    """Samples a process tree's RSS every 50 ms; kills it past `WATCHDOG`."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.peak = 0
        self.killed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def watch(self, pid: int | None) -> None:
        self.pid, self.peak, self.killed = pid, 0, False

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            pid = self.pid
            if pid is None:
                continue
            rss = tree_rss(pid)
            self.peak = max(self.peak, rss)
            if rss > WATCHDOG and not self.killed:
                self.killed = True
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)

    def close(self) -> None:
        self._stop.set()


# ---- the victim ------------------------------------------------------------------------------


VICTIM_SCRIPT = textwrap.dedent(
    """
    import json, sys, time, warnings
    import numpy as np
    import veil
    warnings.simplefilter("ignore")
    info_path, rps = sys.argv[1], float(sys.argv[2])
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    client, next_at = None, time.monotonic()
    while True:
        t0 = time.monotonic()
        try:
            if client is None:
                info = json.loads(open(info_path).read())
                a, b, c = info["ports"]
                client = veil.connect("127.0.0.1", simulation=True, api_key=info["key"],
                                      unattested_port=a, attested_port=b, management_port=c,
                                      timeout=30)
                t0 = time.monotonic()
            client.predict("victim", x)
            ok = 1
        except Exception:
            ok, client = 0, None
        t1 = time.monotonic()
        print(f"{t1} {t1 - t0} {ok}", flush=True)
        next_at = max(next_at + 1 / rps, t1)
        time.sleep(max(0.0, next_at - time.monotonic()))
    """
)


class Victim:
    """A separate process predicting the public model, paced at `rps` (its own interpreter: the
    harness's threads never slow it down). It reads where the server is from `info`."""

    def __init__(self, info: Path, rps: float) -> None:
        self.samples: list[tuple[float, float, bool]] = []  # (end, latency, ok), monotonic
        self._proc = subprocess.Popen(
            [sys.executable, "-c", VICTIM_SCRIPT, str(info), str(rps)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            end, latency, ok = line.split()
            self.samples.append((float(end), float(latency), ok == "1"))

    def stop(self) -> None:
        self._proc.kill()
        self._proc.wait(10)

    def window(self, start: float, end: float) -> tuple[int, int, float]:
        """(requests ended in [start, end), errors, p99 latency in ms)."""
        inside = [s for s in self.samples if start <= s[0] < end]
        latencies = [s[1] for s in inside]
        p99 = percentile(latencies, 99) * 1e3 if latencies else float("nan")
        return len(inside), sum(1 for s in inside if not s[2]), p99


def percentile(values: list[float], q: int) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


# ---- models ----------------------------------------------------------------------------------


def _model(graph: Any, functions: list[Any] | None = None, local: bool = False) -> bytes:
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid("local", 1)] if local else [])
    model = helper.make_model(graph, opset_imports=opsets, functions=functions or [])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def victim_model() -> bytes:
    w = numpy_helper.from_array(np.ones((2, 3), np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    nodes = [helper.make_node("Add", ["x", "w"], ["y"])]
    return _model(helper.make_graph(nodes, "victim", [x], [y], initializer=[w]))


def sparse_bomb(elements: int) -> bytes:
    """~400 bytes: one sparse initializer whose dense form has `elements` floats."""
    values = helper.make_tensor("s", TensorProto.FLOAT, [1], [1.0])
    indices = helper.make_tensor("s_i", TensorProto.INT64, [1], [0])
    sparse = helper.make_sparse_tensor(values, indices, [elements])
    x = helper.make_tensor_value_info("x", TensorProto.INT64, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Gather", ["s", "x"], ["y"])], "sparse", [x], [y])
    graph.sparse_initializer.append(sparse)
    return _model(graph)


def expand_bomb(side: int) -> bytes:
    """16 bytes in, side x side floats out."""
    shape = numpy_helper.from_array(np.array([side, side], np.int64), "shape")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [side, side])
    nodes = [
        helper.make_node("Slice", ["x", "one_i", "two_i"], ["x1"]),
        helper.make_node("Expand", ["x1", "shape"], ["y"]),
    ]
    one = numpy_helper.from_array(np.array([0], np.int64), "one_i")
    two = numpy_helper.from_array(np.array([1], np.int64), "two_i")
    graph = helper.make_graph(nodes, "expand", [x], [y], initializer=[shape, one, two])
    return _model(graph)


def _shape_bomb_nodes(side: int, out: str) -> list[Any]:
    return [
        helper.make_node("Constant", [], ["shape"], value_ints=[side, side]),
        helper.make_node(
            "ConstantOfShape",
            ["shape"],
            ["big"],
            value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0]),
        ),
        helper.make_node("ReduceSum", ["big"], [out], keepdims=0),
    ]


def constant_shape_bomb(side: int) -> bytes:
    """A side x side tensor from Constant(value_ints=...) -> ConstantOfShape, summed."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    nodes = [*_shape_bomb_nodes(side, "total"), helper.make_node("Add", ["total", "x"], ["y"])]
    return _model(helper.make_graph(nodes, "constant_shape", [x], [y]))


def function_shape_bomb(side: int) -> bytes:
    """The same, inside a local function."""
    nodes = [*_shape_bomb_nodes(side, "total"), helper.make_node("Add", ["total", "a"], ["b"])]
    function = helper.make_function(
        "local", "Bomb", ["a"], ["b"], nodes, [helper.make_opsetid("", 17)]
    )
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph(
        [helper.make_node("Bomb", ["x"], ["y"], domain="local")], "fn", [x], [y]
    )
    return _model(graph, [function], local=True)


def nested_function_bomb(depth: int) -> bytes:
    """f_k = f_(k-1) o f_(k-1): 2^depth nodes once inlined, from about a kilobyte."""
    opset = [helper.make_opsetid("", 17), helper.make_opsetid("local", 1)]
    functions = [
        helper.make_function(
            "local", "F0", ["a"], ["b"], [helper.make_node("Neg", ["a"], ["b"])], opset
        )
    ]
    for k in range(1, depth + 1):
        nodes = [
            helper.make_node(f"F{k - 1}", ["a"], ["m"], domain="local"),
            helper.make_node(f"F{k - 1}", ["m"], ["b"], domain="local"),
        ]
        functions.append(helper.make_function("local", f"F{k}", ["a"], ["b"], nodes, opset))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph(
        [helper.make_node(f"F{depth}", ["x"], ["y"], domain="local")], "nested", [x], [y]
    )
    return _model(graph, functions, local=True)


def long_matmul(side: int, inner: int) -> bytes:
    """One MatMul of [side, inner] x [inner, side], both expanded from a 4-byte input."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [])
    init = [
        numpy_helper.from_array(np.array([side, inner], np.int64), "sa"),
        numpy_helper.from_array(np.array([inner, side], np.int64), "sb"),
    ]
    nodes = [
        helper.make_node("Expand", ["x", "sa"], ["a"]),
        helper.make_node("Expand", ["x", "sb"], ["b"]),
        helper.make_node("MatMul", ["a", "b"], ["c"]),
        helper.make_node("ReduceMax", ["c"], ["y"], keepdims=0),
    ]
    return _model(helper.make_graph(nodes, "matmul", [x], [y], initializer=init))


# ---- attacks ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    seconds: float
    flood_sockets: int
    tag36_mib: int
    tag36_count: int
    nested_depth: int
    matmul: tuple[int, int]
    quote_seconds: float


QUICK = Sizes(seconds=3.0, flood_sockets=1500, tag36_mib=2, tag36_count=1, nested_depth=20,
              matmul=(8000, 1000), quote_seconds=8.0)  # fmt: skip
FULL = Sizes(seconds=10.0, flood_sockets=4000, tag36_mib=16, tag36_count=2, nested_depth=24,
             matmul=(12000, 1000), quote_seconds=20.0)  # fmt: skip


@dataclass
class Context:
    server: Server
    sizes: Sizes
    deadline: float
    note: list[str] = field(default_factory=list)

    def left(self) -> float:
        return max(0.1, self.deadline - time.monotonic())


def _post(ctx: Context, port: int, path: str, body: bytes | Iterator[bytes], key: str) -> str:
    """POST within the window; the status, or the transport error's name."""
    with ctx.server.pinned(ctx.left() + 1) as client:
        try:
            response = client.post(
                ctx.server.url(port, path),
                content=body,
                headers={API_KEY_HEADER: key, "content-type": "application/cbor"},
                extensions=SNI,
            )
            return str(response.status_code)
        except httpx.HTTPError as exc:
            return type(exc).__name__


def attack_tag36(ctx: Context) -> None:
    text = "Content-Type: text/plain\n\n" + "a" * (ctx.sizes.tag36_mib * MiB)
    body = cbor2.dumps({"model_id": cbor2.CBORTag(36, text), "inputs": []})
    statuses = []
    while time.monotonic() < ctx.deadline and len(statuses) < ctx.sizes.tag36_count:
        statuses.append(_post(ctx, 1, "/run", body, ctx.server.attacker))
    ctx.note.append(f"{len(statuses)} x {ctx.sizes.tag36_mib} MiB: {statuses[:1]}")


def attack_empty_maps(ctx: Context) -> None:
    count = 60 * MiB
    body = b"\x9a" + count.to_bytes(4, "big") + b"\xa0" * count
    status = _post(ctx, 1, "/run", body, ctx.server.attacker)
    ctx.note.append(f"status {status}")


def attack_indefinite_upload(ctx: Context) -> None:
    size = 48 * MiB
    body = (
        b"\xbf"
        + cbor2.dumps("model_name")
        + cbor2.dumps("bomb")
        + cbor2.dumps("model")
        + b"\x5a"
        + size.to_bytes(4, "big")
        + b"\x00" * size
        + b"\xff"
    )
    ctx.note.append(f"status {_post(ctx, 2, '/upload', body, ctx.server.attacker_owner)}")


def attack_declared_size(ctx: Context) -> None:
    declared = GiB - 1
    head = (
        b"\xa2"
        + cbor2.dumps("model_name")
        + cbor2.dumps("held")
        + cbor2.dumps("model")
        + b"\x5a"
        + declared.to_bytes(4, "big")
    )
    with contextlib.ExitStack() as stack:
        for _ in range(8):
            with contextlib.suppress(OSError):
                sock = stack.enter_context(ctx.server.tls_socket(2))
                sock.sendall(
                    b"POST /upload HTTP/1.1\r\nHost: veil\r\nContent-Type: application/cbor\r\n"
                    + f"{API_KEY_HEADER}: {ctx.server.attacker_owner}\r\n".encode()
                    + f"Content-Length: {len(head) + declared}\r\n\r\n".encode()
                    + head
                    + b"\x00" * MiB
                )
        time.sleep(ctx.left())


def attack_slow_body(ctx: Context) -> None:
    with contextlib.ExitStack() as stack:
        for _ in range(8):
            with contextlib.suppress(OSError):
                sock = stack.enter_context(ctx.server.tls_socket(1))
                sock.sendall(
                    b"POST /run HTTP/1.1\r\nHost: veil\r\nContent-Type: application/cbor\r\n"
                    + f"{API_KEY_HEADER}: {ctx.server.attacker}\r\n".encode()
                    + b"Content-Length: 1000\r\n\r\n\xa1"
                )
        time.sleep(ctx.left())


def attack_idle_flood(ctx: Context) -> None:
    opened = 0
    with contextlib.ExitStack() as stack:
        for i in range(ctx.sizes.flood_sockets):
            if time.monotonic() >= ctx.deadline:
                break
            # Spread over addresses as a botnet would; each port of the server gets some.
            source = f"127.0.{2 + i // 200}.{1 + i % 200}"
            with contextlib.suppress(OSError):
                stack.enter_context(open_tcp(ctx.server.ports[i % 2], source))
                opened += 1
        ctx.note.append(f"{opened} sockets")
        time.sleep(ctx.left())


def _upload_and_run(ctx: Context, blob: bytes, feed: Any, repeat: bool = True) -> None:
    model_id = f"bomb-{os.urandom(4).hex()}"
    try:
        with ctx.server.connect(ctx.server.attacker_owner, timeout=ctx.left() + 1) as client:
            client.upload_model(blob, model_id=model_id, visibility="public")
            runs = 0
            while True:
                client.predict(model_id, feed)
                runs += 1
                if not repeat or time.monotonic() >= ctx.deadline:
                    break
            ctx.note.append(f"uploaded, ran {runs}x")
    except (
        Exception
    ) as exc:  # a refusal is the server doing its job; the row is judged by the victim
        ctx.note.append(f"{type(exc).__name__}: {str(exc)[:60]}")


def attack_sparse(ctx: Context) -> None:
    _upload_and_run(ctx, sparse_bomb(1 << 28), np.zeros(1, np.int64), repeat=False)


def attack_expand(ctx: Context) -> None:
    _upload_and_run(ctx, expand_bomb(16384), np.ones(4, np.float32))


def attack_constant_shape(ctx: Context) -> None:
    _upload_and_run(ctx, constant_shape_bomb(16384), np.ones(1, np.float32))


def attack_function_shape(ctx: Context) -> None:
    _upload_and_run(ctx, function_shape_bomb(16384), np.ones(1, np.float32))


def attack_nested(ctx: Context) -> None:
    blob = nested_function_bomb(ctx.sizes.nested_depth)
    ctx.note.append(f"{len(blob)} bytes")
    _upload_and_run(ctx, blob, np.ones(1, np.float32), repeat=False)


def attack_matmul(ctx: Context) -> None:
    side, inner = ctx.sizes.matmul
    _upload_and_run(ctx, long_matmul(side, inner), np.ones((1, 1), np.float32))


@dataclass
class Attack:
    name: str
    run: Callable[[Context], None]
    client_side: bool = False


ATTACKS = [
    Attack("tag36-body", attack_tag36),
    Attack("empty-maps-60MiB", attack_empty_maps),
    Attack("indefinite-map-upload", attack_indefinite_upload),
    Attack("declared-size-held-x8", attack_declared_size),
    Attack("slow-body-x8", attack_slow_body),
    Attack("idle-tcp-flood", attack_idle_flood),
    Attack("sparse-initializer-bomb", attack_sparse),
    Attack("expand-output-bomb", attack_expand),
    Attack("constant-shape-bomb", attack_constant_shape),
    Attack("function-shape-bomb", attack_function_shape),
    Attack("nested-function-cpu-bomb", attack_nested),
    Attack("long-matmul", attack_matmul),
    Attack("quote-flood", lambda ctx: None, client_side=True),
    Attack("quote-drip", lambda ctx: None, client_side=True),
]


# ---- client-side rows: a hostile evidence port -----------------------------------------------


class HostileEvidencePort:
    """Plain HTTP on loopback: ``GET /`` answers the real certificate; anything else answers a
    chunked body, as fast as possible (flood) or one byte every 3 s (drip), for `seconds`."""

    def __init__(self, certificate: bytes, mode: str, seconds: float) -> None:
        self._cert = cbor2.dumps(certificate)
        self._mode, self._seconds = mode, seconds
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self._listener.accept()
                thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
                thread.start()
                self._threads.append(thread)

    def _serve(self, conn: socket.socket) -> None:
        end = time.monotonic() + self._seconds
        with contextlib.suppress(OSError), conn:
            while True:
                request = b""
                while b"\r\n\r\n" not in request:
                    data = conn.recv(4096)
                    if not data:
                        return
                    request += data
                path = request.split(b" ", 2)[1]
                if path == b"/":
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/cbor\r\n"
                        + f"Content-Length: {len(self._cert)}\r\n\r\n".encode()
                        + self._cert
                    )
                    continue
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/cbor\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n"
                )
                chunk = b"%x\r\n" % MiB + b"\x00" * MiB + b"\r\n"
                while time.monotonic() < end:
                    if self._mode == "flood":
                        conn.sendall(chunk)
                    else:
                        conn.sendall(b"1\r\n\x00\r\n")
                        time.sleep(3)
                conn.sendall(b"0\r\n\r\n")
                return

    def close(self) -> None:
        self._listener.close()


CLIENT_SCRIPT = textwrap.dedent(
    """
    import sys, time, warnings
    import veil
    warnings.simplefilter("ignore")
    port = int(sys.argv[1])
    start = time.monotonic()
    try:
        veil.connect("127.0.0.1", simulation=True, unattested_port=port, attested_port=port,
                     management_port=port, timeout=5)
        outcome = "connected"
    except Exception as exc:
        outcome = type(exc).__name__
    print(f"{time.monotonic() - start:.1f} {outcome}", flush=True)
    """
)
CLIENT_TIMEOUT_S = 5.0


def client_row(server: Server, mode: str, sizes: Sizes, monitor: RssMonitor) -> dict[str, Any]:
    hostile = HostileEvidencePort(server.certificate, mode, sizes.quote_seconds)
    try:
        child = subprocess.Popen(
            [sys.executable, "-c", CLIENT_SCRIPT, str(hostile.port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        monitor.watch(child.pid)
        try:
            out, _ = child.communicate(timeout=sizes.quote_seconds + 30)
        except subprocess.TimeoutExpired:
            child.kill()
            out, _ = child.communicate()
        peak, killed = monitor.peak, monitor.killed
    finally:
        hostile.close()
    parts = out.split()
    took = float(parts[0]) if parts else float("inf")
    outcome = parts[1] if len(parts) > 1 else ("killed by watchdog" if killed else "no output")
    ok = took <= CLIENT_TIMEOUT_S + 2 and peak < RSS_LIMIT and not killed
    return {
        "peak_rss_mib": peak / MiB,
        "ok": ok,
        "note": f"client: {outcome} after {took:.1f} s (timeout={CLIENT_TIMEOUT_S:g})",
    }


# ---- the table -------------------------------------------------------------------------------


@dataclass
class Row:
    attack: str
    victim_p99_ms: float
    victim_errors: int
    victim_throughput_pct: float
    peak_rss_mib: float
    verdict: str
    note: str


class Bench:
    def __init__(self, root: Path, sizes: Sizes, victim_rps: float) -> None:
        self.root, self.sizes = root, sizes
        self.server = Server(root)
        self.monitor = RssMonitor()
        self.info = root / "server.json"
        self.victim_rps = victim_rps
        self.victim: Victim | None = None
        self.baseline_rps = 0.0

    def start_server(self) -> None:
        self.server.start()
        self.monitor.watch(self.server.proc.pid if self.server.proc else None)
        with self.server.connect(self.server.owner) as owner:
            if "victim" not in {m.model_id for m in owner.list_models()}:  # kept from a restart
                owner.upload_model(victim_model(), model_id="victim", visibility="public")
        info = {"ports": list(self.server.ports), "key": self.server.user}
        self.info.with_suffix(".tmp").write_text(json.dumps(info))
        self.info.with_suffix(".tmp").replace(self.info)
        if self.victim is None:
            self.victim = Victim(self.info, self.victim_rps)

    def restart(self) -> None:
        self.server.stop()
        self.start_server()
        # The victim's request to the old server fails once; let that happen before the next
        # window opens, so it is not counted against the next attack.
        restarted = time.monotonic()
        deadline = restarted + 40
        while (
            self.victim
            and time.monotonic() < deadline
            and not any(ok and end > restarted for end, _, ok in self.victim.samples[-5:])
        ):
            time.sleep(0.1)

    def healthy(self) -> str:
        """'' if the server answers quickly, is not burning CPU, holds little memory and
        serves the victim promptly again."""
        if not self.server.alive():
            return "server died"
        try:
            httpx.get(f"http://127.0.0.1:{self.server.ports[0]}/healthz", timeout=3)
        except httpx.HTTPError:
            return "server unresponsive"
        assert self.server.proc is not None
        try:
            busy = psutil.Process(self.server.proc.pid).cpu_percent(interval=0.5)
        except psutil.Error:
            return "server died"
        if busy > 60:
            return f"server still busy ({busy:.0f} % CPU)"
        if tree_rss(self.server.proc.pid) > RSS_LIMIT:
            return "server kept > 1.5 GiB"
        # Work the attack left running (an operator that cannot be stopped) shows as a victim
        # that does not get answers promptly.
        assert self.victim is not None
        since = time.monotonic()
        while time.monotonic() < since + 3:
            if any(ok and end > since and lat < 1.0 for end, lat, ok in self.victim.samples[-3:]):
                return ""
            time.sleep(0.1)
        return "victim still not served promptly"

    def baseline(self) -> None:
        assert self.victim is not None
        deadline = time.monotonic() + 60  # the victim's first connection (imports, attestation)
        while not self.victim.samples and time.monotonic() < deadline:
            time.sleep(0.1)
        start = time.monotonic()
        time.sleep(max(3.0, self.sizes.seconds))
        count, errors, p99 = self.victim.window(start, time.monotonic())
        self.baseline_rps = count / (time.monotonic() - start)
        print(
            f"baseline: victim {self.baseline_rps:.1f} req/s, p99 {p99:.1f} ms, {errors} errors",
            flush=True,
        )

    def row(self, attack: Attack) -> Row:
        assert self.victim is not None
        self.monitor.watch(self.server.proc.pid if self.server.proc else None)
        ctx = Context(self.server, self.sizes, time.monotonic() + self.sizes.seconds)
        start = time.monotonic()
        client: dict[str, Any] = {}
        if attack.client_side:
            mode = attack.name.split("-")[1]
            client = client_row(self.server, mode, self.sizes, self.monitor)
            ctx.note.append(client["note"])
        else:
            thread = threading.Thread(target=self._guarded, args=(attack, ctx), daemon=True)
            thread.start()
            thread.join(self.sizes.seconds + 5)
            if thread.is_alive():
                ctx.note.append("attack still blocked at the end of its window")
            # Every window lasts the same: an attack refused at once still gets the victim's
            # throughput measured over a whole window (and whatever the server does after).
            time.sleep(max(0.0, ctx.deadline - time.monotonic()))
        end = time.monotonic()
        count, errors, p99 = self.victim.window(start, end)
        throughput = 100.0 * count / (end - start) / self.baseline_rps if self.baseline_rps else 0
        peak = client.get("peak_rss_mib", self.monitor.peak / MiB)
        killed = self.monitor.killed and not attack.client_side
        problem = "" if attack.client_side else self.healthy()
        if killed:
            problem = f"watchdog killed the server past {WATCHDOG / GiB:g} GiB"
        if attack.client_side:  # the attacked party is the client: judged by it alone
            ok = bool(client["ok"])
        else:
            ok = (
                errors == 0
                and throughput >= 100 * THROUGHPUT_FLOOR
                and peak * MiB < RSS_LIMIT
                and not problem
            )
        if problem:
            ctx.note.append(problem + "; restarted")
            self.restart()
        return Row(attack.name, p99, errors, throughput, peak, "pass" if ok else "FAIL",
                   "; ".join(ctx.note))  # fmt: skip

    @staticmethod
    def _guarded(attack: Attack, ctx: Context) -> None:
        try:
            attack.run(ctx)
        except Exception as exc:  # one failing attack must not stop the table
            ctx.note.append(f"harness: {type(exc).__name__}: {str(exc)[:80]}")


def print_table(rows: list[Row], baseline_rps: float) -> None:
    head = (
        f"{'attack':<25} {'victim p99 ms':>13} {'errors':>6} {'thrpt %':>7} "
        f"{'peak RSS MiB':>12} {'verdict':>7}  note"
    )
    print(f"\nvictim baseline {baseline_rps:.1f} req/s; pass = >= 90 % of it, 0 errors, "
          f"peak RSS < 1536 MiB")  # fmt: skip
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r.attack:<25} {r.victim_p99_ms:>13.1f} {r.victim_errors:>6} "
            f"{r.victim_throughput_pct:>7.0f} {r.peak_rss_mib:>12.0f} {r.verdict:>7}  {r.note}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short windows, smaller floods")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--only", default="", help="comma-separated attack names")
    parser.add_argument("--victim-rps", type=float, default=40.0)
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    wanted = [a for a in ATTACKS if not args.only or a.name in args.only.split(",")]
    unknown = set(filter(None, args.only.split(","))) - {a.name for a in ATTACKS}
    if unknown or not 1 <= args.victim_rps <= 45:
        parser.error(f"unknown attacks {sorted(unknown)}, or --victim-rps outside 1..45")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="veil-attacks-") as tmp:
        bench = Bench(Path(tmp), sizes, args.victim_rps)
        try:
            bench.start_server()
            bench.baseline()
            for attack in wanted:
                try:
                    rows.append(bench.row(attack))
                except Exception as exc:  # the harness itself failed (e.g. no restart): say so
                    note = f"harness: {type(exc).__name__}: {str(exc)[:100]}"
                    rows.append(Row(attack.name, float("nan"), -1, 0.0, 0.0, "FAIL", note))
                    with contextlib.suppress(Exception):
                        bench.restart()
                r = rows[-1]
                print(f"{r.attack}: {r.verdict} ({r.note})", flush=True)
                time.sleep(0.5)
        finally:
            if bench.victim is not None:
                bench.victim.stop()
            bench.monitor.close()
            bench.server.stop()
    print_table(rows, bench.baseline_rps)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "baseline_rps": bench.baseline_rps,
                    "sizes": asdict(sizes),
                    "rows": [asdict(r) for r in rows],
                },
                indent=2,
            )
        )
    return 0 if all(r.verdict == "pass" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
