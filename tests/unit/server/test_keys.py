"""API keys: hashed storage, constant-time authentication, roles, the auth policy and the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from veil.cli import main
from veil.client.connection import API_KEY_HEADER as CLIENT_HEADER
from veil.errors import AuthenticationError, NotFoundError
from veil.providers import detect_provider
from veil.server.keys import (
    API_KEY_HEADER,
    KeyStore,
    Principal,
    auth_required,
    can_delete,
    can_list,
    can_manage_keys,
    can_predict,
    can_upload,
    principal_from_api_key,
    principal_from_authorization,
)
from veil.server.state import SealedState, open_state

KEY = bytes(range(32))


def open_keys(d: Path, **kw: object) -> KeyStore:
    return KeyStore(SealedState(d, KEY), **kw)  # type: ignore[arg-type]


@pytest.fixture
def store(tmp_path: Path) -> KeyStore:
    clock = iter(range(1000, 2000))
    return open_keys(tmp_path, now=lambda: float(next(clock)))


def test_create_and_authenticate(store: KeyStore) -> None:
    key_id, secret = store.create("owner", name="alice")
    assert secret.startswith(f"veil_{key_id}_")
    info = store.authenticate(secret)
    assert info is not None
    assert (info.key_id, info.role, info.name, info.revoked) == (key_id, "owner", "alice", False)
    assert info.principal == Principal(key_id, "owner")


def test_secret_is_not_stored(store: KeyStore) -> None:
    key_id, secret = store.create("user")
    raw = store.state.manifest_path.read_bytes()
    secret_part = secret.rsplit("_", 1)[1]
    assert secret_part.encode() not in raw
    assert bytes.fromhex(secret_part) not in raw
    assert len(store.state.current().keys[key_id].secret_hash) == 32


def test_store_file_is_private(store: KeyStore) -> None:
    store.create("user")
    assert store.state.manifest_path.stat().st_mode & 0o077 == 0


@pytest.mark.parametrize(
    "mutate",
    [
        lambda s: s[:-1] + ("0" if s[-1] != "0" else "1"),  # last secret digit
        lambda s: s.replace("veil_", "vail_"),
        lambda s: s[:5] + ("0" if s[5] != "0" else "1") + s[6:],  # key id digit
        lambda s: s + "0",
        lambda s: s.upper(),
        lambda s: "",
        lambda s: s[:-64],
    ],
)
def test_wrong_secret_fails(store: KeyStore, mutate: object) -> None:
    _, secret = store.create("admin")
    bad = mutate(secret)  # type: ignore[operator]
    assert bad != secret
    assert store.authenticate(bad) is None


def test_revoke(store: KeyStore) -> None:
    key_id, secret = store.create("user")
    other_id, other = store.create("user")
    store.revoke(key_id)
    assert store.authenticate(secret) is None
    assert store.authenticate(other) is not None
    infos = {k.key_id: k for k in store.list()}
    assert infos[key_id].revoked
    assert infos[key_id].revoked_at is not None
    assert not infos[other_id].revoked
    first = infos[key_id].revoked_at
    store.revoke(key_id)  # idempotent: keeps the first revocation time
    assert store.get(key_id).revoked_at == first  # type: ignore[union-attr]
    with pytest.raises(NotFoundError, match="no such key"):
        store.revoke("0" * 16)


def test_list_never_holds_secrets(store: KeyStore) -> None:
    _, secret = store.create("owner", name="n")
    listing = repr(store.list())
    assert secret.rsplit("_", 1)[1] not in listing
    assert "hash" not in listing


def test_any_keys_and_persistence(tmp_path: Path) -> None:
    s1 = open_keys(tmp_path / "d")
    assert not s1.any_keys()
    _, secret = s1.create("user")
    s2 = open_keys(tmp_path / "d")
    assert s2.any_keys()
    assert s2.authenticate(secret) is not None


def test_create_rejects_bad_role_and_name(store: KeyStore) -> None:
    with pytest.raises(ValueError, match="role: got 'root'"):
        store.create("root")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="name"):
        store.create("user", name="x\n")
    assert not store.any_keys()


def test_roles() -> None:
    admin, owner, user = Principal("a", "admin"), Principal("o", "owner"), Principal("u", "user")
    assert [can_manage_keys(p) for p in (admin, owner, user)] == [True, False, False]
    assert [can_upload(p) for p in (admin, owner, user)] == [True, True, False]
    assert can_delete(admin, "o")
    assert can_delete(owner, "o")
    assert not can_delete(owner, "someone-else")
    assert not can_delete(owner, None)
    assert not can_delete(Principal("o", "user"), "o")  # a user key never deletes
    assert can_list(owner, "o")
    assert not can_list(user, "u")


def test_can_predict() -> None:
    u = Principal("u", "user")
    assert can_predict(u, "public", ())
    assert not can_predict(u, "restricted", ("x",))
    assert can_predict(u, "restricted", ("x", "u"))
    assert can_predict(u, "restricted", (), model_owner="u")
    assert not can_predict(Principal("a", "admin"), "restricted", ("u",))
    assert not can_predict(u, "Public", ())  # unknown visibility: closed
    assert can_predict(Principal.unauthenticated(), "restricted", ())


@pytest.mark.parametrize(
    ("host", "no_auth", "keys_exist", "expected"),
    [
        ("127.0.0.1", False, False, False),
        ("127.8.9.1", False, False, False),
        ("::1", False, False, False),
        ("[::1]", False, False, False),
        ("localhost", False, False, False),
        ("127.0.0.1", False, True, True),
        ("0.0.0.0", False, False, True),
        ("::", False, False, True),
        ("", False, False, True),
        ("10.0.0.5", False, False, True),
        ("example.org", False, False, True),
        ("0.0.0.0", True, True, False),
    ],
)
def test_auth_required(host: str, no_auth: bool, keys_exist: bool, expected: bool) -> None:
    assert auth_required(host, no_auth, keys_exist=keys_exist) is expected


def test_principal_from_authorization(store: KeyStore) -> None:
    key_id, secret = store.create("owner")
    assert principal_from_authorization(f"Bearer {secret}", store) == Principal(key_id, "owner")
    assert principal_from_authorization(f"bearer  {secret}", store).key_id == key_id
    for header, msg in [
        (None, "missing API key"),
        ("", "missing API key"),
        (secret, "expected 'Bearer <key>'"),
        ("Basic abc", "expected 'Bearer <key>'"),
        ("Bearer veil_0000000000000000_" + "0" * 64, "invalid or revoked"),
    ]:
        with pytest.raises(AuthenticationError, match=msg) as info:
            principal_from_authorization(header, store)
        assert info.value.status == 401
        assert secret not in str(info.value)


def _sim_keys(d: Path) -> KeyStore:
    provider = detect_provider("simulated", data_dir=d)
    return KeyStore(open_state(d, provider.sealing_key))


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path)
    sim = ["--platform", "simulated"]
    create = ["keys", "create", "--role", "owner", "--name", "bob", "--data-dir", d]
    assert main([*create, *sim]) == 0
    out, err = capsys.readouterr()
    assert "shown only once" in err
    secret = next(line.split()[-1] for line in out.splitlines() if line.startswith("key:"))
    key_id = next(line.split()[-1] for line in out.splitlines() if line.startswith("key id:"))
    store = _sim_keys(tmp_path)
    assert store.authenticate(secret) is not None

    assert main(["keys", "list", "--data-dir", d, *sim]) == 0
    out, _ = capsys.readouterr()
    assert key_id in out
    assert "bob" in out
    assert secret.rsplit("_", 1)[1] not in out

    assert main(["keys", "revoke", key_id, "--data-dir", d, *sim]) == 0
    assert store.authenticate(secret) is None
    assert main(["keys", "revoke", "f" * 16, "--data-dir", d, *sim]) == 1
    with pytest.raises(SystemExit):
        main(["keys", "create", "--role", "root", "--data-dir", d, *sim])


def test_principal_from_api_key(store: KeyStore) -> None:
    assert API_KEY_HEADER == CLIENT_HEADER  # the header the SDK sends
    key_id, secret = store.create("user")
    assert principal_from_api_key(secret, store) == Principal(key_id, "user")
    with pytest.raises(AuthenticationError) as missing:
        principal_from_api_key(None, store)
    assert missing.value.message == (
        "missing API key: pass api_key= to veil.connect (or send the X-Veil-Api-Key header)"
    )
    for value, msg in [(None, "missing API key"), ("", "missing"), ("veil_x", "invalid")]:
        with pytest.raises(AuthenticationError, match=msg) as info:
            principal_from_api_key(value, store)
        assert info.value.status == 401
    store.revoke(key_id)
    with pytest.raises(AuthenticationError, match="invalid or revoked"):
        principal_from_api_key(secret, store)


def test_cli_empty_list_and_bad_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path)
    sim = ["--platform", "simulated"]
    assert main(["keys", "list", "--data-dir", d, *sim]) == 0
    assert "no keys" in capsys.readouterr().out
    assert main(["keys", "create", "--role", "user", "--name", "a\tb", "--data-dir", d, *sim]) == 2
    assert "name" in capsys.readouterr().err
    assert not _sim_keys(tmp_path).any_keys()


def test_cli_refuses_a_tampered_state(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path)
    sim = ["--platform", "simulated"]
    assert main(["keys", "create", "--role", "admin", "--data-dir", d, *sim]) == 0
    capsys.readouterr()
    manifest = _sim_keys(tmp_path).state.manifest_path
    data = bytearray(manifest.read_bytes())
    data[30] ^= 1
    manifest.write_bytes(bytes(data))
    assert main(["keys", "list", "--data-dir", d, *sim]) == 2
    assert "state.sealed: does not unseal" in capsys.readouterr().err


def test_cli_without_the_servers_platform_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # "auto" never means simulated; on a machine with no TEE the command names the choice.
    assert main(["keys", "list", "--data-dir", str(tmp_path), "--platform", "tdx"]) == 2
    assert "veil keys list:" in capsys.readouterr().err


def test_anonymous_caller_runs_public_models_only() -> None:
    anon = Principal.anonymous_caller()
    assert can_predict(anon, "public", ())
    assert not can_predict(anon, "restricted", ())
    assert not can_predict(anon, "restricted", ("x",), model_owner=None)
    assert not can_predict(anon, "secret", ())
    assert not can_upload(anon)
    assert not can_delete(anon, None)
    assert not can_list(anon, None)
    assert not can_manage_keys(anon)
    assert not anon.has_role("user")
