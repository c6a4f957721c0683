"""What a client accepts: measurements, debug, TCB status and collateral freshness.

A `Policy` is a small immutable object. It compares verified facts (`VerifiedEvidence`) with what
the user pinned and raises on any difference; it never touches signatures or collateral.

Safe by default: debug is refused, only the ``UpToDate`` TCB status is accepted (SGX/TDX), an
SEV-SNP TCB must meet `AMD_MINIMUM_TCB` at VMPL 0, and a policy
that pins no measurement cannot be built except through `Policy.unsafe_unpinned`, which warns.

Example::

    from veil.attestation.policy import Policy, SgxPolicy

    policy = Policy(sgx=SgxPolicy(mr_enclave=(bytes.fromhex("33d8" + "00" * 30),)))
    policy = Policy.from_toml('''
        [sgx]
        mr_enclave = ["33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"]
    ''')
"""

from __future__ import annotations

import os
import tomllib
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any

from veil.attestation.abi.snp import SnpTcb
from veil.attestation.claims import AuthenticEvidence, Platform, VerifiedEvidence
from veil.attestation.verify.tcb import KNOWN_TCB_STATUSES, REVOKED
from veil.errors import CollateralError, PolicyError, TcbError, UnsafePolicyWarning

__all__ = [
    "AMD_MINIMUM_TCB",
    "AMD_MINIMUM_TCB_AS_OF",
    "SNP_TCB_STATUSES",
    "TCB_STATUSES",
    "Policy",
    "SgxPolicy",
    "SnpPolicy",
    "TdxPolicy",
    "minimum_snp_tcb",
    "snp_tcb_status",
]

# Intel's TCB statuses a policy may accept. "Revoked" can never be accepted.
TCB_STATUSES = KNOWN_TCB_STATUSES - {REVOKED}

# The SEV-SNP TCB decision, made by comparing the verified REPORTED_TCB with a minimum per
# product: "MeetsMinimum" (every component >= the minimum), "BelowMinimum", or "NoMinimum"
# (no minimum is known for the product; refused: name one in `SnpPolicy.min_tcb`).
# Only "MeetsMinimum" is ever accepted; lower the minimum, never the status.
SNP_MEETS_MINIMUM = "MeetsMinimum"
SNP_TCB_STATUSES = frozenset({SNP_MEETS_MINIMUM, "BelowMinimum", "NoMinimum"})

# Default minimum SEV-SNP TCB per product, from AMD's security bulletins. Table reviewed
# 2026-12-02; newest bulletin reflected: AMD-SB-3019 (published 2025-02-03; CVE-2024-56161,
# microcode signature verification; fixed firmware released 2024-12-17), whose Milan fix level
# is TCB_VERSION 0xDB18000000000004 = bootloader 4, TEE 0, SNP 0x18 (24), microcode 0xDB (219).
# That value was taken from public deployments that track the bulletin (Microsoft CCF's Milan
# minimum, microsoft/CCF pull request 7749; Azure Milan hosts report it since early 2025), not
# re-read from AMD's bulletin text here. Genoa and Turin are NOT in the table: their bulletin
# values could not be confirmed, so their evidence is "NoMinimum" and refused until a policy
# names a minimum (fail closed, never a guess). Review with every AMD bulletin that raises an
# SPL (SB-3011, SB-3005 and later).
AMD_MINIMUM_TCB_AS_OF = "2025-02-03 (AMD-SB-3019)"
AMD_MINIMUM_TCB: Mapping[str, SnpTcb] = MappingProxyType(
    {"Milan": SnpTcb(bootloader=4, tee=0, snp=24, microcode=219)}
)

SnpMinimumTcb = SnpTcb | Mapping[str, SnpTcb]


def minimum_snp_tcb(min_tcb: SnpMinimumTcb | None, product: str) -> SnpTcb | None:
    """The minimum TCB for `product`: one `SnpTcb` applies to every product, a mapping is
    per product, None means `AMD_MINIMUM_TCB`. None when the product has no minimum."""
    if isinstance(min_tcb, SnpTcb):
        return min_tcb
    return (AMD_MINIMUM_TCB if min_tcb is None else min_tcb).get(product)


