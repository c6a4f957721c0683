"""The simulated platform's measurements, derived from the code being served.

On real SGX, MRENCLAVE is a hash of the enclave's initial pages. The simulated platform has no
enclave, so it measures what matters to a client instead: the Python source of the installed
`veil` package. A client running the same veil release computes the same value and can pin it;
any edit to any module changes it.

Encoding (version 1), hashed with SHA-256::

    b"veil simulated MRENCLAVE v1\\0"
    u64be(number of files)
    for each .py file, sorted by its path relative to the package root (POSIX, '/'-separated,
    compared as UTF-8 bytes):
        u64be(len(path)) ‖ path (UTF-8) ‖ u64be(len(content)) ‖ content (raw bytes)

Every variable-length field carries its length, so no two different trees share an encoding.
Directories named ``__pycache__`` are skipped (they hold no .py files anyway).

MRSIGNER of the simulated platform is SHA-256 of the simulated root's public key as the 64-byte
uncompressed point x ‖ y (big-endian, without the 0x04 prefix): the simulated analogue of real
SGX, where MRSIGNER is the hash of the enclave signer's public key.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator
from importlib import resources
from importlib.resources.abc import Traversable

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

__all__ = ["measure_tree", "simulated_measurement", "simulated_mr_signer"]

_DOMAIN = b"veil simulated MRENCLAVE v1\0"


def _python_files(root: Traversable, prefix: str = "") -> Iterator[tuple[str, Traversable]]:
    for entry in root.iterdir():
        name = entry.name
        if entry.is_dir():
            if name != "__pycache__":
                yield from _python_files(entry, f"{prefix}{name}/")
        elif entry.is_file() and name.endswith(".py"):
            yield f"{prefix}{name}", entry


def measure_tree(root: Traversable) -> bytes:
    """SHA-256 over every .py file under `root`, in the encoding described in the module doc."""
    files = sorted(
        ((path.encode("utf-8"), entry) for path, entry in _python_files(root)),
        key=lambda item: item[0],
    )
    digest = hashlib.sha256(_DOMAIN)
    digest.update(len(files).to_bytes(8, "big"))
    for path, entry in files:
        content = entry.read_bytes()
        digest.update(len(path).to_bytes(8, "big"))
        digest.update(path)
        digest.update(len(content).to_bytes(8, "big"))
        digest.update(content)
    return digest.digest()


@functools.cache
def simulated_measurement() -> bytes:
    """The 32-byte MRENCLAVE of the simulated platform: a hash of the installed veil sources.

    Cached for the life of the process: the served code does not change under a running server.
    """
    return measure_tree(resources.files("veil"))


@functools.cache
def simulated_mr_signer() -> bytes:
    """The 32-byte MRSIGNER of the simulated platform: SHA-256 of the simulated root's x ‖ y."""
    pem = (
        resources.files("veil.attestation.verify.roots")
        .joinpath("veil_simulated_root.pem")
        .read_bytes()
    )
    key = x509.load_pem_x509_certificate(pem).public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise TypeError("veil's simulated root must hold an EC key")
    point = key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    return hashlib.sha256(point[1:]).digest()
