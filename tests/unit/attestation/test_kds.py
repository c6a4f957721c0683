"""AMD KDS client: request building from a report, each service failure, each foreign answer."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from snp_fake import CHIP_ID, NOW, FakeAmd, build_report, make_crl, tcb

from veil.attestation.abi.snp import parse_snp_report
from veil.attestation.kds import (
    MAX_CERT_BYTES,
    KdsClient,
    snp_collateral_to_map,
    vcek_request,
)
from veil.attestation.verify.snp import snp_collateral_from_map, verify_snp_report
from veil.errors import CollateralError, EvidenceUnavailableError, MalformedEvidenceError
from veil.providers.pcs import collateral_fetcher, kds_collateral_fetcher

KDS = "https://kds.test"
GENOA_CPUID = (0x19, 0x11, 0x1)
TURIN_CPUID = (0x1A, 0x02, 0x0)


def ark_crl(amd: FakeAmd, issuer_cn: str | None = None) -> bytes:
    return make_crl(amd, issuer=issuer_cn)


def chain(amd: FakeAmd, *, vlek: bool = False) -> bytes:
    return b"".join(
        c.public_bytes(Encoding.PEM) for c in ((amd.asvk if vlek else amd.ask), amd.ark)
    )


class CannedKds:
    """Answers by path; an exception as the answer is raised. Records every URL asked for."""

    def __init__(self, answers: Mapping[str, bytes | Exception]) -> None:
        self.answers = dict(answers)
        self.asked: list[str] = []

    def __call__(self, url: str) -> tuple[bytes, Mapping[str, str]]:
        self.asked.append(url)
        answer = self.answers.get(url.removeprefix(KDS).split("?")[0])
        if answer is None:
            request = httpx.Request("GET", url)
            raise httpx.HTTPStatusError("404", request=request, response=httpx.Response(404))
        if isinstance(answer, Exception):
            raise answer
        return answer, {}


def milan_service(amd: FakeAmd, vcek: bytes) -> dict[str, bytes | Exception]:
    return {
        f"/vcek/v1/Milan/{CHIP_ID.hex()}": vcek,
        "/vcek/v1/Milan/cert_chain": chain(amd),
        "/vcek/v1/Milan/crl": ark_crl(amd),
    }


@pytest.fixture(scope="module")
def milan() -> FakeAmd:
    return FakeAmd("Milan")


def signed_report(amd: FakeAmd, **kwargs: object) -> bytes:
    return build_report(key=amd.leaf_key, **kwargs)  # type: ignore[arg-type]


# --- which VCEK a report needs ---


def test_milan_v2_request_uses_the_given_product_and_every_spl() -> None:
    report = parse_snp_report(build_report(reported_tcb=tcb(3, 0, 8, 115)))
    request = vcek_request(report, product="Milan")
    assert request.path() == (
        f"/vcek/v1/Milan/{CHIP_ID.hex()}?blSPL=3&teeSPL=0&snpSPL=8&ucodeSPL=115"
    )


def test_genoa_product_comes_from_cpuid() -> None:
    report = parse_snp_report(build_report(version=3, cpuid=GENOA_CPUID))
    assert vcek_request(report).product == "Genoa"


def test_turin_uses_an_8_byte_hwid_and_fmc_spl() -> None:
    raw = tcb(2, 1, 4, 70, fmc=5)
    report = parse_snp_report(build_report(version=3, cpuid=TURIN_CPUID, reported_tcb=raw))
    request = vcek_request(report)
    assert request.hwid == CHIP_ID[:8]
    assert request.path() == (
        f"/vcek/v1/Turin/{CHIP_ID[:8].hex()}?fmcSPL=5&blSPL=2&teeSPL=1&snpSPL=4&ucodeSPL=70"
    )


def test_v2_report_without_product_is_refused() -> None:
    with pytest.raises(CollateralError, match="does not name its CPU"):
        vcek_request(parse_snp_report(build_report(version=2)))


def test_product_contradicting_cpuid_is_refused() -> None:
    report = parse_snp_report(build_report(version=3, cpuid=GENOA_CPUID))
    with pytest.raises(CollateralError, match="CPUID says 'Genoa'"):
        vcek_request(report, product="Milan")


def test_unknown_product_is_refused() -> None:
    with pytest.raises(CollateralError, match="product: got 'Naples'"):
        vcek_request(parse_snp_report(build_report()), product="Naples")


def test_vlek_report_has_no_kds_vcek() -> None:
    with pytest.raises(CollateralError, match="host's certificate table"):
        vcek_request(parse_snp_report(build_report(signing_key=1)), product="Milan")


def test_masked_chip_id_cannot_be_looked_up() -> None:
    with pytest.raises(CollateralError, match="masked"):
        vcek_request(parse_snp_report(build_report(mask_chip=True)), product="Milan")


# --- fetching ---


def test_fetched_collateral_verifies(milan: FakeAmd) -> None:
    vcek = milan.endorsement_key()
    get = CannedKds(milan_service(milan, vcek))
    report = signed_report(milan)
    collateral = KdsClient(KDS, get=get).collateral(report, product="Milan")
    assert collateral.endorsement_key == vcek
    assert collateral.crl is not None
    assert x509.load_der_x509_crl(collateral.crl).issuer == milan.ark.subject
    # What the server serves round-trips into what the verifier takes, and verifies.
    served = snp_collateral_from_map(snp_collateral_to_map(collateral))
    assert served == collateral
    verdict = verify_snp_report(parse_snp_report(report), served, trust=milan.trust(), now=NOW)
    assert verdict.product == "Milan"
    assert [u.split("?")[0] for u in get.asked] == [
        f"{KDS}/vcek/v1/Milan/{CHIP_ID.hex()}",
        f"{KDS}/vcek/v1/Milan/cert_chain",
        f"{KDS}/vcek/v1/Milan/crl",
    ]


def test_host_supplied_vlek_fetches_only_chain_and_crl(milan: FakeAmd) -> None:
    vlek = milan.endorsement_key(vlek=True)
    get = CannedKds(
        {"/vlek/v1/Milan/cert_chain": chain(milan, vlek=True), "/vlek/v1/Milan/crl": ark_crl(milan)}
    )
    report = build_report(signing_key=1, key=milan.leaf_key)
    collateral = KdsClient(KDS, get=get).collateral(report, product="Milan", endorsement_key=vlek)
    assert snp_collateral_to_map(collateral).keys() == {"vlek", "cert_chain", "crl"}
    assert all("/vlek/" in url for url in get.asked)


def _fetch_with(answers: dict[str, bytes | Exception], milan: FakeAmd) -> None:
    KdsClient(KDS, get=CannedKds(answers)).collateral(signed_report(milan), product="Milan")


def test_service_down_is_unavailability(milan: FakeAmd) -> None:
    answers = milan_service(milan, milan.endorsement_key())
    answers[f"/vcek/v1/Milan/{CHIP_ID.hex()}"] = httpx.ConnectError("refused")
    with pytest.raises(EvidenceUnavailableError, match="AMD KDS VCEK: ConnectError"):
        _fetch_with(answers, milan)


def test_service_slow_is_unavailability(milan: FakeAmd) -> None:
    answers = milan_service(milan, milan.endorsement_key())
    answers["/vcek/v1/Milan/cert_chain"] = httpx.ReadTimeout("slow")
    with pytest.raises(EvidenceUnavailableError, match="cert_chain: ReadTimeout"):
        _fetch_with(answers, milan)


def test_404_is_unavailability_with_the_status(milan: FakeAmd) -> None:
    answers = milan_service(milan, milan.endorsement_key())
    del answers["/vcek/v1/Milan/crl"]
    with pytest.raises(EvidenceUnavailableError, match="VCEK CRL: HTTP status 404"):
        _fetch_with(answers, milan)


def test_oversized_answer_is_refused(milan: FakeAmd) -> None:
    answers = milan_service(milan, milan.endorsement_key())
    answers[f"/vcek/v1/Milan/{CHIP_ID.hex()}"] = b"\x30" * (MAX_CERT_BYTES + 1)
    with pytest.raises(CollateralError, match="expected at most"):
        _fetch_with(answers, milan)


def test_garbage_vcek_is_malformed(milan: FakeAmd) -> None:
    answers = milan_service(milan, milan.endorsement_key())
    answers[f"/vcek/v1/Milan/{CHIP_ID.hex()}"] = b"<html>maintenance</html>"
    with pytest.raises(MalformedEvidenceError, match="VCEK: not a DER certificate"):
        _fetch_with(answers, milan)


def test_a_vlek_served_as_vcek_is_foreign(milan: FakeAmd) -> None:
    answers = milan_service(milan, milan.endorsement_key(vlek=True))
    with pytest.raises(CollateralError, match="expected 'SEV-VCEK'"):
        _fetch_with(answers, milan)


def test_another_products_chain_is_foreign(milan: FakeAmd) -> None:
    genoa = FakeAmd("Genoa")
    answers = milan_service(milan, milan.endorsement_key())
    answers["/vcek/v1/Milan/cert_chain"] = chain(genoa)
    with pytest.raises(CollateralError, match="subjects got \\['SEV-Genoa', 'ARK-Genoa'\\]"):
        _fetch_with(answers, milan)


def test_chain_that_is_not_pem_is_malformed(milan: FakeAmd) -> None:
    answers = milan_service(milan, milan.endorsement_key())
    answers["/vcek/v1/Milan/cert_chain"] = b"-----BEGIN CERTIFICATE-----\nnope\n"
    with pytest.raises(MalformedEvidenceError, match="not PEM certificates"):
        _fetch_with(answers, milan)


def test_crl_of_another_issuer_is_foreign(milan: FakeAmd) -> None:
    answers = milan_service(milan, milan.endorsement_key())
    answers["/vcek/v1/Milan/crl"] = ark_crl(milan, issuer_cn="ARK-Genoa")
    with pytest.raises(CollateralError, match="issuer CN got 'ARK-Genoa'"):
        _fetch_with(answers, milan)


def test_crl_that_is_not_der_is_malformed(milan: FakeAmd) -> None:
    answers = milan_service(milan, milan.endorsement_key())
    answers["/vcek/v1/Milan/crl"] = b"\x30\x03\x02\x01\x00"
    with pytest.raises(MalformedEvidenceError, match="not a DER CRL"):
        _fetch_with(answers, milan)


# --- the server's fetchers ---


def test_kds_fetcher_returns_the_served_map(milan: FakeAmd) -> None:
    fetch = kds_collateral_fetcher(
        KDS, get=CannedKds(milan_service(milan, milan.endorsement_key())), product="Milan"
    )
    assert set(fetch(signed_report(milan))) == {"vcek", "cert_chain", "crl"}


def test_one_fetcher_sends_snp_to_kds_and_quotes_to_pcs(milan: FakeAmd, vectors: Path) -> None:
    asked: list[str] = []

    def get(url: str) -> tuple[bytes, Mapping[str, str]]:
        asked.append(url)
        raise httpx.ConnectError("down")

    fetch: Callable[[bytes], object] = collateral_fetcher(
        pccs_url="https://pccs.test", kds_url=KDS, get=get, product="Milan"
    )
    with pytest.raises(EvidenceUnavailableError):
        fetch(signed_report(milan))
    assert asked[-1].startswith(f"{KDS}/vcek/v1/Milan/")
    with pytest.raises(EvidenceUnavailableError):
        fetch((vectors / "sgx/dcap-qvl-sgx-v3/sgx_quote").read_bytes())
    assert asked[-1].startswith("https://pccs.test/sgx/certification/v4/tcb?fmspc=")
