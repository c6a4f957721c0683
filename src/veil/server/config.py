"""Settings of one `veil serve` process."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from veil.attestation.collateral_source import INTEL_PCS_URL
from veil.attestation.kds import AMD_KDS_URL
from veil.server.batching import BatchingConfig
from veil.server.collateral import RefreshSettings
from veil.server.limits import Limits

__all__ = ["DEFAULT_DATA_DIR", "ServerConfig", "parse_duration"]

# `veil serve` and `veil keys` both default to this, relative to the working directory.
DEFAULT_DATA_DIR = Path("veil-data")


_REPLICA_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


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
        batching: how concurrent predictions for one model are merged (on by default; only
            models whose inputs and outputs all have a free batch axis are merged).
        pccs_url: Intel PCS or a PCCS, where SGX and TDX collateral for the quote is fetched.
        kds_url: AMD KDS or a mirror, where an SEV-SNP guest whose host supplies no
            certificate table gets its VCEK (and every SNP guest its ASK/ARK chain and CRL).
        snp_product: the SEV-SNP product for version 2 reports, which do not name their CPU.
        collateral_refresh: when the served collateral is refreshed (schedule, margin before
            expiry, retry delay after a failure); see `veil.server.collateral`.
    """

    data_dir: Path
    platform: str = "auto"
    host: str = "127.0.0.1"
    unattested_port: int = 9923
    attested_port: int = 9924
    management_port: int = 9925
    threads: int = os.cpu_count() or 1
    log_level: str = "warning"
    pccs_url: str = INTEL_PCS_URL
    kds_url: str = AMD_KDS_URL
    snp_product: str | None = None
    # --- hardening: authentication, sealed storage, resource limits ---
    # no_auth: ``--no-auth``: no API keys asked for (local development; a banner says so).
    # unsealed_store: ``--unsealed-store``: keep models in plain files when the platform has no
    #   sealing key (the default refuses to start then: fail closed).
    # limits: body, model, storage, tensor, time, concurrency and rate limits.
    # no_anonymous: ``--no-anonymous``: a request with no key is refused (401) even for a public
    #   model; by default it may run public models, within the anonymous rate limits.
    no_auth: bool = False
    no_anonymous: bool = False
    unsealed_store: bool = False
    limits: Limits = field(default_factory=Limits)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    # optimization: what an upload's ``optimize`` flag means when the upload names no
    #   optimization itself: ``off`` or ``graph`` (`veil.server.optimize`; never ``int8``,
    #   which changes outputs and must be asked for by name).
    optimization: str = "off"
    collateral_refresh: RefreshSettings = field(default_factory=RefreshSettings)
    # join: ``--join URL``: obtain the TLS identity and the store key from this key broker
    #   (`veil.cluster`); join_policy: what the broker's evidence must satisfy (default: this
    #   server's own measurement).
    join: str | None = None
    join_policy: Path | None = None
    # --- shared state, for replicas behind one balancer ---
    # database_url: ``--database-url``: model metadata, owners and API keys as MACed rows in this
    #   PostgreSQL database (`veil.server.pgstate`) instead of the sealed manifest file.
    # store_dir: ``--store-dir``: the directory of the sealed model blobs (default
    #   ``<data_dir>/sealed``); replicas share one (a network volume).
    database_url: str | None = None
    store_dir: Path | None = None
    # replica_name: ``--replica-name``: sent as the ``Veil-Replica`` header of every response,
    #   so that tests and operators see which replica behind a balancer answered.
    replica_name: str | None = None
    # rotate_keys_every_s: ``--rotate-keys-every``: rotate the TLS and receipt keys (new
    #   evidence) this often, in seconds (`veil.server.rotation`); None: only on request.
    rotate_keys_every_s: float | None = None

    def __post_init__(self) -> None:
        if self.rotate_keys_every_s is not None and not self.rotate_keys_every_s >= 1:
            raise ValueError(
                f"rotate_keys_every_s: got {self.rotate_keys_every_s}, expected at least 1 second"
            )
        if self.replica_name is not None and not _REPLICA_NAME.fullmatch(self.replica_name):
            raise ValueError(
                f"replica_name: got {self.replica_name[:80]!r}, expected 1-64 of A-Z a-z 0-9 . _ -"
            )
        if self.database_url is not None and self.unsealed_store:
            raise ValueError(
                "database_url: got it with unsealed_store, expected sealed storage (the rows are "
                "authenticated with the sealing or cluster key)"
            )
        for name in ("unattested_port", "attested_port", "management_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise ValueError(f"{name}: got {port}, expected 0..65535")
        if self.optimization not in ("off", "graph"):
            raise ValueError(f"optimization: got {self.optimization!r}, expected off or graph")
        if self.threads < 1:
            raise ValueError(f"threads: got {self.threads}, expected at least 1")


_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
_UNIT_SECONDS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Seconds in a duration such as ``90``, ``90s``, ``30m``, ``24h`` or ``7d``.

    Raises:
        ValueError: not a number with an optional unit s, m, h or d.
    """
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"duration: got {text[:40]!r}, expected a number and s, m, h or d")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
