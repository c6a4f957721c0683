"""Evidence from Intel TDX and AMD SEV-SNP guests through Linux configfs-tsm (Linux ≥ 6.7).

The kernel ABI (Documentation/ABI/testing/configfs-tsm): a process creates a report entry with
``mkdir /sys/kernel/config/tsm/report/<name>``; the kernel populates it with attributes:

- ``provider`` (read): which driver answers, ``tdx_guest`` or ``sev_guest``;
- ``generation`` (read): a counter bumped on every write to the entry, so a reader can detect
  that another writer changed the request between its write and its read;
- ``privlevel`` (write, SNP only): the VMPL the report is requested for;
- ``inblob`` (write, ≤ 64 bytes): the report data;
- ``outblob`` (read): the TDX quote or the SNP attestation report;
- ``auxblob`` (read, SNP): the host-provided certificate table (GHCB spec, "SNP Extended Guest
  Request": 24-byte entries GUID ‖ u32 offset ‖ u32 length, an all-zero GUID ends the table).

The entry is removed with ``rmdir`` afterwards. The files are reached through `DeviceFilesystem`,
so tests run this code unchanged against `veil.testing.devices`; a real configfs exists only
inside a TDX or SNP guest.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import struct
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from veil.attestation.abi import snp
from veil.attestation.abi.dcap import quote_report_data
from veil.attestation.claims import Platform
from veil.errors import EvidenceUnavailableError, MalformedEvidenceError
from veil.providers.base import CollateralFetcher, Evidence, fetch_collateral, pad_report_data
from veil.providers.devicefs import DeviceFilesystem, OsDeviceFilesystem

__all__ = [
    "REPORT_DIR",
    "ConfigfsTsmProvider",
    "parse_snp_cert_table",
    "probe_tsm_provider",
]

REPORT_DIR = Path("sys/kernel/config/tsm/report")
PROVIDER_NAMES: Mapping[Platform, str] = {Platform.TDX: "tdx_guest", Platform.SEV_SNP: "sev_guest"}
_ATTEMPTS = 3

# GHCB spec / AMD SEV-SNP firmware ABI: certificate-table GUIDs.
_SNP_GUIDS = {
    uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd"): "vcek",
    uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1"): "vlek",
    uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782"): "ask",
    uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae"): "ark",
}
_CERT_ENTRY = 24


def probe_tsm_provider(fs_root: Path, fs: DeviceFilesystem | None = None) -> str | None:
    """The configfs-tsm provider name (``tdx_guest``, ``sev_guest``), or None if there is none."""
    fs = fs or OsDeviceFilesystem()
    report_dir = fs_root / REPORT_DIR
    if not fs.is_dir(report_dir):
        return None
    entry = report_dir / f"veil-probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        fs.mkdir(entry)
    except OSError:
        return None
    try:
        return fs.read(entry / "provider").decode("ascii", "replace").strip() or None
    except OSError:
        return None
    finally:
        # A probe entry left behind is harmless: it holds no request.
        with contextlib.suppress(OSError):
            fs.rmdir(entry)


def parse_snp_cert_table(table: bytes) -> dict[str, bytes]:
    """Split an SNP certificate table (auxblob) into ``{"vcek"|"vlek"|"ask"|"ark": DER}``.

    Unknown GUIDs are skipped. GUIDs are matched in both RFC 4122 byte order and the mixed-endian
    EFI order, because host tooling has written both; the certificates are verified later anyway.
    """
    certs: dict[str, bytes] = {}
    offset = 0
    while True:
        if offset + _CERT_ENTRY > len(table):
            if not any(table[offset:]):
                return certs  # an empty or zero-filled buffer holds no (more) entries
            raise MalformedEvidenceError(
                f"SNP certificate table: entry at {offset} runs past the end ({len(table)} bytes)"
            )
        raw_guid = table[offset : offset + 16]
        if not any(raw_guid):
            return certs
        start, length = struct.unpack_from("<II", table, offset + 16)
        if start + length > len(table) or length == 0:
            raise MalformedEvidenceError(
                f"SNP certificate table: entry {offset // _CERT_ENTRY} covers bytes "
                f"{start}..{start + length}, expected a non-empty range within {len(table)}"
            )
        name = _SNP_GUIDS.get(uuid.UUID(bytes=raw_guid)) or _SNP_GUIDS.get(
            uuid.UUID(bytes_le=raw_guid)
        )
        if name is not None:
            certs[name] = table[start : start + length]
        offset += _CERT_ENTRY


def _pem_chain(ders: list[bytes]) -> str:
    try:
        certs = [x509.load_der_x509_certificate(der) for der in ders]
    except ValueError as exc:
        raise MalformedEvidenceError(
            f"SNP certificate table: a certificate is not DER: {exc}"
        ) from exc
    return "".join(cert.public_bytes(Encoding.PEM).decode("ascii") for cert in certs)


class ConfigfsTsmProvider:
    """Evidence from a TDX or SEV-SNP guest kernel through configfs-tsm.

    Args:
        platform: `Platform.TDX` or `Platform.SEV_SNP`; the kernel's provider must match it.
        fs_root: the filesystem root that holds ``sys/kernel/config/tsm/report``.
        fs: the filesystem operations (default: the real one).
        collateral_fetcher: returns the collateral map for a quote. Required for TDX (Intel
            PCS/PCCS); for SNP used only when the host supplied no VCEK/VLEK in the auxblob.
        privlevel: SNP VMPL to request (0-3); None leaves the kernel's default.
    """

    simulated = False

    def __init__(
        self,
        platform: Platform,
        *,
        fs_root: Path = Path("/"),
        fs: DeviceFilesystem | None = None,
        collateral_fetcher: CollateralFetcher | None = None,
        privlevel: int | None = None,
    ) -> None:
        if platform not in PROVIDER_NAMES:
            raise ValueError(f"platform: got {platform}, expected tdx or sev-snp")
        if privlevel is not None and (platform is not Platform.SEV_SNP or not 0 <= privlevel <= 3):
            raise ValueError(f"privlevel: got {privlevel}, expected 0..3 and an SNP platform")
        self.platform = platform
        self._report_dir = fs_root / REPORT_DIR
        self._fs: DeviceFilesystem = fs or OsDeviceFilesystem()
        self._fetcher = collateral_fetcher
        self._privlevel = privlevel

    def evidence(self, report_data: bytes) -> Evidence:
        """Ask the kernel for a quote/report over `report_data`, then gather its collateral."""
        data = pad_report_data(report_data)
        if self.platform is Platform.TDX and self._fetcher is None:
            raise EvidenceUnavailableError(
                "TDX collateral comes from Intel PCS/PCCS: no collateral fetcher was configured"
            )
        outblob, auxblob = self._report(data)
        self._check_report_data(outblob, data)
        return Evidence(quote=outblob, collateral=self._collateral(outblob, auxblob))

    def sealing_key(self) -> bytes:
        """Not available: configfs-tsm guests have no file-reachable sealing facility."""
        raise EvidenceUnavailableError(
            f"{self.platform.value}: configfs-tsm exposes no sealing key; a TDX/SNP guest keeps "
            "its state under the store key a key broker releases (veil serve --join URL)"
        )

    def _report(self, data: bytes) -> tuple[bytes, bytes]:
        for _ in range(_ATTEMPTS):
            entry = self._report_dir / f"veil-{os.getpid()}-{secrets.token_hex(8)}"
            try:
                self._fs.mkdir(entry)
            except OSError as exc:
                raise EvidenceUnavailableError(
                    f"configfs-tsm: cannot create a report entry under {self._report_dir}: "
                    f"{exc.strerror or exc}"
                ) from exc
            try:
                result = self._attempt(entry, data)
            except OSError as exc:
                raise EvidenceUnavailableError(
                    f"configfs-tsm: the kernel refused the report request: {exc.strerror or exc}"
                ) from exc
            finally:
                with contextlib.suppress(OSError):  # best effort; the entry holds no secret
                    self._fs.rmdir(entry)
            if result is not None:
                return result
        raise EvidenceUnavailableError(
            f"configfs-tsm: another writer changed the report request {_ATTEMPTS} times in a row"
        )

    def _attempt(self, entry: Path, data: bytes) -> tuple[bytes, bytes] | None:
        provider = self._fs.read(entry / "provider").decode("ascii", "replace").strip()
        expected = PROVIDER_NAMES[self.platform]
        if provider != expected:
            raise EvidenceUnavailableError(
                f"configfs-tsm provider: got {provider!r}, expected {expected!r}"
            )
        before = self._generation(entry)
        writes = 0
        if self._privlevel is not None:
            self._fs.write(entry / "privlevel", str(self._privlevel).encode("ascii"))
            writes += 1
        self._fs.write(entry / "inblob", data)
        writes += 1
        outblob = self._fs.read(entry / "outblob")
        auxblob = self._fs.read(entry / "auxblob") if self.platform is Platform.SEV_SNP else b""
        # A changed count means someone else wrote to this entry: the blobs may answer their
        # request, not ours. Retry with a fresh entry (what go-configfs-tsm does too).
        if self._generation(entry) != before + writes:
            return None
        return outblob, auxblob

    def _generation(self, entry: Path) -> int:
        raw = self._fs.read(entry / "generation").strip()
        try:
            return int(raw)
        except ValueError:
            raise EvidenceUnavailableError(
                f"configfs-tsm generation: got {raw[:16]!r}, expected a decimal counter"
            ) from None

    def _check_report_data(self, outblob: bytes, data: bytes) -> None:
        # Cheap sanity check, not a security boundary (the client verifies the signed bytes):
        # catches a kernel or fake answering a different request.
        if self.platform is Platform.SEV_SNP:
            found = outblob[snp.REPORT_DATA]
        else:
            try:
                found = quote_report_data(outblob)
            except MalformedEvidenceError as exc:
                raise EvidenceUnavailableError(
                    f"configfs-tsm: the outblob is no quote: {exc}"
                ) from exc
        if found != data:
            raise EvidenceUnavailableError(
                "configfs-tsm: the outblob does not carry the requested report data"
            )

    def _collateral(self, outblob: bytes, auxblob: bytes) -> Mapping[str, Any]:
        if self.platform is Platform.SEV_SNP:
            certs = parse_snp_cert_table(auxblob)
            # Named after its kind, as a KDS-fetched key is (`snp_collateral_to_map`).
            kind = next((name for name in ("vcek", "vlek") if name in certs), None)
            if kind is not None:
                collateral: dict[str, Any] = {kind: certs[kind]}
                chain = [certs[name] for name in ("ask", "ark") if name in certs]
                if chain:
                    collateral["cert_chain"] = _pem_chain(chain)
                return collateral
            if self._fetcher is None:
                raise EvidenceUnavailableError(
                    "SEV-SNP: the host supplied no VCEK/VLEK and no collateral fetcher (AMD KDS) "
                    "was configured"
                )
        if self._fetcher is None:  # pragma: no cover - TDX without fetcher is refused earlier
            raise EvidenceUnavailableError("no collateral fetcher configured")
        return fetch_collateral(self._fetcher, outblob)
