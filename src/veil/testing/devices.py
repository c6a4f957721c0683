"""Emulated TEE device files: configfs-tsm (TDX, SEV-SNP guests) and Gramine's /dev/attestation.

TEST HARNESS. `EmulatedDevices` implements `veil.providers.devicefs.DeviceFilesystem`, so the
production providers run unchanged on it. It answers the way the real interfaces do:

configfs-tsm (Linux drivers/virt/coco/tsm.c, Documentation/ABI/testing/configfs-tsm):

- ``mkdir report/<name>`` makes an entry (EEXIST if taken; ENXIO once the guest driver is gone);
- ``provider`` (RO) ``tdx_guest\\n`` or ``sev_guest\\n``;
- ``generation`` (RO) the write counter as ``%lu\\n``, bumped by every write to ``inblob`` or
  ``privlevel``; a write that would catch up with the last read generation fails with EBUSY;
- ``privlevel`` (WO) and ``privlevel_floor`` (RO), SEV-SNP only (absent, ENOENT, on TDX): a
  decimal VMPL, EINVAL unless ``privlevel_floor <= value <= 3``;
- ``inblob`` (WO) at most 64 bytes, zero-padded to 64; a longer write fails with EFBIG (configfs
  refuses to grow a binary attribute past its maximum, fs/configfs/file.c);
- ``outblob`` (RO) the quote or report over the last inblob, generated on the first read after a
  write and cached until the next write; ``auxblob`` (RO, SEV-SNP only) the certificate table
  the host supplied with that report (GHCB spec: 24-byte entries GUID ‖ u32 offset ‖ u32 length,
  ended by an all-zero entry), empty when the host supplies none;
- reading a write-only or writing a read-only attribute fails with EACCES, like the file modes.

Gramine (docs, "Attestation and Secret Provisioning", /dev/attestation):

- ``attestation_type`` (RO) ``dcap``;
- ``user_report_data`` (RW) exactly 64 bytes, EINVAL otherwise;
- ``quote`` (RO) a DCAP quote over the last user_report_data;
- ``keys/_sgx_mrenclave`` (RO) the 16-byte MRENCLAVE sealing key.

Behind them sit signers from a test PKI: plain callables, so any PKI fits.
"""

from __future__ import annotations

import errno
import os
import struct
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import ClassVar

from veil.providers.configfs_tsm import REPORT_DIR
from veil.providers.gramine import ATTESTATION_DIR

__all__ = [
    "SNP_CERT_GUIDS",
    "EmulatedDevices",
    "EmulatedGramine",
    "EmulatedTsm",
    "QuoteSigner",
    "SnpReportSigner",
    "snp_cert_table",
]

# report_data (64 bytes) → an SGX or TDX quote over it.
QuoteSigner = Callable[[bytes], bytes]
# (report_data (64 bytes), VMPL) → an SEV-SNP attestation report over it.
SnpReportSigner = Callable[[bytes, int], bytes]

INBLOB_MAX = 64
PRIVLEVEL_MAX = 3
_REPORT_DATA_SIZE = 64
_GENERATION_MASK = (1 << 64) - 1  # the kernel's counters are unsigned long

# GHCB spec, "SNP Extended Guest Request", certificate table GUIDs (stored in RFC 4122 byte order,
# as the Linux sev-guest driver passes the host's table through).
SNP_CERT_GUIDS: Mapping[str, uuid.UUID] = {
    "vcek": uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd"),
    "vlek": uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1"),
    "ask": uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782"),
    "ark": uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae"),
}
_CERT_ENTRY = 24


def _error(code: int, path: PurePosixPath | Path) -> OSError:
    return OSError(code, os.strerror(code), str(path))


