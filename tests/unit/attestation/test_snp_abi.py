"""SEV-SNP report parsing: layout, versions, must-be-zero fields (SEV-SNP ABI spec)."""

from __future__ import annotations

from pathlib import Path

import pytest
from snp_fake import build_report, tcb

from veil.attestation.abi.snp import (
    SNP_REPORT_SIZE,
    SigningKey,
    SnpGuestPolicy,
    SnpTcb,
    parse_snp_report,
)
from veil.errors import MalformedEvidenceError


def test_real_reports_parse(vectors: Path) -> None:
    debug = parse_snp_report(
        (vectors / "sev-snp/go-sev-guest-milan-vcek-debugpolicy/attestation.bin").read_bytes()
    )
    assert debug.version == 2
    assert debug.policy.raw == 0xB0000
    assert debug.policy.debug
    assert debug.debug
    assert debug.policy.smt_allowed
    assert not debug.policy.migrate_ma
    assert debug.vmpl == 0
    assert debug.signing_key == SigningKey.VCEK
    assert debug.reported_tcb == 0x4405000000000002
    assert debug.report_data == bytes([1, 2, 3, 4, 5]) + bytes(59)
    assert debug.host_data == bytes(32)
    assert (debug.current_major, debug.current_minor, debug.current_build) == (1, 49, 3)
    assert debug.cpuid_fam_id is None
    assert debug.launch_mit_vector is None
    assert debug.signed_bytes == debug.raw[:0x2A0]
    assert debug.chip_id.hex().startswith("3ac3fe21e13fb099")

    v3 = parse_snp_report(
        (vectors / "sev-snp/trustee-milan-vlek-v3/test-vlek-report.bin").read_bytes()
    )
    assert v3.version == 3
    assert (v3.cpuid_fam_id, v3.cpuid_mod_id, v3.cpuid_step) == (0x19, 0x01, 0x01)
    assert v3.signing_key == SigningKey.VLEK
    assert v3.vmpl == 1
    assert not v3.debug
    assert SnpTcb.from_raw(v3.reported_tcb, turin=False) == SnpTcb(4, 0, 24, 217)
    assert SnpTcb.from_raw(v3.current_tcb, turin=False).microcode == 220
    assert SnpTcb.from_raw(v3.committed_tcb, turin=False).microcode == 219
    assert "measurement=8922ebbd" in repr(v3)


def test_hex_and_binary_forms_agree(vectors: Path) -> None:
    d = vectors / "sev-snp/virtee-milan-vcek"
    from_hex = parse_snp_report(bytes.fromhex((d / "report_milan.hex").read_text()))
    assert from_hex == parse_snp_report((d / "derived/report_milan.bin").read_bytes())
    assert from_hex.policy.raw == 0x30000


def test_version_5_mitigation_vectors() -> None:
    report = parse_snp_report(build_report(version=5, cpuid=(0x1A, 0x02, 0x01), mit=(7, 9)))
    assert (report.launch_mit_vector, report.current_mit_vector) == (7, 9)
    assert report.cpuid_fam_id == 0x1A


def test_unknown_newer_version_keeps_reserved_bytes_unchecked() -> None:
    data = bytearray(build_report(version=6, cpuid=(0x1A, 0, 0), mit=(1, 2)))
    data[0x210] = 0x55  # a field a later spec may define
    assert parse_snp_report(bytes(data)).version == 6


@pytest.mark.parametrize("length", [0, 1183, 1185, 4096])
def test_wrong_length(length: int) -> None:
    with pytest.raises(MalformedEvidenceError, match=f"length got {length} bytes, expected 1184"):
        parse_snp_report(bytes(length))


@pytest.mark.parametrize("version", [0, 1])
def test_old_version_refused(version: int) -> None:
    with pytest.raises(MalformedEvidenceError, match=f"version got {version}, expected 2"):
        parse_snp_report(build_report(version=version))


def test_policy_bit_17_must_be_one() -> None:
    with pytest.raises(MalformedEvidenceError, match="bit 17 got 0, expected 1"):
        parse_snp_report(build_report(policy=0x10000))


