"""Trust anchors: the vendor roots embedded in veil, each pinned by its SHA-256 fingerprint.

A root that arrives with evidence is never trusted; chains must end in one of these certificates.
The simulated root belongs to veil's development platform: its private key ships in the package,
so anything can be signed with it. It is trusted only through `TrustStore.simulated()`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from types import MappingProxyType

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from veil.errors import ChainError

__all__ = ["PINNED_FINGERPRINTS", "TrustStore", "load_embedded_root"]

# SHA-256 of each root's DER encoding; see tests/testdata/attestation-vectors/README.md for provenance.
PINNED_FINGERPRINTS: Mapping[str, str] = MappingProxyType(
    {
        "intel_sgx_root_ca.pem": "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3",
        "amd_ark_milan.pem": "69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd",
        "amd_ark_genoa.pem": "4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1",
        "amd_ark_turin.pem": "1f084161a44bb6d93778a904877d4819cafa5d05ef4193b2ded9dd9c73dd3f6a",
        "veil_simulated_root.pem": (
            "5f3a11ed26330ce8c5b5f6b9ad7d72279643b44393aaabe9c19bafdea89e5073"
        ),
    }
)


def load_embedded_root(name: str) -> x509.Certificate:
    """Load an embedded root certificate and check it against its pinned fingerprint."""
    expected = PINNED_FINGERPRINTS[name]
    pem = resources.files("veil.attestation.verify.roots").joinpath(name).read_bytes()
    cert = x509.load_pem_x509_certificate(pem)
    got = hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()
    if got != expected:
        raise ChainError(f"embedded root {name}: fingerprint got {got}, expected {expected}")
    return cert


@dataclass(frozen=True, slots=True)
class TrustStore:
    """The roots a verifier accepts.

    Attributes:
        intel_root: root of SGX and TDX PCK chains, TCB-info and QE-identity signing chains.
        amd_arks: AMD root keys by product name ("Milan", "Genoa", "Turin").
        simulated: true when `intel_root` is veil's simulated root; results are marked simulated.
    """

    intel_root: x509.Certificate
    amd_arks: Mapping[str, x509.Certificate] = field(default_factory=dict)
    simulated: bool = False

    @classmethod
    def production(cls) -> TrustStore:
        """The vendors' production roots: Intel SGX Root CA, AMD ARK Milan/Genoa/Turin."""
        return cls(
            intel_root=load_embedded_root("intel_sgx_root_ca.pem"),
            amd_arks=MappingProxyType(
                {
                    "Milan": load_embedded_root("amd_ark_milan.pem"),
                    "Genoa": load_embedded_root("amd_ark_genoa.pem"),
                    "Turin": load_embedded_root("amd_ark_turin.pem"),
                }
            ),
        )

    @classmethod
    def simulated_only(cls) -> TrustStore:
        """veil's simulated root, whose key is public. Trusting it means trusting anyone."""
        return cls(intel_root=load_embedded_root("veil_simulated_root.pem"), simulated=True)
