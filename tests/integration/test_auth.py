"""API keys and ownership against a real server: who may upload, delete, list and run what."""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import numpy as np
import pytest
from onnx_models import identity_model
from server_process import (
    SNI,
    RawClient,
    ServerFactory,
    VeilServer,
    create_key,
    start_server,
    veil_cli,
)

import veil
from veil import wire
from veil.client.transport import HttpClient
from veil.server.keys import NO_AUTH_BANNER

X = np.arange(6, dtype=np.float32).reshape(2, 3)


class Keys:
    """The module's keys: (key id, secret) per holder."""

    def __init__(self, data_dir: Path) -> None:
        self.admin = create_key(data_dir, "admin", "admin")
        self.alice = create_key(data_dir, "owner", "alice")
        self.bob = create_key(data_dir, "owner", "bob")
        self.carol = create_key(data_dir, "user", "carol")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[VeilServer, Keys]]:
    """A loopback server whose data directory holds keys before it starts: auth is on."""
    root = tmp_path_factory.mktemp("veil-auth")
    keys = Keys(root / "data")
    running = start_server(root / "data", root / "log", "--log-level", "info")
    yield running, keys
    assert running.stop() == 0, running.stderr()[-3000:]


@pytest.fixture(scope="module")
def server(setup: tuple[VeilServer, Keys]) -> VeilServer:
    return setup[0]


@pytest.fixture(scope="module")
def keys(setup: tuple[VeilServer, Keys]) -> Keys:
    return setup[1]


def as_(server: VeilServer, key: tuple[str, str] | None) -> veil.Connection:
    return server.connect(api_key=None if key is None else key[1])


def upload(server: VeilServer, key: tuple[str, str], model_id: str, **kwargs: Any) -> None:
    with as_(server, key) as client:
        client.upload_model(identity_model("float32"), model_id=model_id, **kwargs)


def predicts(server: VeilServer, key: tuple[str, str] | None, model_id: str) -> bool:
    """True if `key` runs the model (and gets the right answer); False on a 404."""
    refusal: veil.NotFoundError | None = None
    with as_(server, key) as client:
        try:
            out = client.predict(model_id, X).output[0].as_numpy()
        except veil.NotFoundError as exc:
            refusal = exc
    if refusal is not None:
        # the very words of a model that does not exist: no existence oracle
        assert refusal.message == f"unknown model id {model_id!r}"
        return False
    assert np.array_equal(out, X)
    return True


def test_ready_line_says_auth_is_on(server: VeilServer) -> None:
    out = (server.log_dir / "stdout.log").read_text()
    assert "auth=on" in out


@pytest.mark.parametrize("key", [None, "not-a-key", "veil_0123456789abcdef_" + "0" * 64])
def test_upload_without_valid_key_is_401(server: VeilServer, key: str | None) -> None:
    with server.connect(api_key=key) as client, pytest.raises(veil.AuthenticationError) as info:
        client.upload_model(identity_model("float32"), model_id="anon")
    assert info.value.status == 401
    assert ("missing API key" in info.value.message) == (key is None)
    assert key is None or key not in info.value.message


def test_user_key_cannot_upload(server: VeilServer, keys: Keys) -> None:
    with as_(server, keys.carol) as client, pytest.raises(veil.PermissionDeniedError) as info:
        client.upload_model(identity_model("float32"), model_id="by-user")
    assert info.value.status == 403
    assert "owner or admin key" in info.value.message


def test_delete_needs_a_key(server: VeilServer, keys: Keys) -> None:
    upload(server, keys.alice, "del-needs-key", visibility="public")
    with as_(server, None) as client, pytest.raises(veil.AuthenticationError):
        client.delete_model("del-needs-key")
    with as_(server, keys.carol) as client, pytest.raises(veil.PermissionDeniedError) as info:
        client.delete_model("del-needs-key")
    assert info.value.status == 403
    assert "its owner's key or an admin key" in info.value.message
    assert predicts(server, keys.carol, "del-needs-key")  # still there


def test_default_visibility_is_owner_only(server: VeilServer, keys: Keys) -> None:
    upload(server, keys.alice, "alice-default")
    assert predicts(server, keys.alice, "alice-default")
    assert not predicts(server, keys.bob, "alice-default")
    assert not predicts(server, keys.carol, "alice-default")
    # No key at all: anonymous, public models only; a restricted one is as if it did not exist.
    assert not predicts(server, None, "alice-default")


