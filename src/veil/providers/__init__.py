"""Evidence providers: how `veil serve` obtains evidence from the TEE it runs in.

- `GramineProvider`: Intel SGX under Gramine (``/dev/attestation``);
- `ConfigfsTsmProvider`: Intel TDX and AMD SEV-SNP guests (Linux configfs-tsm);
- `SimulatedSgxProvider`: no TEE at all; SGX-format evidence under veil's public simulated root,
  for development and tests. It is never chosen automatically.

Use `detect_provider` to pick one.
"""

from __future__ import annotations

from pathlib import Path

from veil.attestation.claims import Platform
from veil.errors import EvidenceUnavailableError
from veil.providers.base import CollateralFetcher, Evidence, EvidenceProvider
from veil.providers.configfs_tsm import PROVIDER_NAMES, ConfigfsTsmProvider, probe_tsm_provider
from veil.providers.devicefs import DeviceFilesystem, OsDeviceFilesystem
from veil.providers.gramine import ATTESTATION_DIR, GramineProvider
from veil.providers.simulated import SimulatedSgxProvider

__all__ = [
    "ConfigfsTsmProvider",
    "Evidence",
    "EvidenceProvider",
    "GramineProvider",
    "SimulatedSgxProvider",
    "detect_provider",
]

_PLATFORMS = ("auto", "simulated", "sgx", "tdx", "sev-snp")


def detect_provider(
    platform: str = "auto",
    *,
    data_dir: Path,
    fs_root: Path = Path("/"),
    collateral_fetcher: CollateralFetcher | None = None,
    fs: DeviceFilesystem | None = None,
) -> EvidenceProvider:
    """The evidence provider for `platform`, checked to be present on this machine.

    Example::

        provider = detect_provider("auto", data_dir=Path("/var/lib/veil"))

    Args:
        platform: ``"auto"`` (whichever real TEE is present), ``"sgx"`` (Gramine), ``"tdx"`` or
            ``"sev-snp"`` (configfs-tsm), or ``"simulated"`` (no TEE; development only).
        data_dir: the server's data directory (the simulated platform keeps its key there).
        fs_root: the filesystem root to look for TEE interfaces under (tests pass a fake tree).
        collateral_fetcher: fetches Intel/AMD collateral for a quote (SGX and TDX need one).
        fs: how the TEE device files are reached (default: the real filesystem; tests pass
            the emulated devices of `veil.testing.devices`). A real deployment never sets it.

    Raises:
        EvidenceUnavailableError: the requested TEE is not present. ``"auto"`` never falls
            back to the simulated platform: it raises and names ``--platform simulated``.
        ValueError: `platform` is not one of the names above.
    """
    if platform not in _PLATFORMS:
        raise ValueError(f"platform: got {platform!r}, expected one of {', '.join(_PLATFORMS)}")
    if platform == "simulated":
        return SimulatedSgxProvider(data_dir)

    fs = fs or OsDeviceFilesystem()
    gramine_present = fs.is_dir(fs_root / ATTESTATION_DIR)
    if platform == "sgx" or (platform == "auto" and gramine_present):
        if not gramine_present:
            raise EvidenceUnavailableError(
                f"sgx: {fs_root / ATTESTATION_DIR} not found; is this running inside Gramine?"
            )
        return GramineProvider(fs_root=fs_root, collateral_fetcher=collateral_fetcher, fs=fs)

    tsm_name = probe_tsm_provider(fs_root, fs)
    for tee in (Platform.TDX, Platform.SEV_SNP):
        if platform in ("auto", tee.value) and tsm_name == PROVIDER_NAMES[tee]:
            return ConfigfsTsmProvider(
                tee, fs_root=fs_root, fs=fs, collateral_fetcher=collateral_fetcher
            )
    if platform == "auto":
        raise EvidenceUnavailableError(
            "no TEE found (no Gramine /dev/attestation, no configfs-tsm report provider); "
            "for development without a TEE use --platform simulated (evidence proves nothing)"
        )
    found = f"provider {tsm_name!r}" if tsm_name else "no configfs-tsm report interface"
    raise EvidenceUnavailableError(
        f"{platform}: expected configfs-tsm provider "
        f"{PROVIDER_NAMES[Platform(platform)]!r} under {fs_root / 'sys/kernel/config/tsm/report'}, "
        f"found {found}"
    )
