"""`veil policy from-sigstruct` and `veil policy snp-launch`.

snp-launch is held to sev-snp-measure's own published expectations: the values below are those
asserted in virtee/sev-snp-measure tests/test_guest.py (last changed in commit
4a02bf0434624f720697931cbebcb11b107a847c) for the OVMF fixtures copied to
tests/testdata/sev-snp-measure (see its README). Kernel, initrd and command line are empty files
where upstream used /dev/null (the same bytes).
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from veil.attestation.policy import Policy
from veil.attestation.trust import TrustStore
from veil.attestation.verifier import verify_evidence
from veil.cli import main
from veil.errors import HazmatWarning, PolicyError
from veil.testing.intel_pki import IntelPki
from veil.testing.sigstruct import generate_enclave_key, sign_sigstruct

FIXTURES = Path(__file__).resolve().parents[2] / "testdata" / "sev-snp-measure"
ENCLAVE_HASH = bytes.fromhex("a1" * 32)


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return generate_enclave_key()


def run(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    status = main(["policy", *map(str, args)])
    out = capsys.readouterr()
    return status, out.out, out.err


def test_from_sigstruct_pins_mrenclave(
    key: rsa.RSAPrivateKey, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sig = tmp_path / "veil.sig"
    sig.write_bytes(sign_sigstruct(key, enclave_hash=ENCLAVE_HASH, isv_prod_id=5, isv_svn=2))
    status, out, err = run(capsys, "from-sigstruct", sig)
    assert (status, err) == (0, "")
    policy = Policy.from_toml(out)
    assert policy.sgx is not None
    assert policy.sgx.mr_enclave == (ENCLAVE_HASH,)
    assert policy.sgx.mr_signer is None
    mr_signer = hashlib.sha256(key.public_key().public_numbers().n.to_bytes(384, "little"))
    assert f'# mr_signer = "{mr_signer.hexdigest()}"' in out


def test_from_sigstruct_pins_signer(
    key: rsa.RSAPrivateKey, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sig = tmp_path / "veil.sig"
    sig.write_bytes(sign_sigstruct(key, enclave_hash=ENCLAVE_HASH, isv_prod_id=5, isv_svn=2))
    status, out, _ = run(capsys, "from-sigstruct", sig, "--pin", "signer")
    assert status == 0
    policy = Policy.from_toml(out)
    assert policy.sgx is not None
    modulus = key.public_key().public_numbers().n.to_bytes(384, "little")
    assert policy.sgx.mr_signer == hashlib.sha256(modulus).digest()
    assert (policy.sgx.isv_prod_id, policy.sgx.min_isv_svn) == (5, 2)
    assert policy.sgx.mr_enclave == ()


def test_from_sigstruct_refuses_a_mutated_file(
    key: rsa.RSAPrivateKey, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = bytearray(sign_sigstruct(key, enclave_hash=ENCLAVE_HASH))
    data[960] ^= 0xFF  # ENCLAVEHASH: someone swapped in another enclave
    sig = tmp_path / "veil.sig"
    sig.write_bytes(bytes(data))
    status, out, err = run(capsys, "from-sigstruct", sig)
    assert (status, out) == (1, "")
    assert "veil.sig: SIGSTRUCT signature: does not verify" in err


def test_from_sigstruct_refuses_a_truncated_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sig = tmp_path / "veil.sig"
    sig.write_bytes(b"\0" * 100)
    status, out, err = run(capsys, "from-sigstruct", sig)
    assert (status, out) == (1, "")
    assert "got 100 bytes, expected 1808" in err


def test_from_sigstruct_warns_about_debug(
    key: rsa.RSAPrivateKey, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sig = tmp_path / "veil.sig"
    debug = (6).to_bytes(8, "little") + (3).to_bytes(8, "little")
    sig.write_bytes(sign_sigstruct(key, enclave_hash=ENCLAVE_HASH, attributes=debug))
    status, _, err = run(capsys, "from-sigstruct", sig)
    assert status == 0
    assert "enforces ATTRIBUTES.DEBUG" in err


def test_from_sigstruct_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(capsys, "from-sigstruct", tmp_path / "absent.sig")
    assert status == 2
    assert "absent.sig" in err


@pytest.fixture
def empty(tmp_path: Path) -> Path:
    path = tmp_path / "empty"
    path.write_bytes(b"")
    return path


AMDSEV = "ovmf_AmdSev_suffix.bin"


# (test name upstream, OVMF, vcpus, kernel given, command line, guest features, expected)
UPSTREAM = [
    ("test_snp_default", AMDSEV, 1, True, "console=ttyS0 loglevel=7", "0x21",
     "803f691094946e42068aaa3a8f9e26a5c89f36f7b73ecfb28c653360fe4b3aba7e534442e7e1e17895dfe778d0228977"),
    ("test_snp_guest_feature_snp_only", AMDSEV, 1, True, "console=ttyS0 loglevel=7", "0x1",
     "6d287813eb5222d770f75005c664e34c204f385ce832cc2ce7d0d6f354454362f390ef83a92046c042e706363b4b08fa"),
    ("test_snp_without_kernel_default", AMDSEV, 1, False, None, "0x21",
     "e1e1ca029dd7973ab9513295be68198472dcd4fc834bd9af9b63f6e8a1674dbf281a9278a4a2ebe0eed9f22adbcd0e2b"),
    ("test_snp_without_kernel_feature_snp_only", AMDSEV, 1, False, None, "0x1",
     "19358ba9a7615534a9a1e2f0dfc29384dcd4dcb7062ff9c6013b26869a5fc6ecabe033c48dd6f6db5d6d76e7c5df632d"),
    ("test_snp_with_multiple_vcpus_default", AMDSEV, 4, True, "", "0x21",
     "4953b1fb416fa874980e8442b3706d345926d5f38879134e00813c5d7abcbe78eafe7b422907be0b4698e2414a631942"),
    ("test_snp_with_multiple_vcpus_feature_snp_only", AMDSEV, 4, True, "", "0x1",
     "5061fffb019493a903613d56d54b94912a1a2f9e4502385f5c194616753720a92441310ba6c4933de877c36e23046ad5"),
    ("test_snp_with_ovmfx64_without_default", "ovmf_OvmfX64_suffix.bin", 1, False, None, "0x21",
     "28797ae0afaba4005a81e629acebfb59e6687949d6be44007cd5506823b0dd66f146aaae26ff291eed7b493d8a64c385"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "ovmf", "vcpus", "kernel", "append", "features", "expected"),
    UPSTREAM,
    ids=[row[0] for row in UPSTREAM],
)
def test_snp_launch_reproduces_upstream(
    capsys: pytest.CaptureFixture[str],
    empty: Path,
    name: str,
    ovmf: str,
    vcpus: int,
    kernel: bool,
    append: str | None,
    features: str,
    expected: str,
) -> None:
    pytest.importorskip("sevsnpmeasure")
    args: list[object] = ["snp-launch", "--ovmf", FIXTURES / ovmf, "--vcpus", vcpus]
    args += ["--vcpu-type", "EPYC-v4", "--guest-features", features]
    if kernel:
        args += ["--kernel", empty, "--initrd", empty, "--append", append]
    status, out, err = run(capsys, *args)
    assert (status, err) == (0, "")
    policy = Policy.from_toml(out)
    assert policy.sev_snp is not None
    assert policy.sev_snp.measurement == (bytes.fromhex(expected),)
    if not kernel:
        assert "NOT the code it boots" in out


def test_snp_launch_gce_upstream(capsys: pytest.CaptureFixture[str], empty: Path) -> None:
    pytest.importorskip("sevsnpmeasure")
    # upstream test_snp_gce_with_multiple_vcpus_default: no vCPU signature on GCE.
    status, out, _ = run(
        capsys, "snp-launch", "--ovmf", FIXTURES / AMDSEV, "--vcpus", 4, "--vmm-type", "gce",
        "--kernel", empty, "--initrd", empty, "--append", "",
    )  # fmt: skip
    assert status == 0
    assert (
        "5c5debf100fc339f90276e761ee1f1658d08922c3b20e2a2"
        "e6c7a6c3370b2452a15a00eae11886a93d6fd1e7ab81e29d"
    ) in out


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--vcpus", "1", "--vcpu-type", "EPYC-v4", "--append", "x"], "need --kernel"),
        (["--vcpus", "1"], "need --vcpu-type or --vcpu-sig"),
        (["--vcpus", "0", "--vcpu-type", "EPYC-v4"], "--vcpus: got 0"),
        (["--vcpus", "1", "--vcpu-type", "Pentium"], "--vcpu-type: got Pentium"),
    ],
)
def test_snp_launch_usage_errors(
    capsys: pytest.CaptureFixture[str], extra: list[str], match: str
) -> None:
    pytest.importorskip("sevsnpmeasure")
    status, out, err = run(capsys, "snp-launch", "--ovmf", FIXTURES / AMDSEV, *extra)
    assert (status, out) == (2, "")
    assert match in err


def test_snp_launch_kernel_with_ovmf_lacking_hashes_table(
    capsys: pytest.CaptureFixture[str], empty: Path
) -> None:
    pytest.importorskip("sevsnpmeasure")
    # upstream test_snp_with_ovmfx64_and_kernel_should_fail: the plain OVMF build cannot
    # measure a kernel, so direct boot with it measures nothing of the kernel.
    status, out, err = run(
        capsys, "snp-launch", "--ovmf", FIXTURES / "ovmf_OvmfX64_suffix.bin", "--vcpus", 1,
        "--vcpu-type", "EPYC-v4", "--kernel", empty,
    )  # fmt: skip
    assert (status, out) == (1, "")
    assert "SNP_KERNEL_HASHES" in err


def test_from_sigstruct_policy_accepts_the_enclave_it_describes(
    key: rsa.RSAPrivateKey, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The printed policy, applied by the verifier to quotes of an Intel-shaped test platform:
    the enclave the SIGSTRUCT describes passes (either pin), another enclave, signer or older SVN
    does not."""
    now = datetime(2026, 12, 1, tzinfo=UTC)
    pki = IntelPki(now=now, seed=b"sigstruct")
    platform = pki.sgx_platform()
    collateral = platform.collateral(now)
    with pytest.warns(HazmatWarning):
        trust = TrustStore.hazmat_test_roots(intel_root=pki.root)
    sig = tmp_path / "veil.sig"
    sig.write_bytes(sign_sigstruct(key, enclave_hash=ENCLAVE_HASH, isv_prod_id=5, isv_svn=2))
    mr_signer = hashlib.sha256(key.public_key().public_numbers().n.to_bytes(384, "little")).digest()

    def quote(**fields: object) -> bytes:
        body: dict[str, object] = {
            "mr_enclave": ENCLAVE_HASH, "mr_signer": mr_signer, "isv_prod_id": 5, "isv_svn": 2,
        } | fields  # fmt: skip
        return platform.quote(b"tls", **body)

    for pin in ("enclave", "signer"):
        status, out, _ = run(capsys, "from-sigstruct", sig, "--pin", pin)
        assert status == 0
        policy = Policy.from_toml(out)
        verify_evidence(quote(), collateral, policy=policy, trust=trust, now=now)
        refused = [quote(mr_signer=bytes(32)), quote(isv_svn=1), quote(isv_prod_id=6)]
        if pin == "enclave":
            refused = [quote(mr_enclave=bytes(32))]
        for evidence in refused:
            with pytest.raises(PolicyError):
                verify_evidence(evidence, collateral, policy=policy, trust=trust, now=now)
