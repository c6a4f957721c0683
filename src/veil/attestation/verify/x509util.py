"""X.509 helpers for DCAP: chains to a pinned root, CRLs, validity windows, PCK extensions.

Every function takes the verification time `now` (timezone-aware UTC) from its caller and never
reads the clock. A chain is accepted only when it ends in the pinned root: a root that comes
with the evidence is compared with the pinned one and never trusted on its own.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from veil.errors import (
    ChainError,
    CollateralError,
    ExpiredError,
    MalformedEvidenceError,
    RevokedError,
    SignatureError,
)

__all__ = [
    "SGX_EXTENSIONS_OID",
    "PckExtensions",
    "Window",
    "cert_window",
    "check_not_revoked",
    "check_signature_bit_string",
    "check_window",
    "ecdsa_p256_public_key",
    "load_crl",
    "load_pem_chain",
    "malformed_x509_as_typed",
    "parse_pck_extensions",
    "verify_chain",
    "verify_crl",
    "verify_ecdsa_raw",
]

SGX_EXTENSIONS_OID = x509.ObjectIdentifier("1.2.840.113741.1.13.1")
_SGX = "1.2.840.113741.1.13.1"
_OID_PPID = _SGX + ".1"
_OID_TCB = _SGX + ".2"
_OID_PCEID = _SGX + ".3"
_OID_FMSPC = _SGX + ".4"
_OID_SGX_TYPE = _SGX + ".5"
_OID_PCESVN = _OID_TCB + ".17"
_OID_CPUSVN = _OID_TCB + ".18"


@dataclass(frozen=True, slots=True)
class Window:
    """A closed validity interval [not_before, not_after]."""

    not_before: datetime
    not_after: datetime

    def intersect(self, other: Window) -> Window:
        return Window(max(self.not_before, other.not_before), min(self.not_after, other.not_after))


def check_window(
    window: Window, now: datetime, what: str, *, grace: timedelta = timedelta(0)
) -> None:
    """Raise `ExpiredError` unless not_before <= now <= not_after + grace.

    `grace` is for collateral whose nextUpdate passed (a stale list is still a list of what
    was revoked); certificates are always checked with none.
    """
    if now < window.not_before:
        raise ExpiredError(
            f"{what}: not valid yet at {now.isoformat()}, "
            f"valid from {window.not_before.isoformat()}"
        )
    if now - grace > window.not_after:
        raise ExpiredError(
            f"{what}: expired at {now.isoformat()}, valid until {window.not_after.isoformat()}"
        )


@contextmanager
def malformed_x509_as_typed(what: str) -> Iterator[None]:
    """Turn the errors `cryptography` raises on damaged certificates and CRLs into
    `MalformedEvidenceError`.

    It parses fields lazily: a bad extension, key or version surfaces as ValueError, TypeError,
    `x509.InvalidVersion`, `x509.DuplicateExtension` or `UnsupportedAlgorithm` on first access,
    deep inside a
    verification. Malformed input must fail closed with a typed `AttestationError`.
    """
    try:
        yield
    except (
        ValueError,
        TypeError,
        x509.InvalidVersion,
        x509.DuplicateExtension,
        UnsupportedAlgorithm,
    ) as exc:
        raise MalformedEvidenceError(f"{what}: malformed certificate or CRL ({exc})") from None


def _der_header(data: bytes, pos: int, what: str) -> tuple[int, int, int]:
    """(tag, start of content, content length) of the DER element at `pos`."""
    if pos + 2 > len(data):
        raise MalformedEvidenceError(f"{what}: truncated DER")
    tag, length, start = data[pos], data[pos + 1], pos + 2
    if length & 0x80:
        count = length & 0x7F
        if not 1 <= count <= 4 or start + count > len(data):
            raise MalformedEvidenceError(f"{what}: bad DER length")
        length = int.from_bytes(data[start : start + count], "big")
        start += count
    if start + length > len(data):
        raise MalformedEvidenceError(f"{what}: truncated DER")
    return tag, start, length


def check_signature_bit_string(der: bytes, what: str) -> None:
    """Refuse a certificate or CRL whose signatureValue BIT STRING has unused bits.

    Both are SEQUENCE { to-be-signed, signatureAlgorithm, signatureValue BIT STRING }. A
    signature is whole octets, so its unused-bits octet must be 0; cryptography accepts any
    value whose padding bits are zero, which lets anyone make a second encoding of a signed
    object (DER malleability) that independent verifiers reject.
    """
    tag, pos, _ = _der_header(der, 0, what)
    if tag != _TAG_SEQ:
        raise MalformedEvidenceError(f"{what}: tag got {tag:#x}, expected SEQUENCE")
    for _ in range(2):
        _, start, length = _der_header(der, pos, what)
        pos = start + length
    tag, start, length = _der_header(der, pos, what)
    if tag != 0x03 or length < 1:
        raise MalformedEvidenceError(f"{what}: signatureValue is not a BIT STRING")
    if der[start] != 0:
        raise MalformedEvidenceError(
            f"{what}: signature BIT STRING unused bits got {der[start]}, expected 0"
        )


def _name(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string()


def load_pem_chain(pem: bytes | str, what: str) -> list[x509.Certificate]:
    """Load a PEM certificate chain (leaf first); `MalformedEvidenceError` if it is not one."""
    raw = pem.encode("ascii", "replace") if isinstance(pem, str) else pem
    with malformed_x509_as_typed(what):
        try:
            certs = x509.load_pem_x509_certificates(raw.rstrip(b"\x00"))
        except ValueError as exc:
            raise MalformedEvidenceError(f"{what}: not a PEM certificate chain ({exc})") from None
        for cert in certs:
            check_signature_bit_string(cert.public_bytes(Encoding.DER), what)
    return certs


def _same_cert(a: x509.Certificate, b: x509.Certificate) -> bool:
    if a.public_bytes(Encoding.DER) == b.public_bytes(Encoding.DER):
        return True
    # A re-issued root with the same subject and key is the same trust anchor, provided it is
    # a genuine self-signature of that key (a root with damaged bytes is not accepted).
    if a.subject != b.subject or _spki(a) != _spki(b):
        return False
    try:
        a.verify_directly_issued_by(a)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def _spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _check_issued_by(cert: x509.Certificate, issuer: x509.Certificate, what: str) -> None:
    if cert.issuer != issuer.subject:
        raise ChainError(
            f"{what}: issuer got {cert.issuer.rfc4514_string()}, expected {_name(issuer)}"
        )
    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError) as exc:
        raise ChainError(f"{what}: signature by {_name(issuer)} does not verify ({exc})") from None


def _check_is_ca(cert: x509.Certificate, what: str) -> None:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise ChainError(f"{what}: issuer {_name(cert)} has no basicConstraints") from None
    if not bc.ca:
        raise ChainError(f"{what}: issuer {_name(cert)}: ca got False, expected True")


def cert_window(cert: x509.Certificate) -> Window:
    return Window(cert.not_valid_before_utc, cert.not_valid_after_utc)


def verify_chain(
    chain: Sequence[x509.Certificate], root: x509.Certificate, now: datetime, what: str
) -> tuple[list[x509.Certificate], Window]:
    """Verify `chain` (leaf first) up to the pinned `root`.

    The chain may end with the root itself; it is then required to be the pinned root
    (byte-identical, or same subject and key). Returns the chain with the pinned root
    appended in place of the supplied one, and the intersection of the validity windows.

    Raises:
        ChainError: a signature, an issuer name or a CA flag is wrong, or the chain ends in
            another root.
        ExpiredError: a certificate (the root included) is not valid at `now`.
    """
    certs = list(chain)
    if not certs:
        raise ChainError(f"{what}: empty certificate chain")
    if len(certs) > 1 and _same_cert(certs[-1], root):
        certs = certs[:-1]
    top = certs[-1]
    if top.issuer == top.subject and not _same_cert(top, root):
        raise ChainError(
            f"{what}: root got {_name(top)} (SHA-256 {top.fingerprint(hashes.SHA256()).hex()}), "
            f"expected the pinned {_name(root)} "
            f"(SHA-256 {root.fingerprint(hashes.SHA256()).hex()})"
        )
    full = [*certs, root] if not _same_cert(top, root) else certs
    window = cert_window(full[0])
    for i, cert in enumerate(full):
        label = f"{what} certificate {i} ({_name(cert)})"
        check_window(cert_window(cert), now, label)
        window = window.intersect(cert_window(cert))
        issuer = full[i + 1] if i + 1 < len(full) else root
        if i + 1 < len(full):
            _check_is_ca(issuer, label)
        _check_issued_by(cert, issuer, label)
    return full, window


def load_crl(data: bytes, what: str) -> x509.CertificateRevocationList:
    """Load a CRL given as DER, PEM, or hex-encoded DER (signature BIT STRING checked)."""
    crl = _load_crl(data, what)
    check_signature_bit_string(crl.public_bytes(Encoding.DER), what)
    return crl


def _load_crl(data: bytes, what: str) -> x509.CertificateRevocationList:
    raw = bytes(data)
    try:
        if raw[:1] == b"\x30":
            # DER: never strip, its last bytes may well look like whitespace.
            return x509.load_der_x509_crl(raw)
        raw = raw.strip()
        if raw.startswith(b"-----BEGIN"):
            return x509.load_pem_x509_crl(raw)
        try:
            raw = bytes.fromhex(raw.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise MalformedEvidenceError(f"{what}: neither DER, PEM nor hex") from None
        return x509.load_der_x509_crl(raw)
    except (ValueError, x509.InvalidVersion, UnsupportedAlgorithm) as exc:
        raise MalformedEvidenceError(f"{what}: not a CRL ({exc})") from None


def verify_crl(
    crl: x509.CertificateRevocationList,
    issuer: x509.Certificate,
    now: datetime,
    what: str,
    *,
    grace: timedelta = timedelta(0),
) -> Window:
    """Check a CRL's issuer, signature and thisUpdate/nextUpdate window; return the window.

    Raises:
        CollateralError: the CRL is issued by someone else or has no nextUpdate.
        SignatureError: the issuer's signature does not verify.
        ExpiredError: `now` is outside [thisUpdate, nextUpdate + grace].
    """
    if crl.issuer != issuer.subject:
        raise CollateralError(
            f"{what}: issuer got {crl.issuer.rfc4514_string()}, expected {_name(issuer)}"
        )
    key = issuer.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not crl.is_signature_valid(key):
        raise SignatureError(f"{what}: signature by {_name(issuer)} does not verify")
    next_update = crl.next_update_utc
    if next_update is None:
        raise CollateralError(f"{what}: nextUpdate missing")
    window = Window(crl.last_update_utc, next_update)
    check_window(window, now, what, grace=grace)
    return window


def check_not_revoked(
    cert: x509.Certificate, crl: x509.CertificateRevocationList, what: str
) -> None:
    """Raise `RevokedError` when `cert`'s serial number is on `crl` (same issuer required)."""
    if crl.issuer != cert.issuer:
        raise CollateralError(
            f"{what}: CRL issuer got {crl.issuer.rfc4514_string()}, "
            f"expected {cert.issuer.rfc4514_string()}"
        )
    if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
        raise RevokedError(f"{what}: serial {cert.serial_number:x} of {_name(cert)} is revoked")


