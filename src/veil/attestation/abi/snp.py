"""AMD SEV-SNP ATTESTATION_REPORT (SEV-SNP Firmware ABI specification, "ATTESTATION_REPORT
Structure" table; 0x4A0 = 1184 bytes).

Version 2 is the base layout; version 3 fills CPUID_FAM_ID / CPUID_MOD_ID / CPUID_STEP at
0x188..0x18A; version 5 adds LAUNCH_MIT_VECTOR and CURRENT_MIT_VECTOR at 0x1F8..0x207. Bytes that
a version calls reserved must be zero; for a version newer than this parser knows (and for
0x1F8..0x207 of version 4) they may hold fields defined later, so they are kept but not checked.

Parsing records facts only and makes no trust decision. It checks the length, the version,
the must-be-zero fields, the reserved guest-policy bits and the signature algorithm, and keeps
the signed range (bytes 0x000..0x29F) exactly as received.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from veil.errors import MalformedEvidenceError

__all__ = [
    "REPORT_DATA",
    "SNP_REPORT_SIZE",
    "SNP_SIGNED_SIZE",
    "SigningKey",
    "SnpGuestPolicy",
    "SnpReport",
    "SnpTcb",
    "parse_snp_report",
]

SNP_REPORT_SIZE = 0x4A0
# The signature covers bytes 0x000..0x29F of the report.
SNP_SIGNED_SIZE = 0x2A0
# REPORT_DATA (ABI spec, Table "ATTESTATION_REPORT Structure"): 64 bytes chosen by the guest.
REPORT_DATA = slice(0x50, 0x90)

_MIN_VERSION = 2
_V3_CPUID = 3
_V4 = 4
_V5_MIT_VECTORS = 5

# SIGNATURE_ALGO encoding (ABI spec, "Signature Algorithm Encodings"): 1 = ECDSA P-384 with SHA-384.
_SIG_ALGO_ECDSA_P384_SHA384 = 1
# Each ECDSA component is a 72-byte little-endian field in the signature block.
_ECDSA_COMPONENT_SIZE = 72

# GUEST_POLICY bits (ABI spec, "Guest Policy Structure").
_POLICY_SMT = 1 << 16
_POLICY_RESERVED_MUST_BE_ONE = 1 << 17
_POLICY_MIGRATE_MA = 1 << 18
_POLICY_DEBUG = 1 << 19
_POLICY_SINGLE_SOCKET = 1 << 20
_POLICY_CXL_ALLOW = 1 << 21
_POLICY_MEM_AES_256_XTS = 1 << 22
_POLICY_RAPL_DIS = 1 << 23
_POLICY_CIPHERTEXT_HIDING = 1 << 24
_POLICY_PAGE_SWAP_DISABLE = 1 << 25
_POLICY_KNOWN_BITS = (1 << 26) - 1

# Signer info at 0x48 (ABI spec): bit 0 AUTHOR_KEY_EN, bit 1 MASK_CHIP_KEY, bits 4:2 SIGNING_KEY.
_AUTHOR_KEY_EN = 1 << 0
_MASK_CHIP_KEY = 1 << 1
_SIGNING_KEY_SHIFT = 2
_SIGNING_KEY_MASK = 0b111
_SIGNER_INFO_KNOWN_BITS = 0b11111


class SigningKey:
    """Values of the report's SIGNING_KEY field: which key signed the report."""

    VCEK = 0
    VLEK = 1
    NONE = 7


