"""Intel TCB info (v3, SGX and TDX) and QE identity (v2) models, and Intel's TCB-level matching.

Formats: Intel PCS API v4, "TCB Info V3" and "Enclave Identity V2". Matching follows the DCAP
Quote Verification Library (QVL): the first level (levels are ordered newest first) whose every
SGX TCB component and PCESVN are <= the PCK's (and, for TDX, every TEE_TCB_SVN component, the
first two skipped when the TDX module's major version is > 0) gives the status and advisories.
The models are built only from JSON whose signature has already been checked.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from veil.attestation.abi.sgx import SgxReportBody
from veil.attestation.abi.tdx import TdReportBody
from veil.errors import CollateralError, MalformedEvidenceError, TcbError

__all__ = [
    "KNOWN_TCB_STATUSES",
    "IsvSvnTcbLevel",
    "QeIdentity",
    "TcbInfo",
    "TcbLevel",
    "TdxModule",
    "TdxModuleIdentity",
    "converge_status",
    "match_qe_identity",
    "match_tcb_level",
    "match_tdx_module",
]

UP_TO_DATE = "UpToDate"
SW_HARDENING = "SWHardeningNeeded"
CONFIG = "ConfigurationNeeded"
CONFIG_SW = "ConfigurationAndSWHardeningNeeded"
OUT_OF_DATE = "OutOfDate"
OUT_OF_DATE_CONFIG = "OutOfDateConfigurationNeeded"
REVOKED = "Revoked"
KNOWN_TCB_STATUSES = frozenset(
    {UP_TO_DATE, SW_HARDENING, CONFIG, CONFIG_SW, OUT_OF_DATE, OUT_OF_DATE_CONFIG, REVOKED}
)

# Each status as a set of conditions, so that two statuses converge the way Intel's QVL does
# (e.g. QE OutOfDate + platform ConfigurationNeeded -> OutOfDateConfigurationNeeded).
_FLAGS: Mapping[str, frozenset[str]] = {
    UP_TO_DATE: frozenset(),
    SW_HARDENING: frozenset({"sw"}),
    CONFIG: frozenset({"cfg"}),
    CONFIG_SW: frozenset({"cfg", "sw"}),
    OUT_OF_DATE: frozenset({"ood"}),
    OUT_OF_DATE_CONFIG: frozenset({"ood", "cfg"}),
}


def converge_status(platform: str, other: str) -> str:
    """Combine the platform TCB status with the QE's or TDX module's status (Intel QVL rules)."""
    if REVOKED in (platform, other):
        raise TcbError(f"TCB status: got {REVOKED}, expected a non-revoked TCB level")
    flags = _FLAGS[platform] | _FLAGS[other]
    if "ood" in flags:
        flags -= {"sw"}  # OutOfDate already implies the software fixes are missing
    for name, f in _FLAGS.items():
        if f == flags:
            return name
    raise TcbError(f"TCB status: cannot combine {platform} with {other}")  # pragma: no cover


# --- JSON access helpers: every missing/mistyped field is a MalformedEvidenceError ----------


def _get(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    if key not in obj:
        raise MalformedEvidenceError(f"{what}: field {key!r} missing")
    value = obj[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise MalformedEvidenceError(f"{what}.{key}: got {type(value).__name__}")
    return value


def _hex(obj: Mapping[str, Any], key: str, size: int, what: str) -> bytes:
    text = _get(obj, key, str, what)
    try:
        value = bytes.fromhex(text)
    except ValueError:
        raise MalformedEvidenceError(f"{what}.{key}: not hex") from None
    if len(value) != size:
        raise MalformedEvidenceError(f"{what}.{key}: got {len(value)} bytes, expected {size}")
    return value


def _time(obj: Mapping[str, Any], key: str, what: str) -> datetime:
    text = _get(obj, key, str, what)
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise MalformedEvidenceError(f"{what}.{key}: not an ISO 8601 time") from None
    if value.tzinfo is None:
        raise MalformedEvidenceError(f"{what}.{key}: time without a zone")
    return value


def _status(obj: Mapping[str, Any], what: str) -> str:
    status: str = _get(obj, "tcbStatus", str, what)
    if status not in KNOWN_TCB_STATUSES:
        raise CollateralError(f"{what}.tcbStatus: got {status!r}, expected one of Intel's statuses")
    return status


def _advisories(obj: Mapping[str, Any], what: str) -> tuple[str, ...]:
    ids = obj.get("advisoryIDs", [])
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise MalformedEvidenceError(f"{what}.advisoryIDs: expected a list of strings")
    return tuple(ids)


def _svns(obj: Mapping[str, Any], key: str, what: str) -> tuple[int, ...]:
    comps = _get(obj, key, list, what)
    if len(comps) != 16:
        raise MalformedEvidenceError(f"{what}.{key}: got {len(comps)} components, expected 16")
    out = []
    for c in comps:
        if not isinstance(c, dict):
            raise MalformedEvidenceError(f"{what}.{key}: component is not an object")
        out.append(_get(c, "svn", int, f"{what}.{key}"))
    return tuple(out)


def _load_object(text: str, what: str) -> Mapping[str, Any]:
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        raise MalformedEvidenceError(f"{what}: not JSON") from None
    if not isinstance(obj, dict):
        raise MalformedEvidenceError(f"{what}: expected a JSON object")
    return obj


# --- TCB info ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TcbLevel:
    sgx_components: tuple[int, ...]
    pcesvn: int
    tdx_components: tuple[int, ...] | None
    tcb_date: datetime
    tcb_status: str
    advisory_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class TdxModule:
    mrsigner: bytes
    attributes: bytes
    attributes_mask: bytes


@dataclass(frozen=True, slots=True)
class IsvSvnTcbLevel:
    """A TCB level keyed by one ISVSVN: a TDX module identity's or the QE identity's."""

    isvsvn: int
    tcb_date: datetime
    tcb_status: str
    advisory_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class TdxModuleIdentity:
    id: str
    module: TdxModule
    tcb_levels: tuple[IsvSvnTcbLevel, ...]


@dataclass(frozen=True, slots=True)
class TcbInfo:
    """A TCB info v3 body (``tcbInfo``), SGX or TDX."""

    id: str
    version: int
    issue_date: datetime
    next_update: datetime
    fmspc: bytes
    pce_id: bytes
    tcb_type: int
    tcb_evaluation_data_number: int
    tcb_levels: tuple[TcbLevel, ...]
    tdx_module: TdxModule | None
    tdx_module_identities: tuple[TdxModuleIdentity, ...]

    @classmethod
    def from_json(cls, text: str) -> TcbInfo:
        """Parse the exact ``tcbInfo`` JSON text (its signature must already be checked)."""
        what = "tcbInfo"
        obj = _load_object(text, what)
        tcb_id = _get(obj, "id", str, what)
        version = _get(obj, "version", int, what)
        if tcb_id not in ("SGX", "TDX"):
            raise CollateralError(f"tcbInfo.id: got {tcb_id!r}, expected 'SGX' or 'TDX'")
        if version != 3:
            raise CollateralError(f"tcbInfo.version: got {version}, expected 3")
        tcb_type = _get(obj, "tcbType", int, what)
        if tcb_type != 0:
            raise CollateralError(f"tcbInfo.tcbType: got {tcb_type}, expected 0")
        is_tdx = tcb_id == "TDX"
        levels = []
        for lv in _get(obj, "tcbLevels", list, what):
            lw = f"{what}.tcbLevels[]"
            if not isinstance(lv, dict):
                raise MalformedEvidenceError(f"{lw}: not an object")
            tcb = _get(lv, "tcb", dict, lw)
            levels.append(
                TcbLevel(
                    sgx_components=_svns(tcb, "sgxtcbcomponents", lw),
                    pcesvn=_get(tcb, "pcesvn", int, lw),
                    tdx_components=_svns(tcb, "tdxtcbcomponents", lw) if is_tdx else None,
                    tcb_date=_time(lv, "tcbDate", lw),
                    tcb_status=_status(lv, lw),
                    advisory_ids=_advisories(lv, lw),
                )
            )
        if not levels:
            raise CollateralError("tcbInfo.tcbLevels: empty")
        module = None
        identities: list[TdxModuleIdentity] = []
        if is_tdx:
            module = _module(_get(obj, "tdxModule", dict, what), f"{what}.tdxModule")
            for ident in obj.get("tdxModuleIdentities", []):
                iw = f"{what}.tdxModuleIdentities[]"
                if not isinstance(ident, dict):
                    raise MalformedEvidenceError(f"{iw}: not an object")
                mlevels = []
                for ml in _get(ident, "tcbLevels", list, iw):
                    if not isinstance(ml, dict):
                        raise MalformedEvidenceError(f"{iw}.tcbLevels[]: not an object")
                    mtcb = _get(ml, "tcb", dict, iw)
                    mlevels.append(
                        IsvSvnTcbLevel(
                            isvsvn=_get(mtcb, "isvsvn", int, iw),
                            tcb_date=_time(ml, "tcbDate", iw),
                            tcb_status=_status(ml, iw),
                            advisory_ids=_advisories(ml, iw),
                        )
                    )
                identities.append(
                    TdxModuleIdentity(
                        _get(ident, "id", str, iw), _module(ident, iw), tuple(mlevels)
                    )
                )
        return cls(
            id=tcb_id,
            version=version,
            issue_date=_time(obj, "issueDate", what),
            next_update=_time(obj, "nextUpdate", what),
            fmspc=_hex(obj, "fmspc", 6, what),
            pce_id=_hex(obj, "pceId", 2, what),
            tcb_type=tcb_type,
            tcb_evaluation_data_number=_get(obj, "tcbEvaluationDataNumber", int, what),
            tcb_levels=tuple(levels),
            tdx_module=module,
            tdx_module_identities=tuple(identities),
        )


def _module(obj: Mapping[str, Any], what: str) -> TdxModule:
    return TdxModule(
        mrsigner=_hex(obj, "mrsigner", 48, what),
        attributes=_hex(obj, "attributes", 8, what),
        attributes_mask=_hex(obj, "attributesMask", 8, what),
    )


def match_tcb_level(
    tcb_info: TcbInfo, pck_components: Sequence[int], pcesvn: int, tee_tcb_svn: bytes | None
) -> TcbLevel:
    """Return the first TCB level the platform meets (Intel QVL TCB level matching).

    `tee_tcb_svn` is the TD report's TEE_TCB_SVN for TDX quotes, None for SGX.

    Raises:
        TcbError: no level matches (Intel: "TCB not supported"); this is a failure, not a status.
    """
    skip = 0
    if tee_tcb_svn is not None and tee_tcb_svn[1] > 0:
        # TDX module major version > 0: bytes 0-1 are the module's ISVSVN and version, which the
        # tdxModuleIdentities check covers; the TCB levels compare the rest.
        skip = 2
    for level in tcb_info.tcb_levels:
        if any(
            have < need for have, need in zip(pck_components, level.sgx_components, strict=True)
        ):
            continue
        if pcesvn < level.pcesvn:
            continue
        if tee_tcb_svn is not None:
            if level.tdx_components is None:
                raise CollateralError("TCB level without tdxtcbcomponents for a TDX quote")
            pairs = zip(tee_tcb_svn[skip:], level.tdx_components[skip:], strict=True)
            if any(have < need for have, need in pairs):
                continue
        if level.tcb_status == REVOKED:
            raise TcbError(f"TCB level {level.tcb_date.date()}: got status Revoked")
        return level
    raise TcbError(
        f"no matching TCB level: PCK components {list(pck_components)}, PCESVN {pcesvn}"
        + (f", TEE_TCB_SVN {tee_tcb_svn.hex()}" if tee_tcb_svn is not None else "")
        + f", expected one of the {len(tcb_info.tcb_levels)} levels of FMSPC "
        f"{tcb_info.fmspc.hex().upper()}"
    )


def _masked_equal(have: bytes, want: bytes, mask: bytes) -> bool:
    return all((h & m) == (w & m) for h, w, m in zip(have, want, mask, strict=True))


def match_tdx_module(tcb_info: TcbInfo, body: TdReportBody) -> IsvSvnTcbLevel | None:
    """Check MRSIGNERSEAM/SEAMATTRIBUTES against the TDX module identity; return its level.

    For module major version 0 only ``tdxModule`` applies and no extra level is returned.
    For version N > 0 the ``tdxModuleIdentities`` entry ``TDX_0N`` must exist and its first
    level with isvsvn <= TEE_TCB_SVN[0] gives a status that converges with the platform's.
    """
    if tcb_info.tdx_module is None:
        raise CollateralError("tcbInfo.tdxModule: missing in TDX TCB info")
    isvsvn, major = body.tee_tcb_svn[0], body.tee_tcb_svn[1]
    module = tcb_info.tdx_module
    identity = None
    if major > 0 and tcb_info.tdx_module_identities:
        wanted = f"TDX_{major:02X}"
        for ident in tcb_info.tdx_module_identities:
            if ident.id.upper() == wanted:
                identity = ident
                break
        if identity is None:
            raise TcbError(f"TDX module identity: got version {wanted}, not in TCB info")
        module = identity.module
    if body.mr_signer_seam != module.mrsigner:
        raise TcbError(
            f"mr_signer_seam: got {body.mr_signer_seam.hex()}, expected {module.mrsigner.hex()}"
        )
    if not _masked_equal(body.seam_attributes, module.attributes, module.attributes_mask):
        raise TcbError(
            f"seam_attributes: got {body.seam_attributes.hex()}, expected "
            f"{module.attributes.hex()} under mask {module.attributes_mask.hex()}"
        )
    if identity is None:
        return None
    for level in identity.tcb_levels:
        if isvsvn >= level.isvsvn:
            return level
    raise TcbError(
        f"no matching TDX module TCB level: module ISVSVN {isvsvn} is below every level "
        f"of {identity.id}"
    )


# --- QE identity -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QeIdentity:
    """An enclave identity v2 body (``enclaveIdentity``) for the QE or TD_QE."""

    id: str
    version: int
    issue_date: datetime
    next_update: datetime
    tcb_evaluation_data_number: int
    miscselect: bytes
    miscselect_mask: bytes
    attributes: bytes
    attributes_mask: bytes
    mrsigner: bytes
    isvprodid: int
    tcb_levels: tuple[IsvSvnTcbLevel, ...]

    @classmethod
    def from_json(cls, text: str) -> QeIdentity:
        """Parse the exact ``enclaveIdentity`` JSON text (its signature must already be checked)."""
        what = "enclaveIdentity"
        obj = _load_object(text, what)
        version = _get(obj, "version", int, what)
        if version != 2:
            raise CollateralError(f"enclaveIdentity.version: got {version}, expected 2")
        levels = []
        for lv in _get(obj, "tcbLevels", list, what):
            lw = f"{what}.tcbLevels[]"
            if not isinstance(lv, dict):
                raise MalformedEvidenceError(f"{lw}: not an object")
            levels.append(
                IsvSvnTcbLevel(
                    isvsvn=_get(_get(lv, "tcb", dict, lw), "isvsvn", int, lw),
                    tcb_date=_time(lv, "tcbDate", lw),
                    tcb_status=_status(lv, lw),
                    advisory_ids=_advisories(lv, lw),
                )
            )
        return cls(
            id=_get(obj, "id", str, what),
            version=version,
            issue_date=_time(obj, "issueDate", what),
            next_update=_time(obj, "nextUpdate", what),
            tcb_evaluation_data_number=_get(obj, "tcbEvaluationDataNumber", int, what),
            miscselect=_hex(obj, "miscselect", 4, what),
            miscselect_mask=_hex(obj, "miscselectMask", 4, what),
            attributes=_hex(obj, "attributes", 16, what),
            attributes_mask=_hex(obj, "attributesMask", 16, what),
            mrsigner=_hex(obj, "mrsigner", 32, what),
            isvprodid=_get(obj, "isvprodid", int, what),
            tcb_levels=tuple(levels),
        )


def match_qe_identity(qe_report: SgxReportBody, identity: QeIdentity) -> IsvSvnTcbLevel:
    """Check the QE report against the QE identity; return the QE's TCB level.

    Raises:
        TcbError: MRSIGNER, ISVPRODID, MISCSELECT or ATTRIBUTES differ, or the QE's ISVSVN is
            below every level (Intel QVL: QE identity out of date / not supported).
    """
    if qe_report.mr_signer != identity.mrsigner:
        raise TcbError(
            f"QE mr_signer: got {qe_report.mr_signer.hex()}, expected {identity.mrsigner.hex()}"
        )
    if qe_report.isv_prod_id != identity.isvprodid:
        raise TcbError(
            f"QE isv_prod_id: got {qe_report.isv_prod_id}, expected {identity.isvprodid}"
        )
    # MISCSELECT is a little-endian u32 in the report; the identity gives the same 4 bytes in hex.
    misc = qe_report.miscselect.to_bytes(4, "little")
    if not _masked_equal(misc, identity.miscselect, identity.miscselect_mask):
        raise TcbError(
            f"QE miscselect: got {misc.hex()}, expected {identity.miscselect.hex()} "
            f"under mask {identity.miscselect_mask.hex()}"
        )
    if not _masked_equal(qe_report.attributes, identity.attributes, identity.attributes_mask):
        raise TcbError(
            f"QE attributes: got {qe_report.attributes.hex()}, expected "
            f"{identity.attributes.hex()} under mask {identity.attributes_mask.hex()}"
        )
    for level in identity.tcb_levels:
        if qe_report.isv_svn >= level.isvsvn:
            if level.tcb_status == REVOKED:
                raise TcbError(f"QE ISVSVN {qe_report.isv_svn}: got status Revoked")
            return level
    raise TcbError(
        f"QE isv_svn: got {qe_report.isv_svn}, expected at least "
        f"{min((lv.isvsvn for lv in identity.tcb_levels), default=0)}"
    )
