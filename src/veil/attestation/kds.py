"""AMD Key Distribution Service (KDS) client: VCEK, ASK/ARK chain and CRL for an SEV-SNP report.

The KDS interface (AMD "Versioned Chip Endorsement Key (VCEK) Certificate and KDS Interface
Specification", #57230) serves:

- ``/vcek/v1/{product}/{hwid}?blSPL=..&teeSPL=..&snpSPL=..&ucodeSPL=..`` the VCEK (DER) of one
  chip at one TCB; Turin (family 1Ah) takes the first 8 bytes of CHIP_ID as hwID and adds
  ``fmcSPL``;
- ``/vcek/v1/{product}/cert_chain`` and ``/vlek/v1/{product}/cert_chain``: PEM, ASK (or ASVK)
  then ARK;
- ``/vcek/v1/{product}/crl`` and ``/vlek/v1/{product}/crl``: the ARK-signed CRL (DER).

There is no VLEK endpoint by hwID: a VLEK is provisioned to the cloud provider and reaches the
guest only through the host's certificate table (configfs-tsm ``auxblob``).

Nothing fetched here is trusted: each item is only checked to parse and to be what was asked for
(size, certificate or CRL, subject kind); `veil.attestation.verify.snp` verifies the chain to the
pinned ARK. HTTP goes through an injected getter (`HttpGet`), so tests serve canned answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from veil.attestation.abi.snp import SigningKey, SnpReport, SnpTcb, parse_snp_report
from veil.attestation.collateral_source import HttpGet
from veil.attestation.verify.snp import PRODUCTS, SnpCollateral, product_from_cpuid
from veil.errors import CollateralError, EvidenceUnavailableError, MalformedEvidenceError

__all__ = [
    "AMD_KDS_URL",
    "MAX_CERT_BYTES",
    "MAX_CRL_BYTES",
    "KdsClient",
    "VcekRequest",
    "snp_collateral_to_map",
    "vcek_request",
]

AMD_KDS_URL = "https://kdsintf.amd.com"
# A VCEK is about 1.3 KiB and the ASK+ARK chain about 4 KiB; AMD's CRLs are a few KiB. The
# bounds leave room for growth while keeping a hostile or broken service from filling memory.
MAX_CERT_BYTES = 16 << 10
MAX_CRL_BYTES = 1 << 20
_TURIN_HWID_BYTES = 8


@dataclass(frozen=True, slots=True)
class VcekRequest:
    """What identifies one VCEK: the product, the chip's hwID and the TCB it was derived at."""

    product: str
    hwid: bytes
    tcb: SnpTcb

    def path(self) -> str:
        """The KDS path and query for this VCEK (spec section "Get VCEK Certificate")."""
        query = [
            f"blSPL={self.tcb.bootloader}",
            f"teeSPL={self.tcb.tee}",
            f"snpSPL={self.tcb.snp}",
            f"ucodeSPL={self.tcb.microcode}",
        ]
        if self.tcb.fmc is not None:
            query.insert(0, f"fmcSPL={self.tcb.fmc}")
        return f"/vcek/v1/{self.product}/{self.hwid.hex()}?{'&'.join(query)}"


def report_product(report: SnpReport, product: str | None) -> str:
    """The product of `report`: from CPUID (version 3+), else `product`; both must agree.

    Raises:
        CollateralError: no product known, an unknown name, or a disagreement.
    """
    if product is not None and product not in PRODUCTS:
        raise CollateralError(f"product: got {product!r}, expected one of {', '.join(PRODUCTS)}")
    from_cpuid = None
    if report.cpuid_fam_id is not None and report.cpuid_mod_id is not None:
        from_cpuid = product_from_cpuid(report.cpuid_fam_id, report.cpuid_mod_id)
        if from_cpuid is None:
            raise CollateralError(
                f"product: CPUID family {report.cpuid_fam_id:#x} model {report.cpuid_mod_id:#x} "
                f"names no SEV-SNP product, expected one of {', '.join(PRODUCTS)}"
            )
    if from_cpuid is not None and product is not None and from_cpuid != product:
        raise CollateralError(f"product: got {product!r}, the report's CPUID says {from_cpuid!r}")
    chosen = from_cpuid or product
    if chosen is None:
        raise CollateralError(
            f"product: a version {report.version} report does not name its CPU; "
            f"give the product ({', '.join(PRODUCTS)})"
        )
    return chosen


