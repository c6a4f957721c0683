"""An AMD-shaped SEV-SNP PKI and report signer, generated at run time.

What it mirrors, so that veil's production verifier runs unchanged against its output:

- AMD "Versioned Chip Endorsement Key (VCEK) Certificate and KDS Interface Specification"
  (#57230): the self-signed ARK ("ARK-<product>"), the ASK ("SEV-<product>") and ASVK
  ("SEV-VLEK-<product>") it signs, the VCEK ("SEV-VCEK") and VLEK ("SEV-VLEK") leaves with the
  extensions under 1.3.6.1.4.1.3704.1 (structVersion .1, productName .2, blSPL .3.1, teeSPL .3.2,
  snpSPL .3.3, reserved .3.4-.3.7, ucodeSPL .3.8, Turin's fmcSPL .3.9, hwID .4 as the raw chip
  ID bytes (8 on Turin), cspId .5), all RSASSA-PSS with SHA-384, MGF1-SHA-384, 48-byte salt;
  and the ARK-signed CRL the KDS serves per product and key kind.
- AMD "SEV Secure Nested Paging Firmware ABI Specification", ATTESTATION_REPORT (0x4A0 bytes,
  version 3 with CPUID_FAM_ID / CPUID_MOD_ID / CPUID_STEP; version 2 and 5 on request), signed
  with ECDSA P-384 / SHA-384 over bytes 0x000..0x29F, R and S as 72-byte little-endian fields.

RSA key generation is slow, so RSA keys are cached per process by (seed, role, size); EC keys
derive from the seed. Every validity window derives from an injected `now`. Nothing here is
AMD's: trust it only through a `TrustStore` whose ``amd_arks`` hold `AmdPki.ark`.
"""

from __future__ import annotations

import hashlib
import secrets
import struct
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from veil.attestation.abi.snp import SNP_REPORT_SIZE, SNP_SIGNED_SIZE, SnpTcb
from veil.attestation.verify.snp import SnpCollateral

__all__ = [
    "CPUID",
    "CRL_LIFETIME",
    "DEFAULT_GUEST_POLICY",
    "DEFAULT_TCB",
    "PSS",
    "AmdPki",
    "EndorsementKey",
    "SnpChip",
    "derive_p384_key",
    "tcb_raw",
]

PRODUCTS = ("Milan", "Genoa", "Turin")
# CPUID family, model, stepping of each product (KDS spec "Determining the Product Name").
CPUID = {"Milan": (0x19, 0x01, 0x01), "Genoa": (0x19, 0x11, 0x01), "Turin": (0x1A, 0x02, 0x00)}
PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
CRL_LIFETIME = timedelta(days=7)
_ROOT_LIFETIME = timedelta(days=25 * 365)
_VCEK_LIFETIME = timedelta(days=7 * 365)

# A chip's TCB unless a test picks one. Milan's is the level of AMD-SB-3019 (bootloader 4, TEE 0,
# SNP 24, microcode 219), so default Milan evidence meets a bulletin-based minimum; Genoa's and
# Turin's are plausible values only: a policy must name their minimum.
DEFAULT_TCB = {
    "Milan": SnpTcb(bootloader=4, tee=0, snp=24, microcode=219),
    "Genoa": SnpTcb(bootloader=9, tee=0, snp=23, microcode=72),
    "Turin": SnpTcb(bootloader=1, tee=0, snp=4, microcode=77, fmc=1),
}

# Guest policy (ABI spec "Guest Policy Structure"): bit 16 SMT allowed, bit 17 must be one,
# bit 18 migration agent, bit 19 debug.
DEFAULT_GUEST_POLICY = (1 << 16) | (1 << 17)
POLICY_MIGRATE_MA = 1 << 18
POLICY_DEBUG = 1 << 19
# PLATFORM_INFO bit 0: SMT enabled; bit 1: TSME enabled.
DEFAULT_PLATFORM_INFO = 0x3

_OID = "1.3.6.1.4.1.3704.1"
_SIG_ALGO_ECDSA_P384_SHA384 = 1
_SIGNING_KEY_VCEK, _SIGNING_KEY_VLEK = 0, 1
_P384_ORDER = int(
    "ffffffffffffffffffffffffffffffffffffffffffffffffc7634d81f4372ddf581a0db248b0a77aecec196accc52973",
    16,
)

