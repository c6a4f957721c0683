"""Test roots are trusted only through a warning, hazmat-named store; never the simulated root."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

import veil
from veil.attestation.trust import TrustStore, load_embedded_root
from veil.errors import HazmatWarning


def self_signed(name: str) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name.from_rfc4514_string(f"CN={name}")
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )


def test_hazmat_test_roots_warn_and_hold_the_given_roots() -> None:
    intel, ark = self_signed("test intel root"), self_signed("test ark")
    with pytest.warns(HazmatWarning, match="test roots"):
        store = TrustStore.hazmat_test_roots(intel_root=intel, amd_arks={"Milan": ark})
    assert store.intel_root == intel
    assert dict(store.amd_arks) == {"Milan": ark}
    assert store.hazmat_test
    assert not store.simulated
    assert not TrustStore.production().hazmat_test


def test_amd_only_store_keeps_intels_real_root() -> None:
    with pytest.warns(HazmatWarning):
        store = TrustStore.hazmat_test_roots(amd_arks={"Genoa": self_signed("ark")})
    assert store.intel_root == TrustStore.production().intel_root


def test_simulated_root_and_empty_store_are_refused() -> None:
    simulated = load_embedded_root("veil_simulated_root.pem")
    with pytest.raises(ValueError, match="simulated root"):
        TrustStore.hazmat_test_roots(intel_root=simulated)
    with pytest.raises(ValueError, match="simulated root"):
        TrustStore.hazmat_test_roots(amd_arks={"Milan": simulated})
    with pytest.raises(ValueError, match="got no root"):
        TrustStore.hazmat_test_roots()


def test_connection_refuses_trust_with_simulation_or_the_simulated_store() -> None:
    policy = veil.Policy(sgx=veil.SgxPolicy(mr_enclave=(bytes(32),)))
    with pytest.warns(HazmatWarning):
        store = TrustStore.hazmat_test_roots(intel_root=self_signed("r"))
    # refused before any connection is attempted (port 9 is discard: nothing listens there)
    with pytest.raises(ValueError, match="got both"):
        veil.connect("127.0.0.1", simulation=True, trust=store, unattested_port=9)
    with pytest.raises(ValueError, match="simulated root"):
        veil.connect(
            "127.0.0.1", policy=policy, trust=TrustStore.simulated_only(), unattested_port=9
        )