def _below_minimum(reported: SnpTcb, minimum: SnpTcb) -> list[str]:
    got = reported.components()
    return [name for name, floor in minimum.components().items() if got.get(name, -1) < floor]


def snp_tcb_status(reported: SnpTcb, minimum: SnpTcb | None) -> str:
    """ "MeetsMinimum", "BelowMinimum" or "NoMinimum" (see `SNP_TCB_STATUSES`)."""
    if minimum is None:
        return "NoMinimum"
    return "BelowMinimum" if _below_minimum(reported, minimum) else SNP_MEETS_MINIMUM


# SNP guest policy bits (SEV-SNP ABI spec, "Guest Policy Structure").
_SNP_POLICY_SMT = 1 << 16
_SNP_POLICY_MIGRATE_MA = 1 << 18
_SNP_POLICY_SINGLE_SOCKET = 1 << 20

_UNSAFE = object()


def _hex(value: object) -> str:
    return value.hex() if isinstance(value, bytes) else str(value)


def _allow_list(value: Iterable[bytes] | bytes, name: str, size: int) -> tuple[bytes, ...]:
    items = (value,) if isinstance(value, bytes) else tuple(value)
    for item in items:
        _check_size(item, name, size)
    return items


def _check_size(value: object, name: str, size: int) -> None:
    if not isinstance(value, bytes) or len(value) != size:
        got = f"{len(value)} bytes" if isinstance(value, bytes) else type(value).__name__
        raise PolicyError(f"policy {name}: got {got}, expected {size} bytes")


def _check_optional(value: bytes | None, name: str, size: int) -> None:
    if value is not None:
        _check_size(value, name, size)


def _compare_exact(out: list[str], name: str, got: object, expected: bytes | None) -> None:
    if expected is not None and got != expected:
        out.append(f"{name}: got {_hex(got)}, expected {expected.hex()}")


def _compare_allowed(out: list[str], name: str, got: object, allowed: tuple[bytes, ...]) -> None:
    if allowed and got not in allowed:
        expected = (
            allowed[0].hex()
            if len(allowed) == 1
            else "one of " + ", ".join(a.hex() for a in allowed)
        )
        out.append(f"{name}: got {_hex(got)}, expected {expected}")


@dataclass(frozen=True, slots=True)
class SgxPolicy:
    """SGX enclave identity: an MRENCLAVE allow-list, or MRSIGNER + ISVPRODID (+ minimum ISVSVN).

    Attributes:
        mr_enclave: accepted enclave measurements (32 bytes each).
        mr_signer: the signer's key hash (32 bytes); requires `isv_prod_id`.
        isv_prod_id: the product id the signer gave the enclave.
        min_isv_svn: lowest accepted enclave security version.
    """

    mr_enclave: tuple[bytes, ...] = ()
    mr_signer: bytes | None = None
    isv_prod_id: int | None = None
    min_isv_svn: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "mr_enclave", _allow_list(self.mr_enclave, "sgx.mr_enclave", 32))
        _check_optional(self.mr_signer, "sgx.mr_signer", 32)
        if self.mr_signer is not None and self.isv_prod_id is None:
            # Any enclave from that signer would pass otherwise, whatever product it is.
            raise PolicyError("policy sgx.mr_signer: requires sgx.isv_prod_id")

    @property
    def pinned(self) -> bool:
        return bool(self.mr_enclave) or self.mr_signer is not None

    def _mismatches(self, claims: AuthenticEvidence | VerifiedEvidence, out: list[str]) -> None:
        m, d = claims.measurements, claims.details
        _compare_allowed(out, "mr_enclave", m.get("mr_enclave"), self.mr_enclave)
        _compare_exact(out, "mr_signer", m.get("mr_signer"), self.mr_signer)
        if self.isv_prod_id is not None and d.get("isv_prod_id") != self.isv_prod_id:
            out.append(
                f"isv_prod_id: got {_hex(d.get('isv_prod_id'))}, expected {self.isv_prod_id}"
            )
        if self.min_isv_svn is not None:
            svn = d.get("isv_svn")
            if not isinstance(svn, int) or svn < self.min_isv_svn:
                out.append(f"isv_svn: got {_hex(svn)}, expected >= {self.min_isv_svn}")