def test_blindai_upload_without_visibility_is_restricted(server: VeilServer, keys: Keys) -> None:
    # A BlindAI 0.6 client sends neither field (and the model as an int array).
    raw = RawClient(server)
    try:
        model = identity_model("float32").SerializeToString()
        body = cbor2.dumps({"model": list(model), "length": len(model), "model_name": "m"})
        headers = {"X-Veil-Api-Key": keys.alice[1]}
        response = raw.pinned.post(
            raw.url("attested", "/upload"), content=body, headers=headers, extensions=SNI
        )
        assert response.status_code == 200, response.content
        model_id, _ = wire.decode_upload_reply(response.content)
    finally:
        raw.close()
    assert predicts(server, keys.alice, model_id)
    assert not predicts(server, keys.bob, model_id)


def test_foreign_restricted_model_is_untouchable(server: VeilServer, keys: Keys) -> None:
    upload(server, keys.alice, "alice-secret", visibility="restricted")
    with as_(server, keys.bob) as bob:
        with pytest.raises(veil.NotFoundError) as info:
            bob.delete_model("alice-secret")
        assert info.value.message == "unknown model id 'alice-secret'"
        assert "alice-secret" not in {m.model_id for m in bob.list_models()}
    assert not predicts(server, keys.bob, "alice-secret")
    # restricted means exactly the listed keys: an admin sees and deletes it, but cannot run it
    assert not predicts(server, keys.admin, "alice-secret")
    with as_(server, keys.admin) as admin:
        listed = {m.model_id: m for m in admin.list_models()}
        assert listed["alice-secret"].owner == keys.alice[0]
        assert listed["alice-secret"].visibility == "restricted"
        admin.delete_model("alice-secret")
    with as_(server, keys.alice) as alice, pytest.raises(veil.NotFoundError):
        alice.predict("alice-secret", X)


def test_public_model_runs_for_all_keys_but_only_owner_deletes(
    server: VeilServer, keys: Keys
) -> None:
    upload(server, keys.alice, "alice-public", visibility="public")
    for holder in (keys.alice, keys.bob, keys.carol, keys.admin):
        assert predicts(server, holder, "alice-public")
    with as_(server, keys.bob) as bob, pytest.raises(veil.PermissionDeniedError):
        bob.delete_model("alice-public")
    with as_(server, keys.alice) as alice:
        alice.delete_model("alice-public")


def test_allowed_keys(server: VeilServer, keys: Keys) -> None:
    upload(server, keys.alice, "alice-shared", allowed_keys=[keys.carol[0]])
    assert predicts(server, keys.carol, "alice-shared")
    assert predicts(server, keys.alice, "alice-shared")
    assert not predicts(server, keys.bob, "alice-shared")


def test_public_with_allowed_keys_is_400(server: VeilServer, keys: Keys) -> None:
    with as_(server, keys.alice) as client, pytest.raises(veil.BadRequestError) as info:
        client.upload_model(
            identity_model("float32"),
            model_id="contradiction",
            visibility="public",
            allowed_keys=[keys.bob[0]],
        )
    assert info.value.status == 400


def test_listing_shows_own_models_admin_all(server: VeilServer, keys: Keys) -> None:
    upload(server, keys.alice, "list-a")
    upload(server, keys.bob, "list-b", visibility="public")
    with as_(server, keys.alice) as alice:
        mine = {m.model_id for m in alice.list_models()}
    with as_(server, keys.bob) as bob:
        bobs = {m.model_id for m in bob.list_models()}
    with as_(server, keys.carol) as carol:
        users = {m.model_id for m in carol.list_models()}
    with as_(server, keys.admin) as admin:
        everything = {m.model_id for m in admin.list_models()}
    assert "list-a" in mine
    assert "list-b" not in mine
    assert "list-b" in bobs
    assert "list-a" not in bobs
    assert users == set()
    assert {"list-a", "list-b"} <= everything


def test_revoked_key_is_refused(server: VeilServer, keys: Keys) -> None:
    dave = create_key(server.data_dir, "owner", "dave")
    upload(server, dave, "dave-model", visibility="public")
    result = veil_cli(
        "keys", "revoke", dave[0], "--data-dir", str(server.data_dir), "--platform", "simulated"
    )
    assert result.returncode == 0, result.stderr
    with as_(server, dave) as client:
        with pytest.raises(veil.AuthenticationError) as info:
            client.predict("dave-model", X)
        assert info.value.message == "invalid or revoked API key"
        with pytest.raises(veil.AuthenticationError):
            client.delete_model("dave-model")
    assert predicts(server, keys.carol, "dave-model")  # the model stays, the key is gone


