"""The simulated SGX provider's output, checked against Intel's formats independently of veil's
verifier: byte layout of the quote v3 (mirroring the real dcap-qvl vector), every signature, the
certificate chain, the CRLs and the TCB-info / QE-identity JSON."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from veil.attestation.claims import Platform
from veil.errors import EvidenceUnavailableError
from veil.providers.base import EvidenceProvider
from veil.providers.measurement import simulated_measurement, simulated_mr_signer
from veil.providers.simulated import SimulatedSgxProvider

NOW = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)
SGX_EXT = x509.ObjectIdentifier("1.2.840.113741.1.13.1")


def split_quote(quote: bytes) -> dict[str, bytes]:
    """Intel SGX ECDSA Quote Library API, Quote Format A.4: header 48, body 384, signature data."""
    (sig_len,) = struct.unpack_from("<I", quote, 432)
    sig = quote[436 : 436 + sig_len]
    assert len(quote) == 436 + sig_len
    (auth_len,) = struct.unpack_from("<H", sig, 576)
    cert_type, cert_len = struct.unpack_from("<HI", sig, 578 + auth_len)
    cert_start = 584 + auth_len
    assert cert_start + cert_len == len(sig)
    return {
        "header": quote[:48],
        "body": quote[48:432],
        "signature": sig[:64],
        "att_key": sig[64:128],
        "qe_report": sig[128:512],
        "qe_report_signature": sig[512:576],
        "auth_data": sig[578 : 578 + auth_len],
        "cert_type": cert_type.to_bytes(2, "little"),
        "certs": sig[cert_start:],
    }


def verify_raw(key: ec.EllipticCurvePublicKey, signature: bytes, data: bytes) -> None:
    r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    key.verify(encode_dss_signature(r, s), data, ec.ECDSA(hashes.SHA256()))


def point(raw: bytes) -> ec.EllipticCurvePublicKey:
    return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + raw)


def signed_json(text: str, outer: str) -> tuple[str, bytes]:
    prefix = f'{{"{outer}":'
    assert text.startswith(prefix)
    inner, _, tail = text[len(prefix) :].rpartition(',"signature":"')
    assert tail.endswith('"}')
    return inner, bytes.fromhex(tail[:-2])


@pytest.fixture(scope="module")
def provider(tmp_path_factory: pytest.TempPathFactory) -> SimulatedSgxProvider:
    return SimulatedSgxProvider(tmp_path_factory.mktemp("sim"), clock=lambda: NOW)


def test_is_an_evidence_provider(provider: SimulatedSgxProvider) -> None:
    assert isinstance(provider, EvidenceProvider)
    assert provider.platform is Platform.SGX
    assert provider.simulated is True


def test_quote_layout_matches_the_real_v3_vector(
    provider: SimulatedSgxProvider, vectors: Path
) -> None:
    real = split_quote((vectors / "sgx/dcap-qvl-sgx-v3/sgx_quote").read_bytes())
    ours = split_quote(provider.evidence(b"hello").quote)
    for part in ("header", "body", "signature", "att_key", "qe_report", "qe_report_signature"):
        assert len(ours[part]) == len(real[part])
    assert ours["cert_type"] == real["cert_type"] == b"\x05\x00"
    assert ours["auth_data"] == real["auth_data"]
    header = ours["header"]
    version, key_type, tee_type = struct.unpack_from("<HHI", header, 0)
    assert (version, key_type, tee_type) == (3, 2, 0)
    assert header[12:28] == bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")


def test_report_body_fields(provider: SimulatedSgxProvider) -> None:
    body = split_quote(provider.evidence(b"\x01" * 32).quote)["body"]
    assert body[64:96] == simulated_measurement() == provider.mr_enclave
    assert body[128:160] == simulated_mr_signer() == provider.mr_signer
    assert struct.unpack_from("<HH", body, 256) == (0, 1)
    assert body[48] & 0x02 == 0  # DEBUG clear
    assert body[320:384] == b"\x01" * 32 + bytes(32)


def test_mr_signer_is_hash_of_root_point() -> None:
    root = x509.load_pem_x509_certificate(
        (
            Path(__file__).resolve().parents[3]
            / "src/veil/attestation/verify/roots/veil_simulated_root.pem"
        ).read_bytes()
    )
    key = root.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    numbers = key.public_numbers()
    xy = numbers.x.to_bytes(32, "big") + numbers.y.to_bytes(32, "big")
    assert simulated_mr_signer() == hashlib.sha256(xy).digest()


def test_debug_sets_the_debug_attribute(tmp_path: Path) -> None:
    quote = SimulatedSgxProvider(tmp_path, debug=True, clock=lambda: NOW).quote(b"")
    body = split_quote(quote)["body"]
    assert body[48] == 0x07  # INIT | DEBUG | MODE64BIT


def test_custom_mr_enclave_and_bad_inputs(tmp_path: Path) -> None:
    quote = SimulatedSgxProvider(tmp_path, mr_enclave=b"\xaa" * 32, clock=lambda: NOW).quote(b"")
    assert quote[48 + 64 : 48 + 96] == b"\xaa" * 32
    with pytest.raises(ValueError, match="mr_enclave: got 31 bytes"):
        SimulatedSgxProvider(tmp_path, mr_enclave=bytes(31))
    with pytest.raises(ValueError, match="tcb_status"):
        SimulatedSgxProvider(tmp_path, tcb_status="Fine")
    with pytest.raises(ValueError, match="naive"):
        SimulatedSgxProvider(tmp_path, clock=lambda: datetime(2026, 1, 2))


def test_report_data_longer_than_64_is_refused(provider: SimulatedSgxProvider) -> None:
    with pytest.raises(ValueError, match="got 65 bytes"):
        provider.evidence(bytes(65))
    with pytest.raises(TypeError):
        provider.evidence("text")  # type: ignore[arg-type]


def test_every_signature_and_binding(provider: SimulatedSgxProvider) -> None:
    parts = split_quote(provider.evidence(b"binding").quote)
    header, body, att = parts["header"], parts["body"], parts["att_key"]
    qe_report, auth, certs = parts["qe_report"], parts["auth_data"], parts["certs"]
    verify_raw(point(att), parts["signature"], header + body)
    pck, platform_ca, root = x509.load_pem_x509_certificates(certs)
    pck_key = pck.public_key()
    assert isinstance(pck_key, ec.EllipticCurvePublicKey)
    verify_raw(pck_key, parts["qe_report_signature"], qe_report)
    assert qe_report[320:352] == hashlib.sha256(att + auth).digest()
    assert qe_report[352:384] == bytes(32)
    pck.verify_directly_issued_by(platform_ca)
    platform_ca.verify_directly_issued_by(root)
    root.verify_directly_issued_by(root)
    assert "PCK Platform CA" in platform_ca.subject.rfc4514_string()
    ext = pck.extensions.get_extension_for_oid(SGX_EXT)
    assert not ext.critical


def test_mutated_quote_signature_fails(provider: SimulatedSgxProvider) -> None:
    parts = split_quote(provider.evidence(b"x").quote)
    body = bytearray(parts["body"])
    body[64] ^= 1
    with pytest.raises(InvalidSignature):
        verify_raw(
            point(parts["att_key"]),
            parts["signature"],
            parts["header"] + bytes(body),
        )


def test_collateral_map_shape_and_signatures(provider: SimulatedSgxProvider) -> None:
    col = provider.evidence(b"").collateral
    assert set(col) == {
        "version",
        "pck_certificate",
        "pck_crl_issuer_chain",
        "pck_signing_chain",
        "root_ca_crl",
        "pck_crl",
        "tcb_info",
        "tcb_info_issuer_chain",
        "qe_identity",
        "qe_identity_issuer_chain",
    }
    assert col["version"] == 3
    assert all(isinstance(v, str) for k, v in col.items() if k != "version")
    tcb_signing, root = x509.load_pem_x509_certificates(col["tcb_info_issuer_chain"].encode())
    tcb_signing.verify_directly_issued_by(root)
    key = tcb_signing.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    for name, outer in (("tcb_info", "tcbInfo"), ("qe_identity", "enclaveIdentity")):
        inner, signature = signed_json(col[name], outer)
        verify_raw(key, signature, inner.encode())
        assert json.loads(col[name])[outer] == json.loads(inner)

    platform_ca, root2 = x509.load_pem_x509_certificates(col["pck_crl_issuer_chain"].encode())
    pck_crl = x509.load_pem_x509_crl(col["pck_crl"].encode())
    root_crl = x509.load_pem_x509_crl(col["root_ca_crl"].encode())
    ca_key, root_key = platform_ca.public_key(), root2.public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey)
    assert isinstance(root_key, ec.EllipticCurvePublicKey)
    assert pck_crl.is_signature_valid(ca_key)
    assert root_crl.is_signature_valid(root_key)
    pck = x509.load_pem_x509_certificate(col["pck_certificate"].encode())
    assert pck_crl.get_revoked_certificate_by_serial_number(pck.serial_number) is None
    assert pck_crl.next_update_utc is not None
    assert pck_crl.last_update_utc <= NOW < pck_crl.next_update_utc


def _tcb(col: Mapping[str, Any]) -> dict[str, Any]:
    tcb: dict[str, Any] = json.loads(col["tcb_info"])["tcbInfo"]
    return tcb


def test_tcb_info_and_qe_identity_match_the_platform(provider: SimulatedSgxProvider) -> None:
    evidence = provider.evidence(b"")
    tcb = _tcb(evidence.collateral)
    assert (tcb["id"], tcb["version"], tcb["tcbType"]) == ("SGX", 3, 0)
    issue = datetime.fromisoformat(str(tcb["issueDate"]))
    next_update = datetime.fromisoformat(str(tcb["nextUpdate"]))
    assert issue <= NOW < next_update
    assert next_update - issue == timedelta(days=30)
    pck = x509.load_pem_x509_certificate(evidence.collateral["pck_certificate"].encode())
    ext_der = pck.extensions.get_extension_for_oid(SGX_EXT).value.public_bytes()
    assert bytes.fromhex(str(tcb["fmspc"])) in ext_der  # FMSPC OCTET STRING is in the extension
    levels = tcb["tcbLevels"]
    assert isinstance(levels, list)
    assert levels[0]["tcbStatus"] == "UpToDate"

    qe = json.loads(evidence.collateral["qe_identity"])["enclaveIdentity"]
    assert (qe["id"], qe["version"]) == ("QE", 2)
    qe_report = split_quote(evidence.quote)["qe_report"]
    attributes = bytes(
        a & m for a, m in zip(qe_report[48:64], bytes.fromhex(qe["attributesMask"]), strict=False)
    )
    assert attributes == bytes.fromhex(qe["attributes"])
    assert qe_report[128:160] == bytes.fromhex(qe["mrsigner"])
    assert struct.unpack_from("<HH", qe_report, 256) == (qe["isvprodid"], 8)
    assert qe["tcbLevels"][0]["tcb"]["isvsvn"] <= 8


def test_requested_tcb_status_is_the_matching_level(tmp_path: Path) -> None:
    prov = SimulatedSgxProvider(
        tmp_path,
        clock=lambda: NOW,
        tcb_status="SWHardeningNeeded",
        advisory_ids=("INTEL-SA-00615",),
    )
    tcb = _tcb(prov.evidence(b"").collateral)
    levels = tcb["tcbLevels"]
    assert isinstance(levels, list)
    statuses = [level["tcbStatus"] for level in levels]
    assert statuses == ["UpToDate", "SWHardeningNeeded", "OutOfDate"]
    # The platform's CPUSVN bytes are its sixteen component SVNs (header of the quote body).
    cpu_svn = prov.quote(b"")[48:64]
    first_reached = next(
        level
        for level in levels
        if all(cpu_svn[i] >= c["svn"] for i, c in enumerate(level["tcb"]["sgxtcbcomponents"]))
    )
    assert first_reached["tcbStatus"] == "SWHardeningNeeded"
    assert first_reached["advisoryIDs"] == ["INTEL-SA-00615"]


def test_revoke_pck_lists_the_leaf(tmp_path: Path) -> None:
    prov = SimulatedSgxProvider(tmp_path, clock=lambda: NOW, revoke_pck=True)
    col = prov.evidence(b"").collateral
    pck = x509.load_pem_x509_certificate(col["pck_certificate"].encode())
    crl = x509.load_pem_x509_crl(col["pck_crl"].encode())
    assert crl.get_revoked_certificate_by_serial_number(pck.serial_number) is not None


def test_evidence_is_fresh_keys_are_stable(provider: SimulatedSgxProvider) -> None:
    a, b = split_quote(provider.quote(b"same")), split_quote(provider.quote(b"same"))
    assert a["att_key"] == b["att_key"]
    assert a["certs"] == b["certs"]
    assert a["signature"] != b["signature"]  # ECDSA signs with a fresh nonce per quote


def test_collateral_is_reissued_when_a_day_old(tmp_path: Path) -> None:
    now = [NOW]
    prov = SimulatedSgxProvider(tmp_path, clock=lambda: now[0])
    first = prov.collateral_map()
    now[0] = NOW + timedelta(hours=23)
    assert prov.collateral_map() is first
    now[0] = NOW + timedelta(days=29)
    later = _tcb(prov.collateral_map())
    assert datetime.fromisoformat(str(later["nextUpdate"])) > now[0] + timedelta(days=28)


def test_sealing_key_created_0600_and_reused(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    prov = SimulatedSgxProvider(data_dir, clock=lambda: NOW)
    key = prov.sealing_key()
    assert len(key) == 32
    assert os.stat(data_dir / "sealing.key").st_mode & 0o777 == 0o600
    assert prov.sealing_key() == key
    assert SimulatedSgxProvider(data_dir, clock=lambda: NOW).sealing_key() == key
    assert SimulatedSgxProvider(tmp_path / "other", clock=lambda: NOW).sealing_key() != key


def test_sealing_key_with_loose_mode_or_bad_size_is_refused(tmp_path: Path) -> None:
    prov = SimulatedSgxProvider(tmp_path, clock=lambda: NOW)
    path = tmp_path / "sealing.key"
    path.write_bytes(bytes(32))
    path.chmod(0o644)
    with pytest.raises(EvidenceUnavailableError, match="mode got 0644, expected 0600"):
        prov.sealing_key()
    path.chmod(0o600)
    path.write_bytes(bytes(31))
    with pytest.raises(EvidenceUnavailableError, match="got 31 bytes, expected 32"):
        prov.sealing_key()
    path.unlink()
    path.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(EvidenceUnavailableError, match="not a regular file"):
        prov.sealing_key()


def test_sealing_key_concurrent_first_use_agrees(tmp_path: Path) -> None:
    providers = [SimulatedSgxProvider(tmp_path, clock=lambda: NOW) for _ in range(8)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        keys = set(pool.map(lambda p: p.sealing_key(), providers))
    assert len(keys) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sealing.key"]  # no temp files left