def snp_cert_table(certs: Mapping[str, bytes]) -> bytes:
    """The GHCB certificate table for DER certificates named ``vcek``/``vlek``/``ask``/``ark``."""
    unknown = set(certs) - set(SNP_CERT_GUIDS)
    if unknown:
        raise ValueError(
            f"certificate names: got {sorted(unknown)}, expected {list(SNP_CERT_GUIDS)}"
        )
    header_size = _CERT_ENTRY * (len(certs) + 1)
    header, blobs = b"", b""
    for name, der in certs.items():
        offset = header_size + len(blobs)
        header += SNP_CERT_GUIDS[name].bytes + struct.pack("<II", offset, len(der))
        blobs += der
    return header + bytes(_CERT_ENTRY) + blobs


@dataclass
class _Report:
    """One ``report/<name>`` entry: what the kernel's struct tsm_report_state holds."""

    privlevel: int
    inblob: bytes = bytes(_REPORT_DATA_SIZE)
    write_generation: int = 0
    read_generation: int = 0
    outblob: bytes | None = None
    auxblob: bytes = b""


class EmulatedTsm:
    """A configfs-tsm report interface of a TDX guest (`quote_signer`) or SNP guest (`snp_signer`).

    Args:
        quote_signer: makes TDX quotes; exactly one of the two signers is given.
        snp_signer: makes SEV-SNP reports for a VMPL.
        host_certificates: SNP only: the DER certificates (``vcek`` or ``vlek``, ``ask``,
            ``ark``) the host returns with each report, or None when it supplies none.
        privlevel_floor: SNP only: the lowest VMPL a report may be requested for.
    """

    def __init__(
        self,
        *,
        quote_signer: QuoteSigner | None = None,
        snp_signer: SnpReportSigner | None = None,
        host_certificates: Mapping[str, bytes] | None = None,
        privlevel_floor: int = 0,
    ) -> None:
        if (quote_signer is None) == (snp_signer is None):
            raise ValueError("signers: got both or neither, expected quote_signer or snp_signer")
        if snp_signer is None and host_certificates is not None:
            raise ValueError("host_certificates: got some for a TDX guest, expected SNP only")
        self._quote_signer = quote_signer
        self._snp_signer = snp_signer
        self._auxblob = snp_cert_table(host_certificates) if host_certificates else b""
        self._floor = privlevel_floor
        self._reports: dict[str, _Report] = {}
        self._registered = True
        self.reports_generated = 0

    @property
    def provider(self) -> str:
        return "sev_guest" if self._snp_signer is not None else "tdx_guest"

    def unregister(self) -> None:
        """Unbind the guest driver: existing entries stay, every operation on them fails."""
        self._registered = False

    def entries(self) -> list[str]:
        """The names of the report entries that exist now."""
        return sorted(self._reports)

    def _attributes(self) -> dict[str, str]:
        names = {"provider": "r", "generation": "r", "inblob": "w", "outblob": "r"}
        if self._snp_signer is not None:
            names.update({"privlevel": "w", "privlevel_floor": "r", "auxblob": "r"})
        return names

    def mkdir(self, name: str, path: PurePosixPath) -> None:
        if not self._registered:
            raise _error(errno.ENXIO, path)
        if name in self._reports:
            raise _error(errno.EEXIST, path)
        self._reports[name] = _Report(privlevel=self._floor)

    def rmdir(self, name: str, path: PurePosixPath) -> None:
        if self._reports.pop(name, None) is None:
            raise _error(errno.ENOENT, path)

    def _entry(self, name: str, attribute: str, mode: str, path: PurePosixPath) -> _Report:
        report = self._reports.get(name)
        allowed = self._attributes().get(attribute)
        if report is None or allowed is None:
            raise _error(errno.ENOENT, path)
        if allowed != mode:
            raise _error(errno.EACCES, path)
        return report

    def read(self, name: str, attribute: str, path: PurePosixPath) -> bytes:
        report = self._entry(name, attribute, "r", path)
        if attribute in ("outblob", "auxblob"):
            if not self._registered:
                raise _error(errno.ENOTTY, path)
            self._generate(report)
            return report.outblob if attribute == "outblob" else report.auxblob  # type: ignore[return-value]
        if not self._registered:
            raise _error(errno.ENXIO, path)
        if attribute == "provider":
            return f"{self.provider}\n".encode()
        if attribute == "generation":
            return f"{report.write_generation}\n".encode()
        return f"{self._floor}\n".encode()  # privlevel_floor

    def write(self, name: str, attribute: str, data: bytes, path: PurePosixPath) -> None:
        report = self._entry(name, attribute, "w", path)
        if attribute == "inblob" and len(data) > INBLOB_MAX:
            raise _error(errno.EFBIG, path)
        if attribute == "privlevel":
            try:
                value = int(data.decode("ascii").strip(), 0)
            except (UnicodeDecodeError, ValueError):
                raise _error(errno.EINVAL, path) from None
            if not self._registered:
                raise _error(errno.ENXIO, path)
            if not self._floor <= value <= PRIVLEVEL_MAX:
                raise _error(errno.EINVAL, path)
            self._advance(report, path)
            report.privlevel = value
            return
        self._advance(report, path)
        report.inblob = data.ljust(_REPORT_DATA_SIZE, b"\0")

    def _advance(self, report: _Report, path: PurePosixPath) -> None:
        # tsm.c try_advance_write_generation: refuse to wrap onto the last read generation.
        if report.write_generation == (report.read_generation - 1) & _GENERATION_MASK:
            raise _error(errno.EBUSY, path)
        report.write_generation = (report.write_generation + 1) & _GENERATION_MASK

    def _generate(self, report: _Report) -> None:
        if report.outblob is not None and report.read_generation == report.write_generation:
            return
        if self._snp_signer is not None:
            report.outblob = self._snp_signer(report.inblob, report.privlevel)
            report.auxblob = self._auxblob
        else:
            assert self._quote_signer is not None
            report.outblob = self._quote_signer(report.inblob)
        report.read_generation = report.write_generation
        self.reports_generated += 1


