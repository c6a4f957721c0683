"""``veil verify-evidence``: verify an SGX/TDX quote or SEV-SNP report offline and show its claims.

Exit status 0 iff the evidence is accepted, 1 if it is rejected, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
import string
import sys
import warnings
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from veil.attestation.abi.dcap import parse_quote
from veil.attestation.claims import AuthenticEvidence
from veil.attestation.collateral_source import (
    collateral_from_dcap_qvl_json,
    load_collateral_directory,
)
from veil.attestation.policy import Policy
from veil.attestation.trust import TrustStore
from veil.attestation.verifier import (
    UnverifiedClaims,
    hazmat_verify_without_policy,
    unverified_claims,
)
from veil.attestation.verify.collateral import DcapCollateral
from veil.attestation.verify.dcap import hazmat_verify_quote_signatures
from veil.attestation.verify.snp import SnpCollateral, snp_collateral_from_certificates
from veil.commands import error_line
from veil.errors import AttestationError, HazmatWarning, UnsafePolicyWarning

__all__ = ["read_evidence", "register"]

_HEX_CHARS = frozenset(string.hexdigits.encode() + string.whitespace.encode())


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "verify-evidence",
        help="verify an SGX/TDX quote or SEV-SNP report offline",
        description=(
            "Verify TEE evidence (Intel SGX/TDX DCAP quote or AMD SEV-SNP report, raw or hex) "
            "against its collateral and a policy, and print its claims. Exit status 0 iff "
            "accepted."
        ),
    )
    parser.add_argument(
        "evidence",
        type=Path,
        metavar="EVIDENCE_FILE",
        help="raw or hex evidence, or a server's /quote as served (CBOR), e.g. quote.cbor from "
        "'veil evidence save'",
    )
    parser.add_argument(
        "--collateral",
        type=Path,
        help="a directory written by 'veil collateral fetch' (SGX, TDX or SEV-SNP), a server's "
        "/collateral as served (CBOR, e.g. collateral.cbor from 'veil evidence save'), or "
        "SGX/TDX collateral as a dcap-qvl JSON file",
    )
    parser.add_argument(
        "--simulated",
        action="store_true",
        help="trust veil's SIMULATED root instead of Intel's and AMD's: checks evidence from "
        "'veil serve --platform simulated', which proves nothing about any TEE",
    )
    parser.add_argument(
        "--certs",
        type=Path,
        action="append",
        help="SEV-SNP: VCEK/VLEK certificate (DER or PEM), optionally with the ASK/ASVK chain; "
        "repeat for several files",
    )
    parser.add_argument(
        "--policy",
        type=Path,
        help="policy TOML file (default: no measurement pinned, which is unsafe)",
    )
    parser.add_argument(
        "--at",
        metavar="TIME",
        help="verification time, ISO 8601 (UTC if no zone), e.g. 2025-07-01T00:00:00Z",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=_run)


def _served_cbor(data: bytes, kind: type) -> Any:
    """`data` decoded as the one CBOR item of type `kind` a server serves, else None."""
    import cbor2

    try:
        value = cbor2.loads(data)
    except (cbor2.CBORDecodeError, ValueError, EOFError):
        return None
    return value if isinstance(value, kind) else None


def read_evidence(path: Path) -> bytes:
    """The evidence in `path`: a served CBOR byte string is unwrapped, hex text is decoded,
    anything else is taken raw."""
    data = path.read_bytes()
    # A CBOR byte string (major type 2) as /quote serves it: no raw quote or report starts with
    # 0x40..0x5b (theirs start with a small little-endian version number).
    if data[:1] and 0x40 <= data[0] <= 0x5B:
        served = _served_cbor(data, bytes)
        if served is not None:
            return bytes(served)
    stripped = data.strip()
    # Hex text (as some projects store reports) is decoded; anything else is taken raw.
    if stripped and all(b in _HEX_CHARS for b in stripped):
        try:
            return bytes.fromhex(stripped.decode("ascii"))
        except ValueError:
            return data
    return data


def parse_time(text: str | None) -> datetime:
    """`--at` as an aware datetime (naive means UTC); now when not given."""
    if text is None:
        return datetime.now(UTC)
    value = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _load_policy(path: Path | None) -> Policy:
    if path is not None:
        return Policy.from_toml(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UnsafePolicyWarning)
        policy = Policy.unsafe_unpinned()
    for warning in caught:
        print(
            f"veil verify-evidence: WARNING: {warning.message} (no --policy given: "
            "authenticity, collateral, debug and TCB are checked, measurements are not)",
            file=sys.stderr,
        )
    return policy


def load_collateral(
    args: argparse.Namespace,
) -> DcapCollateral | SnpCollateral | Mapping[str, Any] | None:
    """The collateral the arguments name.

    Raises:
        OSError: a file cannot be read. ValueError: a file is neither of the accepted formats.
    """
    if args.certs:
        return snp_collateral_from_certificates(p.read_bytes() for p in args.certs)
    if args.collateral is not None:
        path: Path = args.collateral
        if path.is_dir():
            return load_collateral_directory(path)
        data = path.read_bytes()
        if data.lstrip()[:1] == b"{":
            return collateral_from_dcap_qvl_json(data)
        served = _served_cbor(data, dict)
        if served is None:
            raise ValueError(
                f"--collateral {path}: got neither JSON nor a CBOR map, expected a directory, "
                "a dcap-qvl JSON file or a server's /collateral"
            )
        return cast("Mapping[str, Any]", served)
    return None


def _plain(value: object) -> object:
    if isinstance(value, bytes):
        return value.hex()
    return value


def _claims_dict(claims: AuthenticEvidence | UnverifiedClaims) -> dict[str, Any]:
    return {
        "debug": claims.debug,
        "report_data": claims.report_data.hex(),
        "measurements": {k: v.hex() for k, v in claims.measurements.items()},
        "details": {k: _plain(v) for k, v in claims.details.items()},
    }


def _run(args: argparse.Namespace) -> int:
    try:
        evidence = read_evidence(args.evidence)
        at = parse_time(args.at)
        collateral = load_collateral(args)
        # Last: its warning is worth printing only once the inputs are known to be readable.
        policy = _load_policy(args.policy)
    except (OSError, ValueError) as exc:
        print(f"veil verify-evidence: {error_line(exc)}", file=sys.stderr)
        return 2
    except AttestationError as exc:
        # A policy file or collateral that cannot be read as such: the input, not the evidence.
        print(f"veil verify-evidence: {exc}", file=sys.stderr)
        return 2
    trust = None
    if args.simulated:
        trust = TrustStore.simulated_only()
        print(
            "veil verify-evidence: WARNING: --simulated trusts veil's SIMULATED root, whose key "
            "is public: an accepted result proves nothing about any TEE",
            file=sys.stderr,
        )

    result: dict[str, Any] = {
        "platform": None,
        "verdict": "rejected",
        "error": None,
        "error_type": None,
        "claims_verified": False,
        "at": at.isoformat(),
        "tcb_status": None,
        "advisory_ids": [],
        "debug": None,
        "report_data": None,
        "measurements": {},
        "details": {},
        "valid_from": None,
        "valid_until": None,
        "simulated": False,
    }
    try:
        # Parse first, so that a rejection can still show what the evidence claims.
        parsed = unverified_claims(evidence)
        result["platform"] = parsed.platform.value
        result |= _claims_dict(parsed)
        # The same two steps as verify_evidence; split so that a policy rejection can still
        # report the verified TCB status. The policy is applied below, hence no warning.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", HazmatWarning)
            verified = hazmat_verify_without_policy(
                evidence,
                collateral,
                trust=trust,
                now=at,
                collateral_grace_period=policy.collateral_grace_period,
                snp_min_tcb=policy.sev_snp.min_tcb if policy.sev_snp is not None else None,
            )
        result |= _claims_dict(verified)
        result |= {
            "claims_verified": True,
            "tcb_status": verified.tcb_status,
            "advisory_ids": list(verified.advisory_ids),
            "valid_from": verified.valid_from.isoformat(),
            "valid_until": verified.valid_until.isoformat(),
            "simulated": verified.simulated,
        }
        policy.validate(verified)
        result["verdict"] = "accepted"
    except AttestationError as exc:
        result["error"] = str(exc)
        result["error_type"] = type(exc).__name__
        if result["platform"] in ("sgx", "tdx") and not result["claims_verified"]:
            result["quote_signatures"] = _inspect_quote_signatures(evidence, at)

    if args.json:
        print(json.dumps(result, indent=2, sort_keys=False))
    else:
        _print_text(result)
    return 0 if result["verdict"] == "accepted" else 1


def _inspect_quote_signatures(evidence: bytes, at: datetime) -> str:
    """Without full verification, say whether the quote's own signatures and PCK chain hold:
    useful for quotes shipped without collateral. Informational only, never a verdict."""
    try:
        with warnings.catch_warnings():
            # Shown as "informational only" in the output, which is the warning's point.
            warnings.simplefilter("ignore", HazmatWarning)
            hazmat_verify_quote_signatures(
                parse_quote(evidence), trust=TrustStore.production(), now=at
            )
    except AttestationError as exc:
        return f"invalid: {exc}"
    return "valid (PCK chain, QE report, quote; no CRL, TCB or QE identity check)"


_HEX_INTS = (
    "guest_policy",
    "platform_info",
    "reported_tcb",
    "current_tcb",
    "committed_tcb",
    "launch_tcb",
)


def _print_text(result: Mapping[str, Any]) -> None:
    print(f"platform: {result['platform'] or 'unknown'}")
    print(f"verdict:  {result['verdict'].upper()}")
    if result["error"]:
        print(f"error:    {result['error_type']}: {result['error']}")
    if result["platform"] is None:
        return
    if not result["claims_verified"]:
        label = "claims (UNVERIFIED: parsed only, do not trust)"
    elif result["verdict"] == "accepted":
        label = "claims (verified)"
    else:
        label = "claims (authentic, but rejected by the policy)"
    rows: list[tuple[str, object]] = [
        ("debug", result["debug"]),
        ("report_data", result["report_data"]),
        *result["measurements"].items(),
    ]
    if "quote_signatures" in result:
        rows.append(("quote signatures", result["quote_signatures"]))
    if result["claims_verified"]:
        rows.append(("tcb_status", result["tcb_status"]))
        if result["advisory_ids"]:
            rows.append(("advisory_ids", ", ".join(result["advisory_ids"])))
        rows.append(("valid", f"{result['valid_from']} … {result['valid_until']}"))
    for name, value in result["details"].items():
        shown = f"{value:#018x}" if name in _HEX_INTS and isinstance(value, int) else value
        rows.append((name, shown))
    width = max(len(name) for name, _ in rows) + 2
    print(f"{label}:")
    for name, value in rows:
        print(f"  {name + ':':<{width}}{value}")
