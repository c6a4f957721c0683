"""An Intel-shaped DCAP PKI, generated at run time: certificates, CRLs, signed collateral, quotes.

What it mirrors, so that veil's production verifier runs unchanged against its output:

- Intel SGX PCK Certificate and CRL Profile Specification (rev. 1.5): "Intel SGX Root CA" →
  "Intel SGX PCK Platform CA" / "Intel SGX PCK Processor CA" → "Intel SGX PCK Certificate" with
  the SGX extensions (OID 1.2.840.113741.1.13.1, section 1.3.5); "Intel SGX TCB Signing" issued by
  the root; the Root CA CRL and the PCK CRLs (section 2). Subject names are Intel's.
- Intel PCS API v4, "TCB Info V3" (id "SGX" and "TDX" with ``tdxModule`` and
  ``tdxModuleIdentities``) and "Enclave Identity V2" (id "QE" and "TD_QE"): ECDSA P-256 by the TCB
  Signing key, hex r ‖ s over the exact JSON text of the inner object; issued at ``now`` and valid
  30 days, as Intel's are.
- SGX v3 and TDX v4 (or v5) quotes of a platform's enclaves and TDs, in the formats of
  `veil.testing.dcap_quote`, signed by a quoting enclave the platform's PCK certifies.

Every validity window derives from an injected `now`. Keys derive from a seed and certificates are
signed deterministically (RFC 6979), so two PKIs built from one seed and one `now` issue
byte-identical certificates: an emulated server process and its test agree on every chain. CRL,
collateral and quote signatures stay randomised.
Nothing here is Intel's: trust it only through a `TrustStore` built on `IntelPki.root`.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from veil.attestation.verify.collateral import DcapCollateral
from veil.testing import _sgx_extensions as sgx_extensions
from veil.testing.dcap_quote import (
    FLAG_DEBUG,
    FLAG_INIT,
    FLAG_MODE64,
    TD_QE_MR_SIGNER,
    QeIdentitySpec,
    QuotingEnclave,
    pad_report_data,
    sgx_attributes,
    sgx_report_body,
    sign_raw,
    td_report_body,
)

__all__ = [
    "COLLATERAL_LIFETIME",
    "CertifiedKey",
    "DcapPlatform",
    "IntelPki",
    "Pck",
    "SgxPlatform",
    "TdxPlatform",
    "derive_ec_key",
]

CaKind = Literal["platform", "processor"]

COLLATERAL_LIFETIME = timedelta(days=30)  # PCS TCB info, QE identity and PCK CRL
ROOT_CRL_LIFETIME = timedelta(days=365)
_BACKDATE = timedelta(hours=1)
_ROOT_LIFETIME = timedelta(days=30 * 365)
_CA_LIFETIME = timedelta(days=15 * 365)
_LEAF_LIFETIME = timedelta(days=7 * 365)
_TCB_EVALUATION_DATA_NUMBER = 17

_INTEL_DN = (
    (NameOID.ORGANIZATION_NAME, "Intel Corporation"),
    (NameOID.LOCALITY_NAME, "Santa Clara"),
    (NameOID.STATE_OR_PROVINCE_NAME, "CA"),
    (NameOID.COUNTRY_NAME, "US"),
)
_CA_NAMES: dict[CaKind, str] = {
    "platform": "Intel SGX PCK Platform CA",
    "processor": "Intel SGX PCK Processor CA",
}
# P-256 group order: derived scalars are reduced into [1, n-1].
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def derive_ec_key(seed: bytes, label: str) -> ec.EllipticCurvePrivateKey:
    """A P-256 key determined by `seed` and `label` (cheap, so every PKI can be reproducible)."""
    digest = hashlib.sha512(b"veil.testing P-256\0" + seed + b"\0" + label.encode()).digest()
    scalar = int.from_bytes(digest, "big") % (_P256_ORDER - 1) + 1
    return ec.derive_private_key(scalar, ec.SECP256R1())


def _serial(seed: bytes, label: str) -> int:
    # RFC 5280 4.1.2.2: positive, at most 20 octets; Intel's are 20 random octets.
    digest = hashlib.sha256(b"veil.testing serial\0" + seed + b"\0" + label.encode()).digest()
    return int.from_bytes(digest[:19], "big") | 1


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _pem(*certs: x509.Certificate) -> str:
    return "".join(cert.public_bytes(Encoding.PEM).decode("ascii") for cert in certs)


def _aware(now: datetime) -> datetime:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now: got a naive datetime, expected a timezone-aware one")
    return now.astimezone(UTC).replace(microsecond=0)


@dataclass(frozen=True, slots=True)
class CertifiedKey:
    """A certificate and its private key."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def pem(self) -> str:
        return _pem(self.certificate)

    @property
    def serial_number(self) -> int:
        return self.certificate.serial_number


