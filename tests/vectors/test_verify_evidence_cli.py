"""`veil verify-evidence` on every vector set, at each set's suggested time (README verdicts)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from veil.cli import main

SNP = "sev-snp"
SGX_AT = "2025-07-01T00:00:00Z"


def run(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, dict[str, Any], str]:
    status = main(["verify-evidence", *map(str, args), "--json"])
    captured = capsys.readouterr()
    return status, json.loads(captured.out), captured.err


def test_sgx_full_collateral_default_policy(
    vectors: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = vectors / "sgx/dcap-qvl-sgx-v3"
    status, out, err = run(
        capsys, d / "sgx_quote", "--collateral", d / "sgx_quote_collateral.json", "--at", SGX_AT
    )
    # README: valid, TCB ConfigurationAndSWHardeningNeeded with two advisories; the default
    # policy accepts only UpToDate, so the verdict is a TCB rejection of authentic claims.
    assert status == 1
    assert out["platform"] == "sgx"
    assert out["verdict"] == "rejected"
    assert out["error_type"] == "TcbError"
    assert out["claims_verified"] is True
    assert out["tcb_status"] == "ConfigurationAndSWHardeningNeeded"
    assert out["advisory_ids"] == ["INTEL-SA-00289", "INTEL-SA-00615"]
    assert out["debug"] is False
    assert out["measurements"]["mr_enclave"] == (
        "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"
    )
    assert out["measurements"]["mr_signer"] == (
        "815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6"
    )
    assert bytes.fromhex(out["report_data"]).startswith(b"Hello, world!\0")
    assert "pins no measurement" in err


def test_sgx_full_collateral_policy_accepting_status(
    vectors: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    d = vectors / "sgx/dcap-qvl-sgx-v3"
    policy = tmp_path / "policy.toml"
    policy.write_text(
        'accepted_tcb_statuses = ["UpToDate", "ConfigurationAndSWHardeningNeeded"]\n'
        'accepted_advisory_ids = ["INTEL-SA-00289", "INTEL-SA-00615"]\n'
        "[sgx]\n"
        'mr_enclave = ["33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"]\n'
    )
    for collateral in (d / "sgx_quote_collateral.json", d / "derived"):
        status, out, err = run(
            capsys,
            d / "sgx_quote",
            "--collateral",
            collateral,
            "--policy",
            policy,
            "--at",
            SGX_AT,
        )
        assert (status, out["verdict"], out["error"]) == (0, "accepted", None)
        assert out["tcb_status"] == "ConfigurationAndSWHardeningNeeded"
        assert err == ""


def test_sgx_outside_window(vectors: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = vectors / "sgx/dcap-qvl-sgx-v3"
    status, out, _ = run(
        capsys,
        d / "sgx_quote",
        "--collateral",
        d / "sgx_quote_collateral.json",
        "--at",
        "2025-07-19T10:01:19Z",
    )
    assert (status, out["verdict"], out["error_type"]) == (1, "rejected", "ExpiredError")


@pytest.mark.parametrize(
    ("path", "platform", "mr_name", "mr_value"),
    [
        (
            "sgx/trustee-occlum-sgx-v3-debug/occlum_quote.dat",
            "sgx",
            "mr_enclave",
            "8f173e4613ff05c52aaf04162d234edae8c9977eae47eb2299ae16a553011c68",
        ),
        (
            "tdx/trustee-tdx-v4-debug/tdx_quote_4.dat",
            "tdx",
            "mr_td",
            "705ee9381b8633a9fbe532b52345e8433343d2868959f57889d84ca377c395b6"
            "89cac1599ccea1b7d420483a9ce5f031",
        ),
    ],
)
def test_quote_only_debug_sets_rejected(
    vectors: Path,
    capsys: pytest.CaptureFixture[str],
    path: str,
    platform: str,
    mr_name: str,
    mr_value: str,
) -> None:
    status, out, _ = run(capsys, vectors / path, "--at", "2025-06-01T00:00:00Z")
    assert status == 1
    assert out["platform"] == platform
    assert out["verdict"] == "rejected"
    assert out["error_type"] == "CollateralError"
    assert "collateral missing" in out["error"]
    # Parsed but unverified claims are still shown, labelled as such.
    assert out["claims_verified"] is False
    assert out["debug"] is True
    assert out["measurements"][mr_name] == mr_value
    assert out["quote_signatures"].startswith("valid")


def test_tdx_v4_accepted(vectors: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = vectors / "tdx/dcap-qvl-tdx-v4"
    status, out, _ = run(
        capsys, d / "tdx_quote", "--collateral", d / "tdx_quote_collateral.json", "--at", SGX_AT
    )
    assert (status, out["platform"], out["verdict"]) == (0, "tdx", "accepted")
    assert out["tcb_status"] == "UpToDate"
    assert out["advisory_ids"] == []
    assert out["debug"] is False
    m = out["measurements"]
    assert m["mr_td"].startswith("91eb2b44d141d4ec")
    assert m["rtmr0"].startswith("44c0197b39157fdd")
    assert m["rtmr1"].startswith("0084452c01668329")
    assert m["rtmr2"].startswith("d833feef2cd94514")
    assert m["rtmr3"] == "00" * 48
    assert out["report_data"].startswith("9a9d48e7f6799642")
    assert out["details"]["td_attributes"] == "0000001000000000"


def test_tdx_v4_collateral_directory(vectors: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = vectors / "tdx/dcap-qvl-tdx-v4"
    status, out, _ = run(capsys, d / "tdx_quote", "--collateral", d / "derived", "--at", SGX_AT)
    assert (status, out["verdict"], out["tcb_status"]) == (0, "accepted", "UpToDate")


def test_tdx_v5_no_tcb_level(vectors: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = vectors / "tdx/dcap-qvl-tdx-v5"
    status, out, _ = run(
        capsys,
        d / "tdx_quote_outdated",
        "--collateral",
        d / "tdx_quote_outdated_collateral.json",
        "--at",
        "2026-03-01T00:00:00Z",
    )
    assert (status, out["verdict"], out["error_type"]) == (1, "rejected", "TcbError")
    assert "no matching TCB level" in out["error"]
    assert out["tcb_status"] is None
    assert out["measurements"]["mr_td"].startswith("273828c46252fcbd")


VIRTEE_MEASUREMENT = (
    "7a1e5c266c0108dbc9bb94fa926951320940915d0aafb42464bd88b579ea158d"
    "3e1a0dc39b2c60bd95b9c480cd81841f"
)
VLEK_MEASUREMENT = (
    "8922ebbdd00ec2c541f36a6e7a82a8773a7accb451ed67bc94e740dbe92c93c4"
    "e8c9af857f5ceeb5a493df2a570d7bf0"
)


def pinned_snp_policy(path: Path, measurement: str, tcb: str, vmpl: int = 0) -> Path:
    """A policy that pins the vector's measurement and its own TCB as the minimum: the real
    vectors predate AMD-SB-3019, so AMD's default minimum refuses them."""
    path.write_text(
        f'[sev_snp]\nmeasurement = ["{measurement}"]\nvmpl = {vmpl}\nmin_tcb = {{ {tcb} }}\n'
    )
    return path


