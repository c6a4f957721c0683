"""The managed-service pieces against a real server: the admin-key API, anonymous querying of
public models (and every refusal), its rate limits, and the default server from VEIL_SERVER."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest
from onnx_models import identity_model
from server_process import SNI, RawClient, ServerFactory, VeilServer, create_key, start_server

import veil
from veil.wire.admin import encode_create_key_request

X = np.arange(6, dtype=np.float32).reshape(2, 3)


@pytest.fixture(scope="module")
def setup(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[VeilServer, str, str]]:
    """A server with an admin key and an owner key, a public and a restricted model."""
    root = tmp_path_factory.mktemp("veil-service")
    _, admin = create_key(root / "data", "admin", "operator")
    _, owner = create_key(root / "data", "owner", "alice")
    running = start_server(root / "data", root / "log")
    with running.connect(api_key=owner) as client:
        client.upload_model(identity_model("float32"), model_id="pub", visibility="public")
        client.upload_model(identity_model("float32"), model_id="priv")
    yield running, admin, owner
    assert running.stop() == 0, running.stderr()[-3000:]


@pytest.fixture(scope="module")
def server(setup: tuple[VeilServer, str, str]) -> VeilServer:
    return setup[0]


@pytest.fixture(scope="module")
def anonymous(server: VeilServer) -> Iterator[veil.Connection]:
    with server.connect() as client:
        yield client


# ---- the admin-key API ------------------------------------------------------------------------


def test_admin_creates_lists_and_revokes_keys(setup: tuple[VeilServer, str, str]) -> None:
    server, admin, _ = setup
    with server.connect(api_key=admin) as client:
        info, secret = client.create_key("owner", name="bob@example.com")
        assert info.role == "owner"
        assert info.name == "bob@example.com"
        assert secret.startswith(f"veil_{info.key_id}_")
        listed = {k.key_id: k for k in client.list_keys()}
        assert listed[info.key_id].last_used_at is None
        assert listed[info.key_id].revoked_at is None
        # No secret or hash in a listing.
        assert secret.split("_")[2] not in repr(client.list_keys())
        with server.connect(api_key=secret) as bob:
            bob.upload_model(identity_model("float32"), model_id="bobs")
            bob.delete_model("bobs")
        assert {k.key_id: k for k in client.list_keys()}[info.key_id].last_used_at is not None
        client.revoke_key(info.key_id)
        client.revoke_key(info.key_id)  # idempotent
        assert {k.key_id: k for k in client.list_keys()}[info.key_id].revoked_at is not None
        with (
            server.connect(api_key=secret) as bob,
            pytest.raises(veil.AuthenticationError),
        ):
            bob.upload_model(identity_model("float32"), model_id="bobs")
        # An admin key lists every model with its owner and visibility: the catalogue.
        models = {m.model_id: m for m in client.list_models()}
        assert models["pub"].visibility == "public"
        assert models["priv"].visibility == "restricted"
        assert models["pub"].created_at is not None
        assert abs(models["pub"].created_at - time.time()) < 600


def test_admin_api_refuses_unknown_key_id_and_role(setup: tuple[VeilServer, str, str]) -> None:
    server, admin, _ = setup
    with server.connect(api_key=admin) as client:
        with pytest.raises(veil.NotFoundError):
            client.revoke_key("0123456789abcdef")
        with pytest.raises(veil.BadRequestError) as info:
            client.create_key("root")
        assert "expected one of admin, owner, user" in info.value.message
        with pytest.raises(veil.BadRequestError):
            client.create_key("user", name="bad\nname")
        with pytest.raises(veil.BadRequestError):
            client.revoke_key("../../etc")


def test_admin_api_refuses_owner_and_anonymous(setup: tuple[VeilServer, str, str]) -> None:
    server, _, owner = setup
    with server.connect(api_key=owner) as client:
        for call in (lambda: client.create_key("admin"), client.list_keys):
            with pytest.raises(veil.PermissionDeniedError) as info:
                call()
            assert "needs an admin key" in info.value.message
    with server.connect() as client:
        for call in (lambda: client.create_key("admin"), client.list_keys):
            with pytest.raises(veil.AuthenticationError):
                call()


def test_admin_api_malformed_body_is_400(setup: tuple[VeilServer, str, str]) -> None:
    server, admin, _ = setup
    raw = RawClient(server)
    try:
        headers = {"X-Veil-Api-Key": admin}
        url = raw.url("management", "/admin/keys")
        bad = raw.pinned.post(url, content=b"\xff", headers=headers, extensions=SNI)
        assert bad.status_code == 400
        not_a_map = raw.pinned.post(url, content=b"\x01", headers=headers, extensions=SNI)
        assert not_a_map.status_code == 400
        good = raw.pinned.post(
            url, content=encode_create_key_request("user", None), headers=headers, extensions=SNI
        )
        assert good.status_code == 200
    finally:
        raw.close()


# ---- anonymous querying -----------------------------------------------------------------------


def test_anonymous_runs_a_public_model(anonymous: veil.Connection) -> None:
    out = anonymous.predict("pub", X).output[0].as_numpy()
    assert np.array_equal(out, X)


def test_anonymous_cannot_run_a_restricted_model(anonymous: veil.Connection) -> None:
    with pytest.raises(veil.NotFoundError) as info:
        anonymous.predict("priv", X)
    assert info.value.message == "unknown model id 'priv'"  # no existence oracle


def test_anonymous_cannot_upload_delete_or_list(anonymous: veil.Connection) -> None:
    with pytest.raises(veil.AuthenticationError) as info:
        anonymous.upload_model(identity_model("float32"), model_id="anon")
    assert "missing API key" in info.value.message
    for model_id in ("pub", "priv"):
        with pytest.raises(veil.AuthenticationError):
            anonymous.delete_model(model_id)
    with pytest.raises(veil.AuthenticationError):
        anonymous.list_models()


def test_a_wrong_key_is_refused_not_made_anonymous(server: VeilServer) -> None:
    with (
        server.connect(api_key="veil_0123456789abcdef_" + "0" * 64) as c,
        pytest.raises(veil.AuthenticationError),
    ):
        c.predict("pub", X)


def test_no_anonymous_switch(server_factory: ServerFactory) -> None:
    running = server_factory("--no-anonymous")
    create_key(running.data_dir, "user", "someone")
    with running.connect() as client, pytest.raises(veil.AuthenticationError):
        client.predict("pub", X)


def _anonymous_429(server: VeilServer, attempts: int) -> tuple[int, str]:
    """(successes before the first 429, its message); the model is public."""
    with server.connect() as client:
        for done in range(attempts):
            try:
                client.predict("pub", X)
            except veil.RateLimitError as exc:
                return done, exc.message
    return attempts, ""


def _public_model_server(server_factory: ServerFactory, *limits: str) -> VeilServer:
    running = server_factory(*limits)
    _, owner = create_key(running.data_dir, "owner", "alice")
    with running.connect(api_key=owner) as client:
        client.upload_model(identity_model("float32"), model_id="pub", visibility="public")
    return running


def test_anonymous_rate_limit_per_address(server_factory: ServerFactory) -> None:
    running = _public_model_server(
        server_factory,
        "--anonymous-requests-per-second",
        "0.001",
        "--anonymous-burst",
        "3",
    )
    done, message = _anonymous_429(running, 10)
    assert done == 3
    assert "anonymous_requests_per_second=0.001 for this address" in message
    _, owner = create_key(running.data_dir, "owner", "carol")
    with running.connect(api_key=owner) as client:
        client.predict("pub", X)  # a key holder is not held back by the anonymous limit


def test_anonymous_global_budget(server_factory: ServerFactory) -> None:
    running = _public_model_server(
        server_factory,
        "--anonymous-budget-per-second",
        "0.001",
        "--anonymous-budget-burst",
        "4",
    )
    done, message = _anonymous_429(running, 10)
    assert done == 4
    assert "budget for requests without an API key is spent" in message


# ---- the default server -----------------------------------------------------------------------


def test_connect_without_address_reads_veil_server(
    server: VeilServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    ports = f"{server.unattested_port}:{server.attested_port}:{server.management_port}"
    monkeypatch.setenv("VEIL_SERVER", f"127.0.0.1:{ports}")
    monkeypatch.setenv("VEIL_SIMULATION", "1")
    with veil.connect() as client:
        assert np.array_equal(client.predict("pub", X).output[0].as_numpy(), X)
