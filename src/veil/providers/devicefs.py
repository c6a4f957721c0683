"""The TEE device files behind one small interface, so tests can put emulated devices there.

Both kernel-facing providers talk to their TEE through files: configfs-tsm
(``/sys/kernel/config/tsm/report``) for TDX and SEV-SNP guests, Gramine's ``/dev/attestation``
for SGX enclaves. They reach those files only through `DeviceFilesystem`; production uses
`OsDeviceFilesystem`, and `veil.testing.devices` answers the same calls the way the kernel and
Gramine do, so the providers run unchanged against emulated hardware.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

__all__ = ["DeviceFilesystem", "OsDeviceFilesystem"]


class DeviceFilesystem(Protocol):
    """The five file operations the TEE interfaces need. Failures raise `OSError` with an errno."""

    def is_dir(self, path: Path) -> bool: ...
    def mkdir(self, path: Path) -> None: ...
    def rmdir(self, path: Path) -> None: ...
    def read(self, path: Path) -> bytes: ...
    def write(self, path: Path, data: bytes) -> None: ...


class OsDeviceFilesystem:
    """The real filesystem. Each attribute is written in one `write` call, as configfs requires."""

    def is_dir(self, path: Path) -> bool:
        return path.is_dir()

    def mkdir(self, path: Path) -> None:
        os.mkdir(path, 0o700)

    def rmdir(self, path: Path) -> None:
        os.rmdir(path)

    def read(self, path: Path) -> bytes:
        with open(path, "rb") as handle:
            return handle.read()

    def write(self, path: Path, data: bytes) -> None:
        with open(path, "wb", buffering=0) as handle:
            written = handle.write(data)
        if written != len(data):
            raise OSError(f"short write to {path}: {written} of {len(data)} bytes")