@dataclass(frozen=True, slots=True)
class TdxPolicy:
    """TDX TD identity.

    Attributes:
        mr_td: accepted initial TD measurements (48 bytes each); pinning needs at least one.
        rtmr0, rtmr1, rtmr2, rtmr3: exact runtime measurement registers (48 bytes).
        mr_seam: exact TDX module measurement (48 bytes).
        td_attributes: exact TD attributes (8 bytes, as in the quote).
        xfam: exact extended features mask (8 bytes, as in the quote).
    """

    mr_td: tuple[bytes, ...] = ()
    rtmr0: bytes | None = None
    rtmr1: bytes | None = None
    rtmr2: bytes | None = None
    rtmr3: bytes | None = None
    mr_seam: bytes | None = None
    td_attributes: bytes | None = None
    xfam: bytes | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "mr_td", _allow_list(self.mr_td, "tdx.mr_td", 48))
        for name in ("rtmr0", "rtmr1", "rtmr2", "rtmr3", "mr_seam"):
            _check_optional(getattr(self, name), f"tdx.{name}", 48)
        _check_optional(self.td_attributes, "tdx.td_attributes", 8)
        _check_optional(self.xfam, "tdx.xfam", 8)

    @property
    def pinned(self) -> bool:
        # MRTD measures the TD firmware that extends the RTMRs: without it they prove nothing.
        return bool(self.mr_td)

    def _mismatches(self, claims: AuthenticEvidence | VerifiedEvidence, out: list[str]) -> None:
        m, d = claims.measurements, claims.details
        _compare_allowed(out, "mr_td", m.get("mr_td"), self.mr_td)
        for name in ("rtmr0", "rtmr1", "rtmr2", "rtmr3", "mr_seam"):
            _compare_exact(out, name, m.get(name), getattr(self, name))
        _compare_exact(out, "td_attributes", d.get("td_attributes"), self.td_attributes)
        _compare_exact(out, "xfam", d.get("xfam"), self.xfam)


