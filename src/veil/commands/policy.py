"""``veil policy``: learn what to pin, and see why evidence meets a policy or not.

``from-sigstruct SIG``       the SGX values of a ``gramine-sgx-sign`` SIGSTRUCT (signature checked)
``snp-launch --ovmf ...``    the SEV-SNP launch measurement of a direct-boot VM (sev-snp-measure)
``from-evidence EVIDENCE``   what verified evidence measured: trust on first use, said loudly
``check POLICY EVIDENCE``    each pinned field: got, expected, ok

Every subcommand that prints a policy prints TOML that ``Policy.from_toml`` loads; the printed
policy is loaded back before it is shown, so a policy this command prints is one veil accepts.
Exit status: 0 on success (``check``: the evidence meets the policy), 1 when evidence or a
SIGSTRUCT is refused, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from veil.attestation.abi.sigstruct import Sigstruct
from veil.attestation.claims import AuthenticEvidence, Platform
from veil.attestation.policy import Policy
from veil.attestation.policy_explain import Check, explain
from veil.attestation.verifier import hazmat_verify_without_policy
from veil.attestation.verify.sigstruct import verify_sigstruct
from veil.commands.verify_evidence import load_collateral, parse_time, read_evidence
from veil.errors import AttestationError, HazmatWarning

__all__ = ["register"]

_TOFU_NOTE = """\
# ============================ TRUST ON FIRST USE ============================
# These values were copied from the evidence given to 'veil policy from-evidence'.
# The evidence was verified (genuine {platform}, collateral valid at {at}), but
# nothing here shows that the code it measured is the code you meant to run:
# compare them with values you computed yourself (veil policy from-sigstruct,
# veil policy snp-launch, a reproducible build) before you protect data with them.
# ============================================================================"""


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "policy",
        help="print the policy to pin for an SGX enclave or a confidential VM; check evidence",
        description="Learn what a client must pin, and explain why evidence meets a policy or not.",
    )
    sub = parser.add_subparsers(dest="policy_command", required=True, metavar="SUBCOMMAND")

    p = sub.add_parser(
        "from-sigstruct",
        help="the SGX policy for the SIGSTRUCT gramine-sgx-sign wrote (e.g. veil.sig)",
        description="Check a SIGSTRUCT's RSA-3072 signature and print the [sgx] policy it implies.",
    )
    p.add_argument("sigstruct", type=Path, metavar="SIGSTRUCT_FILE")
    p.add_argument(
        "--pin",
        choices=("enclave", "signer"),
        default="enclave",
        help="enclave (default): this exact MRENCLAVE; signer: any enclave this key signs with "
        "this product id at this ISV SVN or later",
    )
    p.set_defaults(handler=_from_sigstruct)

    p = sub.add_parser(
        "snp-launch",
        help="the SEV-SNP launch measurement of a direct-boot VM (needs sev-snp-measure)",
        description=(
            "Compute the expected SEV-SNP launch measurement of a QEMU direct-boot guest with "
            "the sev-snp-measure package and print the [sev_snp] policy."
        ),
    )
    p.add_argument("--ovmf", type=Path, required=True, help="the OVMF firmware (AmdSev build)")
    p.add_argument("--kernel", type=Path, help="the kernel QEMU boots (-kernel)")
    p.add_argument("--initrd", type=Path, help="the initrd (-initrd); needs --kernel")
    p.add_argument("--append", help="the kernel command line (-append); needs --kernel")
    p.add_argument("--vcpus", type=int, required=True, help="number of vCPUs (-smp)")
    p.add_argument("--vcpu-type", help="QEMU CPU model (-cpu), e.g. EPYC-v4, EPYC-Milan")
    p.add_argument("--vcpu-sig", type=lambda s: int(s, 0), help="CPUID signature instead")
    p.add_argument(
        "--guest-features",
        type=lambda s: int(s, 0),
        default=0x1,
        help="SEV_FEATURES of the VMSA (default 0x1, SNP only)",
    )
    p.add_argument(
        "--vmm-type", choices=("QEMU", "ec2", "gce"), default="QEMU", help="default QEMU"
    )
    p.set_defaults(handler=_snp_launch)

    p = sub.add_parser(
        "from-evidence",
        help="verify evidence and print a policy pinning what it measured (trust on first use)",
        description=(
            "Verify evidence and print a policy that pins what it measured. This is TRUST ON "
            "FIRST USE: it proves the evidence is genuine, not that the code is yours."
        ),
    )
    _evidence_arguments(p)
    p.add_argument(
        "--accept-observed-tcb",
        action="store_true",
        help="the evidence's TCB is not up to date: pin its status (Intel) or its reported "
        "TCB as the minimum (SEV-SNP) instead of refusing",
    )
    p.set_defaults(handler=_from_evidence)

    p = sub.add_parser(
        "check",
        help="explain, field by field, why evidence meets a policy or not",
        description="Verify evidence, then compare it with POLICY field by field.",
    )
    p.add_argument("policy", type=Path, metavar="POLICY_FILE")
    _evidence_arguments(p)
    p.set_defaults(handler=_check)


