"""Emulated state directories: what a test writes is what the server process rebuilds."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from veil.attestation.abi.dcap import parse_quote
from veil.attestation.abi.snp import SnpTcb
from veil.testing.intel_pki import IntelPki
from veil.testing.state import EmulatedState, load_devices

NOW = datetime(2026, 3, 1, 12, 30, 15, 123456, tzinfo=UTC)


def test_round_trip(tmp_path: Path) -> None:
    state = EmulatedState(
        platform="sev-snp",
        seed=b"s",
        now=NOW,
        measurement=bytes(range(48)),
        debug=True,
        product="Genoa",
        host_certificates={"vcek": b"V", "ask": b"A"},
        vlek_csp_id=None,
        chip_id=bytes(64),
        snp_tcb=SnpTcb(bootloader=1, tee=2, snp=3, microcode=4, fmc=5),
    )
    assert EmulatedState.read(state.write(tmp_path / "st")) == state


def test_invalid_state_is_refused() -> None:
    with pytest.raises(ValueError, match="platform"):
        EmulatedState(platform="sev", seed=b"", now=NOW, measurement=bytes(48))
    with pytest.raises(ValueError, match="measurement: got 48 bytes, expected 32"):
        EmulatedState(platform="sgx", seed=b"", now=NOW, measurement=bytes(48))


def test_server_side_pki_matches_the_tests(tmp_path: Path) -> None:
    # The server process rebuilds the PKI from the seed: its quote must carry the very PCK
    # chain the test's PKI issued, or CRL issuer checks would fail.
    state = EmulatedState(platform="sgx", seed=b"same", now=NOW, measurement=bytes(32))
    devices = load_devices(state.write(tmp_path))
    quote = parse_quote(devices.read(Path("/dev/attestation/quote")))
    expected = IntelPki(now=NOW, seed=b"same").sgx_platform().pck.chain_pem
    assert quote.pck_chain_pem == expected.encode()
