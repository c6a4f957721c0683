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
from typing import TYPE_CHECKING, Any

from veil.commands import error_line
from veil.errors import AttestationError, SimulationModeWarning, TransportError, VeilError
from veil.testing.local_server import LocalServer

if TYPE_CHECKING:
    from veil.attestation.claims import VerifiedEvidence

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
    if args.addr is not None and args.policy is None and not args.simulation:
        # Before anything slow: without either, the server's evidence could only be refused.
        print(
            "veil demo: --addr needs --policy FILE (the measurements to accept) or, for a "
            "server started with --platform simulated, --simulation",
            file=sys.stderr,
        )
        return 2
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
    except AttestationError as exc:
        print(f"veil demo: the server's evidence was refused: {exc}", file=sys.stderr)
        return 1
    except TransportError as exc:
        where = "--addr and the --*-port options" if args.addr else "the embedded server"
        print(f"veil demo: cannot reach the server: {exc} (check {where})", file=sys.stderr)
        return 2
    except (VeilError, RuntimeError, ValueError, OSError) as exc:
        print(f"veil demo: {error_line(exc)}", file=sys.stderr)
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
    import veil

    policy = veil.Policy.from_toml(policy_file) if policy_file is not None else None
    workdir: Path | None = None
    server: LocalServer | None = None
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(warnings.catch_warnings())
            client: veil.Connection | None = None
            if addr is not None:
                # First: a wrong address, port or policy fails now, not after a slow export.
                client = stack.enter_context(
                    veil.connect(
                        addr, simulation=simulation, policy=policy, api_key=api_key, **(ports or {})
                    )
                )
                _show_attested(client.verified, out)
            from veil import export

            export.require_transformers()
            import numpy as np
            import torch
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
            # 1. Tokenize with the bert-base-uncased vocabulary (the bundled MiniLM folder has it).
            own_tokenizer = (
                model_dir is not None and (model_dir / "tokenizer_config.json").is_file()
            )
            tokenizer = export.load_tokenizer(model_dir if own_tokenizer else None)
            ids = tokenizer(
                export.DEMO_SENTENCE, padding="max_length", max_length=8, return_tensors="pt"
            )["input_ids"]
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
            # 3. Export, as the tutorial does: opset 11, input "input", output "output".
            onnx_path = workdir / "distilbert.onnx"
            with _progress(f"exporting {what} to ONNX (opset {_OPSET})"):
                report = export.export_transformers_model(
                    model, onnx_path, example_inputs={"input": ids}, opset=_OPSET
                )
            # 4. Without --addr, an embedded simulated server.
            if client is None:
                with _progress("starting veil serve --platform simulated"):
                    server = LocalServer(data_dir=workdir / "server").start()
                # The embedded server is simulated by construction; say it once, plainly.
                warnings.simplefilter("ignore", SimulationModeWarning)
                out("note: simulated TEE (no hardware): this shows the flow, not confidentiality")
                # 5. Connect: the evidence is checked before any byte of the model is sent.
                client = stack.enter_context(
                    veil.connect(server.host, simulation=True, api_key=api_key, **server.ports)
                )
                _show_attested(client.verified, out)
            model_id = f"distilbert-{uuid.uuid4()}"
            size = report.size_bytes / 2**20
            # A bar on a terminal; elsewhere one line, with the time it took.
            terminal = sys.stderr.isatty()
            with _progress(f"uploading {size:.0f} MiB as {model_id}", enabled=not terminal):
                client.upload_model(onnx_path, model_id=model_id, progress=terminal)
            try:
                response = client.predict(model_id, ids.numpy())
            finally:
                if addr is not None:
                    client.delete_model(model_id)
        got = np.asarray(response.output[0].as_flat(), dtype=np.float64)
    finally:
        if server is not None:
            server.stop()
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)

    # 6. Compare.
    diff = float(np.max(np.abs(got - expected))) if got.shape == expected.shape else float("inf")
    out(f"sentence:        {export.DEMO_SENTENCE!r} -> {ids[0].tolist()}")
    out(f"veil logits:     {_fmt(got)}")
    out(f"PyTorch logits:  {_fmt(expected)}")
    verdict = "OK" if diff <= atol else "MISMATCH"
    out(f"max |difference|: {diff:.3g} (tolerance {atol:g}) {verdict}")
    return 0 if diff <= atol else 1


def _show_attested(verified: VerifiedEvidence, out: Callable[[str], None]) -> None:
    """What the evidence proved, the point of the demo: platform, measurements, TCB status."""
    platform = verified.platform.value + (" (SIMULATED: no TEE)" if verified.simulated else "")
    out(f"attested:        {platform}, TCB status {verified.tcb_status}, debug {verified.debug}")
    for name, value in verified.measurements.items():
        out(f"  {name + ':':<14} {value.hex()}")


def _fmt(values: Any) -> str:
    return "[" + ", ".join(f"{float(v):+.6f}" for v in values) + "]"
