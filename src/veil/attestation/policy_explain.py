"""Field by field, how verified evidence compares with a policy: for people, not for decisions.

`Policy.validate` decides; `explain` shows every field the policy pins, what the evidence holds
and whether it passes, so an operator can see at once why a client refuses a server. The two
read the same policy objects; tests hold them to the same verdict on every vector set.
"""

from __future__ import annotations

from dataclasses import dataclass

from veil.attestation.claims import AuthenticEvidence, Platform, VerifiedEvidence
from veil.attestation.policy import (
    SNP_MEETS_MINIMUM,
    Policy,
    SgxPolicy,
    SnpPolicy,
    TdxPolicy,
    minimum_snp_tcb,
)

__all__ = ["Check", "explain"]

Claims = AuthenticEvidence | VerifiedEvidence

# SNP guest policy bits (SEV-SNP ABI spec, "Guest Policy Structure").
_SMT = 1 << 16
_MIGRATE_MA = 1 << 18
_SINGLE_SOCKET = 1 << 20


@dataclass(frozen=True, slots=True)
class Check:
    """One pinned field: its name, what the evidence holds, what the policy wants, the result."""

    field: str
    got: str
    expected: str
    ok: bool


def _show(value: object) -> str:
    if isinstance(value, bytes):
        return value.hex()
    return "absent" if value is None else str(value)


def _allowed(out: list[Check], name: str, got: object, allowed: tuple[bytes, ...]) -> None:
    if allowed:
        expected = " or ".join(a.hex() for a in allowed)
        out.append(Check(name, _show(got), expected, got in allowed))


def _exact(out: list[Check], name: str, got: object, expected: object) -> None:
    if expected is not None:
        out.append(Check(name, _show(got), _show(expected), got == expected))


def _at_least(out: list[Check], name: str, got: object, floor: int | None) -> None:
    if floor is not None:
        ok = isinstance(got, int) and not isinstance(got, bool) and got >= floor
        out.append(Check(name, _show(got), f">= {floor}", ok))


def _sgx(section: SgxPolicy, claims: Claims, out: list[Check]) -> None:
    m, d = claims.measurements, claims.details
    _allowed(out, "mr_enclave", m.get("mr_enclave"), section.mr_enclave)
    _exact(out, "mr_signer", m.get("mr_signer"), section.mr_signer)
    _exact(out, "isv_prod_id", d.get("isv_prod_id"), section.isv_prod_id)
    _at_least(out, "isv_svn", d.get("isv_svn"), section.min_isv_svn)


def _tdx(section: TdxPolicy, claims: Claims, out: list[Check]) -> None:
    m, d = claims.measurements, claims.details
    _allowed(out, "mr_td", m.get("mr_td"), section.mr_td)
    for name in ("rtmr0", "rtmr1", "rtmr2", "rtmr3", "mr_seam"):
        _exact(out, name, m.get(name), getattr(section, name))
    _exact(out, "td_attributes", d.get("td_attributes"), section.td_attributes)
    _exact(out, "xfam", d.get("xfam"), section.xfam)


def _bit(out: list[Check], name: str, value: int, bit: int, *, want: bool | None) -> None:
    if want is not None:
        got = bool(value & bit)
        out.append(Check(name, str(got), str(want), got == want))


def _snp(section: SnpPolicy, claims: Claims, out: list[Check]) -> None:
    m, d = claims.measurements, claims.details
    _allowed(out, "measurement", m.get("measurement"), section.measurement)
    for name in ("host_data", "id_key_digest", "author_key_digest"):
        _exact(out, name, m.get(name), getattr(section, name))
    raw = d.get("guest_policy")
    policy = raw if isinstance(raw, int) else 0
    _bit(
        out,
        "guest_policy.migrate_ma",
        policy,
        _MIGRATE_MA,
        want=None if section.allow_migration_agent else False,
    )
    _bit(out, "guest_policy.smt", policy, _SMT, want=None if section.allow_smt else False)
    _bit(
        out,
        "guest_policy.single_socket",
        policy,
        _SINGLE_SOCKET,
        want=True if section.require_single_socket else None,
    )
    _exact(out, "vmpl", d.get("vmpl"), section.vmpl)
    raw_info = d.get("platform_info")
    info = raw_info if isinstance(raw_info, int) else 0
    if section.platform_info_required:
        want = section.platform_info_required
        out.append(Check("platform_info", f"{info:#x}", f"bits {want:#x} set", info & want == want))
    if section.platform_info_forbidden:
        bad = section.platform_info_forbidden
        out.append(Check("platform_info", f"{info:#x}", f"bits {bad:#x} clear", not info & bad))
    if section.require_crl:
        checked = d.get("amd_crl_checked") == 1
        out.append(Check("amd_crl", "checked" if checked else "none", "checked", checked))


def _snp_tcb(policy: Policy, claims: Claims, out: list[Check]) -> None:
    out.append(
        Check(
            "tcb_status",
            claims.tcb_status,
            SNP_MEETS_MINIMUM,
            claims.tcb_status == SNP_MEETS_MINIMUM,
        )
    )
    product = str(claims.details.get("product"))
    section_min = policy.sev_snp.min_tcb if policy.sev_snp is not None else None
    minimum = minimum_snp_tcb(section_min, product)
    if minimum is None:
        out.append(Check("min_tcb", f"product {product}", "a minimum for it", False))
        return
    for name, floor in minimum.components().items():
        _at_least(out, f"reported_tcb.{name}", claims.details.get(f"tcb_{name}"), floor)


def explain(policy: Policy, claims: Claims) -> list[Check]:
    """Every field `policy` constrains, compared with authentic `claims`, in policy order.

    The verdict belongs to `Policy.validate`; this list explains it.
    """
    out: list[Check] = []
    section = {Platform.SGX: policy.sgx, Platform.TDX: policy.tdx, Platform.SEV_SNP: policy.sev_snp}
    pinned = section[claims.platform]
    if pinned is None:
        out.append(
            Check(
                "platform",
                claims.platform.value,
                "a platform with a section in the policy",
                policy.unpinned,
            )
        )
    out.append(
        Check(
            "debug",
            str(claims.debug),
            "True or False" if policy.allow_debug else "False",
            policy.allow_debug or not claims.debug,
        )
    )
    if isinstance(pinned, SgxPolicy):
        _sgx(pinned, claims, out)
    elif isinstance(pinned, TdxPolicy):
        _tdx(pinned, claims, out)
    elif isinstance(pinned, SnpPolicy):
        _snp(pinned, claims, out)
    if claims.platform is Platform.SEV_SNP:
        _snp_tcb(policy, claims, out)
        return out
    statuses = sorted(policy.accepted_tcb_statuses)
    out.append(
        Check(
            "tcb_status",
            claims.tcb_status,
            " or ".join(statuses),
            claims.tcb_status in policy.accepted_tcb_statuses,
        )
    )
    if policy.accepted_advisory_ids is not None:
        accepted = policy.accepted_advisory_ids
        extra = [a for a in claims.advisory_ids if a not in accepted]
        out.append(
            Check(
                "advisory_ids",
                ", ".join(claims.advisory_ids) or "none",
                "only " + (", ".join(sorted(accepted)) or "none"),
                not extra,
            )
        )
    _at_least(
        out,
        "tcb_evaluation_data_number",
        claims.details.get("tcb_evaluation_data_number"),
        policy.min_tcb_evaluation_data_number,
    )
    return out
