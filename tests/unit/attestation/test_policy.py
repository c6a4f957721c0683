"""Policy: every field, the messages that list them, TOML loading, the unpinned guard."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from veil.attestation.abi.snp import SnpTcb
from veil.attestation.claims import Platform, VerifiedEvidence
from veil.attestation.policy import (
    AMD_MINIMUM_TCB,
    Policy,
    SgxPolicy,
    SnpPolicy,
    TdxPolicy,
    minimum_snp_tcb,
    snp_tcb_status,
)
from veil.errors import PolicyError, TcbError, UnsafePolicyWarning

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def b(byte: int, n: int) -> bytes:
    return bytes([byte]) * n


def claims(platform: Platform, **kw: Any) -> VerifiedEvidence:
    measurements: dict[str, bytes]
    details: dict[str, int | bytes | str]
    if platform is Platform.SGX:
        measurements = {"mr_enclave": b(1, 32), "mr_signer": b(2, 32)}
        details = {"isv_prod_id": 7, "isv_svn": 3, "tcb_evaluation_data_number": 17}
    elif platform is Platform.TDX:
        measurements = {"mr_td": b(1, 48), "mr_seam": b(2, 48)} | {
            f"rtmr{i}": b(0x10 + i, 48) for i in range(4)
        }
        details = {
            "td_attributes": bytes.fromhex("0000001000000000"),
            "xfam": bytes.fromhex("e702060000000000"),
            "tcb_evaluation_data_number": 17,
        }
    else:
        measurements = {
            "measurement": b(1, 48),
            "host_data": b(2, 32),
            "id_key_digest": b(3, 48),
            "author_key_digest": b(4, 48),
        }
        details = {
            "guest_policy": 0x30000,
            "vmpl": 0,
            "platform_info": 0x3,
            "product": "Milan",
            "tcb_bootloader": 4,
            "tcb_tee": 0,
            "tcb_snp": 24,
            "tcb_microcode": 219,
        }
    fields: dict[str, Any] = {
        "platform": platform,
        "report_data": bytes(64),
        "measurements": measurements | kw.pop("measurements", {}),
        "debug": False,
        "tcb_status": "MeetsMinimum" if platform is Platform.SEV_SNP else "UpToDate",
        "advisory_ids": (),
        "valid_from": T0,
        "valid_until": T0 + timedelta(days=30),
        "details": details | kw.pop("details", {}),
    }
    return VerifiedEvidence(**(fields | kw))


SGX = Policy(sgx=SgxPolicy(mr_enclave=(b(1, 32),)))
TDX = Policy(tdx=TdxPolicy(mr_td=(b(1, 48),)))
SNP = Policy(sev_snp=SnpPolicy(measurement=(b(1, 48),)))


# --- construction guards ---


def test_empty_policy_refused() -> None:
    with pytest.raises(PolicyError, match="pins no measurement"):
        Policy()


@pytest.mark.parametrize(
    ("kw", "section"),
    [
        ({"sgx": SgxPolicy()}, "sgx"),
        ({"tdx": TdxPolicy(rtmr0=b(1, 48))}, "tdx"),
        ({"sev_snp": SnpPolicy(host_data=b(1, 32))}, "sev_snp"),
        ({"sgx": SgxPolicy(mr_enclave=(b(1, 32),)), "tdx": TdxPolicy()}, "tdx"),
    ],
)
def test_section_without_measurement_refused(kw: dict[str, Any], section: str) -> None:
    with pytest.raises(PolicyError, match=f"policy {section} pins no measurement"):
        Policy(**kw)


def test_unsafe_unpinned_warns_and_checks_the_rest() -> None:
    with pytest.warns(UnsafePolicyWarning, match="pins no measurement"):
        policy = Policy.unsafe_unpinned()
    assert policy.unpinned
    for platform in Platform:
        policy.validate(claims(platform))  # any measurement passes ...
    with pytest.raises(PolicyError, match="debug: got True"):
        policy.validate(claims(Platform.TDX, debug=True))  # ... debug does not
    with pytest.raises(TcbError, match="tcb_status: got OutOfDate"):
        policy.validate(claims(Platform.SGX, tcb_status="OutOfDate"))


def test_unsafe_token_cannot_be_forged() -> None:
    with pytest.raises(PolicyError, match="unsafe_unpinned"):
        Policy(_unsafe=True)


def test_pinned_policy_is_not_unpinned() -> None:
    assert not SGX.unpinned


def test_allow_debug_warns_and_accepts_debug() -> None:
    with pytest.warns(UnsafePolicyWarning, match="debug"):
        policy = dataclasses.replace(SGX, allow_debug=True)
    policy.validate(claims(Platform.SGX, debug=True))


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: SgxPolicy(mr_enclave=(b(1, 31),)), "sgx.mr_enclave: got 31 bytes, expected 32"),
        (lambda: SgxPolicy(mr_signer=b(1, 32)), "requires sgx.isv_prod_id"),
        (lambda: SgxPolicy(mr_signer=b(1, 48), isv_prod_id=1), "sgx.mr_signer: got 48 bytes"),
        (lambda: TdxPolicy(mr_td=(b(1, 32),)), "tdx.mr_td: got 32 bytes, expected 48"),
        (lambda: TdxPolicy(mr_td=(b(1, 48),), rtmr2=b(0, 32)), "tdx.rtmr2: got 32 bytes"),
        (lambda: TdxPolicy(mr_td=(b(1, 48),), xfam=b(0, 4)), "tdx.xfam: got 4 bytes"),
        (lambda: TdxPolicy(mr_td=(b(1, 48),), td_attributes=b(0, 4)), "tdx.td_attributes"),
        (lambda: SnpPolicy(measurement=("ab",)), "sev_snp.measurement: got str"),  # type: ignore[arg-type]
        (lambda: SnpPolicy(measurement=(b(1, 48),), host_data=b(1, 48)), "sev_snp.host_data"),
        (lambda: SnpPolicy(measurement=(b(1, 48),), vmpl=4), "sev_snp.vmpl: got 4"),
        (lambda: Policy(sgx=SGX.sgx, accepted_tcb_statuses=frozenset({"Revoked"})), "Revoked"),
        (
            lambda: Policy(sgx=SGX.sgx, collateral_grace_period=timedelta(seconds=-1)),
            "negative",
        ),
    ],
)
def test_invalid_values_refused(factory: Any, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        factory()


def test_single_bytes_value_becomes_allow_list() -> None:
    policy = SgxPolicy(mr_enclave=b(1, 32))
    assert policy.mr_enclave == (b(1, 32),)


# --- validation: matches pass ---


def test_matching_claims_pass() -> None:
    SGX.validate(claims(Platform.SGX))
    TDX.validate(claims(Platform.TDX))
    SNP.validate(claims(Platform.SEV_SNP))


def test_platform_without_section_refused() -> None:
    with pytest.raises(PolicyError, match="policy has no tdx section"):
        SGX.validate(claims(Platform.TDX))


def test_allow_list_with_several_values() -> None:
    policy = Policy(sgx=SgxPolicy(mr_enclave=(b(9, 32), b(1, 32))))
    policy.validate(claims(Platform.SGX))
    with pytest.raises(PolicyError, match=f"expected one of {'09' * 32}, {'01' * 32}"):
        policy.validate(claims(Platform.SGX, measurements={"mr_enclave": b(5, 32)}))


# --- validation: every field, every mismatch listed with got / expected ---


def test_sgx_every_field() -> None:
    policy = Policy(
        sgx=SgxPolicy(mr_enclave=(b(9, 32),), mr_signer=b(8, 32), isv_prod_id=1, min_isv_svn=4)
    )
    with pytest.raises(PolicyError) as info:
        policy.validate(claims(Platform.SGX, debug=True))
    message = str(info.value)
    for expected in (
        "debug: got True, expected False",
        f"mr_enclave: got {'01' * 32}, expected {'09' * 32}",
        f"mr_signer: got {'02' * 32}, expected {'08' * 32}",
        "isv_prod_id: got 7, expected 1",
        "isv_svn: got 3, expected >= 4",
    ):
        assert expected in message
    assert message.count("got") == 5


def test_sgx_signer_mode_passes() -> None:
    policy = Policy(sgx=SgxPolicy(mr_signer=b(2, 32), isv_prod_id=7, min_isv_svn=3))
    policy.validate(claims(Platform.SGX))


def test_tdx_every_field() -> None:
    policy = Policy(
        tdx=TdxPolicy(
            mr_td=(b(9, 48),),
            rtmr0=b(9, 48),
            rtmr1=b(9, 48),
            rtmr2=b(9, 48),
            rtmr3=b(9, 48),
            mr_seam=b(9, 48),
            td_attributes=bytes(8),
            xfam=bytes(8),
        )
    )
    with pytest.raises(PolicyError) as info:
        policy.validate(claims(Platform.TDX, debug=True))
    message = str(info.value)
    for name, got in [
        ("mr_td", "01" * 48),
        ("rtmr0", "10" * 48),
        ("rtmr1", "11" * 48),
        ("rtmr2", "12" * 48),
        ("rtmr3", "13" * 48),
        ("mr_seam", "02" * 48),
    ]:
        assert f"{name}: got {got}, expected {'09' * 48}" in message
    assert "td_attributes: got 0000001000000000, expected 0000000000000000" in message
    assert "xfam: got e702060000000000, expected 0000000000000000" in message
    assert "debug: got True, expected False" in message
    assert message.count("got") == 9


def test_snp_every_field() -> None:
    policy = Policy(
        sev_snp=SnpPolicy(
            measurement=(b(9, 48),),
            host_data=b(9, 32),
            id_key_digest=b(9, 48),
            author_key_digest=b(9, 48),
            allow_smt=False,
            require_single_socket=True,
            vmpl=1,
        )
    )
    evidence = claims(Platform.SEV_SNP, debug=True, details={"guest_policy": 0x30000 | (1 << 18)})
    with pytest.raises(PolicyError) as info:
        policy.validate(evidence)
    message = str(info.value)
    for expected in (
        "debug: got True, expected False",
        f"measurement: got {'01' * 48}, expected {'09' * 48}",
        f"host_data: got {'02' * 32}, expected {'09' * 32}",
        f"id_key_digest: got {'03' * 48}",
        f"author_key_digest: got {'04' * 48}",
        "guest_policy.migrate_ma: got True, expected False",
        "guest_policy.smt: got True, expected False",
        "guest_policy.single_socket: got False, expected True",
        "vmpl: got 0, expected 1",
    ):
        assert expected in message
    assert message.count("got") == 9


def test_snp_migration_agent_allowed_when_asked() -> None:
    policy = Policy(sev_snp=SnpPolicy(measurement=(b(1, 48),), allow_migration_agent=True))
    policy.validate(claims(Platform.SEV_SNP, details={"guest_policy": 0x30000 | (1 << 18)}))


def test_snp_min_tcb() -> None:
    policy = Policy(
        sev_snp=SnpPolicy(measurement=(b(1, 48),), min_tcb=SnpTcb(5, 0, 25, 219, fmc=1))
    )
    with pytest.raises(TcbError) as info:
        policy.validate(claims(Platform.SEV_SNP, tcb_status="BelowMinimum"))
    message = str(info.value)
    assert "tcb_status: got BelowMinimum, expected MeetsMinimum" in message
    assert "reported_tcb.bootloader: got 4, expected >= 5" in message
    assert "reported_tcb.snp: got 24, expected >= 25" in message
    assert "reported_tcb.fmc: got None, expected >= 1" in message
    assert "microcode" not in message
    ok = Policy(sev_snp=SnpPolicy(measurement=(b(1, 48),), min_tcb=SnpTcb(4, 0, 24, 219)))
    ok.validate(claims(Platform.SEV_SNP))


def test_snp_default_minimum_is_amds_table() -> None:
    assert AMD_MINIMUM_TCB["Milan"] == SnpTcb(bootloader=4, tee=0, snp=24, microcode=219)
    SNP.validate(claims(Platform.SEV_SNP))
    low = claims(Platform.SEV_SNP, tcb_status="BelowMinimum", details={"tcb_microcode": 218})
    with pytest.raises(TcbError, match=r"reported_tcb.microcode: got 218, expected >= 219"):
        SNP.validate(low)


def test_snp_product_without_minimum_is_refused() -> None:
    genoa = claims(Platform.SEV_SNP, tcb_status="NoMinimum", details={"product": "Genoa"})
    with pytest.raises(TcbError, match=r"min_tcb: none known for Genoa; set sev_snp.min_tcb"):
        SNP.validate(genoa)
    per_product = Policy(
        sev_snp=SnpPolicy(measurement=(b(1, 48),), min_tcb={"Genoa": SnpTcb(4, 0, 24, 219)})
    )
    # The status the verifier computed is the decision; the policy never upgrades it.
    with pytest.raises(TcbError, match="tcb_status: got NoMinimum, expected MeetsMinimum"):
        per_product.validate(genoa)
    per_product.validate(claims(Platform.SEV_SNP, details={"product": "Genoa"}))


@pytest.mark.parametrize(
    ("reported", "minimum", "status"),
    [
        (SnpTcb(4, 0, 24, 219), SnpTcb(4, 0, 24, 219), "MeetsMinimum"),
        (SnpTcb(9, 9, 99, 250), SnpTcb(4, 0, 24, 219), "MeetsMinimum"),
        (SnpTcb(4, 0, 23, 250), SnpTcb(4, 0, 24, 219), "BelowMinimum"),
        (SnpTcb(4, 0, 24, 219, fmc=0), SnpTcb(4, 0, 24, 219, fmc=1), "BelowMinimum"),
        (SnpTcb(4, 0, 24, 219), SnpTcb(4, 0, 24, 219, fmc=1), "BelowMinimum"),
        (SnpTcb(4, 0, 24, 219), None, "NoMinimum"),
    ],
)
def test_snp_tcb_status(reported: SnpTcb, minimum: SnpTcb | None, status: str) -> None:
    assert snp_tcb_status(reported, minimum) == status


def test_snp_vmpl_defaults_to_zero_and_platform_info() -> None:
    with pytest.raises(PolicyError, match="vmpl: got 1, expected 0"):
        SNP.validate(claims(Platform.SEV_SNP, details={"vmpl": 1}))
    anywhere = Policy(sev_snp=SnpPolicy(measurement=(b(1, 48),), vmpl=None))
    anywhere.validate(claims(Platform.SEV_SNP, details={"vmpl": 3}))
    strict = Policy(
        sev_snp=SnpPolicy(
            measurement=(b(1, 48),), platform_info_required=0x2, platform_info_forbidden=0x1
        )
    )
    with pytest.raises(PolicyError) as info:
        strict.validate(claims(Platform.SEV_SNP, details={"platform_info": 0x1}))
    assert "platform_info: got 0x1, expected bits 0x2 set" in str(info.value)
    assert "platform_info: got 0x1, expected bits 0x1 clear" in str(info.value)
    strict.validate(claims(Platform.SEV_SNP, details={"platform_info": 0x2}))
    with pytest.raises(PolicyError, match="both required and forbidden"):
        SnpPolicy(measurement=(b(1, 48),), platform_info_required=1, platform_info_forbidden=1)
    toml = Policy.from_toml(f'[sev_snp]\nmeasurement = ["{"01" * 48}"]\nvmpl = "any"\n')
    assert toml.sev_snp is not None
    assert toml.sev_snp.vmpl is None


def test_snp_min_tcb_per_product_in_toml() -> None:
    text = (
        f'[sev_snp]\nmeasurement = ["{"01" * 48}"]\n'
        "[sev_snp.min_tcb.Genoa]\nbootloader = 9\ntee = 0\nsnp = 23\nmicrocode = 72\n"
    )
    policy = Policy.from_toml(text)
    assert policy.sev_snp is not None
    assert minimum_snp_tcb(policy.sev_snp.min_tcb, "Genoa") == SnpTcb(9, 0, 23, 72)
    assert minimum_snp_tcb(policy.sev_snp.min_tcb, "Milan") is None
    with pytest.raises(PolicyError, match=r"sev_snp.min_tcb.Turin: missing tee"):
        Policy.from_toml(
            f'[sev_snp]\nmeasurement = ["{"01" * 48}"]\n'
            "[sev_snp.min_tcb.Turin]\nbootloader = 1\nsnp = 1\nmicrocode = 1\n"
        )


# --- TCB status, advisories, freshness ---


def test_only_up_to_date_by_default() -> None:
    with pytest.raises(TcbError, match="tcb_status: got SWHardeningNeeded, expected UpToDate"):
        SGX.validate(claims(Platform.SGX, tcb_status="SWHardeningNeeded"))


def test_named_statuses_and_advisories() -> None:
    policy = dataclasses.replace(
        SGX,
        accepted_tcb_statuses=frozenset({"UpToDate", "SWHardeningNeeded"}),
        accepted_advisory_ids=frozenset({"INTEL-SA-00615"}),
    )
    policy.validate(
        claims(Platform.SGX, tcb_status="SWHardeningNeeded", advisory_ids=("INTEL-SA-00615",))
    )
    with pytest.raises(TcbError, match="advisory_ids: got INTEL-SA-00289, expected only"):
        policy.validate(
            claims(
                Platform.SGX,
                tcb_status="SWHardeningNeeded",
                advisory_ids=("INTEL-SA-00615", "INTEL-SA-00289"),
            )
        )
    any_advisory = dataclasses.replace(policy, accepted_advisory_ids=None)
    any_advisory.validate(
        claims(Platform.SGX, tcb_status="SWHardeningNeeded", advisory_ids=("INTEL-SA-00289",))
    )


def test_tcb_problems_are_all_listed() -> None:
    policy = dataclasses.replace(
        SGX, accepted_advisory_ids=frozenset(), min_tcb_evaluation_data_number=18
    )
    with pytest.raises(TcbError) as info:
        policy.validate(claims(Platform.SGX, tcb_status="OutOfDate", advisory_ids=("X",)))
    message = str(info.value)
    assert "tcb_status: got OutOfDate" in message
    assert "advisory_ids: got X, expected only accepted advisories (none)" in message
    assert "tcb_evaluation_data_number: got 17, expected >= 18" in message


def test_field_mismatch_reported_before_tcb() -> None:
    with pytest.raises(PolicyError):
        SGX.validate(claims(Platform.SGX, debug=True, tcb_status="OutOfDate"))


def test_policy_is_immutable() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        SGX.allow_debug = True  # type: ignore[misc]


# --- TOML ---

FULL_TOML = f"""
accepted_tcb_statuses = ["UpToDate", "SWHardeningNeeded"]
accepted_advisory_ids = ["INTEL-SA-00615"]
min_tcb_evaluation_data_number = 17
collateral_grace_period = 3600

