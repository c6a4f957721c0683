"""Run the production ``veil serve`` or ``veil broker`` on emulated TEE devices. TEST HARNESS.

Usage::

    python -m veil.testing.emulated serve [HARNESS OPTIONS] <the usual veil serve arguments>
    python -m veil.testing.emulated broker [HARNESS OPTIONS] <the usual veil broker arguments>

Harness options (nothing else differs from the commands: same parsers, same code):

- ``--emulated-state DIR``: the TEE device files (configfs-tsm, Gramine's /dev/attestation) are
  answered by `veil.testing.devices`, built from the state directory a test wrote with
  `veil.testing.state.EmulatedState`; the production providers read them unchanged;
- ``--hazmat-test-roots PEM``: HAZMAT, warns. A broker, and a replica joining one
  (``serve --join``), appraise each other's evidence under these test PKI roots instead of
  Intel's and AMD's (`TrustStore.hazmat_test_roots`): each certificate whose subject CN is
  ``ARK-<product>`` is an AMD root for that product, any other the Intel root;
- ``--hazmat-test-tamper-certificate``: the evidence binds a certificate this server does not
  have, so tests can watch clients refuse it.
"""

from __future__ import annotations

import argparse
import logging
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from veil.attestation.claims import Platform
from veil.attestation.trust import TrustStore
from veil.cli import build_parser
from veil.commands import broker as broker_command
from veil.commands import serve as serve_command
from veil.providers import EvidenceProvider
from veil.providers.base import Evidence
from veil.server.config import ServerConfig
from veil.server.runner import make_provider

__all__ = ["hazmat_test_trust", "main"]

_log = logging.getLogger("veil.testing")


class _UnboundEvidence:
    """A provider whose evidence binds 32 random bytes instead of the server's certificate."""

    def __init__(self, inner: EvidenceProvider) -> None:
        self._inner = inner

    @property
    def platform(self) -> Platform:
        return self._inner.platform

    @property
    def simulated(self) -> bool:
        return self._inner.simulated

    def evidence(self, report_data: bytes) -> Evidence:
        return self._inner.evidence(secrets.token_bytes(32))

    def sealing_key(self) -> bytes:
        return self._inner.sealing_key()


def _harness_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m veil.testing.emulated", add_help=False)
    parser.add_argument("command", choices=("serve", "broker"))
    parser.add_argument("--emulated-state", type=Path, default=None)
    parser.add_argument("--hazmat-test-roots", type=Path, default=None)
    parser.add_argument("--hazmat-test-tamper-certificate", action="store_true")
    return parser


def hazmat_test_trust(path: Path) -> TrustStore:
    """HAZMAT: the trust store of the test PKI roots in the PEM file `path` (warns)."""
    intel_root = None
    arks: dict[str, x509.Certificate] = {}
    for cert in x509.load_pem_x509_certificates(path.read_bytes()):
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        name = str(names[0].value) if names else ""
        if name.startswith("ARK-"):
            arks[name.removeprefix("ARK-")] = cert
        else:
            intel_root = cert
    print(
        f"veil: HAZMAT: --hazmat-test-roots {path.name}: peers are appraised under TEST roots "
        "instead of Intel's and AMD's; their evidence proves nothing about real hardware",
        file=sys.stderr,
        flush=True,
    )
    return TrustStore.hazmat_test_roots(intel_root=intel_root, amd_arks=arks)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the harness options, then run ``veil serve`` or ``veil broker`` with the rest."""
    harness, rest = _harness_parser().parse_known_args(argv)
    args = build_parser().parse_args([harness.command, *rest])
    args.argv = rest  # as veil.cli.main: the flags given, over VEIL_* and --config
    roots: Path | None = harness.hazmat_test_roots
    trust = None if roots is None else hazmat_test_trust(roots)

    def provider_factory(config: ServerConfig) -> EvidenceProvider:
        fs = None
        if harness.emulated_state is not None:
            from veil.testing.state import load_devices

            fs = load_devices(harness.emulated_state)
        provider = make_provider(config, fs=fs)
        if harness.hazmat_test_tamper_certificate:
            _log.warning("HAZMAT: the evidence binds a certificate this server does not serve")
            provider = _UnboundEvidence(provider)
        return provider

    if harness.command == "broker":
        return broker_command.run(args, provider_factory=provider_factory, trust=trust)
    return serve_command.run(args, provider_factory=provider_factory, trust=trust)


if __name__ == "__main__":
    sys.exit(main())