_RSA_CACHE: dict[tuple[bytes, str, int], rsa.RSAPrivateKey] = {}
_RSA_LOCK = threading.Lock()


def _rsa_key(seed: bytes, role: str, size: int) -> rsa.RSAPrivateKey:
    with _RSA_LOCK:
        key = _RSA_CACHE.get((seed, role, size))
        if key is None:
            key = rsa.generate_private_key(public_exponent=65537, key_size=size)
            _RSA_CACHE[(seed, role, size)] = key
        return key


def derive_p384_key(seed: bytes, label: str) -> ec.EllipticCurvePrivateKey:
    """A P-384 key determined by `seed` and `label`."""
    digest = hashlib.sha512(b"veil.testing P-384\0" + seed + b"\0" + label.encode()).digest()
    scalar = int.from_bytes(digest, "big") % (_P384_ORDER - 1) + 1
    return ec.derive_private_key(scalar, ec.SECP384R1())


def tcb_raw(tcb: SnpTcb) -> int:
    """Pack a TCB_VERSION (ABI spec "TCB_VERSION Structure"); Turin's layout when `fmc` is set."""
    if tcb.fmc is not None:
        layout = [tcb.fmc, tcb.bootloader, tcb.tee, tcb.snp, 0, 0, 0, tcb.microcode]
    else:
        layout = [tcb.bootloader, tcb.tee, 0, 0, 0, 0, tcb.snp, tcb.microcode]
    return int.from_bytes(bytes(layout), "little")


def _aware(now: datetime) -> datetime:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now: got a naive datetime, expected a timezone-aware one")
    return now.astimezone(UTC).replace(microsecond=0)


def _name(common_name: str) -> x509.Name:
    # AMD's subject layout: OU, C, L, ST, O, CN.
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Engineering"),
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.LOCALITY_NAME, "Santa Clara"),
            x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "CA"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Advanced Micro Devices"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _der_int(value: int) -> bytes:
    body = value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big")
    return bytes([0x02, len(body)]) + body


def _der_ia5(text: str) -> bytes:
    raw = text.encode("ascii")
    if len(raw) >= 0x80:
        raise ValueError(f"IA5String: got {len(raw)} bytes, expected fewer than 128")
    return bytes([0x16, len(raw)]) + raw


def _ext(suffix: str, value: bytes) -> x509.UnrecognizedExtension:
    return x509.UnrecognizedExtension(x509.ObjectIdentifier(f"{_OID}.{suffix}"), value)


def _serial(seed: bytes, label: str) -> int:
    digest = hashlib.sha256(b"veil.testing AMD serial\0" + seed + b"\0" + label.encode()).digest()
    return int.from_bytes(digest[:16], "big") | 1


