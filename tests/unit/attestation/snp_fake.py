"""A generated AMD-like PKI and report signer, for SEV-SNP cases no real vector covers
(Turin and Genoa layouts, masked chip IDs, a TCB mismatch under a valid signature, ...).

Nothing here is AMD's: the roots are made up and trusted only through an explicit TrustStore.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from veil.attestation.trust import TrustStore, load_embedded_root

NOW = datetime(2025, 1, 1, tzinfo=UTC)
NOT_BEFORE = NOW - timedelta(days=1)
NOT_AFTER = NOW + timedelta(days=365)
PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
CHIP_ID = bytes(range(64))
MEASUREMENT = bytes([0xAB]) * 48

_RSA_KEYS: list[rsa.RSAPrivateKey] = []


def _rsa_key(index: int) -> rsa.RSAPrivateKey:
    # RSA generation is slow: keep a few keys for the whole test session.
    while len(_RSA_KEYS) <= index:
        _RSA_KEYS.append(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    return _RSA_KEYS[index]


def name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Not AMD"),
        ]
    )


def der_int(value: int) -> bytes:
    body = value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big")
    return bytes([0x02, len(body)]) + body


def der_ia5(text: str) -> bytes:
    raw = text.encode("latin-1")
    return bytes([0x16, len(raw)]) + raw


def ext(oid: str, value: bytes) -> x509.UnrecognizedExtension:
    return x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value)


def make_cert(
    subject: str,
    issuer: str,
    public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey,
    signer: rsa.RSAPrivateKey,
    extensions: list[x509.UnrecognizedExtension] = [],  # noqa: B006 - read only
    *,
    not_before: datetime = NOT_BEFORE,
    not_after: datetime = NOT_AFTER,
    pss: bool = True,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(name(subject))
        .issuer_name(name(issuer))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    for e in extensions:
        builder = builder.add_extension(e, critical=False)
    if pss:
        return builder.sign(signer, hashes.SHA384(), rsa_padding=PSS)
    return builder.sign(signer, hashes.SHA384())


@dataclass
class FakeAmd:
    """ARK → ASK / ASVK for one product name, and endorsement keys with chosen extensions."""

    product: str = "Milan"
    ark_key: rsa.RSAPrivateKey = field(default_factory=lambda: _rsa_key(0))
    ask_key: rsa.RSAPrivateKey = field(default_factory=lambda: _rsa_key(1))

    def __post_init__(self) -> None:
        p = self.product
        self.ark = make_cert(f"ARK-{p}", f"ARK-{p}", self.ark_key.public_key(), self.ark_key)
        self.ask = make_cert(f"SEV-{p}", f"ARK-{p}", self.ask_key.public_key(), self.ark_key)
        self.asvk = make_cert(f"SEV-VLEK-{p}", f"ARK-{p}", self.ask_key.public_key(), self.ark_key)
        self.leaf_key = ec.generate_private_key(ec.SECP384R1())

    def trust(self) -> TrustStore:
        return TrustStore(
            intel_root=load_embedded_root("intel_sgx_root_ca.pem"),
            amd_arks={self.product: self.ark},
        )

    def chain_pem(self) -> str:
        return "".join(
            c.public_bytes(Encoding.PEM).decode() for c in (self.ask, self.asvk, self.ark)
        )

    def endorsement_key(
        self,
        *,
        vlek: bool = False,
        spl: dict[str, int] | None = None,
        hwid: bytes | None = CHIP_ID,
        csp_id: str | None = "CN=fake-csp",
        product_name: str | None = None,
        omit_product_name: bool = False,
        extra: list[x509.UnrecognizedExtension] = [],  # noqa: B006 - read only
        public_key: ec.EllipticCurvePublicKey | None = None,
        pss: bool = True,
        not_after: datetime = NOT_AFTER,
    ) -> bytes:
        spl = spl if spl is not None else {"1": 3, "2": 0, "3": 8, "8": 115}
        exts = [ext("1.3.6.1.4.1.3704.1.1", der_int(0))]
        if not omit_product_name:
            product = product_name or (self.product if vlek else f"{self.product}-B0")
            exts.append(ext("1.3.6.1.4.1.3704.1.2", der_ia5(product)))
        exts += [ext(f"1.3.6.1.4.1.3704.1.3.{k}", der_int(v)) for k, v in spl.items()]
        if vlek and csp_id is not None:
            exts.append(ext("1.3.6.1.4.1.3704.1.5", der_ia5(csp_id)))
        if not vlek and hwid is not None:
            exts.append(ext("1.3.6.1.4.1.3704.1.4", hwid))
        exts += extra
        issuer = self.asvk if vlek else self.ask
        cert = make_cert(
            "SEV-VLEK" if vlek else "SEV-VCEK",
            issuer.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value,  # type: ignore[arg-type]
            public_key or self.leaf_key.public_key(),
            self.ask_key,
            exts,
            pss=pss,
            not_after=not_after,
        )
        return cert.public_bytes(Encoding.DER)

    def serial(self, der: bytes) -> int:
        return x509.load_der_x509_certificate(der).serial_number


def tcb(bl: int, tee: int, snp: int, ucode: int, *, fmc: int | None = None) -> int:
    if fmc is not None:
        return int.from_bytes(bytes([fmc, bl, tee, snp, 0, 0, 0, ucode]), "little")
    return int.from_bytes(bytes([bl, tee, 0, 0, 0, 0, snp, ucode]), "little")


def build_report(
    *,
    version: int = 2,
    policy: int = 0x30000,
    vmpl: int = 0,
    signing_key: int = 0,
    mask_chip: bool = False,
    reported_tcb: int = tcb(3, 0, 8, 115),
    current_tcb: int | None = None,
    committed_tcb: int | None = None,
    platform_info: int = 0x1,
    chip_id: bytes = CHIP_ID,
    cpuid: tuple[int, int, int] | None = None,
    mit: tuple[int, int] | None = None,
    measurement: bytes = MEASUREMENT,
    report_data: bytes = bytes(64),
    host_data: bytes = bytes(32),
    key: ec.EllipticCurvePrivateKey | None = None,
) -> bytes:
    """A report with the given fields, signed by `key` (unsigned bytes if None)."""
    r = bytearray(0x4A0)
    struct.pack_into("<IIQ", r, 0, version, 1, policy)
    struct.pack_into("<II", r, 0x30, vmpl, 1)
    current = reported_tcb if current_tcb is None else current_tcb
    struct.pack_into("<QQ", r, 0x38, current, platform_info)
    struct.pack_into("<I", r, 0x48, (signing_key << 2) | (2 if mask_chip else 0))
    r[0x50:0x90] = report_data
    r[0x90:0xC0] = measurement
    r[0xC0:0xE0] = host_data
    struct.pack_into("<Q", r, 0x180, reported_tcb)
    if cpuid is not None:
        r[0x188:0x18B] = bytes(cpuid)
    r[0x1A0:0x1E0] = bytes(64) if mask_chip else chip_id
    struct.pack_into("<Q", r, 0x1E0, reported_tcb if committed_tcb is None else committed_tcb)
    r[0x1E8:0x1EB] = bytes([4, 52, 1])
    r[0x1EC:0x1EF] = bytes([4, 52, 1])
    struct.pack_into("<Q", r, 0x1F0, reported_tcb)
    if mit is not None:
        struct.pack_into("<QQ", r, 0x1F8, *mit)
    if key is not None:
        der = key.sign(bytes(r[:0x2A0]), ec.ECDSA(hashes.SHA384()))
        sig_r, sig_s = decode_dss_signature(der)
        r[0x2A0:0x2E8] = sig_r.to_bytes(72, "little")
        r[0x2E8:0x330] = sig_s.to_bytes(72, "little")
    return bytes(r)


def make_crl(
    amd: FakeAmd,
    revoked: list[int] = [],  # noqa: B006 - read only
    *,
    issuer: str | None = None,
    signer: rsa.RSAPrivateKey | None = None,
    this_update: datetime = NOT_BEFORE,
    next_update: datetime = NOW + timedelta(days=7),
    pss: bool = True,
) -> bytes:
    """An AMD-style CRL: issued by the ARK, RSASSA-PSS SHA-384, listing `revoked` serials (DER)."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(name(issuer or f"ARK-{amd.product}"))
        .last_update(this_update)
        .next_update(next_update)
    )
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(this_update)
            .build()
        )
    key = signer or amd.ark_key
    crl = (
        builder.sign(key, hashes.SHA384(), rsa_padding=PSS)
        if pss
        else builder.sign(key, hashes.SHA384())
    )
    return crl.public_bytes(Encoding.DER)
