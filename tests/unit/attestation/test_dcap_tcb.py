"""TCB info / QE identity models and Intel's TCB-level matching rules."""

from __future__ import annotations

import json
from typing import Any

import pytest
from dcap_fake import FMSPC, level, sgx_tcb_info

from veil.attestation.abi.tdx import TdReportBody
from veil.attestation.verify.tcb import (
    QeIdentity,
    TcbInfo,
    converge_status,
    match_tcb_level,
    match_tdx_module,
)
from veil.errors import CollateralError, MalformedEvidenceError, TcbError

C = (3, 3, 2, 2, 4, 1, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0)
MRSIGNER_SEAM = "00" * 48


@pytest.mark.parametrize(
    ("platform", "other", "expected"),
    [
        ("UpToDate", "UpToDate", "UpToDate"),
        ("SWHardeningNeeded", "UpToDate", "SWHardeningNeeded"),
        ("UpToDate", "OutOfDate", "OutOfDate"),
        ("SWHardeningNeeded", "OutOfDate", "OutOfDate"),
        ("ConfigurationNeeded", "OutOfDate", "OutOfDateConfigurationNeeded"),
        ("ConfigurationAndSWHardeningNeeded", "OutOfDate", "OutOfDateConfigurationNeeded"),
        ("OutOfDateConfigurationNeeded", "UpToDate", "OutOfDateConfigurationNeeded"),
        ("ConfigurationNeeded", "SWHardeningNeeded", "ConfigurationAndSWHardeningNeeded"),
    ],
)
def test_converge(platform: str, other: str, expected: str) -> None:
    assert converge_status(platform, other) == expected


def test_converge_revoked() -> None:
    with pytest.raises(TcbError, match="Revoked"):
        converge_status("UpToDate", "Revoked")


def tdx_info(
    levels: list[dict[str, Any]], identities: list[dict[str, Any]] | None = None
) -> TcbInfo:
    info = sgx_tcb_info(FMSPC, levels, tcb_id="TDX")
    info["tdxModule"] = {
        "mrsigner": MRSIGNER_SEAM,
        "attributes": "0000000000000000",
        "attributesMask": "FFFFFFFFFFFFFFFF",
    }
    if identities is not None:
        info["tdxModuleIdentities"] = identities
    return TcbInfo.from_json(json.dumps(info))


def identity(ident: str, levels: list[tuple[int, str]]) -> dict[str, Any]:
    return {
        "id": ident,
        "mrsigner": MRSIGNER_SEAM,
        "attributes": "0000000000000000",
        "attributesMask": "FFFFFFFFFFFFFFFF",
        "tcbLevels": [
            {"tcb": {"isvsvn": svn}, "tcbDate": "2024-01-01T00:00:00Z", "tcbStatus": st}
            for svn, st in levels
        ],
    }


def td_body(
    tee_tcb_svn: bytes, seam_attributes: bytes = bytes(8), signer: bytes = bytes(48)
) -> TdReportBody:
    raw = bytearray(584)
    raw[0:16] = tee_tcb_svn
    raw[64:112] = signer
    raw[112:120] = seam_attributes
    return TdReportBody.parse(bytes(raw))


def svn(*head: int) -> bytes:
    return bytes(head).ljust(16, b"\0")


def test_tdx_major_zero_compares_all_bytes() -> None:
    info = tdx_info(
        [
            level(C, 11, "UpToDate", tdx=(5, 0, 3, *[0] * 13)),
            level(C, 11, "OutOfDate", tdx=(3, 0, 3, *[0] * 13)),
        ]
    )
    assert match_tcb_level(info, C, 11, svn(5, 0, 3)).tcb_status == "UpToDate"
    assert match_tcb_level(info, C, 11, svn(4, 0, 3)).tcb_status == "OutOfDate"
    with pytest.raises(TcbError, match="no matching TCB level"):
        match_tcb_level(info, C, 11, svn(2, 0, 3))


def test_tdx_major_nonzero_skips_module_bytes() -> None:
    info = tdx_info([level(C, 11, "UpToDate", tdx=(9, 9, 3, *[0] * 13))])
    # Bytes 0-1 (module ISVSVN, version) belong to the module identity check.
    assert match_tcb_level(info, C, 11, svn(1, 1, 3)).tcb_status == "UpToDate"
    with pytest.raises(TcbError):
        match_tcb_level(info, C, 11, svn(1, 1, 2))


def test_sgx_components_and_pcesvn() -> None:
    info = TcbInfo.from_json(json.dumps(sgx_tcb_info(FMSPC, [level(C, 11)])))
    assert match_tcb_level(info, C, 11, None).tcb_status == "UpToDate"
    lower = (*C[:7], 4, *C[8:])
    with pytest.raises(TcbError, match="no matching"):
        match_tcb_level(info, lower, 11, None)
    with pytest.raises(TcbError, match="no matching"):
        match_tcb_level(info, C, 10, None)


def test_module_identity_selection() -> None:
    info = tdx_info(
        [level(C, 11, tdx=(0,) * 16)],
        [
            identity("TDX_03", [(3, "UpToDate")]),
            identity("TDX_01", [(6, "UpToDate"), (2, "OutOfDate")]),
        ],
    )
    lv = match_tdx_module(info, td_body(svn(6, 1)))
    assert lv is not None
    assert lv.tcb_status == "UpToDate"
    lv = match_tdx_module(info, td_body(svn(4, 1)))
    assert lv is not None
    assert lv.tcb_status == "OutOfDate"
    with pytest.raises(TcbError, match="module ISVSVN 1"):
        match_tdx_module(info, td_body(svn(1, 1)))
    with pytest.raises(TcbError, match="TDX_02"):
        match_tdx_module(info, td_body(svn(6, 2)))
    # Major version 0: only the base tdxModule applies.
    assert match_tdx_module(info, td_body(svn(6, 0))) is None