def test_request_ids_and_log_lines_never_hold_keys(server: VeilServer, keys: Keys) -> None:
    raw = RawClient(server)
    try:
        first = raw.get("unattested", "/healthz")
        assert first.status_code == 200
        assert re.fullmatch(r"[0-9a-f]{16}", first.headers["x-request-id"])
        mine = raw.pinned.get(
            raw.url("management", "/models"),
            headers={"X-Request-Id": "trace-42", "X-Veil-Api-Key": keys.bob[1]},
            extensions=SNI,
        )
        assert mine.status_code == 200
        assert mine.headers["x-request-id"] == "trace-42"
        # an id that is not a short plain token is replaced (a control character would not
        # even pass the HTTP parser: 400)
        odd = raw.pinned.get(
            raw.url("attested", "/"), headers={"X-Request-Id": "a b/c;" + "x" * 70}, extensions=SNI
        )
        assert re.fullmatch(r"[0-9a-f]{16}", odd.headers["x-request-id"])
    finally:
        raw.close()
    predicts(server, keys.carol, "alice-shared")
    log = server.stderr()
    assert re.search(
        r"request id=trace-42 port=management method=GET route='/models' status=200 "
        rf"duration_ms=[0-9.]+ model=None key_id={keys.bob[0]}",
        log,
    ), log[-2000:]
    assert re.search(r"route='/run' status=200 .* model='alice-shared'", log)
    for _, secret in (keys.admin, keys.alice, keys.bob, keys.carol):
        assert secret not in log
        assert secret.split("_")[2] not in log


def test_client_sends_the_key_only_on_the_attested_channel(
    server: VeilServer, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[str, bool]] = []
    real = HttpClient._head

    def recording(self: HttpClient, method: str, target: str, host: str, *args: Any) -> Any:
        head, sized = real(self, method, target, host, *args)
        port = int(host.rsplit(":", 1)[1])
        seen.append(
            (
                "http" if port == server.unattested_port else "https",
                b"x-veil-api-key" in head.lower(),
            )
        )
        return head, sized

    monkeypatch.setattr(HttpClient, "_head", recording)
    with server.connect(api_key=keys.carol[1]) as client:
        client.list_models()
    assert {scheme for scheme, _ in seen} == {"http", "https"}
    for scheme, with_key in seen:
        assert with_key == (scheme == "https"), seen


# ---- servers of their own -----------------------------------------------------------------------


def test_no_auth_banner_and_no_keys_asked(server_factory: ServerFactory, tmp_path: Path) -> None:
    data = tmp_path / "noauth"
    create_key(data, "owner")  # keys exist, yet --no-auth wins
    running = server_factory("--no-auth", data_dir=data)
    assert NO_AUTH_BANNER in running.stderr()
    assert "auth=OFF (--no-auth)" in (running.log_dir / "stdout.log").read_text()
    with running.connect() as client:
        client.upload_model(identity_model("float32"), model_id="free")
        assert [m.visibility for m in client.list_models()] == ["public"]
        client.delete_model("free")


def test_first_admin_key_created_while_serving(server_factory: ServerFactory) -> None:
    running = server_factory()  # loopback, no keys: auth off (local development)
    assert "auth=off until a key exists" in (running.log_dir / "stdout.log").read_text()
    with running.connect() as client:
        client.upload_model(identity_model("float32"), model_id="early")
    result = veil_cli(
        "keys",
        "create",
        "--role",
        "admin",
        "--data-dir",
        str(running.data_dir),
        "--platform",
        "simulated",
    )
    assert result.returncode == 0, result.stderr
    secret = re.search(r"key:\s+(veil_\S+)", result.stdout)
    assert secret is not None
    # the next request already needs a key
    with running.connect() as client, pytest.raises(veil.AuthenticationError):
        client.upload_model(identity_model("float32"), model_id="late")
    with running.connect(api_key=secret.group(1)) as admin:
        admin.upload_model(identity_model("float32"), model_id="late")
        listed = {m.model_id: m.owner for m in admin.list_models()}
    assert listed["early"] is None  # uploaded while auth was off
    assert listed["late"] == re.search(r"key id:\s+(\S+)", result.stdout).group(1)  # type: ignore[union-attr]
    assert secret.group(1) not in running.stderr()


def test_run_by_hash_finds_the_copy_this_key_may_run(server: VeilServer, keys: Keys) -> None:
    # same bytes uploaded twice: alice's copy restricted, bob's public
    blob = identity_model("float32", (3, 2)).SerializeToString()
    digest = hashlib.sha256(blob).hexdigest()
    with as_(server, keys.alice) as alice:
        alice.upload_model(blob, model_id="hash-a")
    with as_(server, keys.bob) as bob:
        bob.upload_model(blob, model_id="hash-b", visibility="public")
    x = X.reshape(3, 2)
    with as_(server, keys.carol) as carol:
        out = carol.run_model(model_hash=digest, input_tensors=x).output[0].as_numpy()
        assert np.array_equal(out, x)
    with as_(server, keys.bob) as bob:
        bob.delete_model("hash-b")
    with as_(server, keys.carol) as carol, pytest.raises(veil.NotFoundError) as info:
        carol.run_model(model_hash=digest, input_tensors=x)
    assert info.value.message == f"no model with hash {digest!r}"


