"""The simulated SGX platform's PKI: `veil.testing.intel_pki` under veil's shipped simulated root.

One Intel-shaped PKI implementation serves both the simulated platform and the test bed; this
module only supplies the simulated root (certificate and its public private key) and the
simulated platform's fixed identity.
"""

from __future__ import annotations

from datetime import datetime
from importlib import resources

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from veil.testing.dcap_quote import QeIdentitySpec
from veil.testing.intel_pki import CertifiedKey, IntelPki, SgxPlatform

__all__ = ["simulated_platform"]

_ORG = "veil simulation (no TEE)"


def _load_root() -> CertifiedKey:
    cert_pem = (
        resources.files("veil.attestation.verify.roots")
        .joinpath("veil_simulated_root.pem")
        .read_bytes()
    )
    key_pem = resources.files("veil.providers").joinpath("simulated_root_key.pem").read_bytes()
    cert = x509.load_pem_x509_certificate(cert_pem)
    key = load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise ValueError("veil's simulated root key does not match the simulated root certificate")
    return CertifiedKey(cert, key)


def simulated_platform(
    *,
    now: datetime,
    revoke_pck: bool,
    tcb_status: str,
    advisory_ids: tuple[str, ...],
    qe: QeIdentitySpec,
) -> SgxPlatform:
    """A fresh simulated SGX platform (random keys) under veil's simulated root."""
    pki = IntelPki(now=now, root=_load_root(), organization=_ORG)
    platform = pki.sgx_platform(tcb_status=tcb_status, advisory_ids=advisory_ids, qe=qe)
    if revoke_pck:
        pki.revoke(platform.pck.leaf.serial_number)
    return platform
