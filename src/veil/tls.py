"""The server's TLS identity and the client's pinned channel.

The server makes a fresh ECDSA P-256 key inside the TEE at every start and a self-signed
certificate for ``blindai-srv`` (the name BlindAI clients check). The evidence binds SHA-256 of
the certificate's DER in its report data's first half (the second half binds the server's other
keys, `veil.keymap`); a client that verified it trusts that one certificate and nothing else.
The private key never reaches a disk unencrypted: it is handed to OpenSSL through an anonymous
in-memory file, encrypted with a one-time password.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import secrets
import ssl
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from veil.keymap import EMPTY_KEY_MAP, KeyMap

__all__ = [
    "SERVER_NAME",
    "RotatingServerContext",
    "TlsIdentity",
    "binding_report_data",
    "certificate_digest",
    "generate_identity",
    "pinned_client_context",
    "server_context",
]

SERVER_NAME = "blindai-srv"
"""The DNS name in the certificate; BlindAI clients check it whatever address they dial."""


@dataclass(frozen=True, slots=True)
class TlsIdentity:
    """A key pair and its self-signed certificate. Never log or pickle it."""

    certificate_der: bytes
    private_key: ec.EllipticCurvePrivateKey

    def __repr__(self) -> str:
        return f"TlsIdentity(certificate_sha256={certificate_digest(self.certificate_der).hex()})"


def certificate_digest(certificate_der: bytes) -> bytes:
    """SHA-256 of a certificate's DER: what the evidence's report data starts with."""
    return hashlib.sha256(certificate_der).digest()


def binding_report_data(certificate_der: bytes, key_map: KeyMap = EMPTY_KEY_MAP) -> bytes:
    """The 64 bytes of report data that bind a certificate and the server's other keys:
    SHA-256 of the certificate, then the key map's digest (zero without keys; `veil.keymap`)."""
    return certificate_digest(certificate_der) + key_map.digest


def generate_identity(
    *, now: datetime.datetime | None = None, lifetime: datetime.timedelta | None = None
) -> TlsIdentity:
    """A fresh P-256 key and a self-signed certificate with SAN DNS ``blindai-srv``."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = now or datetime.datetime.now(datetime.UTC)
    lifetime = lifetime or datetime.timedelta(days=365)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_NAME)])
    public = key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        # an hour of slack for clients whose clock is behind
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + lifetime)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(SERVER_NAME)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return TlsIdentity(certificate.public_bytes(serialization.Encoding.DER), key)


@contextlib.contextmanager
def _memory_file(data: bytes) -> Iterator[str]:
    """A path OpenSSL can read holding `data`: an anonymous memfd where Linux offers one."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("veil-tls", 0)
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    # Elsewhere a 0600 temporary file; the key inside it is encrypted (see server_context).
    handle, path = tempfile.mkstemp(prefix="veil-tls-")
    try:
        os.write(handle, data)
        os.close(handle)
        yield path
    finally:
        os.unlink(path)


def server_context(identity: TlsIdentity) -> ssl.SSLContext:
    """A server SSLContext presenting `identity` (TLS 1.2+)."""
    password = secrets.token_bytes(32)
    key_pem = identity.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(password),
    )
    cert_pem = x509.load_der_x509_certificate(identity.certificate_der).public_bytes(
        serialization.Encoding.PEM
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    with _memory_file(cert_pem + key_pem) as path:
        context.load_cert_chain(path, password=password)
    return context


class RotatingServerContext:
    """A server SSLContext whose identity can be replaced while the server runs.

    `context` is what the listeners hold; each handshake takes, from its first message on, the
    context of the identity current at that moment (through the SNI callback, which OpenSSL calls
    with or without a server name). Connections already open keep the identity they were made
    with; replacing it never touches them.
    """

    def __init__(self, identity: TlsIdentity) -> None:
        self._current = server_context(identity)
        self.context = server_context(identity)
        self.context.sni_callback = self._pick

    def _pick(
        self, connection: ssl.SSLObject | ssl.SSLSocket, _name: str | None, _ctx: Any
    ) -> None:
        connection.context = self._current

    def use(self, context: ssl.SSLContext) -> None:
        """Present `context`'s identity (a `server_context`) from the next handshake on: one
        reference swap, so a handshake sees the old identity or the new one, never a mixture."""
        self._current = context


def pinned_client_context(certificate_der: bytes) -> ssl.SSLContext:
    """A client SSLContext that trusts exactly one certificate and checks ``blindai-srv``.

    Connect with server_hostname (SNI) ``blindai-srv``: any other certificate, or this one for
    another name, fails the handshake.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = True
    context.load_verify_locations(cadata=certificate_der)
    return context
