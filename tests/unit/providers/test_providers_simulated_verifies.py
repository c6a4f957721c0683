"""Simulated evidence through veil's real verifier: accepted when intact, rejected when not."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import cbor2
import pytest

from veil.attestation.abi.dcap import parse_quote
from veil.attestation.collateral_source import collateral_from_blindai_map
from veil.attestation.policy import Policy, SgxPolicy
from veil.attestation.trust import TrustStore
from veil.attestation.verifier import verify_evidence
from veil.attestation.verify.dcap import verify_dcap_quote
from veil.errors import (
    AttestationError,
    ChainError,
    ExpiredError,
    PolicyError,
    RevokedError,
    SignatureError,
    TcbError,
)
from veil.providers.measurement import simulated_measurement, simulated_mr_signer
from veil.providers.simulated import SimulatedSgxProvider

NOW = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)
REPORT_DATA = bytes(range(32))
SIM = TrustStore.simulated_only()


def make(tmp_path: Path, **kwargs: Any) -> SimulatedSgxProvider:
    return SimulatedSgxProvider(tmp_path, clock=lambda: NOW, **kwargs)


def policy(**kwargs: Any) -> Policy:
    return Policy(sgx=SgxPolicy(mr_enclave=(simulated_measurement(),)), **kwargs)


def verify(
    quote: bytes, collateral: Mapping[str, Any], *, now: datetime = NOW, **kwargs: Any
) -> Any:
    trust = kwargs.pop("trust", SIM)
    return verify_evidence(quote, collateral, policy=policy(**kwargs), trust=trust, now=now)


@pytest.fixture(scope="module")
def evidence(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, Mapping[str, Any]]:
    ev = make(tmp_path_factory.mktemp("sim")).evidence(REPORT_DATA)
    return ev.quote, ev.collateral


def test_verifies_end_to_end(evidence: tuple[bytes, Mapping[str, Any]]) -> None:
    claims = verify(*evidence)
    assert claims.simulated is True
    assert claims.tcb_status == "UpToDate"
    assert claims.advisory_ids == ()
    assert claims.debug is False
    assert claims.measurements["mr_enclave"] == simulated_measurement()
    assert claims.measurements["mr_signer"] == simulated_mr_signer()
    assert claims.report_data == REPORT_DATA + bytes(32)
    assert claims.valid_from <= NOW <= claims.valid_until


def test_collateral_survives_cbor(evidence: tuple[bytes, Mapping[str, Any]]) -> None:
    quote, collateral = evidence
    wire = cbor2.loads(cbor2.dumps(collateral))
    assert verify(quote, wire).tcb_status == "UpToDate"


def test_verifier_reads_the_pck_extensions(tmp_path: Path) -> None:
    prov = make(tmp_path)
    ev = prov.evidence(b"")
    verdict = verify_dcap_quote(
        parse_quote(ev.quote), collateral_from_blindai_map(ev.collateral), trust=SIM, now=NOW
    )
    assert verdict.fmspc == bytes.fromhex("00906ED50000")
    assert verdict.qe_tcb_status == "UpToDate"
    assert verdict.platform_tcb_status == "UpToDate"


def test_revoked_pck(tmp_path: Path) -> None:
    with pytest.raises(RevokedError):
        verify(*_pair(make(tmp_path, revoke_pck=True)))


def test_debug_enclave_refused_by_default_policy(tmp_path: Path) -> None:
    quote, collateral = _pair(make(tmp_path, debug=True))
    with pytest.raises(PolicyError, match="debug"):
        verify(quote, collateral)


def test_non_uptodate_tcb_reported_and_refused_by_default(tmp_path: Path) -> None:
    quote, collateral = _pair(
        make(tmp_path, tcb_status="SWHardeningNeeded", advisory_ids=("INTEL-SA-00615",))
    )
    with pytest.raises(TcbError):
        verify(quote, collateral)
    accepting = frozenset({"UpToDate", "SWHardeningNeeded"})
    claims = verify(quote, collateral, accepted_tcb_statuses=accepting)
    assert claims.tcb_status == "SWHardeningNeeded"
    assert claims.advisory_ids == ("INTEL-SA-00615",)


def test_expiry_of_collateral(evidence: tuple[bytes, Mapping[str, Any]]) -> None:
    quote, collateral = evidence
    claims = verify(quote, collateral)
    verify(quote, collateral, now=claims.valid_until)  # last valid second
    with pytest.raises(ExpiredError):
        verify(quote, collateral, now=claims.valid_until + timedelta(seconds=1))
    with pytest.raises(ExpiredError):
        verify(quote, collateral, now=NOW + timedelta(days=31))


def test_foreign_to_production_roots(evidence: tuple[bytes, Mapping[str, Any]]) -> None:
    with pytest.raises(ChainError):
        verify(*evidence, trust=TrustStore.production())


# Offsets into the quote: header, body (MRENCLAVE, REPORTDATA), then the signature data
# (quote signature, attestation key, QE report, QE report signature) and the PEM chain.
@pytest.mark.parametrize(
    ("offset", "error"),
    [
        (8, SignatureError),  # header: QE SVN
        (48 + 64, SignatureError),  # MRENCLAVE
        (48 + 320, SignatureError),  # REPORTDATA
        (436 + 10, SignatureError),  # quote signature
        (436 + 64 + 5, SignatureError),  # attestation key
        (436 + 128 + 64, SignatureError),  # QE report, MRENCLAVE of the QE
        (436 + 512 + 3, SignatureError),  # QE report signature
    ],
)
def test_one_byte_mutation_is_rejected(
    evidence: tuple[bytes, Mapping[str, Any]], offset: int, error: type[Exception]
) -> None:
    quote, collateral = evidence
    mutated = bytearray(quote)
    mutated[offset] ^= 0x01
    with pytest.raises(error):
        verify(bytes(mutated), collateral)


def test_mutated_certificate_in_quote_is_rejected(
    evidence: tuple[bytes, Mapping[str, Any]],
) -> None:
    quote, collateral = evidence
    # A character inside the PCK leaf's base64 (its signature area): still PEM, no longer valid.
    start = quote.index(b"-----END CERTIFICATE-----") - 20
    mutated = bytearray(quote)
    mutated[start] = ord("A") if mutated[start] != ord("A") else ord("B")
    with pytest.raises(AttestationError):
        verify(bytes(mutated), collateral)


@pytest.mark.parametrize("item", ["tcb_info", "qe_identity"])
def test_mutated_signed_collateral_is_rejected(
    evidence: tuple[bytes, Mapping[str, Any]], item: str
) -> None:
    quote, collateral = evidence
    text = collateral[item]
    mutated = dict(collateral)
    mutated[item] = text.replace('"version":', '"version": ', 1)  # same JSON, other bytes
    with pytest.raises(SignatureError):
        verify(quote, mutated)


def _pair(prov: SimulatedSgxProvider) -> tuple[bytes, Mapping[str, Any]]:
    ev = prov.evidence(REPORT_DATA)
    return ev.quote, ev.collateral
