"""Emulated configfs-tsm and /dev/attestation: the kernel's and Gramine's answers, and the
production providers running unchanged on them.

The signers here only lay report data where the formats put it; signatures are the test PKI's
business (tests/integration/test_emulated_platforms.py verifies them end to end).
"""

from __future__ import annotations

import errno
import struct
from pathlib import Path

import pytest

from veil.attestation.abi import snp as snp_abi
from veil.attestation.abi.dcap import quote_report_data
from veil.attestation.claims import Platform
from veil.errors import EvidenceUnavailableError, MalformedEvidenceError
from veil.providers import ConfigfsTsmProvider, GramineProvider, detect_provider
from veil.providers.configfs_tsm import REPORT_DIR, parse_snp_cert_table, probe_tsm_provider
from veil.testing.devices import EmulatedDevices, EmulatedGramine, EmulatedTsm, snp_cert_table

ROOT = Path("/")
REPORTS = ROOT / REPORT_DIR
ATTESTATION = ROOT / "dev/attestation"
CERTS = {"vcek": b"\x30\x01v", "ask": b"\x30\x01a", "ark": b"\x30\x01r"}


def tdx_quote(report_data: bytes, version: int = 4) -> bytes:
    head = struct.pack("<HHI", version, 2, 0x81).ljust(48, b"\0")
    descriptor = struct.pack("<HI", 2, 584) if version == 5 else b""
    return head + descriptor + bytes(520) + report_data + bytes(64 + 4)


def sgx_quote(report_data: bytes) -> bytes:
    return struct.pack("<HHI", 3, 2, 0).ljust(48, b"\0") + bytes(320) + report_data + bytes(4)


class SnpSigner:
    def __init__(self) -> None:
        self.vmpls: list[int] = []

    def __call__(self, report_data: bytes, vmpl: int) -> bytes:
        self.vmpls.append(vmpl)
        report = bytearray(snp_abi.SNP_REPORT_SIZE)
        report[snp_abi.REPORT_DATA] = report_data
        return bytes(report)


def tdx_devices() -> EmulatedDevices:
    return EmulatedDevices(tsm=EmulatedTsm(quote_signer=tdx_quote))


def snp_devices(certs: dict[str, bytes] | None = CERTS, floor: int = 0) -> EmulatedDevices:
    return EmulatedDevices(
        tsm=EmulatedTsm(snp_signer=SnpSigner(), host_certificates=certs, privlevel_floor=floor)
    )


def os_error(code: int) -> pytest.RaisesExc[OSError]:
    return pytest.raises(OSError, match=rf"\[Errno {code}\]")


def test_report_entry_lifecycle_and_attributes() -> None:
    fs = snp_devices()
    entry = REPORTS / "one"
    assert fs.is_dir(REPORTS)
    assert fs.is_dir(ROOT / "sys")
    assert not fs.is_dir(entry)
    fs.mkdir(entry)
    assert fs.is_dir(entry)
    assert fs.read(entry / "provider") == b"sev_guest\n"
    assert fs.read(entry / "generation") == b"0\n"
    assert fs.read(entry / "privlevel_floor") == b"0\n"
    fs.write(entry / "privlevel", b"2\n")
    fs.write(entry / "inblob", b"\x07" * 32)
    assert fs.read(entry / "generation") == b"2\n"
    outblob = fs.read(entry / "outblob")
    assert outblob[snp_abi.REPORT_DATA] == b"\x07" * 32 + bytes(32)  # zero-padded like the kernel
    assert parse_snp_cert_table(fs.read(entry / "auxblob")) == CERTS
    fs.rmdir(entry)
    assert not fs.is_dir(entry)
    with os_error(errno.ENOENT):
        fs.read(entry / "outblob")


def test_outblob_is_generated_once_per_write() -> None:
    fs = tdx_devices()
    assert fs.tsm is not None
    entry = REPORTS / "cached"
    fs.mkdir(entry)
    fs.write(entry / "inblob", b"\x01" * 64)
    first = fs.read(entry / "outblob")
    assert fs.read(entry / "outblob") == first
    assert fs.tsm.reports_generated == 1
    fs.write(entry / "inblob", b"\x02" * 64)
    assert quote_report_data(fs.read(entry / "outblob")) == b"\x02" * 64
    assert fs.tsm.reports_generated == 2