# --- model ids belong to their owners: no existence oracle (issue 10) --------------------------


def refusal(server: VeilServer, key: tuple[str, str], call: str, model_id: str) -> tuple[int, str]:
    """(status, message) of a run or delete of `model_id` by `key`, with the id blanked out."""
    with as_(server, key) as client:
        act = (
            functools.partial(client.predict, model_id, X)
            if call == "run"
            else functools.partial(client.delete_model, model_id)
        )
        with pytest.raises(veil.ApiError) as info:
            act()
    return info.value.status, info.value.message.replace(repr(model_id), "ID")


def test_another_owners_id_answers_as_a_fresh_one(server: VeilServer, keys: Keys) -> None:
    upload(server, keys.alice, "oracle-private", visibility="restricted")
    # Probing by run and delete: the same answer as for an id nobody uses.
    for call in ("run", "delete"):
        assert refusal(server, keys.bob, call, "oracle-private") == refusal(
            server, keys.bob, call, "oracle-never-used"
        )
    # Probing by upload: bob gets "oracle-private" exactly as he gets a fresh id.
    wide = identity_model("float32", (3, 2))
    with as_(server, keys.bob) as bob:
        taken = bob.upload_model(wide, model_id="oracle-private")
        fresh = bob.upload_model(wide, model_id="oracle-fresh")
        assert (taken.model_id, taken.hash) == ("oracle-private", fresh.hash)
    # Each owner runs, lists and deletes its own "oracle-private".
    x = X.reshape(3, 2)
    with as_(server, keys.bob) as bob:
        assert np.array_equal(bob.predict("oracle-private", x).output[0].as_numpy(), x)
        assert [m.owner for m in bob.list_models() if m.model_id == "oracle-private"] == [
            keys.bob[0]
        ]
    assert predicts(server, keys.alice, "oracle-private")
    with as_(server, keys.bob) as bob:
        bob.delete_model("oracle-private")
        bob.delete_model("oracle-fresh")
    assert predicts(server, keys.alice, "oracle-private")  # alice's is untouched
    # An owner's own id stays taken, for that owner only.
    with as_(server, keys.alice) as alice, pytest.raises(veil.ConflictError) as info:
        alice.upload_model(identity_model("float32"), model_id="oracle-private")
    assert info.value.message == "model id 'oracle-private' is already taken"


def test_public_ids_shared_by_owners(server: VeilServer, keys: Keys) -> None:
    upload(server, keys.alice, "oracle-public", visibility="public")
    assert predicts(server, keys.carol, "oracle-public")  # reachable by id by any key
    blob = identity_model("float32", (3, 2)).SerializeToString()
    with as_(server, keys.bob) as bob:
        bob.upload_model(blob, model_id="oracle-public", visibility="public")
    x = X.reshape(3, 2)
    # Each owner gets its own; carol may run both: which one she means must be said.
    assert predicts(server, keys.alice, "oracle-public")
    with as_(server, keys.bob) as bob:
        assert np.array_equal(bob.predict("oracle-public", x).output[0].as_numpy(), x)
    with as_(server, keys.carol) as carol:
        with pytest.raises(veil.ConflictError) as info:
            carol.predict("oracle-public", X)
        assert info.value.status == 409
        assert "is ambiguous: 2 models you may use have it" in info.value.message
        # ... by the qualified id, or by id and hash
        out = carol.predict(f"{keys.alice[0]}/oracle-public", X).output[0].as_numpy()
        assert np.array_equal(out, X)
        digest = hashlib.sha256(blob).hexdigest()
        # (the wire takes both, the public methods one: both as a client pinning a hash sends)
        out = carol._run("oracle-public", digest, x, None, None)
        assert np.array_equal(out.output[0].as_numpy(), x)
    # An admin may delete either: it names which.
    with as_(server, keys.admin) as admin:
        with pytest.raises(veil.ConflictError):
            admin.delete_model("oracle-public")
        admin.delete_model(f"{keys.bob[0]}/oracle-public")
    # One visible model of that id again: the plain id reaches it.
    assert predicts(server, keys.carol, "oracle-public")
    # A qualified id of a model the caller may not run is as unknown as any other.
    upload(server, keys.alice, "oracle-hidden", visibility="restricted")
    qualified = f"{keys.alice[0]}/oracle-hidden"
    assert refusal(server, keys.bob, "run", qualified) == refusal(
        server, keys.bob, "run", f"{keys.alice[0]}/oracle-none"
    )