@dataclass(frozen=True, slots=True)
class SnpGuestPolicy:
    """The guest policy the guest owner set at launch, decoded from its 64-bit value."""

    raw: int

    @property
    def abi_minor(self) -> int:
        return self.raw & 0xFF

    @property
    def abi_major(self) -> int:
        return (self.raw >> 8) & 0xFF

    @property
    def smt_allowed(self) -> bool:
        return bool(self.raw & _POLICY_SMT)

    @property
    def migrate_ma(self) -> bool:
        """A migration agent may be associated with the guest (it could export guest memory)."""
        return bool(self.raw & _POLICY_MIGRATE_MA)

    @property
    def debug(self) -> bool:
        """The hypervisor may debug the guest: its memory is then readable by the host."""
        return bool(self.raw & _POLICY_DEBUG)

    @property
    def single_socket(self) -> bool:
        return bool(self.raw & _POLICY_SINGLE_SOCKET)

    @property
    def cxl_allowed(self) -> bool:
        return bool(self.raw & _POLICY_CXL_ALLOW)

    @property
    def mem_aes_256_xts(self) -> bool:
        return bool(self.raw & _POLICY_MEM_AES_256_XTS)

    @property
    def rapl_disabled(self) -> bool:
        return bool(self.raw & _POLICY_RAPL_DIS)

    @property
    def ciphertext_hiding(self) -> bool:
        return bool(self.raw & _POLICY_CIPHERTEXT_HIDING)

    @property
    def page_swap_disabled(self) -> bool:
        return bool(self.raw & _POLICY_PAGE_SWAP_DISABLE)


@dataclass(frozen=True, slots=True)
class SnpReport:
    """A parsed SEV-SNP attestation report. Nothing in it is verified yet.

    TCB values (`current_tcb`, `reported_tcb`, `committed_tcb`, `launch_tcb`) stay raw 64-bit
    integers here: their byte layout depends on the product (Milan/Genoa versus Turin), which
    `veil.attestation.verify.snp` decides.

    Attributes:
        raw: the exact 1184 bytes.
        signed_bytes: bytes 0x000..0x29F, the range the signature covers.
        version: report format version (2, 3, 5, ...).
        guest_svn: the guest's security version number.
        policy: the guest policy.
        family_id, image_id: 16 bytes each, from the ID block.
        vmpl: the VM privilege level that requested the report.
        signature_algo: always 1 (ECDSA P-384 with SHA-384) after parsing.
        current_tcb, reported_tcb, committed_tcb, launch_tcb: raw TCB_VERSION values.
        platform_info: platform flags (SMT enabled, TSME enabled, ...).
        author_key_en: the digest of the ID-block author key is present.
        mask_chip_key: the firmware masked the chip ID (it reads as zero).
        signing_key: 0 = VCEK, 1 = VLEK, 7 = unsigned (see `SigningKey`).
        report_data: 64 bytes chosen by the guest.
        measurement: 48-byte launch measurement.
        host_data: 32 bytes chosen by the hypervisor at launch.
        id_key_digest, author_key_digest: SHA-384 digests of the ID-block keys.
        report_id, report_id_ma: 32 bytes each.
        cpuid_fam_id, cpuid_mod_id, cpuid_step: CPUID family/model/stepping (version 3 and
            later; None before).
        chip_id: 64-byte chip identifier (zero when masked or VLEK-signed).
        current_build/minor/major, committed_build/minor/major: firmware versions.
        launch_mit_vector, current_mit_vector: mitigation vectors (version 5 and later).
        signature_r, signature_s: the ECDSA signature components as integers.
    """

    raw: bytes
    signed_bytes: bytes
    version: int
    guest_svn: int
    policy: SnpGuestPolicy
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb: int
    platform_info: int
    author_key_en: bool
    mask_chip_key: bool
    signing_key: int
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb: int
    cpuid_fam_id: int | None
    cpuid_mod_id: int | None
    cpuid_step: int | None
    chip_id: bytes
    committed_tcb: int
    current_build: int
    current_minor: int
    current_major: int
    committed_build: int
    committed_minor: int
    committed_major: int
    launch_tcb: int
    launch_mit_vector: int | None
    current_mit_vector: int | None
    signature_r: int
    signature_s: int

    @property
    def debug(self) -> bool:
        """True when the guest policy allows debugging."""
        return self.policy.debug

    def __repr__(self) -> str:
        return (
            f"SnpReport(version={self.version}, vmpl={self.vmpl}, policy={self.policy.raw:#x}, "
            f"signing_key={self.signing_key}, measurement={self.measurement.hex()}, "
            f"report_data={self.report_data.hex()}, reported_tcb={self.reported_tcb:#018x})"
        )


