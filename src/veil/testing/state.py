"""The state of an emulated TEE: what a test prepares and the launcher builds devices from.

TEST HARNESS. A test writes an `EmulatedState` (``emulated.json`` plus certificate files) and
starts ``python -m veil.testing.emulated serve --emulated-state DIR ...``; the server process
rebuilds the same test PKI from the seed and answers the device files with it.

Two processes agree without sharing private keys on disk: the Intel-shaped PKI and the SEV-SNP
endorsement keys derive from the seed (a root with the same subject and key is the same trust
anchor). AMD's RSA keys do not derive from the seed, so the certificates an SNP host hands the
guest (its certificate table) are written here by the test, whose PKI the client trusts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

from veil.attestation.abi.snp import SnpTcb
from veil.testing.devices import (
    EmulatedDevices,
    EmulatedGramine,
    EmulatedTsm,
    SnpReportSigner,
)

__all__ = ["STATE_FILE", "EmulatedState", "load_devices"]

STATE_FILE = "emulated.json"
_PLATFORMS = ("sgx", "tdx", "sev-snp")
_MEASUREMENT_SIZE = {"sgx": 32, "tdx": 48, "sev-snp": 48}


@dataclass(frozen=True, slots=True)
class EmulatedState:
    """One emulated machine and the guest it runs.

    Attributes:
        platform: ``sgx`` (Gramine), ``tdx`` or ``sev-snp`` (configfs-tsm).
        seed: the test PKI's seed (`IntelPki` / `AmdPki`).
        now: the time the PKI's validity windows start from.
        measurement: MRENCLAVE (32 bytes), MRTD or the SNP launch measurement (48 bytes).
        debug: report a debug enclave / TD / guest.
        product: SNP only: "Milan", "Genoa" or "Turin".
        host_certificates: SNP only: the DER certificates (``vcek`` or ``vlek``, ``ask``,
            ``ark``) the host supplies with each report; None when it supplies none.
        vlek_csp_id: SNP only: reports are signed by a VLEK of this provider instead of a VCEK.
        chip_id: SNP only: the chip's 64-byte ID (its VCEK derives from it); None for the
            seed's default chip.
        snp_tcb: SNP only: the chip's TCB (reported, committed and current, and its VCEK's);
            None for `AmdPki.chip`'s default.
        sealing_key: SGX only: the 16-byte MRENCLAVE sealing key Gramine hands out.
        label: the platform's label in the Intel PKI (its PCK key and serial derive from it).
    """

    platform: str
    seed: bytes
    now: datetime
    measurement: bytes
    debug: bool = False
    product: str = "Milan"
    host_certificates: Mapping[str, bytes] | None = None
    vlek_csp_id: str | None = None
    chip_id: bytes | None = None
    snp_tcb: SnpTcb | None = None
    sealing_key: bytes = field(default=bytes(range(16)), repr=False)
    label: str | None = None

    def __post_init__(self) -> None:
        if self.platform not in _PLATFORMS:
            raise ValueError(f"platform: got {self.platform!r}, expected one of {_PLATFORMS}")
        size = _MEASUREMENT_SIZE[self.platform]
        if len(self.measurement) != size:
            raise ValueError(f"measurement: got {len(self.measurement)} bytes, expected {size}")
        if self.host_certificates is not None:
            object.__setattr__(
                self, "host_certificates", MappingProxyType(dict(self.host_certificates))
            )

    def write(self, directory: Path) -> Path:
        """Write the state under `directory` (created if missing); returns the directory."""
        directory.mkdir(parents=True, exist_ok=True)
        certs = None
        if self.host_certificates is not None:
            certs = {}
            for name, der in self.host_certificates.items():
                (directory / f"host-{name}.der").write_bytes(der)
                certs[name] = f"host-{name}.der"
        document: dict[str, Any] = {
            "platform": self.platform,
            "seed": self.seed.hex(),
            "now": self.now.isoformat(),
            "measurement": self.measurement.hex(),
            "debug": self.debug,
            "product": self.product,
            "host_certificates": certs,
            "vlek_csp_id": self.vlek_csp_id,
            "chip_id": None if self.chip_id is None else self.chip_id.hex(),
            "snp_tcb": None if self.snp_tcb is None else asdict(self.snp_tcb),
            "sealing_key": self.sealing_key.hex(),
            "label": self.label,
        }
        (directory / STATE_FILE).write_text(json.dumps(document, indent=2))
        return directory

    @classmethod
    def read(cls, directory: Path) -> EmulatedState:
        """Read what `write` wrote."""
        document = json.loads((directory / STATE_FILE).read_text())
        certs = document["host_certificates"]
        return cls(
            platform=document["platform"],
            seed=bytes.fromhex(document["seed"]),
            now=datetime.fromisoformat(document["now"]),
            measurement=bytes.fromhex(document["measurement"]),
            debug=document["debug"],
            product=document["product"],
            host_certificates=None
            if certs is None
            else {name: (directory / file).read_bytes() for name, file in certs.items()},
            vlek_csp_id=document["vlek_csp_id"],
            chip_id=None if document["chip_id"] is None else bytes.fromhex(document["chip_id"]),
            snp_tcb=None if document["snp_tcb"] is None else SnpTcb(**document["snp_tcb"]),
            sealing_key=bytes.fromhex(document["sealing_key"]),
            label=document["label"],
        )

    def devices(self) -> EmulatedDevices:
        """The device files of this machine, answered by signers of the seed's test PKI."""
        if self.platform == "sev-snp":
            return EmulatedDevices(
                tsm=EmulatedTsm(
                    snp_signer=self._snp_signer(), host_certificates=self.host_certificates
                )
            )
        from veil.testing.intel_pki import IntelPki

        pki = IntelPki(now=self.now, seed=self.seed)
        if self.platform == "sgx":
            sgx = pki.sgx_platform(label=self.label or "sgx")

            def sgx_quote(report_data: bytes) -> bytes:
                return sgx.quote(report_data, mr_enclave=self.measurement, debug=self.debug)

            return EmulatedDevices(
                gramine=EmulatedGramine(quote_signer=sgx_quote, sealing_key=self.sealing_key)
            )
        tdx = pki.tdx_platform(label=self.label or "tdx")

        def tdx_quote(report_data: bytes) -> bytes:
            return tdx.quote(report_data, mr_td=self.measurement, debug=self.debug)

        return EmulatedDevices(tsm=EmulatedTsm(quote_signer=tdx_quote))

    def _snp_signer(self) -> SnpReportSigner:
        from veil.testing.amd_pki import AmdPki

        # The RSA keys of this PKI are not the test's; only the endorsement key (derived from
        # the seed) signs here, and the host certificates come from the test's PKI.
        chip = AmdPki(self.product, now=self.now, seed=self.seed).chip(
            chip_id=self.chip_id, tcb=self.snp_tcb, vlek_csp_id=self.vlek_csp_id
        )

        def report(report_data: bytes, vmpl: int) -> bytes:
            return chip.report(
                report_data, measurement=self.measurement, debug=self.debug, vmpl=vmpl
            )

        return report


def load_devices(directory: Path) -> EmulatedDevices:
    """The emulated devices described by the state directory `directory`."""
    return EmulatedState.read(directory).devices()