@dataclass(frozen=True, slots=True)
class SnpPolicy:
    """SEV-SNP guest identity and guest-policy requirements.

    Attributes:
        measurement: accepted launch measurements (48 bytes each); pinning needs at least one.
        host_data: exact HOST_DATA (32 bytes).
        id_key_digest, author_key_digest: exact ID-block key digests (48 bytes).
        allow_migration_agent: accept a guest policy with MIGRATE_MA set (default False).
        allow_smt: accept a guest policy that allows SMT (default True).
        require_single_socket: require the SINGLE_SOCKET guest policy bit.
        vmpl: the exact VMPL that must have requested the report (default 0, the most
            privileged level, where an SVSM or the guest kernel runs; None accepts any).
        min_tcb: lowest accepted REPORTED_TCB, component by component: one `SnpTcb` for every
            product, or a mapping product -> `SnpTcb`. None (default) uses `AMD_MINIMUM_TCB`.
            A product without a minimum is refused ("NoMinimum").
        platform_info_required, platform_info_forbidden: PLATFORM_INFO bits that must be set /
            clear (ABI spec: bit 0 SMT_EN, 1 TSME_EN, 2 ECC_EN, 3 RAPL_DIS, 4 CIPHERTEXT_HIDING_EN,
            5 ALIAS_CHECK_COMPLETE). E.g. ``platform_info_forbidden=1`` refuses a host with SMT on.
        require_crl: refuse evidence whose collateral had no AMD CRL (default False: BlindAI
            and veil servers have served only the VCEK and its chain, so a missing CRL means
            "revocation not checked", recorded as ``details["amd_crl_checked"] == 0``; a CRL
            that is given is always checked).
    """

    measurement: tuple[bytes, ...] = ()
    host_data: bytes | None = None
    id_key_digest: bytes | None = None
    author_key_digest: bytes | None = None
    allow_migration_agent: bool = False
    allow_smt: bool = True
    require_single_socket: bool = False
    vmpl: int | None = 0
    min_tcb: SnpMinimumTcb | None = None
    require_crl: bool = False
    platform_info_required: int = 0
    platform_info_forbidden: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "measurement", _allow_list(self.measurement, "sev_snp.measurement", 48)
        )
        _check_optional(self.host_data, "sev_snp.host_data", 32)
        _check_optional(self.id_key_digest, "sev_snp.id_key_digest", 48)
        _check_optional(self.author_key_digest, "sev_snp.author_key_digest", 48)
        if self.vmpl is not None and not 0 <= self.vmpl <= 3:
            raise PolicyError(f"policy sev_snp.vmpl: got {self.vmpl}, expected 0..3")
        if self.min_tcb is not None and not isinstance(self.min_tcb, SnpTcb):
            object.__setattr__(self, "min_tcb", MappingProxyType(dict(self.min_tcb)))
        if self.platform_info_required & self.platform_info_forbidden:
            raise PolicyError("policy sev_snp.platform_info: a bit is both required and forbidden")

    @property
    def pinned(self) -> bool:
        return bool(self.measurement)

    def _mismatches(self, claims: AuthenticEvidence | VerifiedEvidence, out: list[str]) -> None:
        m, d = claims.measurements, claims.details
        _compare_allowed(out, "measurement", m.get("measurement"), self.measurement)
        _compare_exact(out, "host_data", m.get("host_data"), self.host_data)
        _compare_exact(out, "id_key_digest", m.get("id_key_digest"), self.id_key_digest)
        _compare_exact(out, "author_key_digest", m.get("author_key_digest"), self.author_key_digest)
        raw = d.get("guest_policy")
        guest_policy = raw if isinstance(raw, int) else 0
        if not self.allow_migration_agent and guest_policy & _SNP_POLICY_MIGRATE_MA:
            out.append("guest_policy.migrate_ma: got True, expected False")
        if not self.allow_smt and guest_policy & _SNP_POLICY_SMT:
            out.append("guest_policy.smt: got True, expected False")
        if self.require_single_socket and not guest_policy & _SNP_POLICY_SINGLE_SOCKET:
            out.append("guest_policy.single_socket: got False, expected True")
        if self.vmpl is not None and d.get("vmpl") != self.vmpl:
            out.append(f"vmpl: got {_hex(d.get('vmpl'))}, expected {self.vmpl}")
        raw_info = d.get("platform_info")
        info = raw_info if isinstance(raw_info, int) else 0
        if info & self.platform_info_required != self.platform_info_required:
            out.append(
                f"platform_info: got {info:#x}, expected bits {self.platform_info_required:#x} set"
            )
        if info & self.platform_info_forbidden:
            out.append(
                f"platform_info: got {info:#x}, expected bits "
                f"{self.platform_info_forbidden:#x} clear"
            )

    def _collateral_problems(self, claims: AuthenticEvidence | VerifiedEvidence) -> None:
        if self.require_crl and claims.details.get("amd_crl_checked") != 1:
            raise CollateralError(
                "AMD CRL: got none in the collateral, expected one (policy sev_snp.require_crl)"
            )


def _snp_tcb_problems(
    min_tcb: SnpMinimumTcb | None, claims: AuthenticEvidence | VerifiedEvidence, out: list[str]
) -> None:
    """The SEV-SNP TCB decision: status and every component below the minimum."""
    if claims.tcb_status != SNP_MEETS_MINIMUM:
        out.append(f"tcb_status: got {claims.tcb_status}, expected {SNP_MEETS_MINIMUM}")
    product = claims.details.get("product")
    minimum = minimum_snp_tcb(min_tcb, str(product))
    if minimum is None:
        out.append(f"min_tcb: none known for {_hex(product)}; set sev_snp.min_tcb for it")
        return
    for name, floor in minimum.components().items():
        got = claims.details.get(f"tcb_{name}")
        if not isinstance(got, int) or got < floor:
            out.append(f"reported_tcb.{name}: got {_hex(got)}, expected >= {floor}")


