"""The simulated SGX platform: real DCAP-format evidence, signed by veil's public simulated root.

No TEE is involved and nothing here protects anything: the simulated root's private key ships in
the package, so anyone can mint such evidence. The point is that the *same* verifier code runs
against it as against genuine Intel evidence, end to end, in tests and demos. Clients accept it
only with an explicit, loud opt-in (`TrustStore.simulated_only()`).

What a provider builds once, at construction (mirroring Intel's PKI, see `veil.testing.intel_pki`):

- "PCK Platform CA" under the simulated root; a PCK leaf under it with Intel's SGX extensions;
- a "TCB Signing" certificate under the root, which signs the TCB info and the QE identity;
- a quoting-enclave attestation key (P-256), certified by a QE report signed with the PCK key.

Per call, `evidence()` builds an SGX ECDSA quote v3 (Intel SGX ECDSA Quote Library API, appendix
"Quote Format", A.4) around a fresh report; collateral (CRLs, TCB info, QE identity) is re-issued
whenever the cached copy is a day old, so a long-running server never serves expired collateral.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
import tempfile
import threading
import warnings
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from veil.attestation.claims import Platform
from veil.attestation.collateral_source import collateral_to_blindai_map
from veil.attestation.verify.tcb import KNOWN_TCB_STATUSES
from veil.errors import EvidenceUnavailableError, SimulationModeWarning
from veil.providers import _sim_pki
from veil.providers.base import Evidence, pad_report_data
from veil.providers.measurement import simulated_measurement, simulated_mr_signer
from veil.testing.dcap_quote import QeIdentitySpec

__all__ = ["SimulatedSgxProvider", "now_utc"]


_APP_ISV_PROD_ID, _APP_ISV_SVN = 0, 1
_QE_ISV_PROD_ID, _QE_ISV_SVN = 1, 8
_QE_MR_ENCLAVE = hashlib.sha256(b"veil simulated quoting enclave").digest()

_SEALING_KEY_FILE = "sealing.key"
_SEALING_KEY_SIZE = 32
_COLLATERAL_REFRESH = timedelta(days=1)


def now_utc() -> datetime:
    """The current time, timezone-aware UTC (the default clock of the simulated provider)."""
    return datetime.now(UTC)


class SimulatedSgxProvider:
    """Evidence in Intel's SGX DCAP format, signed under veil's public simulated root.

    Example::

        provider = SimulatedSgxProvider(Path("/var/lib/veil"))
        evidence = provider.evidence(hashlib.sha256(cert_der).digest())

    Args:
        data_dir: where the simulated sealing key (``sealing.key``, mode 0600) lives.
        mr_enclave: the MRENCLAVE to report; default `simulated_measurement()` of the served code.
        debug: set the DEBUG attribute, as a debug enclave would (the default policy refuses it).
        clock: the time source for certificates and collateral validity (timezone-aware UTC).
        revoke_pck: list the PCK leaf on the PCK CRL (to exercise revocation checks).
        tcb_status: the status the TCB info assigns to this platform's TCB level.
        advisory_ids: advisory IDs attached to that level when it is not UpToDate.
    """

    platform = Platform.SGX
    simulated = True

    def __init__(
        self,
        data_dir: Path,
        *,
        mr_enclave: bytes | None = None,
        debug: bool = False,
        clock: Callable[[], datetime] = now_utc,
        revoke_pck: bool = False,
        tcb_status: str = "UpToDate",
        advisory_ids: tuple[str, ...] = (),
    ) -> None:
        if mr_enclave is None:
            mr_enclave = simulated_measurement()
        if len(mr_enclave) != 32:
            raise ValueError(f"mr_enclave: got {len(mr_enclave)} bytes, expected 32")
        if tcb_status not in KNOWN_TCB_STATUSES:
            raise ValueError(
                f"tcb_status: got {tcb_status!r}, expected one of {sorted(KNOWN_TCB_STATUSES)}"
            )
        warnings.warn(
            "simulated SGX platform: evidence is signed by veil's public simulated root and "
            "proves nothing about confidentiality",
            SimulationModeWarning,
            stacklevel=2,
        )
        self._data_dir = Path(data_dir)
        self._mr_enclave = bytes(mr_enclave)
        self._mr_signer = simulated_mr_signer()
        self._debug = debug
        self._clock = clock
        self._platform = _sim_pki.simulated_platform(
            now=self._now(),
            revoke_pck=revoke_pck,
            tcb_status=tcb_status,
            advisory_ids=advisory_ids,
            qe=QeIdentitySpec(
                mr_signer=self._mr_signer,
                mr_enclave=_QE_MR_ENCLAVE,
                isv_prod_id=_QE_ISV_PROD_ID,
                isv_svn=_QE_ISV_SVN,
            ),
        )
        self._lock = threading.Lock()
        self._collateral: Mapping[str, Any] | None = None
        self._collateral_issued: datetime | None = None

    @property
    def mr_enclave(self) -> bytes:
        """The MRENCLAVE this provider reports."""
        return self._mr_enclave

    @property
    def mr_signer(self) -> bytes:
        """The MRSIGNER this provider reports (`simulated_mr_signer()`)."""
        return self._mr_signer

    def _now(self) -> datetime:
        now = self._clock()
        if now.tzinfo is None:
            raise ValueError("clock: got a naive datetime, expected a timezone-aware one")
        return now.astimezone(UTC)

    def quote(self, report_data: bytes) -> bytes:
        """An SGX ECDSA quote v3 binding `report_data` (at most 64 bytes, zero-padded)."""
        return self._platform.quote(
            pad_report_data(report_data),
            mr_enclave=self._mr_enclave,
            mr_signer=self._mr_signer,
            isv_prod_id=_APP_ISV_PROD_ID,
            isv_svn=_APP_ISV_SVN,
            debug=self._debug,
        )

    def collateral_map(self) -> Mapping[str, Any]:
        """BlindAI 0.6's collateral map for this platform, valid for 30 days from issue."""
        now = self._now()
        with self._lock:
            issued = self._collateral_issued
            if (
                self._collateral is None
                or issued is None
                or now < issued
                or now - issued >= _COLLATERAL_REFRESH
            ):
                self._collateral = collateral_to_blindai_map(self._platform.collateral(now))
                self._collateral_issued = now
            return self._collateral

    def evidence(self, report_data: bytes) -> Evidence:
        """Fresh evidence: a new quote over `report_data` and current collateral."""
        return Evidence(quote=self.quote(report_data), collateral=self.collateral_map())

    def sealing_key(self) -> bytes:
        """A random 32-byte key kept in ``<data_dir>/sealing.key`` (mode 0600).

        Created on first use and reused afterwards. A key file readable or writable by group or
        others is refused, since whoever reads it can read the sealed models.
        """
        path = self._data_dir / _SEALING_KEY_FILE
        self._data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if os.path.lexists(path):
            return _read_key_file(path)
        # Write a complete private temp file, then link it into place: a concurrent starter
        # either wins the link or reads the winner's full key, never a half-written file.
        fd, tmp = tempfile.mkstemp(prefix=".sealing-", dir=self._data_dir)  # mode 0600
        try:
            key = secrets.token_bytes(_SEALING_KEY_SIZE)
            with os.fdopen(fd, "wb") as handle:
                handle.write(key)
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                return _read_key_file(path)
            return key
        finally:
            os.unlink(tmp)


def _read_key_file(path: Path) -> bytes:
    st = path.lstat()
    if not stat.S_ISREG(st.st_mode):
        raise EvidenceUnavailableError(f"sealing key {path}: not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise EvidenceUnavailableError(
            f"sealing key {path}: mode got {mode:04o}, expected 0600 (no group/other access)"
        )
    key = path.read_bytes()
    if len(key) != _SEALING_KEY_SIZE:
        raise EvidenceUnavailableError(
            f"sealing key {path}: got {len(key)} bytes, expected {_SEALING_KEY_SIZE}"
        )
    return key