[sgx]
mr_enclave = ["{"01" * 32}", "{"09" * 32}"]
mr_signer = "{"02" * 32}"
isv_prod_id = 7
min_isv_svn = 3

[tdx]
mr_td = "{"01" * 48}"
rtmr0 = "{"10" * 48}"
rtmr1 = "{"11" * 48}"
rtmr2 = "{"12" * 48}"
rtmr3 = "{"13" * 48}"
mr_seam = "{"02" * 48}"
td_attributes = "0000001000000000"
xfam = "0xe702060000000000"

[sev_snp]
measurement = ["{"01" * 48}"]
host_data = "{"02" * 32}"
id_key_digest = "{"03" * 48}"
author_key_digest = "{"04" * 48}"
allow_migration_agent = false
allow_smt = true
require_single_socket = false
vmpl = 0
min_tcb = {{ bootloader = 4, tee = 0, snp = 24, microcode = 219 }}
"""


def test_toml_full_text() -> None:
    policy = Policy.from_toml(FULL_TOML)
    assert policy.sgx == SgxPolicy(
        mr_enclave=(b(1, 32), b(9, 32)), mr_signer=b(2, 32), isv_prod_id=7, min_isv_svn=3
    )
    assert policy.tdx is not None
    assert policy.tdx.mr_td == (b(1, 48),)
    assert policy.tdx.xfam == bytes.fromhex("e702060000000000")
    assert policy.sev_snp is not None
    assert policy.sev_snp.min_tcb == SnpTcb(4, 0, 24, 219)
    assert policy.sev_snp.vmpl == 0
    assert policy.accepted_tcb_statuses == {"UpToDate", "SWHardeningNeeded"}
    assert policy.accepted_advisory_ids == {"INTEL-SA-00615"}
    assert policy.min_tcb_evaluation_data_number == 17
    assert policy.collateral_grace_period == timedelta(hours=1)
    assert not policy.allow_debug
    for platform in Platform:
        policy.validate(claims(platform))


def test_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(FULL_TOML, encoding="utf-8")
    assert Policy.from_toml(path) == Policy.from_toml(str(path)) == Policy.from_toml(FULL_TOML)


def test_toml_unpinned_refused_unless_unsafe() -> None:
    with pytest.raises(PolicyError, match="pins no measurement"):
        Policy.from_toml("allow_debug = false")
    with pytest.warns(UnsafePolicyWarning):
        policy = Policy.from_toml("unsafe_unpinned = true\n[sev_snp]\nvmpl = 0")
    assert policy.unpinned
    assert policy.sev_snp is not None
    assert policy.sev_snp.vmpl == 0


def test_toml_allow_debug_warns() -> None:
    with pytest.warns(UnsafePolicyWarning, match="debug"):
        policy = Policy.from_toml(f'allow_debug = true\n[sgx]\nmr_enclave = "{"01" * 32}"')
    assert policy.allow_debug


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[sgx\n", "policy TOML"),
        (f'mr_enclave = "{"01" * 32}"', "unknown key"),
        (
            f'[sgx]\nmr_enclave = "{"01" * 32}"\nmrenclave = "00"',
            r"unknown key\(s\) sgx\.mrenclave",
        ),
        ('[sgx]\nmr_enclave = "zz"', r"sgx\.mr_enclave\[0: not a hex string"),
        ("[sgx]\nmr_enclave = 5", "expected a hex string or an array"),
        ("[sgx]\nmr_signer = 5\nisv_prod_id = 1", "sgx.mr_signer: got int, expected hex"),
        (f'[sgx]\nmr_enclave = "{"01" * 32}"\nisv_prod_id = "1"', "expected an integer"),
        (f'[sev_snp]\nmeasurement = "{"01" * 48}"\nallow_smt = 1', "expected true or false"),
        (f'sgx = 1\n[tdx]\nmr_td = "{"01" * 48}"', "sgx: expected a table"),
        ('accepted_tcb_statuses = "UpToDate"', "expected an array of strings"),
        (
            f'[sev_snp]\nmeasurement = "{"01" * 48}"\nmin_tcb = {{ bootloader = 1 }}',
            "min_tcb: missing tee, snp, microcode",
        ),
        (
            f'[sev_snp]\nmeasurement = "{"01" * 48}"\nmin_tcb = {{ bootloader = 1, x = 2 }}',
            r"unknown key\(s\) sev_snp\.min_tcb\.x",
        ),
        (
            f'accepted_tcb_statuses = ["UpToDat"]\n[sgx]\nmr_enclave = "{"01" * 32}"',
            "got UpToDat",
        ),
    ],
)
def test_toml_errors(text: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        Policy.from_toml(text)


def test_toml_missing_file(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="nope"):
        Policy.from_toml(tmp_path / "nope.toml")
