"""The client attests before it sends anything: mock servers, policies, binding and pinning."""

from __future__ import annotations

import hashlib
import warnings
from datetime import UTC, datetime

import cbor2
import httpx
import numpy as np
import pytest
from onnx_models import identity_model
from server_process import SNI, RawClient, ServerFactory, VeilServer

import veil
from veil.attestation.policy import Policy, SgxPolicy
from veil.attestation.trust import TrustStore
from veil.errors import HazmatWarning
from veil.providers.measurement import simulated_measurement
from veil.testing.intel_pki import IntelPki
from veil.tls import pinned_client_context

pytestmark = pytest.mark.slow
NOW_UTC = datetime.now(UTC)


def simulated_policy() -> Policy:
    return Policy(sgx=SgxPolicy(mr_enclave=(simulated_measurement(),)))


def test_unattested_port_serves_certificate_evidence_and_mock_header(raw: RawClient) -> None:
    first = raw.get("unattested", "/")
    assert first.status_code == 200
    assert "mock" in first.headers["server"]
    certificate = cbor2.loads(first.content)
    assert isinstance(certificate, bytes)
    quote = cbor2.loads(raw.get("unattested", "/quote").content)
    collateral = cbor2.loads(raw.get("unattested", "/collateral").content)
    assert isinstance(quote, bytes)
    assert isinstance(collateral, dict)
    assert "tcb_info" in collateral
    health = raw.get("unattested", "/healthz")
    assert health.status_code == 200
    body = cbor2.loads(health.content)
    assert (body["status"], body["simulated"]) == ("ok", True)
    assert body["collateral"]["state"] == "ok"
    assert body["collateral"]["next_refresh"] is not None
    # the header is on every answer, errors included
    missing = raw.get("unattested", "/no-such-path")
    assert missing.status_code == 404
    assert "mock" in missing.headers["server"]
    assert "mock" in raw.get("attested", "/").headers["server"]


def test_connection_verifies_and_binds_the_certificate(client: veil.Connection) -> None:
    verified = client.verified
    assert verified.simulated
    assert verified.measurements["mr_enclave"] == simulated_measurement()
    assert verified.report_data[:32] == hashlib.sha256(client.certificate_der).digest()
    # The second half binds the key map (the receipt key): veil.keymap.
    assert verified.report_data[32:] == hashlib.sha256(client.key_map.encoded).digest()


def test_simulated_server_refused_without_simulation(server: VeilServer) -> None:
    with pytest.raises(veil.AttestationError, match="simulated") as info:
        veil.connect("127.0.0.1", policy=simulated_policy(), **server.ports)
    # refused on the Server header, before any verification step could fail
    assert type(info.value) is veil.AttestationError


def test_hazmat_test_roots_do_not_accept_a_simulated_server(server: VeilServer) -> None:
    with pytest.warns(HazmatWarning):
        trust = TrustStore.hazmat_test_roots(intel_root=IntelPki(now=NOW_UTC, seed=b"t").root)
    with pytest.raises(veil.AttestationError, match="simulated") as info:
        veil.connect("127.0.0.1", policy=simulated_policy(), trust=trust, **server.ports)
    assert type(info.value) is veil.AttestationError


def test_policy_required_without_simulation(server: VeilServer) -> None:
    with pytest.raises(veil.PolicyError, match="pass policy="):
        veil.connect("127.0.0.1", **server.ports)


def test_policy_pinning_another_measurement_is_refused(server: VeilServer) -> None:
    other = Policy(sgx=SgxPolicy(mr_enclave=(bytes(32),)))
    with pytest.raises(veil.PolicyError, match="mr_enclave"):
        server.connect(policy=other)


def test_simulation_warns_on_every_connection(server: VeilServer) -> None:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("default")
        server.connect().close()
        server.connect().close()
    assert sum(issubclass(w.category, veil.SimulationModeWarning) for w in record) == 2


def test_tampered_certificate_is_refused(server_factory: ServerFactory) -> None:
    # the test bed's launcher, not `veil serve`: production has no such option
    tampered = server_factory("--hazmat-test-tamper-certificate", module="veil.testing.emulated")
    with pytest.raises(veil.BindingError, match="certificate binding"):
        tampered.connect()


def test_pinned_channel_refuses_another_servers_certificate(
    server: VeilServer, server_factory: ServerFactory
) -> None:
    other = server_factory()
    # Evidence and certificate from `server`, but the attested ports of `other`: the evidence
    # verifies and binds, then the pinned handshake meets a certificate it does not trust.
    ports = dict(server.ports, attested_port=other.attested_port)
    with pytest.raises(veil.BindingError, match="not the attested one"):
        veil.connect("127.0.0.1", simulation=True, **ports)

    certificate = cbor2.loads(httpx.get(f"http://127.0.0.1:{server.unattested_port}/").content)
    context = pinned_client_context(certificate)
    with httpx.Client(verify=context) as pinned:
        assert pinned.get(f"https://127.0.0.1:{server.attested_port}/", extensions=SNI).is_success
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            pinned.get(f"https://127.0.0.1:{other.attested_port}/", extensions=SNI)
    # the right certificate checked against another name (here the IP address) is refused too
    with (
        httpx.Client(verify=context) as fresh,
        pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"),
    ):
        fresh.get(f"https://127.0.0.1:{server.attested_port}/")


def test_nothing_reaches_an_unreachable_server() -> None:
    with pytest.raises(veil.TransportError):
        veil.connect("127.0.0.1", simulation=True, unattested_port=1, timeout=5)


def test_verified_connection_keeps_working(client: veil.Connection) -> None:
    client.upload_model(identity_model("uint32"), model_id="keepalive")
    x = np.arange(6, dtype=np.uint32).reshape(2, 3)
    for _ in range(5):
        np.testing.assert_array_equal(client.predict("keepalive", x).output[0].as_numpy(), x)


def test_a_simulated_server_with_other_sources_says_why(
    server: VeilServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from veil.providers import measurement

    # This client's veil "differs by one comment" from the server's: another measurement.
    monkeypatch.setattr(measurement, "simulated_measurement", lambda: bytes(32))
    with pytest.raises(veil.PolicyError) as info:
        server.connect()
    message = str(info.value)
    assert "mr_enclave: got" in message
    assert "runs different veil sources" in message
    assert "same veil installation" in message


def test_the_attested_port_given_as_the_plain_one_gets_a_hint(server: VeilServer) -> None:
    ports = {**server.ports, "unattested_port": server.attested_port}
    with pytest.raises(veil.TransportError) as info:
        veil.connect("127.0.0.1", simulation=True, timeout=10, **ports)
    assert "the server's unattested plain-HTTP port?" in str(info.value)