def vcek_request(report: SnpReport, *, product: str | None = None) -> VcekRequest:
    """The VCEK that signs `report`, as a KDS request.

    Args:
        report: the parsed report; its REPORTED_TCB and CHIP_ID select the VCEK.
        product: "Milan", "Genoa" or "Turin"; needed for version 2 reports, which carry no CPUID.

    Raises:
        CollateralError: a VLEK-signed or unsigned report, a masked chip ID, or no product.
    """
    if report.signing_key != SigningKey.VCEK:
        raise CollateralError(
            f"SNP report: SIGNING_KEY got {report.signing_key}, expected 0 (VCEK): a VLEK comes "
            "from the host's certificate table, AMD KDS serves none by hwID"
        )
    if report.mask_chip_key or not any(report.chip_id):
        raise CollateralError(
            "SNP report: CHIP_ID is masked (zero): the VCEK cannot be looked up by hwID"
        )
    chosen = report_product(report, product)
    turin = chosen == "Turin"
    hwid = report.chip_id[:_TURIN_HWID_BYTES] if turin else report.chip_id
    return VcekRequest(
        product=chosen, hwid=hwid, tcb=SnpTcb.from_raw(report.reported_tcb, turin=turin)
    )


def _common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


class KdsClient:
    """Fetches SEV-SNP collateral from AMD KDS (or a mirror) through an injected getter.

    Example::

        from veil.providers.pcs import httpx_getter

        kds = KdsClient(get=httpx_getter())
        collateral = kds.collateral(report_bytes)   # VCEK, ASK/ARK chain, CRL

    Args:
        base_url: the KDS root (default AMD's public ``https://kdsintf.amd.com``).
        get: ``get(url) -> (body, headers)``; it must raise on an HTTP error and should bound
            the body and the time (`veil.providers.pcs.httpx_getter` does both).
    """

    def __init__(self, base_url: str = AMD_KDS_URL, *, get: HttpGet) -> None:
        self._base = base_url.rstrip("/")
        self._get = get

    def _fetch(self, path: str, limit: int, what: str) -> bytes:
        try:
            body, _ = self._get(f"{self._base}{path}")
        except CollateralError:
            raise
        except Exception as exc:
            # The exception text may carry the whole URL and server text: name the type only.
            raise EvidenceUnavailableError(
                f"AMD KDS {what}: {_describe(exc)} from {self._base}"
            ) from exc
        if len(body) > limit:
            raise CollateralError(
                f"AMD KDS {what}: got {len(body)} bytes, expected at most {limit}"
            )
        return bytes(body)

    def vcek(self, request: VcekRequest) -> bytes:
        """The VCEK certificate (DER) for `request`; checked to be a VCEK of that product.

        Raises:
            EvidenceUnavailableError: the service failed (down, time-out, 404).
            CollateralError / MalformedEvidenceError: the answer is not that VCEK.
        """
        der = self._fetch(request.path(), MAX_CERT_BYTES, "VCEK")
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            raise MalformedEvidenceError("AMD KDS VCEK: not a DER certificate") from None
        if _common_name(cert) != "SEV-VCEK":
            raise CollateralError(
                f"AMD KDS VCEK: subject CN got {_common_name(cert)!r}, expected 'SEV-VCEK'"
            )
        return der

    def cert_chain(self, product: str, *, vlek: bool = False) -> str:
        """PEM of the ASK (or, for VLEKs, the ASVK) then the ARK of `product`.

        Raises:
            EvidenceUnavailableError: the service failed.
            CollateralError / MalformedEvidenceError: not two certificates of that product.
        """
        kind = "vlek" if vlek else "vcek"
        what = f"{kind.upper()} cert_chain"
        body = self._fetch(f"/{kind}/v1/{_product(product)}/cert_chain", MAX_CERT_BYTES, what)
        try:
            certs = x509.load_pem_x509_certificates(body)
        except ValueError:
            raise MalformedEvidenceError(f"AMD KDS {what}: not PEM certificates") from None
        expected = [f"SEV-VLEK-{product}" if vlek else f"SEV-{product}", f"ARK-{product}"]
        got = [_common_name(c) for c in certs]
        if got != expected:
            raise CollateralError(f"AMD KDS {what}: subjects got {got}, expected {expected}")
        return "".join(c.public_bytes(Encoding.PEM).decode("ascii") for c in certs)

    def crl(self, product: str, *, vlek: bool = False) -> bytes:
        """The ARK-signed CRL (DER) revoking ASKs/ASVKs (and VCEKs) of `product`.

        Raises:
            EvidenceUnavailableError: the service failed.
            CollateralError / MalformedEvidenceError: not a CRL issued by that product's ARK.
        """
        kind = "vlek" if vlek else "vcek"
        what = f"{kind.upper()} CRL"
        der = self._fetch(f"/{kind}/v1/{_product(product)}/crl", MAX_CRL_BYTES, what)
        try:
            crl = x509.load_der_x509_crl(der)
            issuer = crl.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
        except ValueError:
            raise MalformedEvidenceError(f"AMD KDS {what}: not a DER CRL") from None
        issuer_cn = str(issuer[0].value) if issuer else ""
        if issuer_cn != f"ARK-{product}":
            raise CollateralError(
                f"AMD KDS {what}: issuer CN got {issuer_cn!r}, expected 'ARK-{product}'"
            )
        return der

    def collateral(
        self,
        report: bytes | SnpReport,
        *,
        product: str | None = None,
        endorsement_key: bytes | None = None,
    ) -> SnpCollateral:
        """Everything a verifier needs beside `report`: VCEK, chain and CRL.

        Args:
            report: the report (bytes or parsed).
            product: needed for version 2 reports (no CPUID in them).
            endorsement_key: a VCEK or VLEK (DER) the host already supplied in its certificate
                table; then only the chain and CRL are fetched (the only way to a VLEK).
        """
        parsed = report if isinstance(report, SnpReport) else parse_snp_report(report)
        vlek = parsed.signing_key == SigningKey.VLEK
        if endorsement_key is None:
            request = vcek_request(parsed, product=product)
            chosen, key = request.product, self.vcek(request)
        else:
            named = product or _product_name(endorsement_key)
            chosen, key = report_product(parsed, named), endorsement_key
        return SnpCollateral(
            endorsement_key=key,
            intermediates_pem=self.cert_chain(chosen, vlek=vlek),
            crl=self.crl(chosen, vlek=vlek),
        )


