"""Settings of one `veil serve` process."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DEFAULT_MAX_RUN_BYTES",
    "DEFAULT_MAX_UPLOAD_BYTES",
    "ServerConfig",
]

DEFAULT_MAX_UPLOAD_BYTES = 1 << 30
DEFAULT_MAX_RUN_BYTES = 64 << 20


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Where and how the server listens and runs models.

    Attributes:
        data_dir: holds the stored models (and the simulated platform's key).
        platform: ``auto``, ``simulated``, ``sgx``, ``tdx`` or ``sev-snp``.
        host: the address all three ports bind.
        unattested_port: plain HTTP: certificate, quote, collateral.
        attested_port: HTTPS with the attested certificate: run (and BlindAI's upload/delete).
        management_port: HTTPS with the attested certificate: upload, delete, list.
        threads: ONNX Runtime intra-op threads per model.
        max_upload_bytes: largest upload body accepted (counted while reading).
        max_run_bytes: largest run/delete body accepted.
        hazmat_test_tamper_certificate: TEST ONLY: serve on the unattested port a certificate
            other than the one the evidence binds, so tests can see clients refuse it.
    """

    data_dir: Path
    platform: str = "auto"
    host: str = "127.0.0.1"
    unattested_port: int = 9923
    attested_port: int = 9924
    management_port: int = 9925
    threads: int = os.cpu_count() or 1
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_run_bytes: int = DEFAULT_MAX_RUN_BYTES
    log_level: str = "warning"
    hazmat_test_tamper_certificate: bool = False

    def __post_init__(self) -> None:
        for name in ("unattested_port", "attested_port", "management_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise ValueError(f"{name}: got {port}, expected 0..65535")
        if self.threads < 1:
            raise ValueError(f"threads: got {self.threads}, expected at least 1")
        if self.max_upload_bytes < 1 or self.max_run_bytes < 1:
            raise ValueError("body limits must be positive")