def test_kernel_errors() -> None:
    fs = snp_devices(floor=1)
    entry = REPORTS / "e"
    fs.mkdir(entry)
    with os_error(errno.EEXIST):
        fs.mkdir(entry)
    with os_error(errno.EFBIG):  # configfs refuses to grow inblob past 64 bytes
        fs.write(entry / "inblob", bytes(65))
    for bad in (b"0", b"4", b"x"):  # below the floor, above 3, not a number
        with os_error(errno.EINVAL):
            fs.write(entry / "privlevel", bad)
    with os_error(errno.EACCES):
        fs.read(entry / "inblob")
    with os_error(errno.EACCES):
        fs.write(entry / "outblob", b"")
    with os_error(errno.EPERM):
        fs.mkdir(ROOT / "sys/kernel/config/tsm/elsewhere")
    with os_error(errno.ENOENT):
        fs.rmdir(REPORTS / "never")
    assert fs.read(entry / "generation") == b"0\n"  # refused writes count for nothing


def test_generation_wrap_is_busy() -> None:
    fs = tdx_devices()
    assert fs.tsm is not None
    entry = REPORTS / "wrap"
    fs.mkdir(entry)
    fs.write(entry / "inblob", b"")
    fs.read(entry / "outblob")  # read generation 1
    fs.tsm._reports["wrap"].write_generation = 0  # as after 2**64 - 1 unread writes
    with os_error(errno.EBUSY):
        fs.write(entry / "inblob", b"")


def test_tdx_has_no_snp_attributes() -> None:
    fs = tdx_devices()
    entry = REPORTS / "t"
    fs.mkdir(entry)
    assert fs.read(entry / "provider") == b"tdx_guest\n"
    for name in ("privlevel_floor", "auxblob"):
        with os_error(errno.ENOENT):
            fs.read(entry / name)
    with os_error(errno.ENOENT):
        fs.write(entry / "privlevel", b"0")


def test_unbound_driver() -> None:
    fs = tdx_devices()
    assert fs.tsm is not None
    entry = REPORTS / "gone"
    fs.mkdir(entry)
    fs.tsm.unregister()
    with os_error(errno.ENXIO):
        fs.mkdir(REPORTS / "new")
    with os_error(errno.ENXIO):
        fs.read(entry / "provider")
    with os_error(errno.ENOTTY):
        fs.read(entry / "outblob")
    provider = ConfigfsTsmProvider(Platform.TDX, fs=fs, collateral_fetcher=lambda q: {})
    with pytest.raises(EvidenceUnavailableError, match="cannot create a report entry"):
        provider.evidence(b"x")


def test_cert_table_round_trip_and_names() -> None:
    table = snp_cert_table({"vlek": b"L", "ark": b"R"})
    assert table[:16] == bytes.fromhex("a8074bc2a25a483eaae639c045a0b8a1")
    assert parse_snp_cert_table(table) == {"vlek": b"L", "ark": b"R"}
    with pytest.raises(ValueError, match="certificate names"):
        snp_cert_table({"pck": b"x"})


@pytest.mark.parametrize("version", [4, 5])
def test_production_tdx_provider_on_emulated_kernel(version: int) -> None:
    fs = EmulatedDevices(tsm=EmulatedTsm(quote_signer=lambda d: tdx_quote(d, version)))
    fetched: list[bytes] = []

    def fetcher(quote: bytes) -> dict[str, object]:
        fetched.append(quote)
        return {"version": 4}

    provider = detect_provider("auto", data_dir=Path("unused"), fs=fs, collateral_fetcher=fetcher)
    assert isinstance(provider, ConfigfsTsmProvider)
    assert provider.platform is Platform.TDX
    evidence = provider.evidence(b"\x05" * 32)
    assert quote_report_data(evidence.quote) == b"\x05" * 32 + bytes(32)
    assert fetched == [evidence.quote]
    assert fs.tsm is not None
    assert fs.tsm.entries() == []


def test_production_snp_provider_on_emulated_kernel() -> None:
    signer = SnpSigner()
    fs = EmulatedDevices(tsm=EmulatedTsm(snp_signer=signer, host_certificates={"vcek": b"V"}))
    provider = ConfigfsTsmProvider(Platform.SEV_SNP, fs=fs, privlevel=1)
    assert probe_tsm_provider(ROOT, fs) == "sev_guest"
    evidence = provider.evidence(b"\x09" * 64)
    assert evidence.quote[snp_abi.REPORT_DATA] == b"\x09" * 64
    assert signer.vmpls == [1]
    assert evidence.collateral == {"vcek": b"V"}


def test_snp_host_without_certificates_needs_a_fetcher() -> None:
    fs = snp_devices(certs=None)
    entry = REPORTS / "bare"
    fs.mkdir(entry)
    assert fs.read(entry / "auxblob") == b""
    with pytest.raises(EvidenceUnavailableError, match="no VCEK/VLEK"):
        ConfigfsTsmProvider(Platform.SEV_SNP, fs=fs).evidence(b"")
    got = ConfigfsTsmProvider(
        Platform.SEV_SNP, fs=fs, collateral_fetcher=lambda q: {"vcek": b"K"}
    ).evidence(b"")
    assert got.collateral == {"vcek": b"K"}


