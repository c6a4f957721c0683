"""`veil demo`: the tutorial end to end, from a PyTorch DistilBERT to a confidential prediction.

Steps: tokenize "I love AI and privacy!", build DistilBERT (seeded random weights, or a local
checkpoint), export it to ONNX (opset 11, as BlindAI's tutorial), start a simulated `veil serve`
on free loopback ports (or use ``--addr``), connect (the evidence is verified before anything is
sent), upload, predict, and compare the logits with PyTorch's. Exit status 0 only when they agree
within ``--atol``. The server and temporary files are removed however the demo ends.

The embedded server is `veil.testing.local_server.LocalServer`, which tests use too.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from veil.errors import SimulationModeWarning, VeilError
from veil.testing.local_server import LocalServer

__all__ = ["register", "run_demo"]

_OPSET = 11  # BlindAI's tutorial


@contextlib.contextmanager
def _progress(message: str, *, enabled: bool = True) -> Iterator[None]:
    """Say on stderr what is running, with the seconds it has taken so far."""
    if not enabled:
        yield
        return
    done = threading.Event()
    started = time.perf_counter()
    interactive = sys.stderr.isatty()

    def tick() -> None:
        while not done.wait(0.5):
            if interactive:
                elapsed = time.perf_counter() - started
                sys.stderr.write(f"\r{message} ... {elapsed:.0f} s")
                sys.stderr.flush()

    sys.stderr.write(f"{message} ...")
    sys.stderr.flush()
    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    try:
        yield
    except BaseException:
        done.set()
        ticker.join()
        sys.stderr.write(" failed\n")
        raise
    done.set()
    ticker.join()
    elapsed = time.perf_counter() - started
    # On a terminal the ticker rewrote the line; elsewhere the message is already there.
    head = f"\r{message} ..." if interactive else ""
    sys.stderr.write(f"{head} done in {elapsed:.1f} s\n")
    sys.stderr.flush()


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "demo",
        help="run the Transformers tutorial end to end (needs veil[transformers])",
        description=(
            "Build a DistilBERT classifier, export it to ONNX, serve it on a simulated TEE (or on "
            "--addr), verify the evidence, upload, predict on 'I love AI and privacy!' and "
            "compare the confidential logits with PyTorch's. Exits 1 if they differ by more "
            "than --atol."
        ),
    )
    parser.add_argument(
        "--model-dir", type=Path, help="local DistilBERT-style classifier checkpoint"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the random weights (default 0)"
    )
    parser.add_argument(
        "--addr", help="use the veil server at this host instead of starting a simulated one"
    )
    parser.add_argument("--unattested-port", type=int, default=9923, help="with --addr")
    parser.add_argument("--attested-port", type=int, default=9924, help="with --addr")
    parser.add_argument("--management-port", type=int, default=9925, help="with --addr")
    parser.add_argument(
        "--simulation",
        action="store_true",
        help="with --addr: accept a simulated TEE (insecure; implied without --addr)",
    )
    parser.add_argument(
        "--policy", type=Path, help="with --addr: TOML policy naming the measurements to accept"
    )
    parser.add_argument("--api-key", default=os.environ.get("VEIL_API_KEY"), help="$VEIL_API_KEY")
    parser.add_argument("--atol", type=float, default=1e-4, help="tolerance (default 1e-4)")
    parser.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    try:
        return run_demo(
            model_dir=args.model_dir,
            seed=args.seed,
            addr=args.addr,
            ports={
                "unattested_port": args.unattested_port,
                "attested_port": args.attested_port,
                "management_port": args.management_port,
            },
            simulation=args.simulation or args.addr is None,
            policy_file=args.policy,
            api_key=args.api_key,
            atol=args.atol,
        )
    except KeyboardInterrupt:
        print("\nveil demo: interrupted, cleaned up", file=sys.stderr)
        return 130
    except ImportError as exc:
        print(f"veil demo: {exc}", file=sys.stderr)
        return 3
    except (VeilError, RuntimeError, ValueError, OSError) as exc:
        print(f"veil demo: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


def run_demo(
    *,
    model_dir: Path | None = None,
    seed: int = 0,
    addr: str | None = None,
    ports: dict[str, int] | None = None,
    simulation: bool = True,
    policy_file: Path | None = None,
    api_key: str | None = None,
    atol: float = 1e-4,
    out: Callable[[str], None] = print,
) -> int:
    """The demo; returns 0 when veil's logits equal PyTorch's within `atol`, else 1.

    Without `addr` it starts its own simulated server. With `addr`, the server must prove what it
    runs: pass `policy_file` (TOML, see `veil.Policy.from_toml`), or `simulation=True` for a
    simulated server (no security). Raises `veil.AttestationError` if the evidence is refused;
    nothing is uploaded then.
    """
    from veil import export

    export.require_transformers()
    import numpy as np
    import torch
    from transformers.utils import logging as hf_logging

    import veil

    policy = veil.Policy.from_toml(policy_file) if policy_file is not None else None
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    # 1. Tokenize with the bert-base-uncased vocabulary (the bundled MiniLM folder has it).
    own_tokenizer = model_dir is not None and (model_dir / "tokenizer_config.json").is_file()
    tokenizer = export.load_tokenizer(model_dir if own_tokenizer else None)
    ids = tokenizer(export.DEMO_SENTENCE, padding="max_length", max_length=8, return_tensors="pt")[
        "input_ids"
    ]
    if not own_tokenizer and tuple(ids[0].tolist()) != export.DEMO_TOKEN_IDS:
        raise RuntimeError(
            f"tokenizer: got {ids[0].tolist()}, expected {list(export.DEMO_TOKEN_IDS)}"
        )
    # 2. The model and PyTorch's answer.
    if model_dir is None:
        model = export.build_demo_distilbert(seed=seed)
        what = f"DistilBERT, random weights from seed {seed}"
    else:
        model = export.load_classifier(model_dir)
        what = f"checkpoint {model_dir}"
    with torch.no_grad():
        expected = np.asarray(model(input_ids=ids).logits[0], dtype=np.float64)

    workdir = Path(tempfile.mkdtemp(prefix="veil-demo-"))
    server: LocalServer | None = None
    try:
        # 3. Export, as the tutorial does: opset 11, input "input", output "output".
        onnx_path = workdir / "distilbert.onnx"
        with _progress(f"exporting {what} to ONNX (opset {_OPSET})"):
            report = export.export_transformers_model(
                model, onnx_path, example_inputs={"input": ids}, opset=_OPSET
            )
        # 4. A server: an embedded simulated one, or the one at --addr.
        if addr is None:
            with _progress("starting veil serve --platform simulated"):
                server = LocalServer(data_dir=workdir / "server").start()
            host, connect_ports = server.host, server.ports
        else:
            host, connect_ports = addr, dict(ports or {})
        model_id = f"distilbert-{uuid.uuid4()}"
        # 5. Connect: the evidence is checked before any byte of the model leaves this machine.
        with warnings.catch_warnings():
            if addr is None:
                # The embedded server is simulated by construction; say it once, plainly.
                warnings.simplefilter("ignore", SimulationModeWarning)
                out("note: simulated TEE (no hardware): this shows the flow, not confidentiality")
            with veil.connect(
                host, simulation=simulation, policy=policy, api_key=api_key, **connect_ports
            ) as client:
                size = report.size_bytes / 2**20
                with _progress(f"uploading {size:.0f} MiB as {model_id}"):
                    client.upload_model(onnx_path, model_id=model_id)
                try:
                    response = client.predict(model_id, ids.numpy())
                finally:
                    if addr is not None:
                        client.delete_model(model_id)
        got = np.asarray(response.output[0].as_flat(), dtype=np.float64)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    # 6. Compare.
    diff = float(np.max(np.abs(got - expected))) if got.shape == expected.shape else float("inf")
    out(f"sentence:        {export.DEMO_SENTENCE!r} -> {ids[0].tolist()}")
    out(f"veil logits:     {_fmt(got)}")
    out(f"PyTorch logits:  {_fmt(expected)}")
    verdict = "OK" if diff <= atol else "MISMATCH"
    out(f"max |difference|: {diff:.3g} (tolerance {atol:g}) {verdict}")
    return 0 if diff <= atol else 1


def _fmt(values: Any) -> str:
    return "[" + ", ".join(f"{float(v):+.6f}" for v in values) + "]"