@dataclass(frozen=True, slots=True)
class EndorsementKey:
    """A VCEK or VLEK: its certificate and the P-384 key that signs reports."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def der(self) -> bytes:
        return self.certificate.public_bytes(Encoding.DER)

    @property
    def serial_number(self) -> int:
        return self.certificate.serial_number


class AmdPki:
    """ARK → ASK and ASVK for one product; VCEKs, VLEKs and the KDS CRLs under them.

    Example::

        pki = AmdPki("Genoa", now=now, seed=b"test")
        chip = pki.chip()
        report = chip.report(report_data, measurement=bytes(48))
        collateral = chip.collateral(now)
        trust = TrustStore(intel_root=..., amd_arks={"Genoa": pki.ark})

    Args:
        product: "Milan", "Genoa" or "Turin".
        now: the time certificate validity windows are computed from.
        seed: serials and EC keys derive from it, RSA keys are cached by it; random when None.
        rsa_key_size: AMD's keys are RSA-4096; the default 2048 keeps tests fast.

    RSA keys are random (cached per process and seed), so a second process built from the same
    seed signs with other ARK/ASK/ASVK keys: hand it the certificates (a host certificate table,
    the KDS stand-in of the first process) rather than rebuilding them. VCEK and VLEK keys derive
    from the seed, the chip ID and the TCB, so any process signs reports the same VCEK verifies.
    """

    def __init__(
        self,
        product: str = "Milan",
        *,
        now: datetime,
        seed: bytes | None = None,
        rsa_key_size: int = 2048,
    ) -> None:
        if product not in PRODUCTS:
            raise ValueError(f"product: got {product!r}, expected one of {', '.join(PRODUCTS)}")
        now = _aware(now)
        self.product = product
        self.seed = secrets.token_bytes(32) if seed is None else bytes(seed)
        self._lock = threading.Lock()
        self._revoked: set[int] = set()
        self._not_before = now - timedelta(days=1)
        self._root_until = now + _ROOT_LIFETIME
        self.ark_key = _rsa_key(self.seed, f"ark-{product}", rsa_key_size)
        self.ask_key = _rsa_key(self.seed, f"ask-{product}", rsa_key_size)
        self.asvk_key = _rsa_key(self.seed, f"asvk-{product}", rsa_key_size)
        self.ark = self._ca(f"ARK-{product}", self.ark_key, "ark")
        self.ask = self._ca(f"SEV-{product}", self.ask_key, "ask")
        self.asvk = self._ca(f"SEV-VLEK-{product}", self.asvk_key, "asvk")

    def _ca(self, common_name: str, key: rsa.RSAPrivateKey, label: str) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(_name(f"ARK-{self.product}"))
            .public_key(key.public_key())
            .serial_number(_serial(self.seed, f"{label}-{self.product}"))
            .not_valid_before(self._not_before)
            .not_valid_after(self._root_until)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.CRLDistributionPoints(
                    [
                        x509.DistributionPoint(
                            [x509.UniformResourceIdentifier(self._crl_url)], None, None, None
                        )
                    ]
                ),
                critical=False,
            )
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
        )
        if label != "ark":
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ark_key.public_key()),
                critical=False,
            )
        return builder.sign(self.ark_key, hashes.SHA384(), rsa_padding=PSS)

    @property
    def _crl_url(self) -> str:
        return f"https://kdsintf.amd.com/vcek/v1/{self.product}/crl"

    def chain_pem(self, *, vlek: bool = False) -> str:
        """ASK (or ASVK) then ARK, PEM: the KDS ``cert_chain`` answer."""
        first = self.asvk if vlek else self.ask
        return "".join(c.public_bytes(Encoding.PEM).decode("ascii") for c in (first, self.ark))

    def _leaf(
        self,
        common_name: str,
        issuer: x509.Certificate,
        issuer_key: rsa.RSAPrivateKey,
        key: ec.EllipticCurvePrivateKey,
        label: str,
        extensions: list[x509.UnrecognizedExtension],
    ) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(issuer.subject)
            .public_key(key.public_key())
            .serial_number(_serial(self.seed, f"{self.product}-{label}"))
            .not_valid_before(self._not_before)
            .not_valid_after(min(self._not_before + _VCEK_LIFETIME, self._root_until))
        )
        for extension in extensions:
            builder = builder.add_extension(extension, critical=False)
        return builder.sign(issuer_key, hashes.SHA384(), rsa_padding=PSS)

    def _spl_extensions(self, tcb: SnpTcb) -> list[x509.UnrecognizedExtension]:
        turin = self.product == "Turin"
        if turin != (tcb.fmc is not None):
            raise ValueError(f"tcb: fmc must be set exactly on Turin, got {tcb} for {self.product}")
        # The order of AMD's own VCEKs: blSPL, teeSPL, the reserved SPLs, snpSPL, ucodeSPL.
        exts = [_ext("3.1", _der_int(tcb.bootloader)), _ext("3.2", _der_int(tcb.tee))]
        if not turin:
            exts += [_ext(f"3.{i}", _der_int(0)) for i in range(4, 8)]
        exts.append(_ext("3.3", _der_int(tcb.snp)))
        exts.append(_ext("3.8", _der_int(tcb.microcode)))
        if tcb.fmc is not None:
            exts.append(_ext("3.9", _der_int(tcb.fmc)))
        return exts

    def vcek(self, hwid: bytes, tcb: SnpTcb) -> EndorsementKey:
        """The VCEK of chip `hwid` (64 bytes; 8 on Turin) at `tcb`, as the KDS would derive it."""
        size = 8 if self.product == "Turin" else 64
        if len(hwid) != size:
            raise ValueError(f"hwid: got {len(hwid)} bytes, expected {size} for {self.product}")
        label = f"vcek-{hwid.hex()}-{tcb_raw(tcb):016x}"
        key = derive_p384_key(self.seed, label)
        exts = [_ext("1", _der_int(0)), _ext("2", _der_ia5(f"{self.product}-B0"))]
        exts += self._spl_extensions(tcb)
        exts.append(_ext("4", bytes(hwid)))
        cert = self._leaf("SEV-VCEK", self.ask, self.ask_key, key, label, exts)
        return EndorsementKey(cert, key)

    def vlek(self, tcb: SnpTcb, *, csp_id: str = "veil-test-csp") -> EndorsementKey:
        """A VLEK for cloud provider `csp_id` at `tcb` (issued by the ASVK, no hwID)."""
        label = f"vlek-{csp_id}-{tcb_raw(tcb):016x}"
        key = derive_p384_key(self.seed, label)
        exts = [_ext("1", _der_int(0)), _ext("2", _der_ia5(self.product))]
        exts += self._spl_extensions(tcb)
        exts.append(_ext("5", _der_ia5(csp_id)))
        cert = self._leaf("SEV-VLEK", self.asvk, self.asvk_key, key, label, exts)
        return EndorsementKey(cert, key)

    # --- revocation -----------------------------------------------------------------------------

    def revoke(self, serial_number: int) -> None:
        """List `serial_number` on every CRL issued from now on."""
        with self._lock:
            self._revoked.add(serial_number)

    def unrevoke(self, serial_number: int) -> None:
        with self._lock:
            self._revoked.discard(serial_number)

    def crl(self, now: datetime, *, lifetime: timedelta = CRL_LIFETIME) -> bytes:
        """The ARK-signed CRL (DER, RSASSA-PSS SHA-384) issued an hour before `now`.

        The KDS serves the same list at ``/vcek/v1/{product}/crl`` and ``/vlek/...``.
        """
        this_update = _aware(now) - timedelta(hours=1)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.ark.subject)
            .last_update(this_update)
            .next_update(this_update + lifetime)
        )
        with self._lock:
            revoked = sorted(self._revoked)
        for serial in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(this_update)
                .build()
            )
        return builder.sign(self.ark_key, hashes.SHA384(), rsa_padding=PSS).public_bytes(
            Encoding.DER
        )

    def chip(
        self,
        *,
        chip_id: bytes | None = None,
        tcb: SnpTcb | None = None,
        vlek_csp_id: str | None = None,
    ) -> SnpChip:
        """A machine of this product with `chip_id` at `tcb` (defaults derive from the seed).

        With `vlek_csp_id` its reports are signed by a VLEK for that provider, else by its VCEK.
        """
        turin = self.product == "Turin"
        if tcb is None:
            tcb = DEFAULT_TCB[self.product]
        if chip_id is None:
            chip_id = hashlib.sha512(b"chip" + self.seed).digest()
            if turin:
                chip_id = chip_id[:8] + bytes(56)
        return SnpChip(self, bytes(chip_id), tcb, vlek_csp_id)


class SnpChip:
    """One SEV-SNP machine: its chip ID, TCBs, firmware version and endorsement key."""

    def __init__(self, pki: AmdPki, chip_id: bytes, tcb: SnpTcb, vlek_csp_id: str | None) -> None:
        if len(chip_id) != 64:
            raise ValueError(f"chip_id: got {len(chip_id)} bytes, expected 64")
        self.pki = pki
        self.chip_id = chip_id
        self.tcb = tcb
        self.vlek_csp_id = vlek_csp_id
        turin = pki.product == "Turin"
        self.hwid = chip_id[:8] if turin else chip_id
        self.firmware = (4, 52, 1)  # build, minor, major as the report stores them
        self.endorsement_key = (
            pki.vlek(tcb, csp_id=vlek_csp_id)
            if vlek_csp_id is not None
            else pki.vcek(self.hwid, tcb)
        )

    @property
    def signed_by_vlek(self) -> bool:
        return self.vlek_csp_id is not None

    def report(
        self,
        report_data: bytes,
        *,
        measurement: bytes,
        version: int = 3,
        policy: int = DEFAULT_GUEST_POLICY,
        debug: bool = False,
        vmpl: int = 0,
        guest_svn: int = 0,
        host_data: bytes = bytes(32),
        family_id: bytes = bytes(16),
        image_id: bytes = bytes(16),
        id_key_digest: bytes = bytes(48),
        author_key_digest: bytes = bytes(48),
        report_id: bytes | None = None,
        platform_info: int = DEFAULT_PLATFORM_INFO,
        reported_tcb: SnpTcb | None = None,
        current_tcb: SnpTcb | None = None,
        committed_tcb: SnpTcb | None = None,
        launch_tcb: SnpTcb | None = None,
        cpuid: tuple[int, int, int] | None = None,
        mask_chip_id: bool = False,
        mit_vectors: tuple[int, int] = (0, 0),
        signing_key: ec.EllipticCurvePrivateKey | None = None,
    ) -> bytes:
        """A signed ATTESTATION_REPORT (ABI spec table "ATTESTATION_REPORT Structure").

        TCBs default to the chip's; `cpuid` to the product's (versions 3 and later);
        `signing_key` to the chip's VCEK/VLEK (pass another to forge a signature).
        """
        if len(report_data) > 64:
            raise ValueError(f"report_data: got {len(report_data)} bytes, expected at most 64")
        if len(measurement) != 48:
            raise ValueError(f"measurement: got {len(measurement)} bytes, expected 48")
        if debug:
            policy |= POLICY_DEBUG
        tcb = tcb_raw(self.tcb)
        r = bytearray(SNP_REPORT_SIZE)
        struct.pack_into("<IIQ", r, 0x00, version, guest_svn, policy)
        r[0x10:0x20] = family_id
        r[0x20:0x30] = image_id
        struct.pack_into("<II", r, 0x30, vmpl, _SIG_ALGO_ECDSA_P384_SHA384)
        struct.pack_into(
            "<QQ", r, 0x38, tcb_raw(current_tcb) if current_tcb else tcb, platform_info
        )
        key_kind = _SIGNING_KEY_VLEK if self.signed_by_vlek else _SIGNING_KEY_VCEK
        struct.pack_into("<I", r, 0x48, (key_kind << 2) | (2 if mask_chip_id else 0))
        r[0x50:0x90] = report_data.ljust(64, b"\0")
        r[0x90:0xC0] = measurement
        r[0xC0:0xE0] = host_data
        r[0xE0:0x110] = id_key_digest
        r[0x110:0x140] = author_key_digest
        r[0x140:0x160] = report_id or hashlib.sha256(b"report id" + self.chip_id).digest()
        struct.pack_into("<Q", r, 0x180, tcb_raw(reported_tcb) if reported_tcb else tcb)
        if version >= 3:
            r[0x188:0x18B] = bytes(cpuid or CPUID[self.pki.product])
        if not mask_chip_id and not self.signed_by_vlek:
            r[0x1A0:0x1E0] = self.chip_id
        struct.pack_into("<Q", r, 0x1E0, tcb_raw(committed_tcb) if committed_tcb else tcb)
        r[0x1E8:0x1EB] = bytes(self.firmware)
        r[0x1EC:0x1EF] = bytes(self.firmware)
        struct.pack_into("<Q", r, 0x1F0, tcb_raw(launch_tcb) if launch_tcb else tcb)
        if version >= 5:
            struct.pack_into("<QQ", r, 0x1F8, *mit_vectors)
        key = signing_key or self.endorsement_key.key
        sig_r, sig_s = decode_dss_signature(
            key.sign(bytes(r[:SNP_SIGNED_SIZE]), ec.ECDSA(hashes.SHA384()))
        )
        r[0x2A0:0x2E8] = sig_r.to_bytes(72, "little")
        r[0x2E8:0x330] = sig_s.to_bytes(72, "little")
        return bytes(r)

    def collateral(self, now: datetime, *, with_crl: bool = True) -> SnpCollateral:
        """The endorsement key, its ASK/ASVK ‖ ARK chain and (by default) the CRL of `now`."""
        vlek = self.signed_by_vlek
        return SnpCollateral(
            endorsement_key=self.endorsement_key.der,
            intermediates_pem=self.pki.chain_pem(vlek=vlek),
            crl=self.pki.crl(now) if with_crl else None,
        )