class EmulatedGramine:
    """Gramine's /dev/attestation in an enclave built with ``sgx.remote_attestation = "dcap"``.

    Args:
        quote_signer: makes SGX quotes over the user report data.
        sealing_key: the 16-byte MRENCLAVE sealing key (``keys/_sgx_mrenclave``).
        attestation_type: what ``attestation_type`` says (``dcap``, ``epid`` or ``none``).
    """

    _FILES: ClassVar[Mapping[str, str]] = {
        "attestation_type": "r",
        "user_report_data": "rw",
        "quote": "r",
        "keys/_sgx_mrenclave": "r",
    }

    def __init__(
        self, *, quote_signer: QuoteSigner, sealing_key: bytes, attestation_type: str = "dcap"
    ) -> None:
        if len(sealing_key) != 16:
            raise ValueError(f"sealing_key: got {len(sealing_key)} bytes, expected 16")
        self._signer = quote_signer
        self._sealing_key = sealing_key
        self._type = attestation_type
        self._user_report_data = bytes(_REPORT_DATA_SIZE)

    def is_dir(self, name: str) -> bool:
        return name in ("", "keys")

    def read(self, name: str, path: PurePosixPath) -> bytes:
        if "r" not in self._FILES.get(name, ""):
            raise _error(errno.EACCES if name in self._FILES else errno.ENOENT, path)
        if name == "attestation_type":
            return self._type.encode("ascii")
        if name == "user_report_data":
            return self._user_report_data
        if name == "keys/_sgx_mrenclave":
            return self._sealing_key
        if self._type != "dcap":
            raise _error(errno.EACCES, path)
        return self._signer(self._user_report_data)

    def write(self, name: str, data: bytes, path: PurePosixPath) -> None:
        if "w" not in self._FILES.get(name, ""):
            raise _error(errno.EACCES if name in self._FILES else errno.ENOENT, path)
        if len(data) != _REPORT_DATA_SIZE:
            raise _error(errno.EINVAL, path)
        self._user_report_data = bytes(data)


