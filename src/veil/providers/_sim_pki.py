"""Intel-shaped PKI and collateral for the simulated SGX platform, under veil's simulated root.

Mirrors what Intel publishes for a real platform, so the production verifier code path runs:

- Intel SGX PCK Certificate and CRL Profile Specification (rev. 1.5): a "PCK Platform CA"
  intermediate, a PCK leaf carrying the SGX extensions (OID 1.2.840.113741.1.13.1, section 1.3.5),
  the Root CA CRL and the PCK CRL;
- Intel PCS API v4 / "TCB Info" and "Enclave Identity" JSON schemas: TCB info v3 (id "SGX") and
  QE identity v2 (id "QE"), each signed with ECDSA P-256 by a "TCB Signing" certificate, the
  signature being hex r ‖ s over the exact JSON text of the inner object.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_private_key,
)
from cryptography.x509.oid import NameOID

from veil.attestation.verify.collateral import DcapCollateral
from veil.providers import _sgx_extensions as sgx_extensions

__all__ = ["SimulatedPki", "sign_raw"]

_ORG = "veil simulation (no TEE)"
_CERT_LIFETIME = timedelta(days=7 * 365)
_COLLATERAL_LIFETIME = timedelta(days=30)  # PCS TCB info, QE identity and PCK CRL: ~30 days
_ROOT_CRL_LIFETIME = timedelta(days=365)
_BACKDATE = timedelta(hours=1)
_TCB_EVALUATION_DATA_NUMBER = 17

# The simulated platform's TCB: Intel-like component SVNs (PCK Certificate Profile 1.3.5, the
# sixteen SGX TCB component SVNs), PCESVN, and a CPUSVN made of the same sixteen bytes.
_COMPONENT_SVNS = (11, 11, 2, 2, 255, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
_PCE_SVN = 13
_PCE_ID = bytes(2)
_FMSPC = bytes.fromhex("00906ED50000")


def sign_raw(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """ECDSA P-256/SHA-256 over `data`, as the 64-byte big-endian r ‖ s DCAP uses."""
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _raw_public_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)[1:]


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(Encoding.PEM).decode("ascii")


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORG),
        ]
    )


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _load_root() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_pem = (
        resources.files("veil.attestation.verify.roots")
        .joinpath("veil_simulated_root.pem")
        .read_bytes()
    )
    key_pem = resources.files("veil.providers").joinpath("simulated_root_key.pem").read_bytes()
    cert = x509.load_pem_x509_certificate(cert_pem)
    key = load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise ValueError("veil's simulated root key does not match the simulated root certificate")
    return cert, key


class SimulatedPki:
    """Keys, certificates and collateral of one simulated SGX platform (generated once)."""

    def __init__(
        self,
        *,
        now: datetime,
        revoke_pck: bool,
        tcb_status: str,
        advisory_ids: tuple[str, ...],
        qe_mr_signer: bytes,
        qe_isv_prod_id: int,
        qe_isv_svn: int,
    ) -> None:
        self.root, self._root_key = _load_root()
        self._revoke_pck = revoke_pck
        self._tcb_status = tcb_status
        self._advisory_ids = advisory_ids
        self._qe_mr_signer = qe_mr_signer
        self._qe_isv_prod_id = qe_isv_prod_id
        self._qe_isv_svn = qe_isv_svn

        self.cpu_svn = bytes(_COMPONENT_SVNS)
        self.pce_svn = _PCE_SVN
        self.fmspc = _FMSPC
        self.pce_id = _PCE_ID
        ppid = secrets.token_bytes(16)
        self.qe_id = hashlib.sha256(b"veil simulated QE ID" + ppid).digest()[:16]

        start = now - timedelta(days=1)
        end = min(now + _CERT_LIFETIME, self.root.not_valid_after_utc)
        self._platform_ca_key = ec.generate_private_key(ec.SECP256R1())
        self.platform_ca = self._issue(
            "veil SIMULATED SGX PCK Platform CA",
            self._platform_ca_key,
            self.root,
            self._root_key,
            start,
            end,
            ca=True,
        )
        self.pck_key = ec.generate_private_key(ec.SECP256R1())
        extension = sgx_extensions.encode_sgx_extensions(
            ppid=ppid,
            component_svns=_COMPONENT_SVNS,
            pce_svn=_PCE_SVN,
            cpu_svn=self.cpu_svn,
            pce_id=_PCE_ID,
            fmspc=_FMSPC,
            platform_instance_id=secrets.token_bytes(16),
        )
        self.pck = self._issue(
            "veil SIMULATED SGX PCK Certificate",
            self.pck_key,
            self.platform_ca,
            self._platform_ca_key,
            start,
            end,
            ca=False,
            sgx_extension=extension,
        )
        self._tcb_signing_key = ec.generate_private_key(ec.SECP256R1())
        self.tcb_signing = self._issue(
            "veil SIMULATED SGX TCB Signing",
            self._tcb_signing_key,
            self.root,
            self._root_key,
            start,
            end,
            ca=False,
        )
        self.attestation_key = ec.generate_private_key(ec.SECP256R1())
        self.attestation_public_key = _raw_public_key(self.attestation_key)
        self.pck_chain_pem = _pem(self.pck) + _pem(self.platform_ca) + _pem(self.root)

    @staticmethod
    def _issue(
        common_name: str,
        key: ec.EllipticCurvePrivateKey,
        issuer: x509.Certificate,
        issuer_key: ec.EllipticCurvePrivateKey,
        not_before: datetime,
        not_after: datetime,
        *,
        ca: bool,
        sgx_extension: bytes | None = None,
    ) -> x509.Certificate:
        # Same extension set and criticality as Intel's PCK Platform CA, PCK and TCB Signing certs.
        public = key.public_key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(issuer.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=not ca,
                    content_commitment=not ca,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=ca,
                    crl_sign=ca,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True
            )
        )
        if sgx_extension is not None:
            builder = builder.add_extension(
                x509.UnrecognizedExtension(sgx_extensions.SGX_EXTENSIONS_OID, sgx_extension),
                critical=False,
            )
        return builder.sign(issuer_key, hashes.SHA256())

    def _crl(
        self,
        issuer: x509.Certificate,
        issuer_key: ec.EllipticCurvePrivateKey,
        this_update: datetime,
        lifetime: timedelta,
        revoked_serials: tuple[int, ...],
    ) -> bytes:
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(issuer.subject)
            .last_update(this_update)
            .next_update(this_update + lifetime)
            .add_extension(x509.CRLNumber(1), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                critical=False,
            )
        )
        for serial in revoked_serials:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(this_update)
                .add_extension(x509.CRLReason(x509.ReasonFlags.key_compromise), critical=False)
                .build()
            )
        return builder.sign(issuer_key, hashes.SHA256()).public_bytes(Encoding.DER)

    def _signed_json(self, body: dict[str, Any]) -> tuple[str, bytes]:
        # The signature covers the exact bytes of the inner object's text, which travels
        # verbatim; verifiers must not re-serialise it.
        text = json.dumps(body, separators=(",", ":"))
        return text, sign_raw(self._tcb_signing_key, text.encode("utf-8"))

    def _tcb_levels(self, tcb_date: datetime) -> list[dict[str, Any]]:
        def level(svns: tuple[int, ...], pce_svn: int, status: str, age: int) -> dict[str, Any]:
            entry: dict[str, Any] = {
                "tcb": {
                    "sgxtcbcomponents": [{"svn": svn} for svn in svns],
                    "pcesvn": pce_svn,
                },
                "tcbDate": _iso(tcb_date - timedelta(days=age)),
                "tcbStatus": status,
            }
            if status != "UpToDate" and self._advisory_ids:
                entry["advisoryIDs"] = list(self._advisory_ids)
            return entry

        # Ordered newest first, as Intel does: a verifier takes the first level that the PCK's
        # SVNs all reach. Ours matches the second level when a non-UpToDate status is requested.
        svns = _COMPONENT_SVNS
        newer = tuple(svn + 1 if i < 2 else svn for i, svn in enumerate(svns))
        older = tuple(max(svn - 1, 0) if i < 2 else svn for i, svn in enumerate(svns))
        levels = []
        if self._tcb_status != "UpToDate":
            levels.append(level(newer, _PCE_SVN, "UpToDate", 0))
        levels.append(level(svns, _PCE_SVN, self._tcb_status, 90))
        levels.append(level(older, _PCE_SVN - 1, "OutOfDate", 365))
        return levels

    def collateral(self, now: datetime) -> DcapCollateral:
        """The DCAP collateral for this platform's quotes, issued at `now`."""
        issued = now.replace(microsecond=0) - _BACKDATE
        next_update = issued + _COLLATERAL_LIFETIME
        tcb_date = issued.replace(hour=0, minute=0, second=0) - timedelta(days=30)
        tcb_info = {
            "id": "SGX",
            "version": 3,
            "issueDate": _iso(issued),
            "nextUpdate": _iso(next_update),
            "fmspc": self.fmspc.hex().upper(),
            "pceId": self.pce_id.hex().upper(),
            "tcbType": 0,
            "tcbEvaluationDataNumber": _TCB_EVALUATION_DATA_NUMBER,
            "tcbLevels": self._tcb_levels(tcb_date),
        }
        qe_identity = {
            "id": "QE",
            "version": 2,
            "issueDate": _iso(issued),
            "nextUpdate": _iso(next_update),
            "tcbEvaluationDataNumber": _TCB_EVALUATION_DATA_NUMBER,
            "miscselect": "00000000",
            "miscselectMask": "FFFFFFFF",
            # INIT | PROVISIONKEY must be set, DEBUG (bit 1) must be clear; XFRM is not compared.
            "attributes": "11000000000000000000000000000000",
            "attributesMask": "FBFFFFFFFFFFFFFF0000000000000000",
            "mrsigner": self._qe_mr_signer.hex().upper(),
            "isvprodid": self._qe_isv_prod_id,
            "tcbLevels": [
                {
                    "tcb": {"isvsvn": self._qe_isv_svn},
                    "tcbDate": _iso(tcb_date),
                    "tcbStatus": "UpToDate",
                }
            ],
        }
        revoked = (self.pck.serial_number,) if self._revoke_pck else ()
        signing_chain = _pem(self.platform_ca) + _pem(self.root)
        tcb_chain = _pem(self.tcb_signing) + _pem(self.root)
        tcb_text, tcb_signature = self._signed_json(tcb_info)
        qe_text, qe_signature = self._signed_json(qe_identity)
        return DcapCollateral(
            pck_crl_issuer_chain=signing_chain,
            root_ca_crl=self._crl(self.root, self._root_key, issued, _ROOT_CRL_LIFETIME, ()),
            pck_crl=self._crl(
                self.platform_ca, self._platform_ca_key, issued, _COLLATERAL_LIFETIME, revoked
            ),
            tcb_info_issuer_chain=tcb_chain,
            tcb_info=tcb_text,
            tcb_info_signature=tcb_signature,
            qe_identity_issuer_chain=tcb_chain,
            qe_identity=qe_text,
            qe_identity_signature=qe_signature,
            pck_certificate_chain=_pem(self.pck) + signing_chain,
        )
