"""configfs-tsm provider against a fake kernel (a real configfs exists only inside a TDX/SNP guest).

The fake is a small emulation on a tmp_path tree: mkdir populates the attributes the way the
kernel does, each write bumps ``generation``, and a write to ``inblob`` produces ``outblob``.
"""

from __future__ import annotations

import shutil
import struct
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from veil.attestation.claims import Platform
from veil.errors import EvidenceUnavailableError, MalformedEvidenceError
from veil.providers.configfs_tsm import (
    REPORT_DIR,
    ConfigfsTsmProvider,
    parse_snp_cert_table,
    probe_tsm_provider,
)
from veil.providers.devicefs import OsDeviceFilesystem

VCEK = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd")
VLEK = uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1")
ASK = uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782")
ARK = uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae")


def empty(quote: bytes) -> dict[str, object]:
    return {}


def tdx_quote(report_data: bytes, version: int = 4) -> bytes:
    body_start = 48 + (6 if version >= 5 else 0)
    head = struct.pack("<HHI", version, 2, 0x81).ljust(body_start, b"\0")
    return head + bytes(520) + report_data + bytes(64)


def snp_report(report_data: bytes) -> bytes:
    return bytes(0x50) + report_data + bytes(1184 - 0x90)


def cert_table(entries: list[tuple[uuid.UUID, bytes]], le: bool = False) -> bytes:
    header_size = 24 * (len(entries) + 1)
    header, blobs = b"", b""
    for guid, blob in entries:
        raw = guid.bytes_le if le else guid.bytes
        header += raw + struct.pack("<II", header_size + len(blobs), len(blob))
        blobs += blob
    return header + bytes(24) + blobs


class FakeKernel(OsDeviceFilesystem):
    """Emulates the configfs-tsm report attributes on an ordinary directory tree."""

    def __init__(
        self,
        provider: str,
        answer: Callable[[bytes], bytes],
        auxblob: bytes = b"",
        intruder_writes: int = 0,
    ) -> None:
        self.provider = provider
        self.answer = answer
        self.auxblob = auxblob
        self.intruder_writes = intruder_writes  # how many attempts another writer spoils
        self.writes: list[tuple[str, bytes]] = []
        self.removed: list[str] = []

    def mkdir(self, path: Path) -> None:
        super().mkdir(path)
        (path / "provider").write_text(self.provider + "\n")
        (path / "generation").write_text("0\n")

    def rmdir(self, path: Path) -> None:
        self.removed.append(path.name)
        shutil.rmtree(path)

    def write(self, path: Path, data: bytes) -> None:
        self.writes.append((path.name, data))
        generation = int((path.parent / "generation").read_text())
        if self.intruder_writes:
            self.intruder_writes -= 1
            generation += 1
        (path.parent / "generation").write_text(f"{generation + 1}\n")
        super().write(path, data)
        if path.name == "inblob":
            (path.parent / "outblob").write_bytes(self.answer(data))
            (path.parent / "auxblob").write_bytes(self.auxblob)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / REPORT_DIR).mkdir(parents=True)
    return tmp_path


def report_entries(root: Path) -> list[Path]:
    return list((root / REPORT_DIR).iterdir())


def test_tdx_evidence_with_fetcher(root: Path) -> None:
    kernel = FakeKernel("tdx_guest", tdx_quote)
    fetched: list[bytes] = []

    def fetcher(quote: bytes) -> dict[str, object]:
        fetched.append(quote)
        return {"version": 1, "tcb_info": "{}"}

    prov = ConfigfsTsmProvider(Platform.TDX, fs_root=root, fs=kernel, collateral_fetcher=fetcher)
    evidence = prov.evidence(b"\x07" * 32)
    assert evidence.quote == tdx_quote(b"\x07" * 32 + bytes(32))
    assert fetched == [evidence.quote]
    assert evidence.collateral["version"] == 1
    assert kernel.writes == [("inblob", b"\x07" * 32 + bytes(32))]
    assert report_entries(root) == []
    assert len(kernel.removed) == 1
    assert prov.simulated is False
    assert prov.platform is Platform.TDX


def test_tdx_v5_quote_report_data_offset(root: Path) -> None:
    kernel = FakeKernel("tdx_guest", lambda d: tdx_quote(d, version=5))
    prov = ConfigfsTsmProvider(Platform.TDX, fs_root=root, fs=kernel, collateral_fetcher=empty)
    assert prov.evidence(b"\x01").quote[:2] == b"\x05\x00"


def test_tdx_without_fetcher_is_unavailable(root: Path) -> None:
    kernel = FakeKernel("tdx_guest", tdx_quote)
    prov = ConfigfsTsmProvider(Platform.TDX, fs_root=root, fs=kernel)
    with pytest.raises(EvidenceUnavailableError, match="Intel PCS/PCCS"):
        prov.evidence(b"")
    with pytest.raises(EvidenceUnavailableError, match="no sealing key"):
        prov.sealing_key()


def test_snp_auxblob_gives_vcek_and_chain(root: Path, vectors: Path) -> None:
    base = vectors / "sev-snp/virtee-milan-vcek"
    vcek = (base / "vcek_milan.der").read_bytes()
    ask, ark = x509.load_pem_x509_certificates((base / "cert_chain_milan").read_bytes())
    ders = [c.public_bytes(Encoding.DER) for c in (ask, ark)]
    table = cert_table([(ARK, ders[1]), (VCEK, vcek), (ASK, ders[0])])
    kernel = FakeKernel("sev_guest", snp_report, auxblob=table)
    prov = ConfigfsTsmProvider(Platform.SEV_SNP, fs_root=root, fs=kernel, privlevel=0)
    evidence = prov.evidence(b"\x05" * 64)
    assert evidence.quote == snp_report(b"\x05" * 64)
    assert evidence.collateral["vcek"] == vcek
    chain = x509.load_pem_x509_certificates(evidence.collateral["cert_chain"].encode())
    assert chain == [ask, ark]
    assert kernel.writes == [("privlevel", b"0"), ("inblob", b"\x05" * 64)]