def _evidence_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("evidence", type=Path, metavar="EVIDENCE_FILE")
    p.add_argument(
        "--collateral",
        type=Path,
        help="a directory written by 'veil collateral fetch', or SGX/TDX dcap-qvl JSON",
    )
    p.add_argument(
        "--certs",
        type=Path,
        action="append",
        help="SEV-SNP: VCEK/VLEK certificate (DER or PEM); repeat for several files",
    )
    p.add_argument("--at", metavar="TIME", help="verification time, ISO 8601 (default now)")


def _fail(what: str, exc: object, status: int = 1) -> int:
    print(f"veil policy {what}: {exc}", file=sys.stderr)
    return status


def _checked(toml: str) -> str:
    """The TOML, after making sure veil loads it (a policy we print must be one we accept)."""
    Policy.from_toml(toml)
    return toml


# --- from-sigstruct ---


def _from_sigstruct(args: argparse.Namespace) -> int:
    try:
        data = args.sigstruct.read_bytes()
    except OSError as exc:
        return _fail("from-sigstruct", exc, 2)
    try:
        sig = Sigstruct.parse(data)
        verify_sigstruct(sig)
    except AttestationError as exc:
        return _fail("from-sigstruct", f"{args.sigstruct.name}: {exc}")
    if sig.debug:
        print(
            "veil policy from-sigstruct: WARNING: this SIGSTRUCT enforces ATTRIBUTES.DEBUG: the "
            "enclave is debuggable and every veil policy refuses it; sign with sgx.debug = false",
            file=sys.stderr,
        )
    enclave = "" if args.pin == "enclave" else "# "
    signer = "" if args.pin == "signer" else "# "
    lines = [
        f"# From the SIGSTRUCT {args.sigstruct.name} (RSA-3072 signature and Q1/Q2 verified).",
        f"# date {sig.date.hex()}, vendor {sig.vendor:#06x}, "
        f"MISCSELECT {sig.miscselect:#010x} mask {sig.misc_mask:#010x},",
        f"# ATTRIBUTES {sig.attributes.hex()} mask {sig.attribute_mask.hex()}: "
        "EINIT enforces these; the policy",
        "# checks the DEBUG bit of the running enclave itself (allow_debug = false).",
        "[sgx]",
        "# This exact enclave build:",
        f'{enclave}mr_enclave = ["{sig.enclave_hash.hex()}"]',
        "# Or every enclave this key signs as this product, at this security version or later:",
        f'{signer}mr_signer = "{sig.mr_signer.hex()}"',
        f"{signer}isv_prod_id = {sig.isv_prod_id}",
        f"{signer}min_isv_svn = {sig.isv_svn}",
    ]
    print(_checked("\n".join(lines) + "\n"), end="")
    return 0


# --- snp-launch ---