def _u32(data: bytes, offset: int) -> int:
    value: int = struct.unpack_from("<I", data, offset)[0]
    return value


def _u64(data: bytes, offset: int) -> int:
    value: int = struct.unpack_from("<Q", data, offset)[0]
    return value


def _must_be_zero(data: bytes, lo: int, hi: int) -> None:
    if any(data[lo:hi]):
        raise MalformedEvidenceError(
            f"SNP report: reserved bytes 0x{lo:03X}..0x{hi - 1:03X}: got {data[lo:hi].hex()}, "
            "expected all zero"
        )


def parse_snp_report(data: bytes) -> SnpReport:
    """Parse a 1184-byte SEV-SNP ATTESTATION_REPORT.

    Args:
        data: the report exactly as the firmware returned it (no certificate table after it).

    Returns:
        The parsed report; its signature is not checked here.

    Raises:
        MalformedEvidenceError: wrong length, unknown version, a reserved field that is not
            zero, a reserved policy or signer-info bit, or a signature algorithm other than
            ECDSA P-384 with SHA-384.
    """
    data = bytes(data)
    if len(data) != SNP_REPORT_SIZE:
        raise MalformedEvidenceError(
            f"SNP report: length got {len(data)} bytes, expected {SNP_REPORT_SIZE}"
        )
    version = _u32(data, 0x00)
    if version < _MIN_VERSION:
        raise MalformedEvidenceError(
            f"SNP report: version got {version}, expected {_MIN_VERSION} or later"
        )

    policy = _u64(data, 0x08)
    if not policy & _POLICY_RESERVED_MUST_BE_ONE:
        raise MalformedEvidenceError("SNP report: guest policy bit 17 got 0, expected 1")
    if policy & ~_POLICY_KNOWN_BITS:
        raise MalformedEvidenceError(
            f"SNP report: guest policy {policy:#018x} sets reserved bits 63:26, expected zero"
        )

    signature_algo = _u32(data, 0x34)
    if signature_algo != _SIG_ALGO_ECDSA_P384_SHA384:
        raise MalformedEvidenceError(
            f"SNP report: signature algorithm got {signature_algo}, "
            f"expected {_SIG_ALGO_ECDSA_P384_SHA384} (ECDSA P-384 with SHA-384)"
        )

    signer_info = _u32(data, 0x48)
    if signer_info & ~_SIGNER_INFO_KNOWN_BITS:
        raise MalformedEvidenceError(
            f"SNP report: signer info {signer_info:#010x} sets reserved bits 31:5, expected zero"
        )
    signing_key = (signer_info >> _SIGNING_KEY_SHIFT) & _SIGNING_KEY_MASK
    if signing_key not in (SigningKey.VCEK, SigningKey.VLEK, SigningKey.NONE):
        raise MalformedEvidenceError(
            f"SNP report: SIGNING_KEY got {signing_key}, expected 0 (VCEK), 1 (VLEK) or 7 (none)"
        )
    _must_be_zero(data, 0x4C, 0x50)

    if version >= _V3_CPUID:
        cpuid: tuple[int | None, int | None, int | None] = (data[0x188], data[0x189], data[0x18A])
        _must_be_zero(data, 0x18B, 0x1A0)
    else:
        cpuid = (None, None, None)
        _must_be_zero(data, 0x188, 0x1A0)

    _must_be_zero(data, 0x1EB, 0x1EC)
    _must_be_zero(data, 0x1EF, 0x1F0)
    mit: tuple[int | None, int | None] = (None, None)
    if version >= _V5_MIT_VECTORS:
        mit = (_u64(data, 0x1F8), _u64(data, 0x200))
    if version < _V4:
        _must_be_zero(data, 0x1F8, SNP_SIGNED_SIZE)
    elif version <= _V5_MIT_VECTORS:
        _must_be_zero(data, 0x208, SNP_SIGNED_SIZE)

    # Signature block (ABI spec, "ECDSA P-384 with SHA-384 Signature"): R at 0x00, S at 0x48,
    # each 72 bytes little-endian, the rest of the 512-byte block reserved.
    sig = SNP_SIGNED_SIZE
    r_bytes = data[sig : sig + _ECDSA_COMPONENT_SIZE]
    s_bytes = data[sig + _ECDSA_COMPONENT_SIZE : sig + 2 * _ECDSA_COMPONENT_SIZE]
    _must_be_zero(data, sig + 2 * _ECDSA_COMPONENT_SIZE, SNP_REPORT_SIZE)

    return SnpReport(
        raw=data,
        signed_bytes=data[:SNP_SIGNED_SIZE],
        version=version,
        guest_svn=_u32(data, 0x04),
        policy=SnpGuestPolicy(policy),
        family_id=data[0x10:0x20],
        image_id=data[0x20:0x30],
        vmpl=_u32(data, 0x30),
        signature_algo=signature_algo,
        current_tcb=_u64(data, 0x38),
        platform_info=_u64(data, 0x40),
        author_key_en=bool(signer_info & _AUTHOR_KEY_EN),
        mask_chip_key=bool(signer_info & _MASK_CHIP_KEY),
        signing_key=signing_key,
        report_data=data[REPORT_DATA],
        measurement=data[0x90:0xC0],
        host_data=data[0xC0:0xE0],
        id_key_digest=data[0xE0:0x110],
        author_key_digest=data[0x110:0x140],
        report_id=data[0x140:0x160],
        report_id_ma=data[0x160:0x180],
        reported_tcb=_u64(data, 0x180),
        cpuid_fam_id=cpuid[0],
        cpuid_mod_id=cpuid[1],
        cpuid_step=cpuid[2],
        chip_id=data[0x1A0:0x1E0],
        committed_tcb=_u64(data, 0x1E0),
        current_build=data[0x1E8],
        current_minor=data[0x1E9],
        current_major=data[0x1EA],
        committed_build=data[0x1EC],
        committed_minor=data[0x1ED],
        committed_major=data[0x1EE],
        launch_tcb=_u64(data, 0x1F0),
        launch_mit_vector=mit[0],
        current_mit_vector=mit[1],
        signature_r=int.from_bytes(r_bytes, "little"),
        signature_s=int.from_bytes(s_bytes, "little"),
    )