def test_snp_vlek_in_mixed_endian_table(root: Path) -> None:
    kernel = FakeKernel("sev_guest", snp_report, auxblob=cert_table([(VLEK, b"vlek")], le=True))
    prov = ConfigfsTsmProvider(Platform.SEV_SNP, fs_root=root, fs=kernel)
    assert dict(prov.evidence(b"").collateral) == {"vlek": b"vlek"}


def test_snp_without_certs_uses_fetcher_or_fails(root: Path) -> None:
    kernel = FakeKernel("sev_guest", snp_report)
    with pytest.raises(EvidenceUnavailableError, match="no VCEK/VLEK"):
        ConfigfsTsmProvider(Platform.SEV_SNP, fs_root=root, fs=kernel).evidence(b"")
    prov = ConfigfsTsmProvider(
        Platform.SEV_SNP, fs_root=root, fs=kernel, collateral_fetcher=lambda q: {"vcek": b"kds"}
    )
    assert prov.evidence(b"").collateral["vcek"] == b"kds"


def test_concurrent_writer_is_detected_and_retried(root: Path) -> None:
    kernel = FakeKernel("tdx_guest", tdx_quote, intruder_writes=2)
    prov = ConfigfsTsmProvider(Platform.TDX, fs_root=root, fs=kernel, collateral_fetcher=empty)
    prov.evidence(b"ok")
    assert len(kernel.removed) == 3  # two spoiled attempts, then a clean one
    kernel = FakeKernel("tdx_guest", tdx_quote, intruder_writes=3)
    prov = ConfigfsTsmProvider(Platform.TDX, fs_root=root, fs=kernel, collateral_fetcher=empty)
    with pytest.raises(EvidenceUnavailableError, match="another writer"):
        prov.evidence(b"ok")
    assert report_entries(root) == []


def test_wrong_provider_or_wrong_report_data(root: Path) -> None:
    kernel = FakeKernel("sev_guest", snp_report)
    prov = ConfigfsTsmProvider(Platform.TDX, fs_root=root, fs=kernel, collateral_fetcher=empty)
    with pytest.raises(EvidenceUnavailableError, match="got 'sev_guest', expected 'tdx_guest'"):
        prov.evidence(b"")
    kernel = FakeKernel("tdx_guest", lambda d: tdx_quote(bytes(64)))
    prov = ConfigfsTsmProvider(Platform.TDX, fs_root=root, fs=kernel, collateral_fetcher=empty)
    with pytest.raises(EvidenceUnavailableError, match="requested report data"):
        prov.evidence(b"\x01")
    assert report_entries(root) == []


def test_kernel_errors_become_unavailable(tmp_path: Path, root: Path) -> None:
    prov = ConfigfsTsmProvider(Platform.TDX, fs_root=tmp_path / "none", collateral_fetcher=empty)
    with pytest.raises(EvidenceUnavailableError, match="cannot create a report entry"):
        prov.evidence(b"")

    def refuse(data: bytes) -> bytes:
        raise OSError(5, "Input/output error")

    kernel = FakeKernel("tdx_guest", refuse)
    prov = ConfigfsTsmProvider(Platform.TDX, fs_root=root, fs=kernel, collateral_fetcher=empty)
    with pytest.raises(EvidenceUnavailableError, match="Input/output error"):
        prov.evidence(b"")


def test_bad_construction_arguments(root: Path) -> None:
    with pytest.raises(ValueError, match="expected tdx or sev-snp"):
        ConfigfsTsmProvider(Platform.SGX, fs_root=root)
    with pytest.raises(ValueError, match="privlevel"):
        ConfigfsTsmProvider(Platform.TDX, fs_root=root, privlevel=0)
    with pytest.raises(ValueError, match="privlevel"):
        ConfigfsTsmProvider(Platform.SEV_SNP, fs_root=root, privlevel=4)


def test_malformed_cert_tables() -> None:
    assert parse_snp_cert_table(b"") == {}
    assert parse_snp_cert_table(bytes(100)) == {}
    with pytest.raises(MalformedEvidenceError, match="runs past the end"):
        parse_snp_cert_table(VCEK.bytes + b"\x01")
    bad = VCEK.bytes + struct.pack("<II", 40, 100) + bytes(24)
    with pytest.raises(MalformedEvidenceError, match=r"covers bytes 40\.\.140"):
        parse_snp_cert_table(bad)
    table = cert_table([(ASK, b"not DER"), (VCEK, b"v")])
    assert parse_snp_cert_table(table) == {"ask": b"not DER", "vcek": b"v"}


def test_undecodable_chain_certificate_is_malformed(root: Path) -> None:
    table = cert_table([(ASK, b"not DER"), (VCEK, b"v")])
    kernel = FakeKernel("sev_guest", snp_report, auxblob=table)
    prov = ConfigfsTsmProvider(Platform.SEV_SNP, fs_root=root, fs=kernel)
    with pytest.raises(MalformedEvidenceError, match="not DER"):
        prov.evidence(b"")


def test_probe(root: Path, tmp_path: Path) -> None:
    assert probe_tsm_provider(root, FakeKernel("tdx_guest", tdx_quote)) == "tdx_guest"
    assert report_entries(root) == []
    assert probe_tsm_provider(tmp_path / "nothing") is None
    # a plain directory is not configfs: mkdir works but no provider attribute appears
    assert probe_tsm_provider(root) is None