def _snp_launch(args: argparse.Namespace) -> int:
    try:
        from sevsnpmeasure import guest, vcpu_types, vmm_types  # type: ignore[import-untyped]
        from sevsnpmeasure.sev_mode import SevMode  # type: ignore[import-untyped]
    except ImportError:
        return _fail(
            "snp-launch", "needs the sev-snp-measure package: pip install 'veil[deploy]'", 2
        )
    if (args.initrd is not None or args.append is not None) and args.kernel is None:
        return _fail("snp-launch", "--initrd and --append need --kernel", 2)
    if args.vcpus < 1:
        return _fail("snp-launch", f"--vcpus: got {args.vcpus}, expected at least 1", 2)
    vmm_type = vmm_types.VMMType[args.vmm_type]
    if args.vcpu_sig is not None:
        vcpu_sig = args.vcpu_sig
    elif args.vcpu_type is not None:
        if args.vcpu_type not in vcpu_types.CPU_SIGS:
            known = ", ".join(vcpu_types.CPU_SIGS)
            return _fail("snp-launch", f"--vcpu-type: got {args.vcpu_type}, expected {known}", 2)
        vcpu_sig = vcpu_types.CPU_SIGS[args.vcpu_type]
    elif vmm_type is vmm_types.VMMType.QEMU:
        return _fail("snp-launch", "QEMU guests need --vcpu-type or --vcpu-sig", 2)
    else:
        vcpu_sig = None
    try:
        digest: bytes = guest.calc_launch_digest(
            SevMode.SEV_SNP,
            args.vcpus,
            vcpu_sig,
            str(args.ovmf),
            None if args.kernel is None else str(args.kernel),
            None if args.initrd is None else str(args.initrd),
            args.append,
            args.guest_features,
            vmm_type=vmm_type,
        )
    except (OSError, RuntimeError, ValueError) as exc:
        return _fail("snp-launch", exc)
    booted = (
        f"kernel {args.kernel.name}, initrd {args.initrd.name if args.initrd else 'none'}, "
        f"command line {args.append!r}"
        if args.kernel is not None
        else "no kernel: the measurement covers the firmware only, NOT the code it boots"
    )
    lines = [
        f"# SEV-SNP launch measurement of a {args.vmm_type} guest: firmware {args.ovmf.name},",
        f"# {booted},",
        f"# {args.vcpus} vCPU(s), signature {vcpu_sig if vcpu_sig is None else hex(vcpu_sig)}, "
        f"SEV_FEATURES {args.guest_features:#x}. Computed with sev-snp-measure.",
        "[sev_snp]",
        f'measurement = ["{digest.hex()}"]',
    ]
    print(_checked("\n".join(lines) + "\n"), end="")
    return 0


# --- from-evidence ---


def _verified(args: argparse.Namespace, policy: Policy | None = None) -> AuthenticEvidence:
    """Authentic claims, appraised as `policy` would (its grace period and SEV-SNP minimum)."""
    evidence = read_evidence(args.evidence)
    collateral = load_collateral(args)
    with warnings.catch_warnings():
        # The caller applies a policy (check) or prints one for the user to review (from-evidence).
        warnings.simplefilter("ignore", HazmatWarning)
        return hazmat_verify_without_policy(
            evidence,
            collateral,
            now=parse_time(args.at),
            collateral_grace_period=(
                policy.collateral_grace_period if policy is not None else timedelta(0)
            ),
            snp_min_tcb=(policy.sev_snp.min_tcb if policy is not None and policy.sev_snp else None),
        )


def _from_evidence(args: argparse.Namespace) -> int:
    try:
        claims = _verified(args)
    except (OSError, ValueError) as exc:
        return _fail("from-evidence", exc, 2)
    except AttestationError as exc:
        return _fail("from-evidence", f"evidence refused: {type(exc).__name__}: {exc}")
    if claims.simulated:
        return _fail("from-evidence", "simulated evidence (no TEE): there is nothing to pin")
    if claims.debug:
        return _fail(
            "from-evidence",
            "debug evidence: the host can read this TEE's memory; no policy should accept it",
        )
    body = _POLICY_WRITERS[claims.platform](claims)
    tcb = _tcb_lines(claims, args.accept_observed_tcb)
    if tcb is None:
        return _fail(
            "from-evidence",
            f"the TCB is not up to date (tcb_status {claims.tcb_status}); update the platform, "
            "or pass --accept-observed-tcb to pin it as it is",
        )
    at = parse_time(args.at).isoformat()
    note = _TOFU_NOTE.format(platform=claims.platform.value, at=at)
    print(note, file=sys.stderr)
    print(_checked("\n".join([note, *tcb[0], *body, *tcb[1]]) + "\n"), end="")
    return 0


def _hex_row(name: str, value: object) -> str:
    shown = value.hex() if isinstance(value, bytes) else str(value)
    return f'{name} = "{shown}"'


def _number(details: Mapping[str, int | bytes | str], key: str) -> int:
    value = details[key]
    if not isinstance(value, int):
        raise TypeError(f"claims detail {key}: got {type(value).__name__}, expected int")
    return value


def _sgx_lines(claims: AuthenticEvidence) -> list[str]:
    m, d = claims.measurements, claims.details
    return [
        "[sgx]",
        f'mr_enclave = ["{m["mr_enclave"].hex()}"]',
        _hex_row("mr_signer", m["mr_signer"]),
        f"isv_prod_id = {_number(d, 'isv_prod_id')}",
        f"min_isv_svn = {_number(d, 'isv_svn')}",
    ]