def snp_collateral_to_map(collateral: SnpCollateral) -> dict[str, Any]:
    """The CBOR map a veil server serves for SEV-SNP: ``vcek``/``vlek``, ``cert_chain``, ``crl``.

    The key is named after the certificate's kind (subject "SEV-VLEK" → ``vlek``).
    """
    try:
        cert = x509.load_der_x509_certificate(collateral.endorsement_key)
    except ValueError:
        raise MalformedEvidenceError("SNP endorsement key: not a DER certificate") from None
    out: dict[str, Any] = {
        "vlek" if _common_name(cert) == "SEV-VLEK" else "vcek": collateral.endorsement_key
    }
    if collateral.intermediates_pem:
        out["cert_chain"] = collateral.intermediates_pem
    if collateral.crl is not None:
        out["crl"] = collateral.crl
    return out


_PRODUCT_NAME_OID = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.2")


def _product_name(der: bytes) -> str | None:
    """The product in a VCEK/VLEK's productName extension ("Milan-B0" → "Milan"), if readable.

    Only a hint for choosing KDS paths; the verifier reads and checks it again."""
    try:
        value = x509.load_der_x509_certificate(der).extensions.get_extension_for_oid(
            _PRODUCT_NAME_OID
        )
        raw = value.value.public_bytes()
    except (ValueError, x509.ExtensionNotFound):
        return None
    # An IA5String: tag 0x16, a short length, the text.
    if len(raw) < 2 or raw[0] != 0x16 or raw[1] != len(raw) - 2:
        return None
    name = raw[2:].decode("ascii", "replace").split("-", 1)[0]
    return name if name in PRODUCTS else None


def _product(product: str) -> str:
    if product not in PRODUCTS:
        raise CollateralError(f"product: got {product!r}, expected one of {', '.join(PRODUCTS)}")
    return product


def _describe(exc: BaseException) -> str:
    """A failure in a few words: the HTTP status when there is one, else the exception type."""
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if isinstance(status, int):
        return f"HTTP status {status}"
    return type(exc).__name__
