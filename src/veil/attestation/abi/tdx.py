"""TDX TD report body (Intel TDX DCAP quote spec, "TD Quote Body"): 1.0 = 584 bytes, 1.5 = 648.

TD 1.5 (quote v5, body type 3) appends TEE_TCB_SVN2 and MRSERVICETD to the 1.0 layout.
Parsing records facts only; no trust decision is made here.
"""

from __future__ import annotations

from dataclasses import dataclass

from veil.errors import MalformedEvidenceError

__all__ = ["REPORT_DATA", "TD_REPORT_BODY_10_SIZE", "TD_REPORT_BODY_15_SIZE", "TdReportBody"]

TD_REPORT_BODY_10_SIZE = 584
TD_REPORT_BODY_15_SIZE = 648

_TEE_TCB_SVN = slice(0, 16)
_MR_SEAM = slice(16, 64)
_MR_SIGNER_SEAM = slice(64, 112)
_SEAM_ATTRIBUTES = slice(112, 120)
_TD_ATTRIBUTES = slice(120, 128)
_XFAM = slice(128, 136)
_MR_TD = slice(136, 184)
_MR_CONFIG_ID = slice(184, 232)
_MR_OWNER = slice(232, 280)
_MR_OWNER_CONFIG = slice(280, 328)
_RTMR = (slice(328, 376), slice(376, 424), slice(424, 472), slice(472, 520))
REPORT_DATA = slice(520, 584)
_TEE_TCB_SVN2 = slice(584, 600)
_MR_SERVICETD = slice(600, 648)

# TDATTRIBUTES bit 0 (TUD.DEBUG): the TD runs in debug mode, the host can read its state.
_TD_ATTRIBUTE_DEBUG = 0x01


@dataclass(frozen=True, slots=True)
class TdReportBody:
    """A TD report body, version 1.0 or 1.5.

    Attributes:
        raw: the exact body bytes as signed.
        tee_tcb_svn: 16 bytes; byte 0 is the TDX module ISVSVN, byte 1 its major version.
        mr_seam, mr_signer_seam: measurement and signer of the TDX module.
        seam_attributes, td_attributes, xfam: 8 bytes each, little-endian bit fields.
        mr_td: initial TD measurement; mr_config_id, mr_owner, mr_owner_config: 48 bytes each.
        rtmr0..rtmr3: runtime measurement registers.
        report_data: 64 bytes chosen by the TD.
        tee_tcb_svn2, mr_servicetd: TD 1.5 only; None in a 1.0 body.
    """

    raw: bytes
    tee_tcb_svn: bytes
    mr_seam: bytes
    mr_signer_seam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    xfam: bytes
    mr_td: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    rtmr0: bytes
    rtmr1: bytes
    rtmr2: bytes
    rtmr3: bytes
    report_data: bytes
    tee_tcb_svn2: bytes | None = None
    mr_servicetd: bytes | None = None

    @property
    def version(self) -> str:
        """ "1.0" or "1.5"."""
        return "1.0" if self.tee_tcb_svn2 is None else "1.5"

    @property
    def debug(self) -> bool:
        """True when TDATTRIBUTES.DEBUG is set."""
        return bool(self.td_attributes[0] & _TD_ATTRIBUTE_DEBUG)

    @classmethod
    def parse(cls, data: bytes) -> TdReportBody:
        """Parse a 584-byte (TD 1.0) or 648-byte (TD 1.5) body."""
        data = bytes(data)
        if len(data) not in (TD_REPORT_BODY_10_SIZE, TD_REPORT_BODY_15_SIZE):
            raise MalformedEvidenceError(
                f"TD report body: got {len(data)} bytes, expected "
                f"{TD_REPORT_BODY_10_SIZE} or {TD_REPORT_BODY_15_SIZE}"
            )
        is15 = len(data) == TD_REPORT_BODY_15_SIZE
        return cls(
            raw=data,
            tee_tcb_svn=data[_TEE_TCB_SVN],
            mr_seam=data[_MR_SEAM],
            mr_signer_seam=data[_MR_SIGNER_SEAM],
            seam_attributes=data[_SEAM_ATTRIBUTES],
            td_attributes=data[_TD_ATTRIBUTES],
            xfam=data[_XFAM],
            mr_td=data[_MR_TD],
            mr_config_id=data[_MR_CONFIG_ID],
            mr_owner=data[_MR_OWNER],
            mr_owner_config=data[_MR_OWNER_CONFIG],
            rtmr0=data[_RTMR[0]],
            rtmr1=data[_RTMR[1]],
            rtmr2=data[_RTMR[2]],
            rtmr3=data[_RTMR[3]],
            report_data=data[REPORT_DATA],
            tee_tcb_svn2=data[_TEE_TCB_SVN2] if is15 else None,
            mr_servicetd=data[_MR_SERVICETD] if is15 else None,
        )

    def __repr__(self) -> str:
        return (
            f"TdReportBody(version={self.version}, mr_td={self.mr_td.hex()}, "
            f"tee_tcb_svn={self.tee_tcb_svn.hex()}, td_attributes={self.td_attributes.hex()}, "
            f"report_data={self.report_data.hex()})"
        )
