"""`veil policy from-evidence` and `veil policy check` on the real vector sets.

A policy printed from one set, fed to `veil verify-evidence --policy`, accepts that set and
rejects every other set; `check` explains the same verdict field by field.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

import pytest

from veil.attestation.policy import Policy
from veil.attestation.policy_explain import explain
from veil.attestation.verifier import hazmat_verify_without_policy
from veil.attestation.verify.snp import snp_collateral_from_certificates
from veil.cli import main
from veil.commands.verify_evidence import read_evidence
from veil.errors import AttestationError, HazmatWarning


class VectorSet(NamedTuple):
    name: str
    evidence: str
    options: tuple[str, ...]
    at: str
    up_to_date: bool


SETS = [
    VectorSet("sgx", "sgx/dcap-qvl-sgx-v3/sgx_quote",
              ("--collateral", "sgx/dcap-qvl-sgx-v3/sgx_quote_collateral.json"),
              "2025-07-01T00:00:00Z", False),
    VectorSet("tdx", "tdx/dcap-qvl-tdx-v4/tdx_quote",
              ("--collateral", "tdx/dcap-qvl-tdx-v4/tdx_quote_collateral.json"),
              "2025-07-01T00:00:00Z", True),
    VectorSet("snp-vcek", "sev-snp/virtee-milan-vcek/report_milan.hex",
              ("--certs", "sev-snp/virtee-milan-vcek/vcek_milan.der"),
              "2025-01-01T00:00:00Z", False),
    VectorSet("snp-vlek", "sev-snp/trustee-milan-vlek-v3/test-vlek-report.bin",
              ("--certs", "sev-snp/trustee-milan-vlek-v3/test-vlek.der"),
              "2025-06-01T00:00:00Z", False),
]  # fmt: skip
IDS = [s.name for s in SETS]


def evidence_args(vectors: Path, s: VectorSet) -> list[str]:
    option, path = s.options
    return [str(vectors / s.evidence), option, str(vectors / path), "--at", s.at]


def from_evidence(
    vectors: Path, s: VectorSet, capsys: pytest.CaptureFixture[str], *extra: str
) -> tuple[int, str, str]:
    status = main(["policy", "from-evidence", *evidence_args(vectors, s), *extra])
    out = capsys.readouterr()
    return status, out.out, out.err


@pytest.fixture(scope="module")
def policies(vectors: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("policies")
    out = {}
    for s in SETS:
        path = folder / f"{s.name}.toml"
        buffer, errors = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(errors):
            status = main(
                ["policy", "from-evidence", *evidence_args(vectors, s), "--accept-observed-tcb"]
            )
        assert status == 0, errors.getvalue()
        path.write_text(buffer.getvalue())
        out[s.name] = path
    return out


@pytest.mark.parametrize("s", SETS, ids=IDS)
def test_from_evidence_is_loud_about_trust_on_first_use(
    vectors: Path, s: VectorSet, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = from_evidence(vectors, s, capsys, "--accept-observed-tcb")
    assert status == 0
    for text in (out, err):
        assert "TRUST ON FIRST USE" in text
    Policy.from_toml(out)


@pytest.mark.parametrize("s", [s for s in SETS if not s.up_to_date], ids=lambda s: s.name)
def test_from_evidence_refuses_an_outdated_tcb_by_default(
    vectors: Path, s: VectorSet, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = from_evidence(vectors, s, capsys)
    assert (status, out) == (1, "")
    assert "the TCB is not up to date" in err
    assert "--accept-observed-tcb" in err


def test_from_evidence_up_to_date_tdx_pins_no_tcb_exception(
    vectors: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = from_evidence(vectors, SETS[1], capsys)
    assert status == 0
    policy = Policy.from_toml(out)
    assert policy.accepted_tcb_statuses == frozenset({"UpToDate"})
    assert policy.min_tcb_evaluation_data_number == 17
    assert policy.tdx is not None
    assert policy.tdx.mr_td[0].hex().startswith("91eb2b44d141d4ec")
    assert policy.tdx.rtmr3 == bytes(48)
    assert policy.tdx.mr_seam is None  # left to the TCB status, with a comment


@pytest.mark.parametrize("policy_set", SETS, ids=IDS)
@pytest.mark.parametrize("evidence_set", SETS, ids=IDS)
def test_round_trip_through_verify_evidence(
    vectors: Path,
    policies: dict[str, Path],
    policy_set: VectorSet,
    evidence_set: VectorSet,
    capsys: pytest.CaptureFixture[str],
) -> None:
    status = main(
        [
            "verify-evidence",
            *evidence_args(vectors, evidence_set),
            "--policy",
            str(policies[policy_set.name]),
            "--json",
        ]
    )
    result = json.loads(capsys.readouterr().out)
    if policy_set == evidence_set:
        assert (status, result["verdict"], result["error"]) == (0, "accepted", None)
    else:
        assert (status, result["verdict"], result["error_type"]) == (1, "rejected", "PolicyError")


def test_from_evidence_refuses_debug_evidence(
    vectors: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = vectors / "sev-snp/go-sev-guest-milan-vcek-debugpolicy"
    status = main(
        ["policy", "from-evidence", str(d / "attestation.bin"), "--certs", str(d / "vcek.testcer"),
         "--at", "2025-01-01T00:00:00Z", "--accept-observed-tcb"]
    )  # fmt: skip
    out = capsys.readouterr()
    assert (status, out.out) == (1, "")
    assert "debug evidence" in out.err


def test_from_evidence_refuses_unverifiable_evidence(
    vectors: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A genuine debug quote shipped without collateral: nothing is pinned from it.
    quote = vectors / "sgx/trustee-occlum-sgx-v3-debug/occlum_quote.dat"
    status = main(["policy", "from-evidence", str(quote), "--at", "2025-06-01T00:00:00Z"])
    out = capsys.readouterr()
    assert (status, out.out) == (1, "")
    assert "evidence refused: CollateralError" in out.err


def test_from_evidence_refuses_expired_collateral(
    vectors: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    s = SETS[1]._replace(at="2025-07-19T10:01:19Z")
    status, out, err = from_evidence(vectors, s, capsys)
    assert (status, out) == (1, "")
    assert "evidence refused: ExpiredError" in err


@pytest.mark.parametrize("s", SETS, ids=IDS)
def test_check_accepts_its_own_policy(
    vectors: Path, policies: dict[str, Path], s: VectorSet, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(["policy", "check", str(policies[s.name]), *evidence_args(vectors, s)])
    out = capsys.readouterr().out
    assert status == 0
    assert out.rstrip().endswith("verdict: ACCEPTED")
    assert "FAIL" not in out


def test_check_explains_each_failing_field(
    vectors: Path, policies: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    vcek, vlek = SETS[2], SETS[3]
    status = main(["policy", "check", str(policies[vcek.name]), *evidence_args(vectors, vlek)])
    out = capsys.readouterr().out
    assert status == 1
    failing = {line.split()[1].rstrip(":") for line in out.splitlines() if "FAIL" in line}
    # Another VM: other measurement, requested at VMPL 1; its TCB is above the pinned minimum.
    assert failing == {"measurement", "vmpl"}
    assert "ok   reported_tcb.snp:" in out
    assert "got 8922ebbdd00ec2c5" in out
    assert "verdict: REJECTED (PolicyError" in out


def test_check_on_refused_evidence(
    vectors: Path, policies: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    s = SETS[0]._replace(at="2025-07-19T10:01:19Z")
    status = main(["policy", "check", str(policies["sgx"]), *evidence_args(vectors, s)])
    out = capsys.readouterr().out
    assert status == 1
    assert "REFUSED before any policy field: ExpiredError" in out


def test_check_bad_policy_is_a_usage_error(
    vectors: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[sgx]\nmr_enclave = ['00']\n")
    status = main(["policy", "check", str(bad), *evidence_args(vectors, SETS[0])])
    assert status == 2
    assert "sgx.mr_enclave: got 1 bytes" in capsys.readouterr().err


@pytest.mark.parametrize("policy_set", SETS[2:], ids=IDS[2:])
@pytest.mark.parametrize("evidence_set", SETS[2:], ids=IDS[2:])
def test_explain_agrees_with_validate(
    vectors: Path, policies: dict[str, Path], policy_set: VectorSet, evidence_set: VectorSet
) -> None:
    policy = Policy.from_toml(policies[policy_set.name])
    cert = vectors / evidence_set.options[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HazmatWarning)
        claims = hazmat_verify_without_policy(
            read_evidence(vectors / evidence_set.evidence),
            snp_collateral_from_certificates([cert.read_bytes()]),
            now=datetime.fromisoformat(evidence_set.at.replace("Z", "+00:00")),
            snp_min_tcb=policy.sev_snp.min_tcb if policy.sev_snp is not None else None,
        )
    checks = explain(policy, claims)
    try:
        policy.validate(claims)
        accepted = True
    except AttestationError:
        accepted = False
    assert accepted == all(c.ok for c in checks)
    assert accepted == (policy_set == evidence_set)


def test_pinned_evaluation_number_refuses_older_collateral(
    vectors: Path, policies: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The collateral this quote came with has evaluation number 17; a policy that saw 18 once
    # (newer collateral) must refuse it, as it would refuse a replayed older evaluation.
    text = policies["tdx"].read_text()
    assert "min_tcb_evaluation_data_number = 17" in text
    newer = tmp_path / "newer.toml"
    newer.write_text(
        text.replace("min_tcb_evaluation_data_number = 17", "min_tcb_evaluation_data_number = 18")
    )
    status = main(
        ["verify-evidence", *evidence_args(vectors, SETS[1]), "--policy", str(newer), "--json"]
    )
    result = json.loads(capsys.readouterr().out)
    assert (status, result["error_type"]) == (1, "TcbError")
    assert "tcb_evaluation_data_number: got 17, expected >= 18" in result["error"]