@dataclass(frozen=True, slots=True)
class Pck:
    """A PCK leaf certificate with its key, the CA that issued it and what its extension says."""

    leaf: CertifiedKey
    ca: CaKind
    ca_certificate: x509.Certificate
    root: x509.Certificate
    fmspc: bytes
    pce_id: bytes
    component_svns: tuple[int, ...]
    pce_svn: int

    @property
    def cpu_svn(self) -> bytes:
        return bytes(self.component_svns)

    @property
    def chain_pem(self) -> str:
        """Leaf, CA, root: certification data type 5."""
        return _pem(self.leaf.certificate, self.ca_certificate, self.root)


def _level(
    sgx: Sequence[int],
    pce_svn: int,
    status: str,
    date: datetime,
    advisories: Sequence[str],
    tdx: Sequence[int] | None,
) -> dict[str, Any]:
    tcb: dict[str, Any] = {"sgxtcbcomponents": [{"svn": svn} for svn in sgx], "pcesvn": pce_svn}
    if tdx is not None:
        tcb["tdxtcbcomponents"] = [{"svn": svn} for svn in tdx]
    entry: dict[str, Any] = {"tcb": tcb, "tcbDate": _iso(date), "tcbStatus": status}
    if status != "UpToDate" and advisories:
        entry["advisoryIDs"] = list(advisories)
    return entry


def _bumped(svns: Sequence[int], delta: int, count: int) -> tuple[int, ...]:
    return tuple(min(max(svn + delta, 0), 255) if i < count else svn for i, svn in enumerate(svns))