@dataclass(frozen=True, slots=True)
class SnpTcb:
    """The security patch levels packed in a TCB_VERSION value.

    Milan and Genoa (family 19h) pack ``BOOT_LOADER, TEE, 4 reserved bytes, SNP, MICROCODE``;
    Turin (family 1Ah) packs ``FMC, BOOT_LOADER, TEE, SNP, 3 reserved bytes, MICROCODE``
    (ABI spec, "TCB_VERSION Structure"). `fmc` is None on products without it.
    """

    bootloader: int
    tee: int
    snp: int
    microcode: int
    fmc: int | None = None

    @classmethod
    def from_raw(cls, raw: int, *, turin: bool) -> SnpTcb:
        """Decode a raw TCB_VERSION; `turin` selects the family-1Ah layout."""
        b = raw.to_bytes(8, "little")
        if turin:
            return cls(fmc=b[0], bootloader=b[1], tee=b[2], snp=b[3], microcode=b[7])
        return cls(bootloader=b[0], tee=b[1], snp=b[6], microcode=b[7])

    def reserved_bytes(self, raw: int) -> bytes:
        """The bytes of `raw` this layout calls reserved."""
        b = raw.to_bytes(8, "little")
        return b[4:7] if self.fmc is not None else b[2:6]

    def components(self) -> dict[str, int]:
        """Named components, `fmc` only where the product has it."""
        parts = {
            "bootloader": self.bootloader,
            "tee": self.tee,
            "snp": self.snp,
            "microcode": self.microcode,
        }
        if self.fmc is not None:
            parts["fmc"] = self.fmc
        return parts

    def __str__(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in self.components().items())