def test_snp_privlevel_below_floor_is_refused_by_the_kernel() -> None:
    provider = ConfigfsTsmProvider(Platform.SEV_SNP, fs=snp_devices(floor=2), privlevel=1)
    with pytest.raises(EvidenceUnavailableError, match="refused the report request"):
        provider.evidence(b"")


def gramine(kind: str = "dcap") -> EmulatedDevices:
    return EmulatedDevices(
        gramine=EmulatedGramine(
            quote_signer=sgx_quote, sealing_key=bytes(range(16)), attestation_type=kind
        )
    )


def test_gramine_files() -> None:
    fs = gramine()
    assert fs.is_dir(ATTESTATION)
    assert fs.is_dir(ATTESTATION / "keys")
    assert fs.is_dir(ROOT / "dev")
    assert fs.read(ATTESTATION / "attestation_type") == b"dcap"
    assert quote_report_data(fs.read(ATTESTATION / "quote")) == bytes(64)
    fs.write(ATTESTATION / "user_report_data", b"\x03" * 64)
    assert fs.read(ATTESTATION / "user_report_data") == b"\x03" * 64
    assert quote_report_data(fs.read(ATTESTATION / "quote")) == b"\x03" * 64
    assert fs.read(ATTESTATION / "keys/_sgx_mrenclave") == bytes(range(16))
    with os_error(errno.EINVAL):
        fs.write(ATTESTATION / "user_report_data", bytes(32))
    with os_error(errno.EACCES):
        fs.write(ATTESTATION / "quote", bytes(64))
    with os_error(errno.ENOENT):
        fs.read(ATTESTATION / "keys/_sgx_mrsigner")
    with os_error(errno.EPERM):
        fs.mkdir(ATTESTATION / "x")


def test_production_gramine_provider_on_emulated_files() -> None:
    fs = gramine()
    provider = detect_provider(
        "sgx", data_dir=Path("unused"), fs=fs, collateral_fetcher=lambda q: {"version": 3}
    )
    assert isinstance(provider, GramineProvider)
    evidence = provider.evidence(b"\x04" * 32)
    assert quote_report_data(evidence.quote) == b"\x04" * 32 + bytes(32)
    assert len(provider.sealing_key()) == 32


def test_gramine_without_dcap_is_refused() -> None:
    provider = GramineProvider(fs=gramine("epid"), collateral_fetcher=lambda q: {})
    with pytest.raises(EvidenceUnavailableError, match="expected 'dcap'"):
        provider.evidence(b"")


def test_provider_refuses_a_quote_for_other_report_data() -> None:
    fs = EmulatedDevices(tsm=EmulatedTsm(quote_signer=lambda d: tdx_quote(bytes(64))))
    provider = ConfigfsTsmProvider(Platform.TDX, fs=fs, collateral_fetcher=lambda q: {})
    with pytest.raises(EvidenceUnavailableError, match="does not carry the requested"):
        provider.evidence(b"\x01")
    short = EmulatedDevices(tsm=EmulatedTsm(quote_signer=lambda d: tdx_quote(d)[:100]))
    provider = ConfigfsTsmProvider(Platform.TDX, fs=short, collateral_fetcher=lambda q: {})
    with pytest.raises(EvidenceUnavailableError, match="outblob is no quote"):
        provider.evidence(b"\x01")


def test_quote_report_data_refuses_garbage() -> None:
    with pytest.raises(MalformedEvidenceError, match="quote version: got 9"):
        quote_report_data(struct.pack("<H", 9).ljust(48 + 584, b"\0"))
    with pytest.raises(MalformedEvidenceError, match="quote body"):
        quote_report_data(tdx_quote(bytes(64))[:200])


def test_devices_refuse_what_they_do_not_hold() -> None:
    fs = tdx_devices()
    assert not fs.is_dir(ATTESTATION)
    with os_error(errno.ENOENT):
        fs.read(ATTESTATION / "quote")
    with os_error(errno.EISDIR):
        fs.read(REPORTS)
    with pytest.raises(ValueError, match="both or neither"):
        EmulatedTsm()
    with pytest.raises(ValueError, match="SNP only"):
        EmulatedTsm(quote_signer=tdx_quote, host_certificates=CERTS)
    with pytest.raises(ValueError, match="expected 16"):
        EmulatedGramine(quote_signer=sgx_quote, sealing_key=bytes(32))