def test_module_signer_and_attributes() -> None:
    info = tdx_info([level(C, 11, tdx=(0,) * 16)], [identity("TDX_01", [(1, "UpToDate")])])
    with pytest.raises(TcbError, match="mr_signer_seam"):
        match_tdx_module(info, td_body(svn(6, 1), signer=b"\x01" * 48))
    with pytest.raises(TcbError, match="seam_attributes"):
        match_tdx_module(info, td_body(svn(6, 0), seam_attributes=b"\x01" + bytes(7)))


def test_tdx_module_missing() -> None:
    info = sgx_tcb_info(FMSPC, [level(C, 11, tdx=(0,) * 16)], tcb_id="TDX")
    with pytest.raises(MalformedEvidenceError, match="tdxModule"):
        TcbInfo.from_json(json.dumps(info))


BASE = sgx_tcb_info(FMSPC, [level(C, 11)])


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"version": 2}, CollateralError, "version"),
        ({"id": "SEV"}, CollateralError, "id"),
        ({"tcbType": 1}, CollateralError, "tcbType"),
        ({"tcbLevels": []}, CollateralError, "empty"),
        ({"fmspc": "00"}, MalformedEvidenceError, "fmspc"),
        ({"fmspc": "zz"}, MalformedEvidenceError, "hex"),
        ({"issueDate": "yesterday"}, MalformedEvidenceError, "ISO"),
        ({"issueDate": "2025-01-01T00:00:00"}, MalformedEvidenceError, "zone"),
        ({"tcbEvaluationDataNumber": "17"}, MalformedEvidenceError, "tcbEvaluationDataNumber"),
        ({"tcbEvaluationDataNumber": True}, MalformedEvidenceError, "tcbEvaluationDataNumber"),
        ({"tcbLevels": [level(C[:15], 11)]}, MalformedEvidenceError, "15 components"),
        ({"tcbLevels": [level(C, 11, "Fine")]}, CollateralError, "tcbStatus"),
        ({"tcbLevels": [{**level(C, 11), "advisoryIDs": [1]}]}, MalformedEvidenceError, "advisory"),
        ({"tcbLevels": ["x"]}, MalformedEvidenceError, "object"),
    ],
)
def test_tcb_info_rejects(change: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        TcbInfo.from_json(json.dumps({**BASE, **change}))


@pytest.mark.parametrize("text", ["[]", "{", "nope"])
def test_not_objects(text: str) -> None:
    with pytest.raises(MalformedEvidenceError):
        TcbInfo.from_json(text)
    with pytest.raises(MalformedEvidenceError):
        QeIdentity.from_json(text)


def test_missing_field() -> None:
    info = dict(BASE)
    del info["pceId"]
    with pytest.raises(MalformedEvidenceError, match="pceId"):
        TcbInfo.from_json(json.dumps(info))


def test_qe_identity_version() -> None:
    from dcap_fake import qe_identity_json

    ident = qe_identity_json([{"isvsvn": 1, "status": "UpToDate"}])
    assert QeIdentity.from_json(json.dumps(ident)).isvprodid == 1
    with pytest.raises(CollateralError, match="version"):
        QeIdentity.from_json(json.dumps({**ident, "version": 1}))


def test_sgx_tcb_info_for_tdx_quote() -> None:
    info = TcbInfo.from_json(json.dumps(sgx_tcb_info(FMSPC, [level(C, 11)])))
    with pytest.raises(CollateralError, match="tdxtcbcomponents"):
        match_tcb_level(info, C, 11, svn(1, 0))
    with pytest.raises(CollateralError, match="tdxModule"):
        match_tdx_module(info, td_body(svn(1, 0)))


@pytest.mark.parametrize(
    "change",
    [
        {"tdxModuleIdentities": ["x"]},
        {"tdxModuleIdentities": [{**identity("TDX_01", []), "tcbLevels": ["x"]}]},
    ],
)
def test_tdx_identity_garbage(change: dict[str, Any]) -> None:
    info = sgx_tcb_info(FMSPC, [level(C, 11, tdx=(0,) * 16)], tcb_id="TDX")
    info["tdxModule"] = identity("base", [])
    with pytest.raises(MalformedEvidenceError, match="not an object"):
        TcbInfo.from_json(json.dumps({**info, **change}))


def test_component_not_object() -> None:
    lv = level(C, 11)
    lv["tcb"]["sgxtcbcomponents"][0] = 3
    with pytest.raises(MalformedEvidenceError, match="component"):
        TcbInfo.from_json(json.dumps({**BASE, "tcbLevels": [lv]}))


def test_qe_levels_garbage_and_revoked() -> None:
    from dcap_fake import qe_identity_json

    from veil.attestation.abi.sgx import SgxReportBody
    from veil.attestation.verify.tcb import match_qe_identity

    ident = qe_identity_json([{"isvsvn": 1, "status": "Revoked"}])
    with pytest.raises(MalformedEvidenceError, match="not an object"):
        QeIdentity.from_json(json.dumps({**ident, "tcbLevels": [1]}))
    raw = bytearray(384)
    raw[48] = 0x11
    raw[128:160] = bytes.fromhex(ident["mrsigner"])
    raw[256] = 1
    raw[258] = 3
    with pytest.raises(TcbError, match="Revoked"):
        match_qe_identity(SgxReportBody.parse(bytes(raw)), QeIdentity.from_json(json.dumps(ident)))