class IntelPki:
    """Root CA, PCK Platform and Processor CAs, TCB Signing; CRLs and signed collateral.

    Example::

        pki = IntelPki(now=now, seed=b"test")
        sgx = pki.sgx_platform()
        quote = sgx.quote(report_data, mr_enclave=bytes(32))
        collateral = sgx.collateral(now)
        trust = TrustStore(intel_root=pki.root)

    Args:
        now: the time every certificate's validity window is computed from.
        seed: keys and serials derive from it; a random seed when None.
        root: issue under this root (certificate and key) instead of a generated
            "Intel SGX Root CA" (veil's simulated platform passes its shipped root).
        organization: the O of every issued subject; Intel's full DN when None.

    Revocation is live: `revoke` lists a serial on the next CRL issued, so a running collateral
    service reflects it.
    """

    def __init__(
        self,
        *,
        now: datetime,
        seed: bytes | None = None,
        root: CertifiedKey | None = None,
        organization: str | None = None,
    ) -> None:
        now = _aware(now)
        self.seed = secrets.token_bytes(32) if seed is None else bytes(seed)
        self._organization = organization
        self._lock = threading.Lock()
        self._revoked: set[int] = set()
        self._pcks: dict[str, Pck] = {}
        start = now - timedelta(days=1)
        if root is None:
            key = derive_ec_key(self.seed, "root")
            name = self._name("Intel SGX Root CA")
            cert = self._builder(
                name,
                name,
                key,
                key,
                start,
                now + _ROOT_LIFETIME,
                ca=True,
                serial=_serial(self.seed, "root"),
                path=1,
            )
            root = CertifiedKey(cert.sign(key, hashes.SHA256(), ecdsa_deterministic=True), key)
        self._root = root
        limit = root.certificate.not_valid_after_utc
        self._cas: dict[CaKind, CertifiedKey] = {
            kind: self._issue(cn, f"ca-{kind}", start, min(now + _CA_LIFETIME, limit), ca=True)
            for kind, cn in _CA_NAMES.items()
        }
        self.tcb_signing = self._issue(
            "Intel SGX TCB Signing",
            "tcb-signing",
            start,
            min(now + _LEAF_LIFETIME, limit),
            ca=False,
        )
        self._leaf_window = (start, min(now + _LEAF_LIFETIME, limit))

    # --- certificates ---------------------------------------------------------------------------

    @property
    def root(self) -> x509.Certificate:
        """The root certificate: the only thing a `TrustStore` for this PKI holds."""
        return self._root.certificate

    @property
    def root_key(self) -> ec.EllipticCurvePrivateKey:
        return self._root.key

    def ca(self, kind: CaKind) -> CertifiedKey:
        """The PCK Platform CA ("platform") or PCK Processor CA ("processor")."""
        return self._cas[kind]

    def _name(self, common_name: str) -> x509.Name:
        attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
        if self._organization is None:
            attrs += [x509.NameAttribute(oid, value) for oid, value in _INTEL_DN]
        else:
            attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, self._organization))
        return x509.Name(attrs)

    def _builder(
        self,
        subject: x509.Name,
        issuer: x509.Name,
        key: ec.EllipticCurvePrivateKey,
        issuer_key: ec.EllipticCurvePrivateKey,
        not_before: datetime,
        not_after: datetime,
        *,
        ca: bool,
        serial: int,
        path: int | None = 0,
    ) -> x509.CertificateBuilder:
        # Same extension set and criticality as Intel's certificates (PCK profile 1.3).
        public = key.public_key()
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public)
            .serial_number(serial)
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
                x509.BasicConstraints(ca=ca, path_length=path if ca else None), critical=True
            )
        )

    def _issue(
        self,
        common_name: str,
        label: str,
        not_before: datetime,
        not_after: datetime,
        *,
        ca: bool,
        issuer: CertifiedKey | None = None,
        extension: bytes | None = None,
    ) -> CertifiedKey:
        issuer = issuer or self._root
        key = derive_ec_key(self.seed, label)
        builder = self._builder(
            self._name(common_name),
            issuer.certificate.subject,
            key,
            issuer.key,
            not_before,
            not_after,
            ca=ca,
            serial=_serial(self.seed, label),
        )
        if extension is not None:
            builder = builder.add_extension(
                x509.UnrecognizedExtension(sgx_extensions.SGX_EXTENSIONS_OID, extension),
                critical=False,
            )
        return CertifiedKey(
            builder.sign(issuer.key, hashes.SHA256(), ecdsa_deterministic=True), key
        )

    def issue_pck(
        self,
        *,
        fmspc: bytes,
        component_svns: Sequence[int],
        pce_svn: int,
        pce_id: bytes = bytes(2),
        ca: CaKind = "platform",
        label: str = "pck",
    ) -> Pck:
        """A PCK leaf with the SGX extensions, issued by the chosen PCK CA.

        `label` names the platform: the same label gives the same key and serial.
        """
        component_svns = tuple(component_svns)
        ppid = hashlib.sha256(b"ppid" + self.seed + label.encode()).digest()[:16]
        extension = sgx_extensions.encode_sgx_extensions(
            ppid=ppid,
            component_svns=component_svns,
            pce_svn=pce_svn,
            cpu_svn=bytes(component_svns),
            pce_id=pce_id,
            fmspc=fmspc,
            platform_instance_id=(
                hashlib.sha256(b"instance" + ppid).digest()[:16] if ca == "platform" else None
            ),
        )
        leaf = self._issue(
            "Intel SGX PCK Certificate",
            f"pck-{label}",
            *self._leaf_window,
            ca=False,
            issuer=self._cas[ca],
            extension=extension,
        )
        pck = Pck(
            leaf=leaf,
            ca=ca,
            ca_certificate=self._cas[ca].certificate,
            root=self.root,
            fmspc=bytes(fmspc),
            pce_id=bytes(pce_id),
            component_svns=component_svns,
            pce_svn=pce_svn,
        )
        with self._lock:
            self._pcks[label] = pck
        return pck

    def quoting_enclave(self, pck: Pck, identity: QeIdentitySpec | None = None) -> QuotingEnclave:
        """A quoting enclave on the platform of `pck`, its attestation key derived from the seed."""
        identity = identity or QeIdentitySpec()
        key = derive_ec_key(
            self.seed, f"attestation-{pck.leaf.serial_number}-{identity.mr_signer.hex()}"
        )
        return QuotingEnclave(pck, identity, key)

    # --- revocation -----------------------------------------------------------------------------

    def revoke(self, serial_number: int) -> None:
        """List `serial_number` on every CRL issued from now on (root CRL and PCK CRLs)."""
        with self._lock:
            self._revoked.add(serial_number)

    def unrevoke(self, serial_number: int) -> None:
        with self._lock:
            self._revoked.discard(serial_number)

    @property
    def revoked(self) -> frozenset[int]:
        with self._lock:
            return frozenset(self._revoked)

    def _crl(self, issuer: CertifiedKey, this_update: datetime, lifetime: timedelta) -> bytes:
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(issuer.certificate.subject)
            .last_update(this_update)
            .next_update(this_update + lifetime)
            .add_extension(x509.CRLNumber(1), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
                critical=False,
            )
        )
        for serial in sorted(self.revoked):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(this_update)
                .add_extension(x509.CRLReason(x509.ReasonFlags.key_compromise), critical=False)
                .build()
            )
        return builder.sign(issuer.key, hashes.SHA256()).public_bytes(Encoding.DER)

    def root_crl(self, now: datetime) -> bytes:
        """The Root CA CRL (DER), issued an hour before `now`, valid a year."""
        return self._crl(self._root, _aware(now) - _BACKDATE, ROOT_CRL_LIFETIME)

    def pck_crl(self, ca: CaKind, now: datetime) -> bytes:
        """The PCK CRL (DER) of the Platform or Processor CA, issued at `now`, valid 30 days."""
        return self._crl(self._cas[ca], _aware(now) - _BACKDATE, COLLATERAL_LIFETIME)

    def pck_crl_issuer_chain(self, ca: CaKind) -> str:
        """PEM CA ‖ root: the ``SGX-PCK-CRL-Issuer-Chain`` of a PCS response."""
        return _pem(self._cas[ca].certificate, self.root)

    @property
    def tcb_signing_chain(self) -> str:
        """PEM TCB Signing ‖ root: the issuer chain of TCB info and QE identity responses."""
        return _pem(self.tcb_signing.certificate, self.root)

    # --- signed collateral ----------------------------------------------------------------------

    def sign_json(self, body: dict[str, Any]) -> tuple[str, bytes]:
        """The compact JSON text of `body` and the TCB Signing key's raw r ‖ s over it.

        The signature covers the exact bytes of the text, which must travel verbatim.
        """
        text = json.dumps(body, separators=(",", ":"))
        return text, sign_raw(self.tcb_signing.key, text.encode("utf-8"))

    def tcb_info(
        self,
        now: datetime,
        *,
        tee: Literal["SGX", "TDX"],
        fmspc: bytes,
        pce_id: bytes,
        tcb_levels: Sequence[dict[str, Any]],
        tdx_module: dict[str, Any] | None = None,
        tdx_module_identities: Sequence[dict[str, Any]] = (),
    ) -> dict[str, Any]:
        """A TCB info v3 body issued at `now` (minus an hour), valid 30 days."""
        issued = _aware(now) - _BACKDATE
        info: dict[str, Any] = {"id": tee, "version": 3, "issueDate": _iso(issued)}
        info["nextUpdate"] = _iso(issued + COLLATERAL_LIFETIME)
        info["fmspc"] = fmspc.hex().upper()
        info["pceId"] = pce_id.hex().upper()
        info["tcbType"] = 0
        info["tcbEvaluationDataNumber"] = _TCB_EVALUATION_DATA_NUMBER
        if tee == "TDX":
            info["tdxModule"] = tdx_module or _tdx_module_json(bytes(48))
            info["tdxModuleIdentities"] = list(tdx_module_identities)
        info["tcbLevels"] = list(tcb_levels)
        return info

    def qe_identity(
        self, now: datetime, *, tee: Literal["SGX", "TDX"], identity: QeIdentitySpec
    ) -> dict[str, Any]:
        """A QE identity v2 body ("QE" for SGX, "TD_QE" for TDX), valid 30 days from `now`."""
        issued = _aware(now) - _BACKDATE
        return {
            "id": "TD_QE" if tee == "TDX" else "QE",
            "version": 2,
            "issueDate": _iso(issued),
            "nextUpdate": _iso(issued + COLLATERAL_LIFETIME),
            "tcbEvaluationDataNumber": _TCB_EVALUATION_DATA_NUMBER,
            "miscselect": "00000000",
            "miscselectMask": "FFFFFFFF",
            # INIT | PROVISIONKEY must be set, DEBUG (bit 1) must be clear; XFRM is not compared.
            "attributes": "11000000000000000000000000000000",
            "attributesMask": "FBFFFFFFFFFFFFFF0000000000000000",
            "mrsigner": identity.mr_signer.hex().upper(),
            "isvprodid": identity.isv_prod_id,
            "tcbLevels": [
                {
                    "tcb": {"isvsvn": identity.isv_svn},
                    "tcbDate": _iso(_tcb_date(issued)),
                    "tcbStatus": identity.tcb_status,
                }
            ],
        }

    def sgx_platform(
        self,
        *,
        fmspc: bytes = bytes.fromhex("00906ED50000"),
        component_svns: Sequence[int] = (11, 11, 2, 2, 255, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
        pce_svn: int = 13,
        pce_id: bytes = bytes(2),
        ca: CaKind = "platform",
        tcb_status: str = "UpToDate",
        advisory_ids: Sequence[str] = (),
        qe: QeIdentitySpec | None = None,
        label: str = "sgx",
    ) -> SgxPlatform:
        """An SGX platform: a PCK, a QE, and the TCB info placing it at `tcb_status`."""
        pck = self.issue_pck(
            fmspc=fmspc,
            component_svns=component_svns,
            pce_svn=pce_svn,
            pce_id=pce_id,
            ca=ca,
            label=label,
        )
        return SgxPlatform(
            self, pck, self.quoting_enclave(pck, qe), tcb_status, tuple(advisory_ids)
        )

    def tdx_platform(
        self,
        *,
        fmspc: bytes = bytes.fromhex("00806F050000"),
        component_svns: Sequence[int] = (2, 2, 2, 2, 3, 1, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0),
        pce_svn: int = 11,
        pce_id: bytes = bytes(2),
        tee_tcb_svn: bytes = bytes([4, 1, 3, 0]) + bytes(12),
        mr_signer_seam: bytes = bytes(48),
        ca: CaKind = "platform",
        tcb_status: str = "UpToDate",
        module_tcb_status: str = "UpToDate",
        advisory_ids: Sequence[str] = (),
        qe: QeIdentitySpec | None = None,
        label: str = "tdx",
    ) -> TdxPlatform:
        """A TDX platform: PCK, TD QE, TEE_TCB_SVN and the TDX TCB info placing it at `tcb_status`.

        `tee_tcb_svn` byte 0 is the TDX module's ISVSVN and byte 1 its major version, as in a
        TD report; the TCB info carries a ``TDX_0<major>`` module identity at `module_tcb_status`.
        """
        pck = self.issue_pck(
            fmspc=fmspc,
            component_svns=component_svns,
            pce_svn=pce_svn,
            pce_id=pce_id,
            ca=ca,
            label=label,
        )
        qe = qe or QeIdentitySpec(mr_signer=TD_QE_MR_SIGNER, isv_prod_id=2, isv_svn=4)
        return TdxPlatform(
            self,
            pck,
            self.quoting_enclave(pck, qe),
            tcb_status,
            tuple(advisory_ids),
            tee_tcb_svn=bytes(tee_tcb_svn),
            mr_signer_seam=bytes(mr_signer_seam),
            module_tcb_status=module_tcb_status,
        )

    def platforms(self) -> dict[str, Pck]:
        """Every PCK issued so far, by label."""
        with self._lock:
            return dict(self._pcks)


def _tcb_date(issued: datetime) -> datetime:
    return issued.replace(hour=0, minute=0, second=0) - timedelta(days=30)


def _tdx_module_json(mr_signer_seam: bytes) -> dict[str, Any]:
    return {
        "mrsigner": mr_signer_seam.hex().upper(),
        "attributes": "0000000000000000",
        "attributesMask": "FFFFFFFFFFFFFFFF",
    }


class DcapPlatform:
    """One SGX or TDX machine under an `IntelPki`: its PCK, its QE and its TCB info."""

    tee: Literal["SGX", "TDX"] = "SGX"

    def __init__(
        self,
        pki: IntelPki,
        pck: Pck,
        qe: QuotingEnclave,
        tcb_status: str = "UpToDate",
        advisory_ids: tuple[str, ...] = (),
    ) -> None:
        self.pki = pki
        self.pck = pck
        self.qe = qe
        self.tcb_status = tcb_status
        self.advisory_ids = advisory_ids

    def tcb_info(self, now: datetime) -> dict[str, Any]:
        raise NotImplementedError

    def qe_identity(self, now: datetime) -> dict[str, Any]:
        return self.pki.qe_identity(now, tee=self.tee, identity=self.qe.identity)

    def collateral(self, now: datetime, *, with_pck_chain: bool = True) -> DcapCollateral:
        """The complete collateral of this platform's quotes, issued at `now`, valid 30 days."""
        tcb_text, tcb_signature = self.pki.sign_json(self.tcb_info(now))
        qe_text, qe_signature = self.pki.sign_json(self.qe_identity(now))
        return DcapCollateral(
            pck_crl_issuer_chain=self.pki.pck_crl_issuer_chain(self.pck.ca),
            root_ca_crl=self.pki.root_crl(now),
            pck_crl=self.pki.pck_crl(self.pck.ca, now),
            tcb_info_issuer_chain=self.pki.tcb_signing_chain,
            tcb_info=tcb_text,
            tcb_info_signature=tcb_signature,
            qe_identity_issuer_chain=self.pki.tcb_signing_chain,
            qe_identity=qe_text,
            qe_identity_signature=qe_signature,
            pck_certificate_chain=self.pck.chain_pem if with_pck_chain else None,
        )


class SgxPlatform(DcapPlatform):
    """An SGX machine: quotes v3 over chosen enclave reports, and their collateral."""

    tee = "SGX"

    def report_body(
        self,
        report_data: bytes,
        *,
        mr_enclave: bytes,
        mr_signer: bytes = bytes(32),
        isv_prod_id: int = 0,
        isv_svn: int = 0,
        debug: bool = False,
    ) -> bytes:
        """An enclave report body on this platform (CPUSVN from the PCK, DEBUG as asked)."""
        flags = FLAG_INIT | FLAG_MODE64 | (FLAG_DEBUG if debug else 0)
        return sgx_report_body(
            cpu_svn=self.pck.cpu_svn,
            attributes=sgx_attributes(flags),
            mr_enclave=mr_enclave,
            mr_signer=mr_signer,
            isv_prod_id=isv_prod_id,
            isv_svn=isv_svn,
            report_data=pad_report_data(report_data),
        )

    def quote(
        self,
        report_data: bytes,
        *,
        mr_enclave: bytes,
        mr_signer: bytes = bytes(32),
        isv_prod_id: int = 0,
        isv_svn: int = 0,
        debug: bool = False,
    ) -> bytes:
        """An SGX quote v3 over an enclave report (`report_data` zero-padded to 64 bytes)."""
        return self.qe.sgx_quote(
            self.report_body(
                report_data,
                mr_enclave=mr_enclave,
                mr_signer=mr_signer,
                isv_prod_id=isv_prod_id,
                isv_svn=isv_svn,
                debug=debug,
            )
        )

    def tcb_levels(self, issued: datetime) -> list[dict[str, Any]]:
        """Newest first, as Intel orders them; this platform matches the `tcb_status` level."""
        date = _tcb_date(issued)
        svns, pce = self.pck.component_svns, self.pck.pce_svn
        levels = []
        if self.tcb_status != "UpToDate":
            levels.append(_level(_bumped(svns, 1, 2), pce, "UpToDate", date, (), None))
        levels.append(
            _level(svns, pce, self.tcb_status, date - timedelta(days=90), self.advisory_ids, None)
        )
        levels.append(
            _level(
                _bumped(svns, -1, 2),
                max(pce - 1, 0),
                "OutOfDate",
                date - timedelta(days=365),
                self.advisory_ids,
                None,
            )
        )
        return levels

    def tcb_info(self, now: datetime) -> dict[str, Any]:
        """The SGX TCB info v3 body for this platform's FMSPC, issued at `now`."""
        return self.pki.tcb_info(
            now,
            tee="SGX",
            fmspc=self.pck.fmspc,
            pce_id=self.pck.pce_id,
            tcb_levels=self.tcb_levels(_aware(now) - _BACKDATE),
        )


class TdxPlatform(DcapPlatform):
    """A TDX machine: TD quotes v4 and their collateral.

    `tee_tcb_svn` byte 0 is the TDX module's ISVSVN and byte 1 its major version, as in a TD
    report; with a major version > 0 the TCB info carries a ``TDX_0<major>`` module identity at
    `module_tcb_status`.
    """

    tee = "TDX"

    def __init__(
        self,
        pki: IntelPki,
        pck: Pck,
        qe: QuotingEnclave,
        tcb_status: str = "UpToDate",
        advisory_ids: tuple[str, ...] = (),
        *,
        tee_tcb_svn: bytes = bytes([4, 1, 3, 0]) + bytes(12),
        mr_signer_seam: bytes = bytes(48),
        module_tcb_status: str = "UpToDate",
    ) -> None:
        super().__init__(pki, pck, qe, tcb_status, advisory_ids)
        if len(tee_tcb_svn) != 16:
            raise ValueError(f"tee_tcb_svn: got {len(tee_tcb_svn)} bytes, expected 16")
        if len(mr_signer_seam) != 48:
            raise ValueError(f"mr_signer_seam: got {len(mr_signer_seam)} bytes, expected 48")
        self.tee_tcb_svn = tee_tcb_svn
        self.mr_signer_seam = mr_signer_seam
        self.module_tcb_status = module_tcb_status

    def report_body(
        self,
        report_data: bytes,
        *,
        mr_td: bytes,
        rtmrs: Sequence[bytes] = (bytes(48),) * 4,
        debug: bool = False,
        mr_config_id: bytes = bytes(48),
        mr_owner: bytes = bytes(48),
        mr_owner_config: bytes = bytes(48),
        mr_seam: bytes = bytes(48),
        td15: bool = False,
    ) -> bytes:
        """A TD report body on this platform (TDATTRIBUTES bit 0 is TUD.DEBUG); TD 1.5 with
        `td15`, its TEE_TCB_SVN2 equal to TEE_TCB_SVN and no service TD."""
        return td_report_body(
            report_data=pad_report_data(report_data),
            mr_td=mr_td,
            rtmrs=rtmrs,
            tee_tcb_svn=self.tee_tcb_svn,
            mr_seam=mr_seam,
            mr_signer_seam=self.mr_signer_seam,
            td_attributes=(1 if debug else 0).to_bytes(8, "little"),
            mr_config_id=mr_config_id,
            mr_owner=mr_owner,
            mr_owner_config=mr_owner_config,
            tee_tcb_svn2=self.tee_tcb_svn if td15 else None,
            mr_servicetd=bytes(48) if td15 else None,
        )

    def quote(
        self,
        report_data: bytes,
        *,
        mr_td: bytes,
        rtmrs: Sequence[bytes] = (bytes(48),) * 4,
        debug: bool = False,
        mr_config_id: bytes = bytes(48),
        mr_owner: bytes = bytes(48),
        mr_owner_config: bytes = bytes(48),
        version: int = 4,
    ) -> bytes:
        """A TDX quote over a TD report (`report_data` zero-padded to 64 bytes): version 4 with
        a TD 1.0 body, or version 5 with a TD 1.5 body."""
        body = self.report_body(
            report_data,
            mr_td=mr_td,
            rtmrs=rtmrs,
            debug=debug,
            mr_config_id=mr_config_id,
            mr_owner=mr_owner,
            mr_owner_config=mr_owner_config,
            td15=version == 5,
        )
        return self.qe.tdx_quote(body, version=version)

    def tcb_levels(self, issued: datetime) -> list[dict[str, Any]]:
        """Newest first; this platform's TEE_TCB_SVN matches the `tcb_status` level."""
        date = _tcb_date(issued)
        svns, pce, tdx = self.pck.component_svns, self.pck.pce_svn, self.tee_tcb_svn
        # With a module major version > 0, TEE_TCB_SVN bytes 0-1 belong to the module identity.
        first = 2 if tdx[1] > 0 else 0
        newer = tuple(svn + 1 if i == first else svn for i, svn in enumerate(tdx))
        older = tuple(max(svn - 1, 0) if i == first else svn for i, svn in enumerate(tdx))
        levels = []
        if self.tcb_status != "UpToDate":
            levels.append(_level(svns, pce, "UpToDate", date, (), newer))
        levels.append(
            _level(
                svns, pce, self.tcb_status, date - timedelta(days=90), self.advisory_ids, list(tdx)
            )
        )
        levels.append(
            _level(svns, pce, "OutOfDate", date - timedelta(days=365), self.advisory_ids, older)
        )
        return levels

    def tcb_info(self, now: datetime) -> dict[str, Any]:
        """The TDX TCB info v3 body (with tdxModule and tdxModuleIdentities), issued at `now`."""
        issued = _aware(now) - _BACKDATE
        date = _tcb_date(issued)
        isvsvn, major = self.tee_tcb_svn[0], self.tee_tcb_svn[1]
        identities = []
        if major > 0:
            module_levels = []
            if self.module_tcb_status != "UpToDate":
                module_levels.append(
                    {"tcb": {"isvsvn": isvsvn + 1}, "tcbDate": _iso(date), "tcbStatus": "UpToDate"}
                )
            module_levels.append(
                {
                    "tcb": {"isvsvn": isvsvn},
                    "tcbDate": _iso(date - timedelta(days=90)),
                    "tcbStatus": self.module_tcb_status,
                }
            )
            identities.append(
                {"id": f"TDX_{major:02X}", **_tdx_module_json(self.mr_signer_seam)}
                | {"tcbLevels": module_levels}
            )
        return self.pki.tcb_info(
            now,
            tee="TDX",
            fmspc=self.pck.fmspc,
            pce_id=self.pck.pce_id,
            tcb_levels=self.tcb_levels(issued),
            tdx_module=_tdx_module_json(self.mr_signer_seam),
            tdx_module_identities=identities,
        )