def test_policy_reserved_high_bits() -> None:
    with pytest.raises(MalformedEvidenceError, match="reserved bits 63:26"):
        parse_snp_report(build_report(policy=0x30000 | (1 << 40)))


def test_signing_key_reserved_values() -> None:
    with pytest.raises(MalformedEvidenceError, match="SIGNING_KEY got 3"):
        parse_snp_report(build_report(signing_key=3))
    assert parse_snp_report(build_report(signing_key=7)).signing_key == SigningKey.NONE


def test_signer_info_reserved_bits() -> None:
    data = bytearray(build_report())
    data[0x48] |= 0x20
    with pytest.raises(MalformedEvidenceError, match="reserved bits 31:5"):
        parse_snp_report(bytes(data))


MBZ_OFFSETS = [
    (0x4C, "0x04C"),
    (0x188, "0x188"),  # version 2: CPUID bytes are reserved too
    (0x19F, "0x188"),
    (0x1EB, "0x1EB"),
    (0x1EF, "0x1EF"),
    (0x1F8, "0x1F8"),  # version 2: no mitigation vectors
    (0x29F, "0x1F8"),
    (0x330, "0x330"),  # signature block past R and S
    (0x49F, "0x330"),
]


@pytest.mark.parametrize(("offset", "start"), MBZ_OFFSETS)
def test_must_be_zero(offset: int, start: str) -> None:
    data = bytearray(build_report())
    data[offset] = 1
    with pytest.raises(MalformedEvidenceError, match=f"reserved bytes {start}"):
        parse_snp_report(bytes(data))


def test_v3_cpuid_bytes_allowed_but_rest_reserved() -> None:
    data = bytearray(build_report(version=3, cpuid=(0x19, 0x11, 0x01)))
    assert parse_snp_report(bytes(data)).cpuid_mod_id == 0x11
    data[0x18B] = 1
    with pytest.raises(MalformedEvidenceError, match="reserved bytes 0x18B"):
        parse_snp_report(bytes(data))


def test_v5_reserved_after_mitigation_vectors() -> None:
    data = bytearray(build_report(version=5, mit=(1, 1)))
    data[0x208] = 1
    with pytest.raises(MalformedEvidenceError, match="reserved bytes 0x208"):
        parse_snp_report(bytes(data))


def test_signature_algorithm() -> None:
    data = bytearray(build_report())
    data[0x34] = 2
    with pytest.raises(MalformedEvidenceError, match="signature algorithm got 2, expected 1"):
        parse_snp_report(bytes(data))


def test_guest_policy_bits() -> None:
    every = SnpGuestPolicy((0x3FF << 16) | 0x0102)
    assert (every.abi_major, every.abi_minor) == (1, 2)
    flags = [
        every.smt_allowed,
        every.migrate_ma,
        every.debug,
        every.single_socket,
        every.cxl_allowed,
        every.mem_aes_256_xts,
        every.rapl_disabled,
        every.ciphertext_hiding,
        every.page_swap_disabled,
    ]
    assert all(flags)
    none = SnpGuestPolicy(1 << 17)
    assert not any(
        [none.smt_allowed, none.migrate_ma, none.debug, none.single_socket, none.cxl_allowed]
    )


def test_tcb_layouts() -> None:
    milan = SnpTcb.from_raw(tcb(3, 1, 8, 115), turin=False)
    assert milan == SnpTcb(bootloader=3, tee=1, snp=8, microcode=115)
    assert milan.components() == {"bootloader": 3, "tee": 1, "snp": 8, "microcode": 115}
    assert str(milan) == "bootloader 3, tee 1, snp 8, microcode 115"
    turin = SnpTcb.from_raw(tcb(3, 1, 8, 115, fmc=2), turin=True)
    assert turin == SnpTcb(bootloader=3, tee=1, snp=8, microcode=115, fmc=2)
    assert turin.components()["fmc"] == 2
    assert turin.reserved_bytes(tcb(3, 1, 8, 115, fmc=2)) == bytes(3)
    assert milan.reserved_bytes(tcb(3, 1, 8, 115) | (1 << 24)) == bytes([0, 1, 0, 0])


def test_report_size_constant() -> None:
    assert SNP_REPORT_SIZE == 1184