VIRTEE_TCB = "bootloader = 3, tee = 0, snp = 8, microcode = 115"
VLEK_TCB = "bootloader = 4, tee = 0, snp = 24, microcode = 217"


def test_snp_virtee_refused_by_the_default_minimum(
    vectors: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = vectors / SNP / "virtee-milan-vcek"
    status, out, _ = run(
        capsys, d / "report_milan.hex", "--certs", d / "vcek_milan.der", "--at", "2025-01-01"
    )
    assert (status, out["verdict"], out["error_type"]) == (1, "rejected", "TcbError")
    assert out["claims_verified"] is True
    assert out["tcb_status"] == "BelowMinimum"
    assert "reported_tcb.microcode: got 115, expected >= 219" in out["error"]


def test_snp_debugpolicy_rejected(vectors: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = vectors / SNP / "go-sev-guest-milan-vcek-debugpolicy"
    status, out, _ = run(
        capsys,
        d / "attestation.bin",
        "--certs",
        d / "vcek.testcer",
        "--certs",
        d / "ask_ark_milan.pem",
        "--at",
        "2025-01-01T00:00:00Z",
    )
    assert (status, out["platform"], out["verdict"]) == (1, "sev-snp", "rejected")
    assert out["error_type"] == "PolicyError"
    assert "debug: got True, expected False" in out["error"]
    assert out["claims_verified"] is True  # authentic, rejected by the policy
    assert out["tcb_status"] == "BelowMinimum"  # firmware of 2022; refused for debug first
    assert out["debug"] is True
    assert out["measurements"]["measurement"].startswith("b07af9620f3b839b")
    assert out["report_data"] == "0102030405" + "00" * 59


def test_snp_virtee_hex_file_accepted(
    vectors: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    d = vectors / SNP / "virtee-milan-vcek"
    policy = pinned_snp_policy(tmp_path / "p.toml", VIRTEE_MEASUREMENT, VIRTEE_TCB)
    status, out, _ = run(
        capsys,
        d / "report_milan.hex",
        "--certs",
        d / "vcek_milan.der",
        "--at",
        "2025-01-01T00:00:00Z",
        "--policy",
        policy,
    )
    assert (status, out["platform"], out["verdict"], out["error"]) == (
        0,
        "sev-snp",
        "accepted",
        None,
    )
    assert out["measurements"]["measurement"] == (
        "7a1e5c266c0108dbc9bb94fa926951320940915d0aafb42464bd88b579ea158d"
        "3e1a0dc39b2c60bd95b9c480cd81841f"
    )
    assert out["details"]["reported_tcb"] == 0x7308000000000003
    assert out["tcb_status"] == "MeetsMinimum"
    assert out["debug"] is False


@pytest.mark.parametrize(
    ("at", "verdict", "error_type"),
    [
        ("2025-06-01T00:00:00Z", "accepted", None),
        ("2025-12-10T22:14:21Z", "accepted", None),
        ("2025-12-10T22:14:22Z", "rejected", "ExpiredError"),
        ("2024-12-10T22:14:20Z", "rejected", "ExpiredError"),
    ],
)
def test_snp_vlek(
    vectors: Path,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    at: str,
    verdict: str,
    error_type: str | None,
) -> None:
    d = vectors / SNP / "trustee-milan-vlek-v3"
    policy = pinned_snp_policy(tmp_path / "p.toml", VLEK_MEASUREMENT, VLEK_TCB, vmpl=1)
    status, out, _ = run(
        capsys,
        d / "test-vlek-report.bin",
        "--certs",
        d / "test-vlek.der",
        "--certs",
        d / "milan_ask_ark_asvk.pem",
        "--at",
        at,
        "--policy",
        policy,
    )
    assert (out["verdict"], out["error_type"]) == (verdict, error_type)
    assert status == (0 if verdict == "accepted" else 1)
    assert out["details"]["signing_key"] == "VLEK"
    assert out["measurements"]["measurement"].startswith("8922ebbdd00ec2c5")


def test_snp_pinned_policy_mismatch(
    vectors: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    d = vectors / SNP / "virtee-milan-vcek"
    policy = tmp_path / "p.toml"
    policy.write_text(f'[sev_snp]\nmeasurement = ["{"00" * 48}"]\nvmpl = 1\n')
    status, out, _ = run(
        capsys,
        d / "report_milan.hex",
        "--certs",
        d / "vcek_milan.der",
        "--policy",
        policy,
        "--at",
        "2025-01-01T00:00:00Z",
    )
    assert status == 1
    assert out["error_type"] == "PolicyError"
    assert "measurement: got 7a1e5c26" in out["error"]
    assert "vmpl: got 0, expected 1" in out["error"]


def test_snp_without_certs(vectors: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = vectors / SNP / "virtee-milan-vcek"
    status, out, _ = run(capsys, d / "derived/report_milan.bin")
    assert (status, out["error_type"], out["claims_verified"]) == (1, "CollateralError", False)
    assert "quote_signatures" not in out


def test_garbage_evidence(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "junk.bin"
    path.write_bytes(b"\x00\xff" * 50)
    status, out, _ = run(capsys, path)
    assert (status, out["platform"], out["error_type"]) == (1, None, "MalformedEvidenceError")


def test_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify-evidence", str(tmp_path / "missing.bin")]) == 2
    assert "missing.bin" in capsys.readouterr().err
    path = tmp_path / "e.bin"
    path.write_bytes(b"x")
    assert main(["verify-evidence", str(path), "--at", "yesterday"]) == 2
    bad_policy = tmp_path / "p.toml"
    bad_policy.write_text("allow_debug = false\n")
    assert main(["verify-evidence", str(path), "--policy", str(bad_policy)]) == 2
    assert "pins no measurement" in capsys.readouterr().err


def test_text_output_labels(
    vectors: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    debug = vectors / "tdx/trustee-tdx-v4-debug/tdx_quote_4.dat"
    assert main(["verify-evidence", str(debug)]) == 1
    out = capsys.readouterr().out
    assert "verdict:  REJECTED" in out
    assert "claims (UNVERIFIED: parsed only, do not trust):" in out
    assert "debug:" in out
    d = vectors / SNP / "virtee-milan-vcek"
    args = ["verify-evidence", str(d / "report_milan.hex"), "--certs", str(d / "vcek_milan.der")]
    policy = pinned_snp_policy(tmp_path / "p.toml", VIRTEE_MEASUREMENT, VIRTEE_TCB)
    assert main([*args, "--at", "2025-01-01", "--policy", str(policy)]) == 0
    out = capsys.readouterr().out
    assert "verdict:  ACCEPTED" in out
    assert "claims (verified):" in out
    assert "reported_tcb:" in out
    assert "0x7308000000000003" in out
    g = vectors / SNP / "go-sev-guest-milan-vcek-debugpolicy"
    args = ["verify-evidence", str(g / "attestation.bin"), "--certs", str(g / "vcek.testcer")]
    assert main([*args, "--at", "2025-01-01T00:00:00+00:00"]) == 1
    assert "claims (authentic, but rejected by the policy):" in capsys.readouterr().out


def test_subprocess_entry_point(vectors: Path, tmp_path: Path) -> None:
    d = vectors / SNP / "virtee-milan-vcek"
    policy = pinned_snp_policy(tmp_path / "p.toml", VIRTEE_MEASUREMENT, VIRTEE_TCB)
    proc = subprocess.run(
        [
            sys.executable,
            "-W",
            "error",
            "-m",
            "veil.cli",
            "verify-evidence",
            str(d / "report_milan.hex"),
            "--certs",
            str(d / "vcek_milan.der"),
            "--certs",
            str(d / "cert_chain_milan"),
            "--at",
            "2025-01-01T00:00:00Z",
            "--policy",
            str(policy),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert (out["platform"], out["verdict"]) == ("sev-snp", "accepted")
    assert proc.stderr == ""  # a pinned policy: no warning


def test_text_output_rejections(
    vectors: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    d = vectors / "sgx/dcap-qvl-sgx-v3"
    args = [str(d / "sgx_quote"), "--collateral", str(d / "sgx_quote_collateral.json")]
    assert main(["verify-evidence", *args, "--at", SGX_AT]) == 1
    out = capsys.readouterr().out
    assert "advisory_ids:" in out
    assert "INTEL-SA-00289, INTEL-SA-00615" in out
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x01\x02")
    assert main(["verify-evidence", str(junk)]) == 1
    out = capsys.readouterr().out
    assert "platform: unknown" in out
    assert "claims" not in out


def test_odd_hex_text_is_taken_raw(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "odd.hex"
    path.write_text("abc")
    status, out, _ = run(capsys, path)
    assert (status, out["error_type"]) == (1, "MalformedEvidenceError")
    assert "3 bytes" in out["error"]


def test_quote_signature_inspection_reports_invalid(
    vectors: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    quote = bytearray((vectors / "tdx/trustee-tdx-v4-debug/tdx_quote_4.dat").read_bytes())
    quote[48 + 136] ^= 1  # a byte of MRTD: the quote signature no longer holds
    path = tmp_path / "q.dat"
    path.write_bytes(bytes(quote))
    status, out, _ = run(capsys, path, "--at", "2025-06-01T00:00:00Z")
    assert (status, out["error_type"]) == (1, "CollateralError")
    assert out["quote_signatures"].startswith("invalid:")


def test_snp_single_pem_bundle(
    vectors: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from cryptography.hazmat.primitives.serialization import Encoding

    from veil.attestation.verify.snp import load_certificate

    d = vectors / SNP / "virtee-milan-vcek"
    vcek = load_certificate((d / "vcek_milan.der").read_bytes(), "VCEK")
    bundle = tmp_path / "certs.pem"
    bundle.write_bytes(vcek.public_bytes(Encoding.PEM) + (d / "cert_chain_milan").read_bytes())
    policy = pinned_snp_policy(tmp_path / "p.toml", VIRTEE_MEASUREMENT, VIRTEE_TCB)
    status, out, _ = run(
        capsys,
        d / "report_milan.hex",
        "--certs",
        bundle,
        "--at",
        "2025-01-01T00:00:00Z",
        "--policy",
        policy,
    )
    assert (status, out["verdict"]) == (0, "accepted")


def test_crl_with_flipped_version_gives_json_not_a_traceback(
    vectors: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # The review's case: cryptography raised x509.InvalidVersion, outside veil's hierarchy, and
    # `verify-evidence --json` printed a traceback instead of a verdict.
    d = vectors / "sgx/dcap-qvl-sgx-v3"
    doc = json.loads((d / "sgx_quote_collateral.json").read_text())
    crl = bytearray.fromhex(doc["pck_crl"])
    at = crl.index(b"\x02\x01\x01")  # TBSCertList version v2
    crl[at + 2] = 0x07
    doc["pck_crl"] = crl.hex()
    damaged = tmp_path / "collateral.json"
    damaged.write_text(json.dumps(doc))
    status, out, _ = run(capsys, d / "sgx_quote", "--collateral", damaged, "--at", SGX_AT)
    assert (status, out["verdict"], out["error_type"]) == (1, "rejected", "MalformedEvidenceError")
    assert "PCK CRL" in out["error"]
