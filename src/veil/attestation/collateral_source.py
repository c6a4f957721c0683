"""Where collateral comes from: offline files, dcap-qvl JSON, BlindAI's map, Intel PCS.

Every loader returns a `DcapCollateral` holding the items exactly as published; nothing is
trusted here (`veil.attestation.verify.dcap` checks it all). Signed JSON (TCB info, QE identity)
is kept as the exact byte span of the signed object inside the response, never re-serialised,
because the signature covers those bytes. The PCS loader takes its HTTP getter as an argument,
so tests serve recorded responses and nothing here touches the network by itself.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from veil.attestation.verify.collateral import DcapCollateral
from veil.attestation.verify.snp import SnpCollateral
from veil.errors import CollateralError, MalformedEvidenceError

__all__ = [
    "INTEL_PCS_URL",
    "collateral_from_blindai_map",
    "collateral_from_dcap_qvl_json",
    "collateral_from_directory",
    "collateral_from_pcs",
    "collateral_to_blindai_map",
    "collateral_to_directory",
    "extract_signed_json",
    "load_collateral_directory",
    "snp_collateral_from_directory",
]

INTEL_PCS_URL = "https://api.trustedservices.intel.com"
# Intel publishes the root CA CRL beside its certificates, not under the PCS API.
INTEL_ROOT_CA_CRL_URL = "https://certificates.trustedservices.intel.com/IntelSGXRootCA.der"
_BLINDAI_COLLATERAL_VERSION = 3

HttpGet = Callable[[str], tuple[bytes, Mapping[str, str]]]


# --- exact signed JSON spans ------------------------------------------------------------------


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _string_end(text: str, pos: int) -> int:
    """Index just after the JSON string starting at `pos` (a quote character)."""
    pos += 1
    while pos < len(text):
        ch = text[pos]
        if ch == "\\":
            pos += 2
            continue
        if ch == '"':
            return pos + 1
        pos += 1
    raise MalformedEvidenceError("JSON: unterminated string")


def _value_end(text: str, pos: int) -> int:
    """Index just after the JSON value starting at `pos`."""
    if pos >= len(text):
        raise MalformedEvidenceError("JSON: value expected")
    if text[pos] == '"':
        return _string_end(text, pos)
    if text[pos] in "{[":
        depth = 0
        while pos < len(text):
            ch = text[pos]
            if ch == '"':
                pos = _string_end(text, pos)
                continue
            if ch in "{[":
                depth += 1
            elif ch in "}]":
                depth -= 1
                if depth == 0:
                    return pos + 1
            pos += 1
        raise MalformedEvidenceError("JSON: unterminated object")
    end = pos
    while end < len(text) and text[end] not in ",}] \t\r\n":
        end += 1
    return end


def extract_signed_json(body: str | bytes, key: str, what: str) -> tuple[str, bytes]:
    """From a PCS body ``{"<key>": {...}, "signature": "<hex>"}`` return the exact text of the
    ``<key>`` value and the raw signature bytes.

    Raises:
        MalformedEvidenceError: not such a body.
    """
    text = body.decode("utf-8") if isinstance(body, bytes) else body
    try:
        parsed = json.loads(text)
    except ValueError:
        raise MalformedEvidenceError(f"{what}: not JSON") from None
    if not isinstance(parsed, dict) or key not in parsed or "signature" not in parsed:
        raise MalformedEvidenceError(f"{what}: expected an object with {key!r} and 'signature'")
    signature = _hex(parsed["signature"], f"{what}.signature")
    # json.loads accepted the text, so this walk over the top-level members is on valid JSON.
    pos = _skip_ws(text, 0) + 1
    span: str | None = None
    while True:
        pos = _skip_ws(text, pos)
        if text[pos] == "}":
            break
        key_end = _string_end(text, pos)
        name = json.loads(text[pos:key_end])
        pos = _skip_ws(text, key_end) + 1  # past ':'
        pos = _skip_ws(text, pos)
        end = _value_end(text, pos)
        if name == key:
            # Duplicate keys would make "the signed object" ambiguous.
            if span is not None:
                raise MalformedEvidenceError(f"{what}: {key!r} appears twice")
            span = text[pos:end]
        pos = _skip_ws(text, end)
        if text[pos] == ",":
            pos += 1
    if span is None or not span.startswith("{"):
        raise MalformedEvidenceError(f"{what}: {key!r} is not an object")
    return span, signature


def _hex(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise MalformedEvidenceError(f"{what}: expected a hex string")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise MalformedEvidenceError(f"{what}: not hex") from None


def _crl_bytes(value: str | bytes, what: str) -> bytes:
    """Accept a CRL as PEM, hex DER or raw DER; return it unchanged but for hex decoding."""
    raw = value.encode("latin-1") if isinstance(value, str) else bytes(value)
    if raw[:1] == b"\x30":
        return raw  # DER: stripping could eat signature bytes that look like whitespace
    stripped = raw.strip()
    if stripped.startswith(b"-----BEGIN"):
        return stripped
    try:
        return bytes.fromhex(stripped.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise MalformedEvidenceError(f"{what}: neither PEM, DER nor hex") from None


def _str(m: Mapping[str, Any], key: str, what: str) -> str:
    value = m.get(key)
    if not isinstance(value, str):
        raise MalformedEvidenceError(f"{what}: {key!r} missing or not a string")
    return value


# --- loaders ---------------------------------------------------------------------------------


def collateral_from_dcap_qvl_json(data: str | bytes) -> DcapCollateral:
    """Load dcap-qvl's ``QuoteCollateralV3`` JSON (CRLs and signatures in hex).

    Example:
        >>> text = Path("sgx_quote_collateral.json").read_text()  # doctest: +SKIP
        >>> collateral = collateral_from_dcap_qvl_json(text)  # doctest: +SKIP
    """
    what = "dcap-qvl collateral"
    try:
        obj = json.loads(data)
    except ValueError:
        raise MalformedEvidenceError(f"{what}: not JSON") from None
    if not isinstance(obj, dict):
        raise MalformedEvidenceError(f"{what}: expected a JSON object")
    chain = obj.get("pck_certificate_chain")
    return DcapCollateral(
        pck_crl_issuer_chain=_str(obj, "pck_crl_issuer_chain", what),
        root_ca_crl=_crl_bytes(_str(obj, "root_ca_crl", what), f"{what}.root_ca_crl"),
        pck_crl=_crl_bytes(_str(obj, "pck_crl", what), f"{what}.pck_crl"),
        tcb_info_issuer_chain=_str(obj, "tcb_info_issuer_chain", what),
        tcb_info=_str(obj, "tcb_info", what),
        tcb_info_signature=_hex(obj.get("tcb_info_signature"), f"{what}.tcb_info_signature"),
        qe_identity_issuer_chain=_str(obj, "qe_identity_issuer_chain", what),
        qe_identity=_str(obj, "qe_identity", what),
        qe_identity_signature=_hex(
            obj.get("qe_identity_signature"), f"{what}.qe_identity_signature"
        ),
        pck_certificate_chain=chain if isinstance(chain, str) else None,
    )


def collateral_from_directory(path: Path) -> DcapCollateral:
    """Load collateral from one file per item (PCS response bodies for the JSON items):

    ``pck_crl_issuer_chain.pem``, ``root_ca_crl.der``, ``pck_crl.der``,
    ``tcb_info_issuer_chain.pem``, ``tcb_info.json``, ``qe_identity_issuer_chain.pem``,
    ``qe_identity.json``, and optionally ``pck_cert_chain.pem``.
    """

    def read(name: str) -> bytes:
        try:
            return (path / name).read_bytes()
        except FileNotFoundError:
            raise CollateralError(f"collateral directory: {name} missing") from None

    tcb_info, tcb_sig = extract_signed_json(read("tcb_info.json"), "tcbInfo", "tcb_info.json")
    qe_id, qe_sig = extract_signed_json(
        read("qe_identity.json"), "enclaveIdentity", "qe_identity.json"
    )
    chain_file = path / "pck_cert_chain.pem"
    return DcapCollateral(
        pck_crl_issuer_chain=read("pck_crl_issuer_chain.pem").decode("ascii", "replace"),
        root_ca_crl=_crl_bytes(read("root_ca_crl.der"), "root_ca_crl.der"),
        pck_crl=_crl_bytes(read("pck_crl.der"), "pck_crl.der"),
        tcb_info_issuer_chain=read("tcb_info_issuer_chain.pem").decode("ascii", "replace"),
        tcb_info=tcb_info,
        tcb_info_signature=tcb_sig,
        qe_identity_issuer_chain=read("qe_identity_issuer_chain.pem").decode("ascii", "replace"),
        qe_identity=qe_id,
        qe_identity_signature=qe_sig,
        pck_certificate_chain=(
            chain_file.read_text("ascii", "replace") if chain_file.is_file() else None
        ),
    )


# One file per SEV-SNP item: the endorsement key under its kind's name, AMD's chain and CRL.
SNP_DIRECTORY_FILES = ("vcek.der", "vlek.der", "cert_chain.pem", "crl.der")
# What `collateral_from_directory` reads, and `collateral_to_directory` writes, for DCAP.
DCAP_DIRECTORY_FILES = (
    "pck_crl_issuer_chain.pem",
    "root_ca_crl.der",
    "pck_crl.der",
    "tcb_info_issuer_chain.pem",
    "tcb_info.json",
    "qe_identity_issuer_chain.pem",
    "qe_identity.json",
    "pck_cert_chain.pem",
)


def snp_collateral_from_directory(path: Path) -> SnpCollateral:
    """Load SEV-SNP collateral from ``vcek.der`` or ``vlek.der`` (DER), and optionally
    ``cert_chain.pem`` (ASK/ASVK then ARK, as KDS serves it) and ``crl.der`` (the ARK's CRL).

    Raises:
        CollateralError: neither or both endorsement key files.
        OSError: a file cannot be read.
    """
    keys = [name for name in ("vcek.der", "vlek.der") if (path / name).is_file()]
    if len(keys) != 1:
        raise CollateralError(
            f"SNP collateral directory: got {keys or 'no key file'}, expected exactly one of "
            "vcek.der and vlek.der"
        )
    chain, crl = path / "cert_chain.pem", path / "crl.der"
    return SnpCollateral(
        endorsement_key=(path / keys[0]).read_bytes(),
        intermediates_pem=chain.read_text("ascii", "replace") if chain.is_file() else None,
        crl=crl.read_bytes() if crl.is_file() else None,
    )


def load_collateral_directory(path: Path) -> DcapCollateral | SnpCollateral:
    """A directory written by ``veil collateral fetch``: SEV-SNP when it holds ``vcek.der`` or
    ``vlek.der``, Intel DCAP (`collateral_from_directory`) otherwise."""
    if any((path / name).is_file() for name in ("vcek.der", "vlek.der")):
        return snp_collateral_from_directory(path)
    return collateral_from_directory(path)


def collateral_to_directory(collateral: DcapCollateral | SnpCollateral, path: Path) -> list[str]:
    """Write `collateral` as the files `load_collateral_directory` reads; returns their names.

    Signed JSON goes back into PCS bodies with its exact bytes. The directory is created if
    needed; files of the other platform's layout are left alone.
    """
    path.mkdir(parents=True, exist_ok=True)
    files: dict[str, bytes] = {}
    if isinstance(collateral, SnpCollateral):
        kind = "vlek" if _is_vlek(collateral.endorsement_key) else "vcek"
        files[f"{kind}.der"] = collateral.endorsement_key
        if collateral.intermediates_pem:
            files["cert_chain.pem"] = collateral.intermediates_pem.encode("ascii")
        if collateral.crl is not None:
            files["crl.der"] = collateral.crl
    else:
        c = collateral
        files = {
            "pck_crl_issuer_chain.pem": c.pck_crl_issuer_chain.encode("ascii"),
            "root_ca_crl.der": c.root_ca_crl,
            "pck_crl.der": c.pck_crl,
            "tcb_info_issuer_chain.pem": c.tcb_info_issuer_chain.encode("ascii"),
            "tcb_info.json": (
                f'{{"tcbInfo":{c.tcb_info},"signature":"{c.tcb_info_signature.hex()}"}}'
            ).encode(),
            "qe_identity_issuer_chain.pem": c.qe_identity_issuer_chain.encode("ascii"),
            "qe_identity.json": (
                f'{{"enclaveIdentity":{c.qe_identity},'
                f'"signature":"{c.qe_identity_signature.hex()}"}}'
            ).encode(),
        }
        if c.pck_certificate_chain is not None:
            files["pck_cert_chain.pem"] = c.pck_certificate_chain.encode("ascii")
    for name, data in files.items():
        (path / name).write_bytes(data)
    return sorted(files)


def _is_vlek(der: bytes) -> bool:
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        raise MalformedEvidenceError("SNP endorsement key: not a DER certificate") from None
    names = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
    return bool(names) and names[0].value == "SEV-VLEK"


_BLINDAI_KEYS = (
    "pck_certificate",
    "pck_crl_issuer_chain",
    "pck_signing_chain",
    "root_ca_crl",
    "pck_crl",
    "tcb_info",
    "tcb_info_issuer_chain",
    "qe_identity",
    "qe_identity_issuer_chain",
)


def collateral_from_blindai_map(m: Mapping[str, Any]) -> DcapCollateral:
    """Load BlindAI 0.6's collateral map (``GET /collateral``): PEM chains, CRLs as PEM or hex
    or DER, and ``tcb_info`` / ``qe_identity`` as full PCS response bodies."""
    what = "BlindAI collateral"
    version = m.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise MalformedEvidenceError(f"{what}: 'version' missing or not an integer")
    fields = {k: _str(m, k, what) for k in _BLINDAI_KEYS}
    tcb_info, tcb_sig = extract_signed_json(fields["tcb_info"], "tcbInfo", f"{what}.tcb_info")
    qe_id, qe_sig = extract_signed_json(
        fields["qe_identity"], "enclaveIdentity", f"{what}.qe_identity"
    )
    leaf = fields["pck_certificate"].strip()
    signing = fields["pck_signing_chain"].strip()
    chain = f"{leaf}\n{signing}\n" if leaf else None
    return DcapCollateral(
        pck_crl_issuer_chain=fields["pck_crl_issuer_chain"],
        root_ca_crl=_crl_bytes(fields["root_ca_crl"], f"{what}.root_ca_crl"),
        pck_crl=_crl_bytes(fields["pck_crl"], f"{what}.pck_crl"),
        tcb_info_issuer_chain=fields["tcb_info_issuer_chain"],
        tcb_info=tcb_info,
        tcb_info_signature=tcb_sig,
        qe_identity_issuer_chain=fields["qe_identity_issuer_chain"],
        qe_identity=qe_id,
        qe_identity_signature=qe_sig,
        pck_certificate_chain=chain,
    )


def _crl_pem(data: bytes, what: str) -> str:
    if data.strip().startswith(b"-----BEGIN"):
        return data.decode("ascii")
    try:
        crl = x509.load_der_x509_crl(data)
    except ValueError:
        raise MalformedEvidenceError(f"{what}: not a DER CRL") from None
    return crl.public_bytes(Encoding.PEM).decode("ascii")


def collateral_to_blindai_map(c: DcapCollateral) -> dict[str, Any]:
    """The BlindAI 0.6 collateral map for `c` (what ``veil serve`` answers on GET /collateral).

    The signed JSON objects are wrapped back into PCS bodies without touching their bytes.
    """
    leaf, signing = "", ""
    if c.pck_certificate_chain is not None:
        certs = x509.load_pem_x509_certificates(c.pck_certificate_chain.encode("ascii"))
        leaf = certs[0].public_bytes(Encoding.PEM).decode("ascii")
        signing = "".join(x.public_bytes(Encoding.PEM).decode("ascii") for x in certs[1:])
    return {
        "version": _BLINDAI_COLLATERAL_VERSION,
        "pck_certificate": leaf,
        "pck_crl_issuer_chain": c.pck_crl_issuer_chain,
        "pck_signing_chain": signing,
        "root_ca_crl": _crl_pem(c.root_ca_crl, "root_ca_crl"),
        "pck_crl": _crl_pem(c.pck_crl, "pck_crl"),
        "tcb_info": f'{{"tcbInfo":{c.tcb_info},"signature":"{c.tcb_info_signature.hex()}"}}',
        "tcb_info_issuer_chain": c.tcb_info_issuer_chain,
        "qe_identity": (
            f'{{"enclaveIdentity":{c.qe_identity},"signature":"{c.qe_identity_signature.hex()}"}}'
        ),
        "qe_identity_issuer_chain": c.qe_identity_issuer_chain,
    }


def _header(headers: Mapping[str, str], *names: str) -> str:
    lowered = {k.lower(): v for k, v in headers.items()}
    for name in names:
        value = lowered.get(name.lower())
        if value is not None:
            # PCS sends issuer chains URL-encoded (RFC 3986) in the header.
            return unquote(value)
    raise CollateralError(f"PCS response: header {names[0]} missing")


def collateral_from_pcs(
    fmspc: bytes,
    ca: str,
    *,
    tdx: bool,
    get: HttpGet,
    base_url: str = INTEL_PCS_URL,
) -> DcapCollateral:
    """Fetch collateral from Intel PCS API v4 (or a PCCS) through the injected getter.

    Args:
        fmspc: the 6-byte FMSPC from the PCK certificate.
        ca: "processor" or "platform": which PCK CA issued the PCK certificate.
        tdx: fetch TDX TCB info and TD_QE identity instead of SGX's.
        get: ``get(url) -> (body, headers)``; it must raise on an HTTP error.
        base_url: PCS or PCCS root URL.
    """
    if len(fmspc) != 6:
        raise CollateralError(f"fmspc: got {len(fmspc)} bytes, expected 6")
    if ca not in ("processor", "platform"):
        raise CollateralError(f"PCK CA: got {ca!r}, expected 'processor' or 'platform'")
    base = base_url.rstrip("/")
    tee = "tdx" if tdx else "sgx"
    tcb_body, tcb_headers = get(f"{base}/{tee}/certification/v4/tcb?fmspc={fmspc.hex().upper()}")
    qe_body, qe_headers = get(f"{base}/{tee}/certification/v4/qe/identity")
    crl_body, crl_headers = get(f"{base}/sgx/certification/v4/pckcrl?ca={ca}&encoding=der")
    root_url = (
        INTEL_ROOT_CA_CRL_URL if base == INTEL_PCS_URL else f"{base}/sgx/certification/v4/rootcacrl"
    )
    root_body, _ = get(root_url)
    tcb_info, tcb_sig = extract_signed_json(tcb_body, "tcbInfo", "PCS TCB info")
    qe_id, qe_sig = extract_signed_json(qe_body, "enclaveIdentity", "PCS QE identity")
    return DcapCollateral(
        pck_crl_issuer_chain=_header(crl_headers, "SGX-PCK-CRL-Issuer-Chain"),
        root_ca_crl=_crl_bytes(root_body, "root CA CRL"),
        pck_crl=_crl_bytes(crl_body, "PCK CRL"),
        tcb_info_issuer_chain=_header(
            tcb_headers, "TCB-Info-Issuer-Chain", "SGX-TCB-Info-Issuer-Chain"
        ),
        tcb_info=tcb_info,
        tcb_info_signature=tcb_sig,
        qe_identity_issuer_chain=_header(qe_headers, "SGX-Enclave-Identity-Issuer-Chain"),
        qe_identity=qe_id,
        qe_identity_signature=qe_sig,
    )
