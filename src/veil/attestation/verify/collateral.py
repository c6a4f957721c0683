"""Intel DCAP collateral: the items a verifier needs beside an SGX or TDX quote.

`DcapCollateral` holds the items exactly as the issuer published them; nothing in it is trusted
until `veil.attestation.verify.dcap` has checked every signature, chain, CRL and validity window.
Loaders for the forms users meet (Intel PCS/PCCS responses, a directory of files, dcap-qvl JSON,
BlindAI's collateral map) live in `veil.attestation.collateral_source`.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DcapCollateral"]


@dataclass(frozen=True, slots=True)
class DcapCollateral:
    """Collateral for one SGX or TDX quote, as published by Intel PCS or a PCCS.

    Attributes:
        pck_crl_issuer_chain: PEM chain of the PCK CRL's issuer (Platform or Processor CA, Root CA).
        root_ca_crl: DER CRL issued by the root CA (revokes intermediate CAs).
        pck_crl: DER CRL issued by the PCK Platform/Processor CA (revokes PCK leaves).
        tcb_info_issuer_chain: PEM chain of the TCB signing certificate.
        tcb_info: the exact JSON text of the ``tcbInfo`` object, the bytes the signature covers.
        tcb_info_signature: raw ECDSA P-256 signature r‖s (64 bytes) over `tcb_info`.
        qe_identity_issuer_chain: PEM chain of the QE identity's signing certificate.
        qe_identity: the exact JSON text of the ``enclaveIdentity`` object.
        qe_identity_signature: raw r‖s over `qe_identity`.
        pck_certificate_chain: PEM PCK leaf + CA chain, when the quote does not embed it
            (certification data type 5 embeds it; then this may be None).
    """

    pck_crl_issuer_chain: str
    root_ca_crl: bytes
    pck_crl: bytes
    tcb_info_issuer_chain: str
    tcb_info: str
    tcb_info_signature: bytes
    qe_identity_issuer_chain: str
    qe_identity: str
    qe_identity_signature: bytes
    pck_certificate_chain: str | None = None
