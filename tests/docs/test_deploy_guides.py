"""The deploy guides' commands: every `veil ...` line in their bash blocks parses with veil's own
command line, and each one that can run without TEE hardware runs here, on files standing in for
the ones the guide names (a SIGSTRUCT signed as gramine-sgx-sign signs, sev-snp-measure's OVMF
fixtures, the real vector sets at their valid times).

Not run here: Gramine (`gramine-manifest`, `gramine-sgx-sign`, `gramine-sgx`), launching a VM,
`veil serve` on real hardware, and `veil collateral fetch` (it needs Intel/AMD services; its own
tests use loopback stand-ins).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from veil.attestation.policy import Policy
from veil.cli import build_parser, main
from veil.testing.sigstruct import generate_enclave_key, sign_sigstruct

ROOT = Path(__file__).resolve().parents[2]
GUIDES = [ROOT / "docs/deploy-sgx.md", ROOT / "docs/deploy-cvm.md", ROOT / "README.md"]
_BASH = re.compile(r"^```bash[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
VECTORS = ROOT / "tests/testdata/attestation-vectors"
OVMF = ROOT / "tests/testdata/sev-snp-measure/ovmf_AmdSev_suffix.bin"


def veil_commands(path: Path) -> list[str]:
    """Each `veil ...` command of the file's bash blocks, continuation lines joined."""
    commands = []
    for block in _BASH.findall(path.read_text(encoding="utf-8")):
        for line in re.sub(r"\\\n\s*", "", block).splitlines():
            code = line.split("  #", 1)[0].strip()
            if code.startswith("veil "):
                commands.append(code)
    return commands


def test_the_guides_have_commands() -> None:
    assert len(veil_commands(GUIDES[0])) >= 4
    assert len(veil_commands(GUIDES[1])) >= 6


@pytest.mark.parametrize(
    "command",
    [c for g in GUIDES for c in veil_commands(g)],
)
def test_every_veil_command_parses(command: str) -> None:
    args = shlex.split(command)[1:]
    if any("<" in a for a in args):
        pytest.skip("placeholder")
    build_parser().parse_args(args)


def _run(command: str, files: dict[str, Path], *extra: str) -> int:
    """Run a guide's command line, each file name it gives replaced by a stand-in."""
    args = [str(files.get(a, a)) for a in shlex.split(command)[1:]]
    return main([*args, *extra])


def _in_guide(guide: Path, command: str) -> str:
    assert command in veil_commands(guide), f"{command!r} is no longer in {guide.name}"
    return command


def test_sgx_guide_policy_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    key = generate_enclave_key()
    enclave = bytes.fromhex("5e" * 32)
    (tmp_path / "veil.sig").write_bytes(
        sign_sigstruct(key, enclave_hash=enclave, isv_prod_id=1, isv_svn=1)
    )
    guide = GUIDES[0]
    assert _run(_in_guide(guide, "veil policy from-sigstruct veil.sig"), {}) == 0
    pinned = Policy.from_toml(capsys.readouterr().out)
    assert pinned.sgx is not None
    assert pinned.sgx.mr_enclave == (enclave,)
    command = _in_guide(guide, "veil policy from-sigstruct veil.sig --pin signer")
    assert _run(command, {}) == 0
    pinned = Policy.from_toml(capsys.readouterr().out)
    assert pinned.sgx is not None
    assert pinned.sgx.isv_prod_id == 1

    # Step 6 on a real SGX quote: a policy for it (trust on first use), then the guide's lines.
    d = VECTORS / "sgx/dcap-qvl-sgx-v3"
    files = {"quote.bin": d / "sgx_quote", "collateral.json": d / "sgx_quote_collateral.json"}
    at = ("--at", "2025-07-01T00:00:00Z")
    assert main(["policy", "from-evidence", str(files["quote.bin"]), "--collateral",
                 str(files["collateral.json"]), "--accept-observed-tcb", *at]) == 0  # fmt: skip
    (tmp_path / "policy.toml").write_text(capsys.readouterr().out)
    for command in (
        "veil verify-evidence quote.bin --collateral collateral.json --policy policy.toml",
        "veil policy check policy.toml quote.bin --collateral collateral.json",
    ):
        assert _run(_in_guide(guide, command), files, *at) == 0, capsys.readouterr()
        capsys.readouterr()


def test_cvm_guide_snp_launch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("sevsnpmeasure")
    (tmp_path / "vmlinuz").write_bytes(b"kernel")
    (tmp_path / "initrd.img").write_bytes(b"initrd")
    command = _in_guide(
        GUIDES[1],
        "veil policy snp-launch --ovmf OVMF.fd --kernel vmlinuz --initrd initrd.img "
        '--append "console=ttyS0" --vcpus 4 --vcpu-type EPYC-v4',
    )
    files = {
        "OVMF.fd": OVMF,
        "vmlinuz": tmp_path / "vmlinuz",
        "initrd.img": tmp_path / "initrd.img",
    }
    assert _run(command, files) == 0
    out = capsys.readouterr().out
    policy = Policy.from_toml(out)
    assert policy.sev_snp is not None
    assert len(policy.sev_snp.measurement[0]) == 48
    # A different kernel is a different measurement: the kernel is measured.
    (tmp_path / "vmlinuz").write_bytes(b"kernel, patched")
    assert _run(command, files) == 0
    assert Policy.from_toml(capsys.readouterr().out).sev_snp != policy.sev_snp


def test_cvm_guide_trust_on_first_use(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    guide = GUIDES[1]
    snp = VECTORS / "sev-snp/virtee-milan-vcek"
    command = _in_guide(guide, "veil policy from-evidence report.bin --certs vcek.der")
    files = {"report.bin": snp / "report_milan.hex", "vcek.der": snp / "vcek_milan.der"}
    at = ("--at", "2025-01-01T00:00:00Z")
    # This 2023 report's TCB is below AMD's current minimum: refused, then pinned on request.
    assert _run(command, files, *at) == 1
    assert "--accept-observed-tcb" in capsys.readouterr().err
    assert _run(command, files, *at, "--accept-observed-tcb") == 0
    captured = capsys.readouterr()
    assert "TRUST ON FIRST USE" in captured.err
    Policy.from_toml(captured.out)

    tdx = VECTORS / "tdx/dcap-qvl-tdx-v4"
    command = _in_guide(guide, "veil policy from-evidence quote.bin --collateral bundle")
    files = {"quote.bin": tdx / "tdx_quote", "bundle": tdx / "derived"}
    assert _run(command, files, "--at", "2025-07-01T00:00:00Z") == 0
    policy = Policy.from_toml(capsys.readouterr().out)
    assert policy.tdx is not None
    assert policy.tdx.rtmr1 is not None
