"""Trust anchors: the vendor roots embedded in veil, each pinned by its SHA-256 fingerprint.

A root that arrives with evidence is never trusted; chains must end in one of these certificates.
The simulated root belongs to veil's development platform: its private key ships in the package,
so anything can be signed with it. It is trusted only through `TrustStore.simulated_only()`.
Test PKIs (the emulated platforms of `veil.testing`) are trusted only through
`TrustStore.hazmat_test_roots()`, which warns.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from types import MappingProxyType

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from veil.errors import ChainError, HazmatWarning

__all__ = ["PINNED_FINGERPRINTS", "TrustStore", "load_embedded_root"]

# SHA-256 of each root's DER encoding; provenance: tests/testdata/attestation-vectors/README.md.
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
        hazmat_test: true for a store of test roots (`hazmat_test_roots`): nothing it accepts
            was produced by Intel or AMD hardware.
    """

    intel_root: x509.Certificate
    amd_arks: Mapping[str, x509.Certificate] = field(default_factory=dict)
    simulated: bool = False
    hazmat_test: bool = False

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

    @classmethod
    def hazmat_test_roots(
        cls,
        *,
        intel_root: x509.Certificate | None = None,
        amd_arks: Mapping[str, x509.Certificate] | None = None,
    ) -> TrustStore:
        """HAZMAT: trust the roots of a test PKI instead of Intel's and AMD's. Warns.

        For tests against emulated TEEs (`veil.testing`): whoever holds these roots' keys can
        make any evidence verify. veil's simulated root is refused here: a simulated server is
        accepted only through ``simulation=True``.

        Example::

            trust = TrustStore.hazmat_test_roots(intel_root=pki.root, amd_arks={"Milan": ark})
            veil.connect(host, policy=policy, trust=trust)

        Args:
            intel_root: root of the test PCK, TCB-info and QE-identity chains (SGX, TDX).
            amd_arks: test AMD root keys by product name ("Milan", "Genoa", "Turin").

        Raises:
            ValueError: no root given, or a root is veil's simulated root.
        """
        arks = dict(amd_arks or {})
        if intel_root is None and not arks:
            raise ValueError("hazmat_test_roots: got no root, expected intel_root or amd_arks")
        simulated_fingerprint = PINNED_FINGERPRINTS["veil_simulated_root.pem"]
        for name, cert in [("intel_root", intel_root), *arks.items()]:
            if cert is None:
                continue
            got = hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()
            if got == simulated_fingerprint:
                raise ValueError(
                    f"hazmat_test_roots {name}: got veil's simulated root, expected a test PKI "
                    "root (connect with simulation=True for a simulated server)"
                )
        warnings.warn(
            "veil: hazmat_test_roots: trusting test roots instead of Intel's and AMD's; "
            "evidence they accept proves nothing about real hardware",
            HazmatWarning,
            stacklevel=2,
        )
        # Without an Intel test root, SGX/TDX evidence must still chain to Intel's real root.
        root = intel_root or load_embedded_root("intel_sgx_root_ca.pem")
        return cls(intel_root=root, amd_arks=MappingProxyType(arks), hazmat_test=True)
