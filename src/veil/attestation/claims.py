"""The verified result: the one object the rest of veil reads claims from.

Only `veil.attestation.verifier` builds a `VerifiedEvidence`, and only after every signature, chain,
collateral and policy check passed. Code that needs a measurement, the report data or the TCB status
reads it here and never re-parses the raw evidence.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType

__all__ = ["AuthenticEvidence", "Platform", "VerifiedEvidence"]


class Platform(enum.StrEnum):
    SGX = "sgx"
    TDX = "tdx"
    SEV_SNP = "sev-snp"


def _frozen(mapping: Mapping[str, bytes]) -> Mapping[str, bytes]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True, slots=True)
class _Claims:
    """The fields both results carry; see `VerifiedEvidence` for what each means. The two
    results stay distinct types so that only a policy-appraised one is ever a `VerifiedEvidence`."""

    platform: Platform
    report_data: bytes
    measurements: Mapping[str, bytes]
    debug: bool
    tcb_status: str
    advisory_ids: tuple[str, ...]
    valid_from: datetime
    valid_until: datetime
    simulated: bool = False
    details: Mapping[str, int | bytes | str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "measurements", _frozen(self.measurements))
        object.__setattr__(self, "details", MappingProxyType(dict(self.details)))

    def __repr__(self) -> str:
        return _repr(self)


# repr=False: keep the base's repr (no raw details, measurements in hex).
@dataclass(frozen=True, slots=True, repr=False)
class VerifiedEvidence(_Claims):
    """Claims of evidence that passed verification and the policy.

    Attributes:
        platform: which TEE produced the evidence.
        report_data: the 64 bytes the TEE bound into the evidence (veil puts SHA-256 of its TLS
            certificate in the first 32).
        measurements: the platform's measurement registers by name, as bytes. Names:
            SGX ``mr_enclave``, ``mr_signer``; TDX ``mr_td``, ``mr_seam``, ``rtmr0``..``rtmr3``,
            ``mr_config_id``, ``mr_owner``, ``mr_owner_config``; SEV-SNP ``measurement``,
            ``host_data``, ``id_key_digest``, ``author_key_digest``.
        debug: whether the TEE allows a debugger (its memory is then readable by the host).
        tcb_status: Intel's TCB status ("UpToDate", "SWHardeningNeeded", ...) for SGX/TDX;
            for SEV-SNP the minimum-TCB decision: "MeetsMinimum" (the verified REPORTED_TCB is
            at least the policy's minimum for the product in every component), "BelowMinimum",
            or "NoMinimum" (no minimum known for the product). See `policy.AMD_MINIMUM_TCB`.
        advisory_ids: Intel security advisories (INTEL-SA-…) that apply to this TCB level.
        valid_from: start of the window in which every certificate and collateral item is valid.
        valid_until: end of that window; the verdict must be renewed after it.
        simulated: true when the evidence chains to veil's simulated root (no TEE, no security).
        details: further platform facts (SVNs, attributes, policy bits) as ints or bytes.
    """


@dataclass(frozen=True, slots=True, repr=False)
class AuthenticEvidence(_Claims):
    """Claims of evidence whose signatures, chains and collateral verified, but that NO policy
    appraised: nothing says WHAT runs (measurements, debug, TCB minimum unchecked).

    Returned only by `verifier.hazmat_verify_without_policy`; `Policy.validate` appraises it.
    Same attributes as `VerifiedEvidence`; its `tcb_status` for SEV-SNP is computed against the
    minimum the caller passed (AMD's default table if none).
    """


def _repr(e: _Claims) -> str:
    shown = ", ".join(f"{k}={v.hex()}" for k, v in e.measurements.items())
    return (
        f"{type(e).__name__}(platform={e.platform.value}, tcb_status={e.tcb_status}, "
        f"debug={e.debug}, simulated={e.simulated}, {shown}, "
        f"report_data={e.report_data.hex()})"
    )
