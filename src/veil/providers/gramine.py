"""Evidence from an SGX enclave running under Gramine, through its /dev/attestation files.

Gramine's pseudo-filesystem (Gramine docs, "Attestation and Secret Provisioning", the
/dev/attestation interface):

- ``attestation_type`` (read): ``dcap`` when the manifest sets ``sgx.remote_attestation = "dcap"``
  (``epid`` and ``none`` are the other values; veil only speaks DCAP);
- ``user_report_data`` (write, 64 bytes): the report data of the next quote;
- ``quote`` (read): an SGX ECDSA quote over the last ``user_report_data``;
- ``keys/_sgx_mrenclave`` (read, 16 bytes): the SGX sealing key bound to this enclave's
  MRENCLAVE (EGETKEY with KEYPOLICY.MRENCLAVE).

Gramine gives no collateral; it comes from Intel PCS/PCCS through an injected fetcher. The files are
reached through `DeviceFilesystem`, so tests run this code unchanged against `veil.testing.devices`.
"""

from __future__ import annotations

import threading
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from veil.attestation.abi.dcap import quote_report_data
from veil.attestation.claims import Platform
from veil.errors import EvidenceUnavailableError, MalformedEvidenceError
from veil.providers.base import CollateralFetcher, Evidence, fetch_collateral, pad_report_data
from veil.providers.devicefs import DeviceFilesystem, OsDeviceFilesystem

__all__ = ["ATTESTATION_DIR", "SEALING_KEY_INFO", "GramineProvider"]

ATTESTATION_DIR = Path("dev/attestation")
# HKDF-SHA256(ikm = the 16-byte MRENCLAVE sealing key, salt = none, info = this) → 32 bytes.
# The label separates veil's model-sealing key from any other use of the same SGX key.
SEALING_KEY_INFO = b"veil sealing key v1: AES-256-GCM model store"
_SGX_SEALING_KEY_SIZE = 16


class GramineProvider:
    """SGX DCAP evidence from inside a Gramine enclave.

    Args:
        fs_root: the filesystem root that holds ``dev/attestation``.
        collateral_fetcher: returns the BlindAI collateral map for a quote (Intel PCS/PCCS).
            Without one, `evidence` raises `EvidenceUnavailableError`.
        fs: the filesystem operations (default: the real one).

    Sealing keys are bound to MRENCLAVE: a rebuilt enclave cannot unseal what an older build
    sealed. That is the safe default (a different binary never reads the models).
    """

    platform = Platform.SGX
    simulated = False

    def __init__(
        self,
        *,
        fs_root: Path = Path("/"),
        collateral_fetcher: CollateralFetcher | None = None,
        fs: DeviceFilesystem | None = None,
    ) -> None:
        self._dir = fs_root / ATTESTATION_DIR
        self._fetcher = collateral_fetcher
        self._fs: DeviceFilesystem = fs or OsDeviceFilesystem()
        # user_report_data and quote form one request: keep concurrent callers from interleaving.
        self._lock = threading.Lock()

    def _read(self, name: str) -> bytes:
        try:
            return self._fs.read(self._dir / name)
        except OSError as exc:
            raise EvidenceUnavailableError(
                f"Gramine: cannot read {self._dir / name}: {exc.strerror or exc}"
            ) from exc

    def attestation_type(self) -> str:
        """The enclave's attestation type (``dcap``, ``epid`` or ``none``)."""
        return self._read("attestation_type").decode("ascii", "replace").strip()

    def evidence(self, report_data: bytes) -> Evidence:
        """A DCAP quote over `report_data` (zero-padded to 64 bytes) and its collateral."""
        data = pad_report_data(report_data)
        kind = self.attestation_type()
        if kind != "dcap":
            raise EvidenceUnavailableError(
                f"Gramine attestation type: got {kind!r}, expected 'dcap' "
                '(set sgx.remote_attestation = "dcap" in the manifest)'
            )
        if self._fetcher is None:
            raise EvidenceUnavailableError(
                "SGX collateral comes from Intel PCS/PCCS: no collateral fetcher was configured"
            )
        with self._lock:
            try:
                self._fs.write(self._dir / "user_report_data", data)
            except OSError as exc:
                raise EvidenceUnavailableError(
                    f"Gramine: cannot write user_report_data: {exc.strerror or exc}"
                ) from exc
            quote = self._read("quote")
        # Not a security check (the client verifies the signed quote); it catches a quote
        # answering another request, e.g. a writer outside this process.
        try:
            found = quote_report_data(quote)
        except MalformedEvidenceError as exc:
            raise EvidenceUnavailableError(
                f"Gramine: the quote file holds no quote: {exc}"
            ) from exc
        if found != data:
            raise EvidenceUnavailableError(
                "Gramine: the quote does not carry the requested report data"
            )
        return Evidence(quote=quote, collateral=fetch_collateral(self._fetcher, quote))

    def sealing_key(self) -> bytes:
        """32 bytes derived with HKDF-SHA256 from the enclave's 16-byte MRENCLAVE sealing key."""
        raw = self._read("keys/_sgx_mrenclave")
        if len(raw) != _SGX_SEALING_KEY_SIZE:
            raise EvidenceUnavailableError(
                f"Gramine sealing key: got {len(raw)} bytes, expected {_SGX_SEALING_KEY_SIZE}"
            )
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=SEALING_KEY_INFO).derive(
            raw
        )
