"""``veil evidence save``: save what a server serves on its unattested port, for offline checks.

Writes ``quote.cbor`` (``/quote`` as served: the evidence in a CBOR byte string),
``certificate.cbor`` (``/``: the TLS certificate, DER in a CBOR byte string) and
``collateral.cbor`` (``/collateral``) into a directory. Nothing is verified here: check the
result with ``veil verify-evidence DIR/quote.cbor --collateral DIR/collateral.cbor`` (add
``--simulated`` for a simulated server).

Exit status: 0 saved, 2 usage or I/O (server unreachable, an error status, unwritable directory).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from veil.commands import error_line

__all__ = ["register", "save_evidence"]

# What the unattested port serves -> the file it is saved as.
_FILES = {"/": "certificate.cbor", "/quote": "quote.cbor", "/collateral": "collateral.cbor"}
_MAX_BYTES = 512 << 10  # as the client's cap on evidence responses


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "evidence",
        help="save a server's evidence, certificate and collateral (unverified)",
        description="Evidence as a server serves it, for offline verification.",
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    save = verbs.add_parser(
        "save",
        help="save the evidence, certificate and collateral a server serves into a directory",
        description=(
            "Fetch /quote, / (certificate) and /collateral from the server's unattested port "
            "into DIR without verifying anything; then run 'veil verify-evidence DIR/quote.cbor "
            "--collateral DIR/collateral.cbor'. Exit status 0 saved, 2 usage or I/O error."
        ),
    )
    save.add_argument("addr", metavar="HOST", help="the server's host name or address")
    save.add_argument("--out", type=Path, required=True, metavar="DIR", help="where to save")
    save.add_argument(
        "--unattested-port", type=int, default=9923, help="the server's plain HTTP port"
    )
    save.add_argument(
        "--timeout", type=float, default=10.0, metavar="S", help="per request (default 10)"
    )
    parser.set_defaults(handler=_save)


def save_evidence(
    host: str, out: Path, *, unattested_port: int = 9923, timeout: float = 10.0
) -> list[Path]:
    """Fetch the served evidence, certificate and collateral into `out`; the files written.

    Raises:
        OSError: the server cannot be reached, answers an error, or `out` cannot be written.
    """
    import httpx

    base = f"http://{host}:{unattested_port}"
    bodies: dict[str, bytes] = {}
    with httpx.Client(timeout=timeout) as client:
        for path, name in _FILES.items():
            url = base + path
            try:
                with client.stream("GET", url) as response:
                    if response.status_code != 200:
                        raise OSError(f"{url}: status {response.status_code}, expected 200")
                    body = bytearray()
                    for chunk in response.iter_raw():
                        body += chunk
                        if len(body) > _MAX_BYTES:
                            raise OSError(f"{url}: more than {_MAX_BYTES} bytes")
            except httpx.HTTPError as exc:
                raise OSError(
                    f"{url}: {exc or type(exc).__name__} (is {unattested_port} the server's "
                    "unattested port? see --unattested-port)"
                ) from None
            bodies[name] = bytes(body)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, content in bodies.items():
        (out / name).write_bytes(content)
        written.append(out / name)
    return written


def _save(args: argparse.Namespace) -> int:
    try:
        written = save_evidence(
            args.addr, args.out, unattested_port=args.unattested_port, timeout=args.timeout
        )
    except OSError as exc:
        print(f"veil evidence save: {error_line(exc)}", file=sys.stderr)
        return 2
    for path in written:
        print(f"saved {path}")
    print(
        f"unverified: check with 'veil verify-evidence {args.out / 'quote.cbor'} "
        f"--collateral {args.out / 'collateral.cbor'}'",
        file=sys.stderr,
    )
    return 0