def ecdsa_p256_public_key(raw: bytes, what: str) -> ec.EllipticCurvePublicKey:
    """Build a P-256 key from raw x‖y (64 bytes); a point off the curve is a `SignatureError`."""
    if len(raw) != 64:
        raise MalformedEvidenceError(f"{what}: got {len(raw)} bytes, expected 64")
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + raw)
    except ValueError:
        raise SignatureError(f"{what}: not a point on P-256") from None


def verify_ecdsa_raw(key: object, signature: bytes, data: bytes, what: str) -> None:
    """Verify a raw r‖s ECDSA-SHA256 signature; raise `SignatureError` if it does not verify."""
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise SignatureError(f"{what}: key is not an ECDSA P-256 key")
    if len(signature) != 64:
        raise SignatureError(f"{what}: signature got {len(signature)} bytes, expected 64")
    der = encode_dss_signature(
        int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    )
    try:
        key.verify(der, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise SignatureError(f"{what}: signature does not verify") from None


# --- SGX PCK certificate extensions (Intel "SGX PCK Certificate and CRL Profile") ------------


@dataclass(frozen=True, slots=True)
class PckExtensions:
    """The SGX extension of a PCK leaf certificate.

    Attributes:
        ppid: platform provisioning id (16 bytes).
        tcb_components: the 16 SGX TCB component SVNs (sub-OIDs .2.1 … .2.16).
        pcesvn: PCE security version.
        cpusvn: 16-byte CPUSVN.
        pce_id: 2 bytes.
        fmspc: 6 bytes, the platform family the TCB info must be for.
        sgx_type: 0 Standard, 1 Scalable, 2 Scalable with integrity.
    """

    ppid: bytes
    tcb_components: tuple[int, ...]
    pcesvn: int
    cpusvn: bytes
    pce_id: bytes
    fmspc: bytes
    sgx_type: int


def _der_items(data: bytes, what: str) -> list[tuple[int, bytes]]:
    """Split DER content into (tag, value) pairs; single-byte tags are all this profile uses."""
    items: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(data):
        if pos + 2 > len(data):
            raise MalformedEvidenceError(f"{what}: truncated DER")
        tag = data[pos]
        length = data[pos + 1]
        pos += 2
        if length & 0x80:
            n = length & 0x7F
            if n == 0 or n > 4 or pos + n > len(data):
                raise MalformedEvidenceError(f"{what}: bad DER length")
            length = int.from_bytes(data[pos : pos + n], "big")
            pos += n
        if pos + length > len(data):
            raise MalformedEvidenceError(f"{what}: truncated DER")
        items.append((tag, data[pos : pos + length]))
        pos += length
    return items


def _der_oid(value: bytes, what: str) -> str:
    if not value:
        raise MalformedEvidenceError(f"{what}: empty OID")
    parts = [value[0] // 40, value[0] % 40]
    acc = 0
    for b in value[1:]:
        acc = (acc << 7) | (b & 0x7F)
        if not b & 0x80:
            parts.append(acc)
            acc = 0
    return ".".join(str(p) for p in parts)


_TAG_INTEGER, _TAG_OCTETS, _TAG_OID, _TAG_ENUM, _TAG_SEQ = 0x02, 0x04, 0x06, 0x0A, 0x30


def _oid_value_pairs(data: bytes, what: str) -> dict[str, tuple[int, bytes]]:
    out: dict[str, tuple[int, bytes]] = {}
    for tag, value in _der_items(data, what):
        if tag != _TAG_SEQ:
            raise MalformedEvidenceError(f"{what}: tag got {tag:#x}, expected SEQUENCE")
        inner = _der_items(value, what)
        if len(inner) != 2 or inner[0][0] != _TAG_OID:
            raise MalformedEvidenceError(f"{what}: expected SEQUENCE {{OID, value}}")
        oid = _der_oid(inner[0][1], what)
        if oid in out:
            raise MalformedEvidenceError(f"{what}: duplicate {oid}")
        out[oid] = inner[1]
    return out


def _need(pairs: dict[str, tuple[int, bytes]], oid: str, tag: int, what: str) -> bytes:
    item = pairs.get(oid)
    if item is None:
        raise MalformedEvidenceError(f"{what}: {oid} missing")
    if item[0] != tag:
        raise MalformedEvidenceError(f"{what}: {oid} tag got {item[0]:#x}, expected {tag:#x}")
    return item[1]


def _int(value: bytes) -> int:
    return int.from_bytes(value, "big", signed=True) if value else 0


def parse_pck_extensions(cert: x509.Certificate) -> PckExtensions:
    """Read FMSPC, PCE-ID, TCB component SVNs, PCESVN and CPUSVN from a PCK leaf."""
    what = "PCK certificate SGX extension"
    try:
        ext = cert.extensions.get_extension_for_oid(SGX_EXTENSIONS_OID).value
    except x509.ExtensionNotFound:
        raise MalformedEvidenceError(f"{what} {SGX_EXTENSIONS_OID.dotted_string} missing") from None
    if not isinstance(ext, x509.UnrecognizedExtension):
        raise MalformedEvidenceError(f"{what}: unexpected type")
    top = _der_items(ext.value, what)
    if len(top) != 1 or top[0][0] != _TAG_SEQ:
        raise MalformedEvidenceError(f"{what}: expected one SEQUENCE")
    pairs = _oid_value_pairs(top[0][1], what)
    tcb = _oid_value_pairs(_need(pairs, _OID_TCB, _TAG_SEQ, what), what)
    comps = tuple(_int(_need(tcb, f"{_OID_TCB}.{i}", _TAG_INTEGER, what)) for i in range(1, 17))
    cpusvn = _need(tcb, _OID_CPUSVN, _TAG_OCTETS, what)
    fmspc = _need(pairs, _OID_FMSPC, _TAG_OCTETS, what)
    pce_id = _need(pairs, _OID_PCEID, _TAG_OCTETS, what)
    if len(fmspc) != 6 or len(pce_id) != 2 or len(cpusvn) != 16:
        raise MalformedEvidenceError(f"{what}: FMSPC/PCE-ID/CPUSVN have the wrong length")
    return PckExtensions(
        ppid=_need(pairs, _OID_PPID, _TAG_OCTETS, what),
        tcb_components=comps,
        pcesvn=_int(_need(tcb, _OID_PCESVN, _TAG_INTEGER, what)),
        cpusvn=cpusvn,
        pce_id=pce_id,
        fmspc=fmspc,
        sgx_type=_int(_need(pairs, _OID_SGX_TYPE, _TAG_ENUM, what)),
    )