@dataclass(frozen=True, slots=True)
class Policy:
    """What a client accepts from a TEE. Immutable; build once, reuse for every connection.

    A policy must pin at least one measurement of every platform section it has (SGX
    ``mr_enclave`` or ``mr_signer``, TDX ``mr_td``, SEV-SNP ``measurement``), and have at
    least one section. Evidence from a platform without a section is refused.

    Attributes:
        sgx, tdx, sev_snp: per-platform requirements.
        allow_debug: accept a debuggable TEE, whose memory the host can read (warns).
        accepted_tcb_statuses: Intel TCB statuses to accept (default only "UpToDate").
        accepted_advisory_ids: when set, every advisory of the TCB level must be in it.
        min_tcb_evaluation_data_number: lowest accepted Intel TCB evaluation data number
            (refuses collateral from before a TCB recovery); SGX and TDX only.
        collateral_grace_period: how long after its expiry collateral is still accepted.

    Raises:
        PolicyError: nothing pinned, a value of the wrong size, an unknown TCB status.
    """

    sgx: SgxPolicy | None = None
    tdx: TdxPolicy | None = None
    sev_snp: SnpPolicy | None = None
    allow_debug: bool = False
    accepted_tcb_statuses: frozenset[str] = frozenset({"UpToDate"})
    accepted_advisory_ids: frozenset[str] | None = None
    min_tcb_evaluation_data_number: int | None = None
    collateral_grace_period: timedelta = timedelta(0)
    # Set only by `unsafe_unpinned`; a token nobody passes by accident.
    _unsafe: object = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        statuses = frozenset(self.accepted_tcb_statuses)
        unknown = sorted(statuses - TCB_STATUSES)
        if unknown:
            raise PolicyError(
                f"policy accepted_tcb_statuses: got {', '.join(unknown)}, "
                f"expected among {', '.join(sorted(TCB_STATUSES))}"
            )
        object.__setattr__(self, "accepted_tcb_statuses", statuses)
        if self.accepted_advisory_ids is not None:
            object.__setattr__(self, "accepted_advisory_ids", frozenset(self.accepted_advisory_ids))
        if self.collateral_grace_period < timedelta(0):
            raise PolicyError("policy collateral_grace_period: got a negative duration")
        if self._unsafe is not None and self._unsafe is not _UNSAFE:
            raise PolicyError("policy: use Policy.unsafe_unpinned() for an unpinned policy")
        if not self.unpinned:
            sections = [s for s in (self.sgx, self.tdx, self.sev_snp) if s is not None]
            if not sections:
                raise PolicyError(
                    "policy pins no measurement: give sgx, tdx or sev_snp requirements "
                    "(or Policy.unsafe_unpinned() to accept any code on a genuine TEE)"
                )
            for name, section in (("sgx", self.sgx), ("tdx", self.tdx), ("sev_snp", self.sev_snp)):
                if section is not None and not section.pinned:
                    raise PolicyError(
                        f"policy {name} pins no measurement "
                        "(or Policy.unsafe_unpinned() to accept any code on a genuine TEE)"
                    )
        if self.allow_debug:
            warnings.warn(
                "policy allows debug TEEs: the host can read their memory",
                UnsafePolicyWarning,
                stacklevel=3,
            )

    @property
    def unpinned(self) -> bool:
        """True for a policy made by `unsafe_unpinned`."""
        return self._unsafe is _UNSAFE

    @classmethod
    def unsafe_unpinned(
        cls,
        *,
        sgx: SgxPolicy | None = None,
        tdx: TdxPolicy | None = None,
        sev_snp: SnpPolicy | None = None,
        allow_debug: bool = False,
        accepted_tcb_statuses: Iterable[str] = ("UpToDate",),
        accepted_advisory_ids: Iterable[str] | None = None,
        min_tcb_evaluation_data_number: int | None = None,
        collateral_grace_period: timedelta = timedelta(0),
    ) -> Policy:
        """A policy that pins no measurement: ANY code on a genuine TEE is accepted.

        Authenticity, collateral, debug and TCB are still checked. Warns with
        `UnsafePolicyWarning`. Use it to inspect evidence, never to protect data.
        """
        warnings.warn(
            "policy pins no measurement: any code running on a genuine TEE is accepted",
            UnsafePolicyWarning,
            stacklevel=2,
        )
        return cls(
            sgx=sgx,
            tdx=tdx,
            sev_snp=sev_snp,
            allow_debug=allow_debug,
            accepted_tcb_statuses=frozenset(accepted_tcb_statuses),
            accepted_advisory_ids=(
                None if accepted_advisory_ids is None else frozenset(accepted_advisory_ids)
            ),
            min_tcb_evaluation_data_number=min_tcb_evaluation_data_number,
            collateral_grace_period=collateral_grace_period,
            _unsafe=_UNSAFE,
        )

    # --- validation ---

    def validate(self, claims: AuthenticEvidence | VerifiedEvidence) -> None:
        """Compare verified claims with this policy.

        Raises:
            CollateralError: the SEV-SNP section requires an AMD CRL and none was checked.
            PolicyError: measurements, debug, attributes or guest policy differ; the message
                lists every differing field as "field: got X, expected Y".
            TcbError: the TCB status, an advisory, the TCB evaluation data number or the
                SNP reported TCB is not accepted; the message lists every problem.
        """
        section: SgxPolicy | TdxPolicy | SnpPolicy | None = {
            Platform.SGX: self.sgx,
            Platform.TDX: self.tdx,
            Platform.SEV_SNP: self.sev_snp,
        }[claims.platform]
        if section is None and not self.unpinned:
            raise PolicyError(f"policy has no {claims.platform.value} section")
        if isinstance(section, SnpPolicy):
            section._collateral_problems(claims)

        mismatches: list[str] = []
        if claims.debug and not self.allow_debug:
            mismatches.append("debug: got True, expected False")
        if section is not None:
            section._mismatches(claims, mismatches)
        if mismatches:
            raise PolicyError("evidence does not match the policy: " + "; ".join(mismatches))

        problems: list[str] = []
        if claims.platform is Platform.SEV_SNP:
            section_tcb = self.sev_snp.min_tcb if self.sev_snp is not None else None
            _snp_tcb_problems(section_tcb, claims, problems)
        elif claims.tcb_status not in self.accepted_tcb_statuses:
            problems.append(
                f"tcb_status: got {claims.tcb_status}, expected "
                + " or ".join(sorted(self.accepted_tcb_statuses))
            )
        if self.accepted_advisory_ids is not None:
            extra = [a for a in claims.advisory_ids if a not in self.accepted_advisory_ids]
            if extra:
                problems.append(
                    f"advisory_ids: got {', '.join(extra)}, expected only accepted advisories "
                    f"({', '.join(sorted(self.accepted_advisory_ids)) or 'none'})"
                )
        intel = claims.platform in (Platform.SGX, Platform.TDX)
        if self.min_tcb_evaluation_data_number is not None and intel:
            number = claims.details.get("tcb_evaluation_data_number")
            if not isinstance(number, int) or number < self.min_tcb_evaluation_data_number:
                problems.append(
                    f"tcb_evaluation_data_number: got {_hex(number)}, "
                    f"expected >= {self.min_tcb_evaluation_data_number}"
                )
        if problems:
            raise TcbError("TCB not accepted by the policy: " + "; ".join(problems))

    # --- TOML ---

    @classmethod
    def from_toml(cls, source: str | os.PathLike[str]) -> Policy:
        """Load a policy from a TOML file path or TOML text.

        A `str` holding a newline, ``=`` or ``[`` is TOML text; any other `str` or path-like is
        a file path. Bytes values are hex strings; allow-lists are arrays (a single string is
        accepted). Unknown keys are refused. ``unsafe_unpinned = true`` builds the policy with
        `Policy.unsafe_unpinned` (and warns). Example::

            allow_debug = false
            accepted_tcb_statuses = ["UpToDate", "SWHardeningNeeded"]
            accepted_advisory_ids = ["INTEL-SA-00615"]
            min_tcb_evaluation_data_number = 17
            collateral_grace_period = 0          # seconds

            [sgx]
            mr_enclave = ["33d8…"]               # or mr_signer + isv_prod_id (+ min_isv_svn)

            [tdx]
            mr_td = ["91eb…"]
            rtmr0 = "44c0…"
            td_attributes = "0000001000000000"

            [sev_snp]
            measurement = ["7a1e…"]
            allow_migration_agent = false
            vmpl = 0                             # the default; "any" accepts every VMPL
            min_tcb = { bootloader = 4, tee = 0, snp = 24, microcode = 219 }   # all products
            # or per product: [sev_snp.min_tcb.Genoa] bootloader = ..., ...
            require_crl = true                   # refuse collateral without AMD's CRL
            platform_info_forbidden = 1          # refuse a host with SMT enabled

        Raises:
            PolicyError: invalid TOML, an unknown key, a value of the wrong type or size.
            OSError: the file cannot be read.
        """
        if isinstance(source, str) and any(c in source for c in "\n=["):
            text = source
        else:
            text = Path(source).read_text(encoding="utf-8")
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise PolicyError(f"policy TOML: {exc}") from None
        return _policy_from_mapping(doc)