def _tdx_lines(claims: AuthenticEvidence) -> list[str]:
    m, d = claims.measurements, claims.details
    return [
        "[tdx]",
        f'mr_td = ["{m["mr_td"].hex()}"]',
        *(_hex_row(name, m[name]) for name in ("rtmr0", "rtmr1", "rtmr2", "rtmr3")),
        _hex_row("td_attributes", d["td_attributes"]),
        _hex_row("xfam", d["xfam"]),
        "# The TDX module changes with every platform update; its TCB status is checked above.",
        f'# mr_seam = "{m["mr_seam"].hex()}"',
    ]


_SNP_TCB_PARTS = ("bootloader", "tee", "snp", "microcode", "fmc")
_MIGRATE_MA = 1 << 18


def _snp_lines(claims: AuthenticEvidence) -> list[str]:
    m, d = claims.measurements, claims.details
    guest_policy = d.get("guest_policy")
    migrate = isinstance(guest_policy, int) and bool(guest_policy & _MIGRATE_MA)
    return [
        "[sev_snp]",
        f'measurement = ["{m["measurement"].hex()}"]',
        *(_hex_row(n, m[n]) for n in ("host_data", "id_key_digest", "author_key_digest")),
        f"vmpl = {_number(d, 'vmpl')}",
        f"allow_migration_agent = {'true' if migrate else 'false'}",
    ]


_POLICY_WRITERS: dict[Platform, Callable[[AuthenticEvidence], list[str]]] = {
    Platform.SGX: _sgx_lines,
    Platform.TDX: _tdx_lines,
    Platform.SEV_SNP: _snp_lines,
}


def _tcb_lines(
    claims: AuthenticEvidence, accept_observed: bool
) -> tuple[list[str], list[str]] | None:
    """(top-level lines, lines after the platform table); None when the TCB is refused."""
    if claims.platform is Platform.SEV_SNP:
        if claims.tcb_status == "MeetsMinimum":
            return [], []
        if not accept_observed:
            return None
        product = str(claims.details.get("product"))
        parts = [
            f"{name} = {_number(claims.details, f'tcb_{name}')}"
            for name in _SNP_TCB_PARTS
            if f"tcb_{name}" in claims.details
        ]
        return [], [
            "# --accept-observed-tcb: this platform's REPORTED_TCB is below AMD's published",
            "# minimum; it is pinned as the minimum instead. Raise it after the host updates.",
            f"[sev_snp.min_tcb.{product}]",
            *parts,
        ]
    # Intel's TCB evaluation data only moves forward: refusing collateral older than the one
    # seen here stops a collateral source from replaying an evaluation that predates a fix.
    number = _number(claims.details, "tcb_evaluation_data_number")
    freshness = [
        "# Collateral must be at least as recent as the one this evidence was verified with.",
        f"min_tcb_evaluation_data_number = {number}",
    ]
    if claims.tcb_status == "UpToDate":
        return freshness, []
    if not accept_observed:
        return None
    advisories = ", ".join(f'"{a}"' for a in claims.advisory_ids)
    return [
        *freshness,
        f"# --accept-observed-tcb: the platform's TCB status is {claims.tcb_status}, not UpToDate.",
        f'accepted_tcb_statuses = ["UpToDate", "{claims.tcb_status}"]',
        f"accepted_advisory_ids = [{advisories}]",
    ], []


# --- check ---


def _check(args: argparse.Namespace) -> int:
    try:
        policy = Policy.from_toml(args.policy)
    except (OSError, AttestationError) as exc:
        return _fail("check", exc, 2)
    try:
        claims = _verified(args, policy)
    except (OSError, ValueError) as exc:
        return _fail("check", exc, 2)
    except AttestationError as exc:
        print(f"evidence: REFUSED before any policy field: {type(exc).__name__}: {exc}")
        return 1
    print(f"evidence: {claims.platform.value}, authentic at {parse_time(args.at).isoformat()}")
    _print_checks(explain(policy, claims))
    try:
        policy.validate(claims)
    except AttestationError as exc:
        print(f"verdict: REJECTED ({type(exc).__name__}: {exc})")
        return 1
    print("verdict: ACCEPTED")
    return 0


def _print_checks(checks: Sequence[Check]) -> None:
    width = max((len(c.field) for c in checks), default=0) + 2
    for c in checks:
        mark = "ok  " if c.ok else "FAIL"
        print(f"  {mark} {c.field + ':':<{width}}got {c.got}")
        print(f"       {'':<{width}}expected {c.expected}")
