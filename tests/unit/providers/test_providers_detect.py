"""detect_provider: explicit choices need their TEE; "auto" never falls back to simulated."""

from __future__ import annotations

from pathlib import Path

import pytest

import veil.providers as providers
from veil.attestation.claims import Platform
from veil.errors import EvidenceUnavailableError
from veil.providers import (
    ConfigfsTsmProvider,
    GramineProvider,
    SimulatedSgxProvider,
    detect_provider,
)
from veil.providers.configfs_tsm import REPORT_DIR
from veil.providers.devicefs import OsDeviceFilesystem


class ProviderOnly(OsDeviceFilesystem):
    def __init__(self, name: str) -> None:
        self.name = name

    def mkdir(self, path: Path) -> None:
        super().mkdir(path)
        (path / "provider").write_text(self.name + "\n")

    def rmdir(self, path: Path) -> None:
        (path / "provider").unlink()
        super().rmdir(path)


def tsm_root(tmp_path: Path) -> Path:
    (tmp_path / REPORT_DIR).mkdir(parents=True)
    return tmp_path


def test_public_api() -> None:
    assert set(providers.__all__) == {
        "ConfigfsTsmProvider",
        "Evidence",
        "EvidenceProvider",
        "GramineProvider",
        "SimulatedSgxProvider",
        "detect_provider",
    }


def test_simulated_only_when_asked(tmp_path: Path) -> None:
    prov = detect_provider("simulated", data_dir=tmp_path, fs_root=tmp_path)
    assert isinstance(prov, SimulatedSgxProvider)
    assert prov.simulated


def test_auto_without_tee_refuses_and_names_the_dev_option(tmp_path: Path) -> None:
    with pytest.raises(EvidenceUnavailableError, match="--platform simulated"):
        detect_provider("auto", data_dir=tmp_path, fs_root=tmp_path)
    with pytest.raises(EvidenceUnavailableError, match="no configfs-tsm report interface"):
        detect_provider("tdx", data_dir=tmp_path, fs_root=tmp_path)
    with pytest.raises(EvidenceUnavailableError, match="inside Gramine"):
        detect_provider("sgx", data_dir=tmp_path, fs_root=tmp_path)


def test_sgx_when_gramine_present(tmp_path: Path) -> None:
    (tmp_path / "dev/attestation").mkdir(parents=True)
    for name in ("sgx", "auto"):
        prov = detect_provider(name, data_dir=tmp_path, fs_root=tmp_path)
        assert isinstance(prov, GramineProvider)


@pytest.mark.parametrize(
    ("kernel", "platform"), [("tdx_guest", Platform.TDX), ("sev_guest", Platform.SEV_SNP)]
)
def test_configfs_tsm_by_provider_name(tmp_path: Path, kernel: str, platform: Platform) -> None:
    root = tsm_root(tmp_path)
    for name in ("auto", platform.value):
        prov = detect_provider(name, data_dir=tmp_path, fs_root=root, fs=ProviderOnly(kernel))
        assert isinstance(prov, ConfigfsTsmProvider)
        assert prov.platform is platform
    other = "sev-snp" if platform is Platform.TDX else "tdx"
    with pytest.raises(EvidenceUnavailableError, match=f"found provider '{kernel}'"):
        detect_provider(other, data_dir=tmp_path, fs_root=root, fs=ProviderOnly(kernel))
    assert list((root / REPORT_DIR).iterdir()) == []


def test_unknown_provider_name_is_not_a_tee(tmp_path: Path) -> None:
    root = tsm_root(tmp_path)
    with pytest.raises(EvidenceUnavailableError, match="no TEE found"):
        detect_provider("auto", data_dir=tmp_path, fs_root=root, fs=ProviderOnly("mystery"))


def test_unknown_platform_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="got 'sev'"):
        detect_provider("sev", data_dir=tmp_path)