# --- TOML helpers ---


class _Table:
    """Reads typed values out of one TOML table and refuses keys nobody asked for."""

    def __init__(self, data: Mapping[str, Any], prefix: str) -> None:
        self._data = dict(data)
        self._prefix = prefix

    def _name(self, key: str) -> str:
        return f"{self._prefix}{key}"

    def _take(self, key: str) -> Any:
        return self._data.pop(key, None)

    def hex(self, key: str) -> bytes | None:
        value = self._take(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise PolicyError(f"policy {self._name(key)}: got {type(value).__name__}, expected hex")
        try:
            return bytes.fromhex(value.removeprefix("0x"))
        except ValueError:
            raise PolicyError(f"policy {self._name(key)}: not a hex string") from None

    def hex_list(self, key: str) -> tuple[bytes, ...]:
        value = self._take(key)
        if value is None:
            return ()
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list):
            raise PolicyError(f"policy {self._name(key)}: expected a hex string or an array")
        sub = _Table({str(i): v for i, v in enumerate(items)}, f"{self._name(key)}[")
        return tuple(sub.hex(str(i)) or b"" for i in range(len(items)))

    def integer(self, key: str) -> int | None:
        value = self._take(key)
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool):
            raise PolicyError(
                f"policy {self._name(key)}: got {type(value).__name__}, expected an integer"
            )
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self._take(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise PolicyError(
                f"policy {self._name(key)}: got {type(value).__name__}, expected true or false"
            )
        return value

    def strings(self, key: str) -> tuple[str, ...] | None:
        value = self._take(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise PolicyError(f"policy {self._name(key)}: expected an array of strings")
        return tuple(value)

    def table(self, key: str) -> _Table | None:
        value = self._take(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise PolicyError(f"policy {self._name(key)}: expected a table")
        return _Table(value, f"{self._name(key)}.")

    def done(self) -> None:
        if self._data:
            unknown = ", ".join(self._name(k) for k in sorted(self._data))
            raise PolicyError(f"policy: unknown key(s) {unknown}")


_SNP_PRODUCTS = ("Milan", "Genoa", "Turin")


def _vmpl(t: _Table) -> int | None:
    # vmpl = "any" accepts every VMPL; absent means the default, 0.
    if t._data.get("vmpl") == "any":
        t._take("vmpl")
        return None
    value = t.integer("vmpl")
    return 0 if value is None else value


def _snp_tcb_from_table(m: _Table, what: str) -> SnpTcb:
    parts = {k: m.integer(k) for k in ("bootloader", "tee", "snp", "microcode", "fmc")}
    m.done()
    missing = [k for k in ("bootloader", "tee", "snp", "microcode") if parts[k] is None]
    if missing:
        raise PolicyError(f"policy sev_snp.{what}: missing {', '.join(missing)}")
    return SnpTcb(
        bootloader=parts["bootloader"] or 0,
        tee=parts["tee"] or 0,
        snp=parts["snp"] or 0,
        microcode=parts["microcode"] or 0,
        fmc=parts["fmc"],
    )


def _policy_from_mapping(doc: Mapping[str, Any]) -> Policy:
    top = _Table(doc, "")
    sgx = tdx = snp = None
    if (t := top.table("sgx")) is not None:
        sgx = SgxPolicy(
            mr_enclave=t.hex_list("mr_enclave"),
            mr_signer=t.hex("mr_signer"),
            isv_prod_id=t.integer("isv_prod_id"),
            min_isv_svn=t.integer("min_isv_svn"),
        )
        t.done()
    if (t := top.table("tdx")) is not None:
        tdx = TdxPolicy(
            mr_td=t.hex_list("mr_td"),
            rtmr0=t.hex("rtmr0"),
            rtmr1=t.hex("rtmr1"),
            rtmr2=t.hex("rtmr2"),
            rtmr3=t.hex("rtmr3"),
            mr_seam=t.hex("mr_seam"),
            td_attributes=t.hex("td_attributes"),
            xfam=t.hex("xfam"),
        )
        t.done()
    if (t := top.table("sev_snp")) is not None:
        min_tcb: SnpMinimumTcb | None = None
        if (m := t.table("min_tcb")) is not None:
            if any(key in _SNP_PRODUCTS for key in m._data):
                per_product = {}
                for product in _SNP_PRODUCTS:
                    if (pm := m.table(product)) is not None:
                        per_product[product] = _snp_tcb_from_table(pm, f"min_tcb.{product}")
                m.done()
                min_tcb = per_product
            else:
                min_tcb = _snp_tcb_from_table(m, "min_tcb")
        snp = SnpPolicy(
            measurement=t.hex_list("measurement"),
            host_data=t.hex("host_data"),
            id_key_digest=t.hex("id_key_digest"),
            author_key_digest=t.hex("author_key_digest"),
            allow_migration_agent=t.boolean("allow_migration_agent", False),
            allow_smt=t.boolean("allow_smt", True),
            require_single_socket=t.boolean("require_single_socket", False),
            vmpl=_vmpl(t),
            min_tcb=min_tcb,
            require_crl=t.boolean("require_crl", False),
            platform_info_required=t.integer("platform_info_required") or 0,
            platform_info_forbidden=t.integer("platform_info_forbidden") or 0,
        )
        t.done()
    statuses = top.strings("accepted_tcb_statuses")
    advisories = top.strings("accepted_advisory_ids")
    grace = top.integer("collateral_grace_period")
    common: dict[str, Any] = {
        "sgx": sgx,
        "tdx": tdx,
        "sev_snp": snp,
        "allow_debug": top.boolean("allow_debug", False),
        "accepted_tcb_statuses": frozenset(statuses or ("UpToDate",)),
        "accepted_advisory_ids": None if advisories is None else frozenset(advisories),
        "min_tcb_evaluation_data_number": top.integer("min_tcb_evaluation_data_number"),
        "collateral_grace_period": timedelta(seconds=grace or 0),
    }
    unpinned = top.boolean("unsafe_unpinned", False)
    top.done()
    if unpinned:
        return Policy.unsafe_unpinned(**common)
    return Policy(**common)
