"""The server's TLS identity and the pinned client context."""

from __future__ import annotations

import hashlib
import socket
import ssl
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from veil.tls import (
    SERVER_NAME,
    RotatingServerContext,
    TlsIdentity,
    binding_report_data,
    generate_identity,
    pinned_client_context,
    server_context,
)


def test_identity_is_a_fresh_p256_self_signed_certificate() -> None:
    identity = generate_identity()
    certificate = x509.load_der_x509_certificate(identity.certificate_der)
    assert isinstance(certificate.public_key(), ec.EllipticCurvePublicKey)
    assert certificate.public_key().curve.name == "secp256r1"
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [SERVER_NAME]
    assert certificate.issuer == certificate.subject
    assert generate_identity().certificate_der != identity.certificate_der
    assert "PRIVATE" not in repr(identity)


def test_binding_report_data() -> None:
    der = generate_identity().certificate_der
    data = binding_report_data(der)
    assert data == hashlib.sha256(der).digest() + bytes(32)


def handshake(server: TlsIdentity, pinned: bytes, name: str = SERVER_NAME) -> None:
    """One TLS handshake over a socket pair."""
    left, right = socket.socketpair()
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            with server_context(server).wrap_socket(right, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError) as exc:
            errors.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with pinned_client_context(pinned).wrap_socket(left, server_hostname=name) as tls:
            tls.sendall(b"x")
    finally:
        left.close()
        thread.join(timeout=10)
        right.close()


def test_pinned_context_accepts_only_its_certificate() -> None:
    identity, other = generate_identity(), generate_identity()
    handshake(identity, identity.certificate_der)
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(other, identity.certificate_der)
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        handshake(identity, identity.certificate_der, name="someone-else")


def presented(context: ssl.SSLContext, name: str | None) -> tuple[bytes, ssl.SSLSocket]:
    """The certificate a server with `context` presents to a client sending SNI `name`, and the
    client's open connection (the caller closes it)."""
    left, right = socket.socketpair()
    server: list[ssl.SSLSocket] = []

    def serve() -> None:
        server.append(context.wrap_socket(right, server_side=True))

    thread = threading.Thread(target=serve)
    thread.start()
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    tls = client.wrap_socket(left, server_hostname=name)
    thread.join(timeout=10)
    der = tls.getpeercert(binary_form=True)
    assert der is not None
    tls.sendall(b"ping")
    assert server[0].recv(4) == b"ping"
    server[0].close()
    return der, tls


@pytest.mark.parametrize("name", [SERVER_NAME, None])
def test_a_rotating_context_presents_the_identity_current_at_each_handshake(
    name: str | None,
) -> None:
    first, second = generate_identity(), generate_identity()
    rotating = RotatingServerContext(first)
    der, before = presented(rotating.context, name)
    assert der == first.certificate_der
    rotating.use(server_context(second))
    der, after = presented(rotating.context, name)
    assert der == second.certificate_der  # with or without SNI
    # The connection made before keeps the certificate it was made with.
    assert before.getpeercert(binary_form=True) == first.certificate_der
    before.close()
    after.close()