class EmulatedDevices:
    """A `DeviceFilesystem` holding an emulated configfs-tsm tree and/or /dev/attestation.

    Example::

        devices = EmulatedDevices(tsm=EmulatedTsm(quote_signer=pki.tdx_quote))
        provider = detect_provider("tdx", data_dir=d, fs=devices, collateral_fetcher=f)

    Args:
        tsm: the configfs-tsm report interface (``sys/kernel/config/tsm/report``), if any.
        gramine: Gramine's ``dev/attestation``, if any.
        root: the filesystem root both live under (the providers' ``fs_root``).
    """

    def __init__(
        self,
        *,
        tsm: EmulatedTsm | None = None,
        gramine: EmulatedGramine | None = None,
        root: Path = Path("/"),
    ) -> None:
        self.tsm = tsm
        self.gramine = gramine
        self._report_dir = PurePosixPath(root / REPORT_DIR)
        self._attestation_dir = PurePosixPath(root / ATTESTATION_DIR)
        # The kernel serialises report requests under tsm_rwsem; Gramine under its own lock.
        self._lock = threading.Lock()

    def _tsm_parts(self, path: Path) -> tuple[str, ...] | None:
        pure = PurePosixPath(path)
        if self.tsm is None or not pure.is_relative_to(self._report_dir):
            return None
        return pure.relative_to(self._report_dir).parts

    def _gramine_name(self, path: Path) -> str | None:
        pure = PurePosixPath(path)
        if self.gramine is None or not pure.is_relative_to(self._attestation_dir):
            return None
        return "/".join(pure.relative_to(self._attestation_dir).parts)

    def is_dir(self, path: Path) -> bool:
        pure = PurePosixPath(path)
        with self._lock:
            parts = self._tsm_parts(path)
            if parts is not None:
                return len(parts) == 0 or (
                    len(parts) == 1 and self.tsm is not None and parts[0] in self.tsm.entries()
                )
            name = self._gramine_name(path)
            if name is not None and self.gramine is not None:
                return self.gramine.is_dir(name)
            # ancestors of a mounted interface exist too
            mounted = [self._report_dir] if self.tsm else []
            mounted += [self._attestation_dir] if self.gramine else []
            return any(d.is_relative_to(pure) for d in mounted)

    def mkdir(self, path: Path) -> None:
        with self._lock:
            parts = self._tsm_parts(path)
            if parts is None or len(parts) != 1 or self.tsm is None:
                # configfs makes items only directly under a group; elsewhere this tree is fixed
                raise _error(errno.EPERM, PurePosixPath(path))
            self.tsm.mkdir(parts[0], PurePosixPath(path))

    def rmdir(self, path: Path) -> None:
        with self._lock:
            parts = self._tsm_parts(path)
            if parts is None or len(parts) != 1 or self.tsm is None:
                raise _error(errno.EPERM, PurePosixPath(path))
            self.tsm.rmdir(parts[0], PurePosixPath(path))

    def read(self, path: Path) -> bytes:
        pure = PurePosixPath(path)
        with self._lock:
            parts = self._tsm_parts(path)
            if parts is not None and self.tsm is not None:
                if len(parts) != 2:
                    raise _error(errno.EISDIR if len(parts) < 2 else errno.ENOENT, pure)
                return self.tsm.read(parts[0], parts[1], pure)
            name = self._gramine_name(path)
            if name is not None and self.gramine is not None:
                return self.gramine.read(name, pure)
            raise _error(errno.ENOENT, pure)

    def write(self, path: Path, data: bytes) -> None:
        pure = PurePosixPath(path)
        with self._lock:
            parts = self._tsm_parts(path)
            if parts is not None and self.tsm is not None:
                if len(parts) != 2:
                    raise _error(errno.EISDIR if len(parts) < 2 else errno.ENOENT, pure)
                self.tsm.write(parts[0], parts[1], bytes(data), pure)
                return
            name = self._gramine_name(path)
            if name is not None and self.gramine is not None:
                self.gramine.write(name, bytes(data), pure)
                return
            raise _error(errno.ENOENT, pure)
