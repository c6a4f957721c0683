"""End-to-end DCAP verification on a generated PKI: revocation, TCB statuses, QE identity."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import pytest
from dcap_fake import NEXT, NOW, FakeDcap, _cert, crl, level, qe_identity_json, sgx_tcb_info

from veil.attestation.abi.dcap import parse_quote
from veil.attestation.trust import TrustStore
from veil.attestation.verify.dcap import DcapVerdict, verify_dcap_quote
from veil.errors import (
    ChainError,
    CollateralError,
    ExpiredError,
    RevokedError,
    SignatureError,
    TcbError,
)


@pytest.fixture(scope="module")
def fake() -> FakeDcap:
    return FakeDcap()


def run(fake: FakeDcap, raw: bytes | None = None, now: dt.datetime = NOW, **kw: Any) -> DcapVerdict:
    quote = parse_quote(raw or fake.quote())
    return verify_dcap_quote(quote, fake.collateral(**kw), trust=fake.trust, now=now)


def test_fake_platform_up_to_date(fake: FakeDcap) -> None:
    verdict = run(fake)
    assert verdict.tcb_status == "UpToDate"
    assert verdict.qe_tcb_status == "UpToDate"
    assert verdict.valid_until == NEXT


def test_revoked_pck_leaf(fake: FakeDcap) -> None:
    with pytest.raises(RevokedError, match="PCK leaf"):
        run(fake, revoked_leaf=True)


def test_revoked_pck_ca(fake: FakeDcap) -> None:
    with pytest.raises(RevokedError, match="PCK CA"):
        run(fake, revoked_ca=True)


def test_revoked_tcb_signer(fake: FakeDcap) -> None:
    coll = fake.collateral()
    root_crl = crl(fake.certs["root"], fake.keys["root"], [fake.certs["tcb"].serial_number])
    with pytest.raises(RevokedError, match="TCB info"):
        verify_dcap_quote(
            parse_quote(fake.quote()),
            dataclasses.replace(coll, root_ca_crl=root_crl),
            trust=fake.trust,
            now=NOW,
        )


def test_crl_signed_by_wrong_key(fake: FakeDcap) -> None:
    other = FakeDcap()
    coll = fake.collateral()
    # Same issuer name, other key: the signature check must catch it.
    forged = crl(fake.certs["ca"], other.keys["ca"])
    with pytest.raises(SignatureError, match="PCK CRL"):
        verify_dcap_quote(
            parse_quote(fake.quote()),
            dataclasses.replace(coll, pck_crl=forged),
            trust=fake.trust,
            now=NOW,
        )


def test_crl_of_another_issuer(fake: FakeDcap) -> None:
    coll = fake.collateral()
    with pytest.raises(CollateralError, match="PCK CRL"):
        verify_dcap_quote(
            parse_quote(fake.quote()),
            dataclasses.replace(coll, pck_crl=coll.root_ca_crl),
            trust=fake.trust,
            now=NOW,
        )


def test_crl_outside_window(fake: FakeDcap) -> None:
    early = (NOW - dt.timedelta(days=60), NOW - dt.timedelta(seconds=1))
    with pytest.raises(ExpiredError, match="PCK CRL"):
        run(fake, crl_window=early)


def test_other_root_rejected(fake: FakeDcap) -> None:
    with pytest.raises(ChainError):
        verify_dcap_quote(
            parse_quote(fake.quote()),
            fake.collateral(),
            trust=TrustStore.production(),
            now=NOW,
        )


C = (5, 5, 2, 2, 3, 1, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0)
HIGHER = (6, *C[1:])


@pytest.mark.parametrize(
    ("levels", "qe_levels", "status", "advisories"),
    [
        # The first level the platform meets wins; newer levels are skipped.
        (
            [level(HIGHER, 13), level(C, 13, "SWHardeningNeeded", ["INTEL-SA-1"])],
            None,
            "SWHardeningNeeded",
            ("INTEL-SA-1",),
        ),
        ([level(C, 14), level(C, 13, "OutOfDate", ["SA-2"])], None, "OutOfDate", ("SA-2",)),
        ([level(C, 13, "ConfigurationNeeded")], None, "ConfigurationNeeded", ()),
        # QE out of date converges with the platform status (Intel QVL rules).
        (
            [level(C, 13, "ConfigurationAndSWHardeningNeeded", ["SA-3"])],
            [
                {"isvsvn": 9, "status": "UpToDate"},
                {"isvsvn": 2, "status": "OutOfDate", "advisories": ["SA-Q"]},
            ],
            "OutOfDateConfigurationNeeded",
            ("SA-3", "SA-Q"),
        ),
        (
            [level(C, 13, "SWHardeningNeeded")],
            [{"isvsvn": 9, "status": "UpToDate"}, {"isvsvn": 2, "status": "OutOfDate"}],
            "OutOfDate",
            (),
        ),
    ],
)
def test_tcb_status_selection(
    fake: FakeDcap,
    levels: list[dict[str, object]],
    qe_levels: list[dict[str, object]] | None,
    status: str,
    advisories: tuple[str, ...],
) -> None:
    verdict = run(fake, tcb_levels=levels, qe_levels=qe_levels)
    assert verdict.tcb_status == status
    assert verdict.advisory_ids == advisories


def test_no_matching_level_is_error(fake: FakeDcap) -> None:
    with pytest.raises(TcbError, match="no matching TCB level"):
        run(fake, tcb_levels=[level(HIGHER, 13)])
    with pytest.raises(TcbError, match="no matching TCB level"):
        run(fake, tcb_levels=[level(C, 14)])


def test_revoked_level_is_error(fake: FakeDcap) -> None:
    with pytest.raises(TcbError, match="Revoked"):
        run(fake, tcb_levels=[level(C, 13, "Revoked")])


def test_qe_below_every_level(fake: FakeDcap) -> None:
    with pytest.raises(TcbError, match="QE isv_svn"):
        run(fake, qe_levels=[{"isvsvn": 9, "status": "UpToDate"}])


def test_qe_identity_mismatch(fake: FakeDcap) -> None:
    ident = qe_identity_json([{"isvsvn": 1, "status": "UpToDate"}])
    with pytest.raises(TcbError, match="mr_signer"):
        run(fake, qe_identity={**ident, "mrsigner": "00" * 32})
    with pytest.raises(TcbError, match="isv_prod_id"):
        run(fake, qe_identity={**ident, "isvprodid": 2})
    with pytest.raises(TcbError, match="miscselect"):
        run(fake, qe_identity={**ident, "miscselect": "01000000"})
    with pytest.raises(TcbError, match="attributes"):
        run(fake, raw=fake.quote(qe_attributes=bytes.fromhex("13" + "00" * 15)))
    # Bits outside the mask do not matter (bit 2 of byte 0 is masked out).
    run(fake, raw=fake.quote(qe_attributes=bytes.fromhex("15" + "00" * 15)))


def test_tcb_info_for_other_fmspc(fake: FakeDcap) -> None:
    info = sgx_tcb_info(bytes.fromhex("00906ED50001"), [level(C, 13)])
    with pytest.raises(CollateralError, match="fmspc"):
        run(fake, tcb_info=info)
    with pytest.raises(CollateralError, match="pceId"):
        run(fake, tcb_info={**sgx_tcb_info(fake.fmspc, [level(C, 13)]), "pceId": "0100"})


def test_tcb_info_window(fake: FakeDcap) -> None:
    info = {**sgx_tcb_info(fake.fmspc, [level(C, 13)]), "nextUpdate": "2025-01-10T00:00:00Z"}
    with pytest.raises(ExpiredError, match="TCB info"):
        run(fake, tcb_info=info)


def test_expired_certificate(fake: FakeDcap) -> None:
    with pytest.raises(ExpiredError):
        run(fake, now=dt.datetime(2035, 1, 1, tzinfo=dt.UTC))


def test_non_intel_qe_vendor(fake: FakeDcap) -> None:
    with pytest.raises(CollateralError, match="QE vendor id"):
        run(fake, raw=fake.quote(vendor=b"\x01" * 16))


def test_pck_chain_too_short() -> None:
    fake = FakeDcap()
    leaf = fake.certs["leaf"]
    direct = _cert(
        "Test SGX PCK Certificate",
        fake.keys["leaf"],
        fake.certs["root"],
        fake.keys["root"],
        ca=False,
        extra=leaf.extensions.get_extension_for_oid(leaf.extensions[1].oid).value,
    )
    fake.certs["leaf"] = direct
    with pytest.raises(ChainError, match="expected 3"):
        run(fake, raw=fake.quote(chain_names=("leaf", "root")))
