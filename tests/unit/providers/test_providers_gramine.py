"""Gramine provider against a fake /dev/attestation tree (real Gramine needs an SGX machine)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from veil.attestation.claims import Platform
from veil.errors import CollateralError, EvidenceUnavailableError
from veil.providers.gramine import GramineProvider
from veil.providers.simulated import SimulatedSgxProvider

NOW = datetime(2026, 6, 1, tzinfo=UTC)


def fake_gramine(root: Path, *, kind: str = "dcap", quote: bytes = b"") -> Path:
    att = root / "dev/attestation"
    (att / "keys").mkdir(parents=True)
    (att / "attestation_type").write_text(kind)
    (att / "user_report_data").write_bytes(bytes(64))
    (att / "quote").write_bytes(quote)
    (att / "keys/_sgx_mrenclave").write_bytes(bytes(range(16)))
    return att


def test_evidence_writes_report_data_and_reads_quote(tmp_path: Path) -> None:
    quote = SimulatedSgxProvider(tmp_path / "sim", clock=lambda: NOW).quote(b"\x09" * 32)
    att = fake_gramine(tmp_path, quote=quote)
    seen: list[bytes] = []

    def fetcher(q: bytes) -> dict[str, object]:
        seen.append(q)
        return {"version": 1}

    prov = GramineProvider(fs_root=tmp_path, collateral_fetcher=fetcher)
    evidence = prov.evidence(b"\x09" * 32)
    assert (att / "user_report_data").read_bytes() == b"\x09" * 32 + bytes(32)
    assert evidence.quote == quote
    assert seen == [quote]
    assert dict(evidence.collateral) == {"version": 1}
    assert prov.platform is Platform.SGX
    assert prov.simulated is False


def test_quote_for_other_report_data_is_refused(tmp_path: Path) -> None:
    quote = SimulatedSgxProvider(tmp_path / "sim", clock=lambda: NOW).quote(b"other")
    fake_gramine(tmp_path, quote=quote)
    prov = GramineProvider(fs_root=tmp_path, collateral_fetcher=lambda q: {})
    with pytest.raises(EvidenceUnavailableError, match="requested report data"):
        prov.evidence(b"mine")


def test_non_dcap_or_no_fetcher_or_no_device(tmp_path: Path) -> None:
    fake_gramine(tmp_path / "epid", kind="epid\n")
    prov = GramineProvider(fs_root=tmp_path / "epid", collateral_fetcher=lambda q: {})
    with pytest.raises(EvidenceUnavailableError, match="got 'epid', expected 'dcap'"):
        prov.evidence(b"")
    fake_gramine(tmp_path / "dcap")
    with pytest.raises(EvidenceUnavailableError, match="no collateral fetcher"):
        GramineProvider(fs_root=tmp_path / "dcap").evidence(b"")
    with pytest.raises(EvidenceUnavailableError, match="cannot read"):
        GramineProvider(fs_root=tmp_path / "absent").evidence(b"")


def test_sealing_key_is_hkdf_of_the_mrenclave_key(tmp_path: Path) -> None:
    att = fake_gramine(tmp_path)
    key = GramineProvider(fs_root=tmp_path).sealing_key()
    expected = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=None,
        info=b"veil sealing key v1: AES-256-GCM model store",
    ).derive(bytes(range(16)))
    assert key == expected
    (att / "keys/_sgx_mrenclave").write_bytes(bytes(16))
    assert GramineProvider(fs_root=tmp_path).sealing_key() != key
    (att / "keys/_sgx_mrenclave").write_bytes(bytes(32))
    with pytest.raises(EvidenceUnavailableError, match="got 32 bytes, expected 16"):
        GramineProvider(fs_root=tmp_path).sealing_key()


def test_fetcher_failures_are_typed(tmp_path: Path) -> None:
    quote = SimulatedSgxProvider(tmp_path / "sim", clock=lambda: NOW).quote(b"r")
    fake_gramine(tmp_path, quote=quote)

    def down(q: bytes) -> dict[str, object]:
        raise ConnectionError("https://pccs.example/?key=secret refused")

    prov = GramineProvider(fs_root=tmp_path, collateral_fetcher=down)
    with pytest.raises(EvidenceUnavailableError, match="failed with ConnectionError") as info:
        prov.evidence(b"r")
    assert "secret" not in str(info.value)
    prov = GramineProvider(fs_root=tmp_path, collateral_fetcher=lambda q: [1, 2])  # type: ignore[arg-type,return-value]
    with pytest.raises(EvidenceUnavailableError, match="got list, expected a mapping"):
        prov.evidence(b"r")

    def refuses(q: bytes) -> dict[str, object]:
        raise CollateralError("PCS has no TCB info for this FMSPC")

    prov = GramineProvider(fs_root=tmp_path, collateral_fetcher=refuses)
    with pytest.raises(CollateralError, match="FMSPC"):
        prov.evidence(b"r")
