"""When the server asks for API keys (`AuthGate`), and which store it opens (`open_store`)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from veil.errors import AuthenticationError, EvidenceUnavailableError, SealedStateError
from veil.server.config import ServerConfig
from veil.server.keys import AuthGate, KeyStore, Principal
from veil.server.runner import UNSEALED_STORE_WARNING, open_store, prepare_state
from veil.server.sealing import SealedModelStore
from veil.server.state import MANIFEST_FILENAME, SealedState, open_state
from veil.server.store import ModelStore, StoredModel

KEY = bytes(range(32))


def keys(tmp_path: Path) -> KeyStore:
    return KeyStore(SealedState(tmp_path, KEY))


def gate(tmp_path: Path, host: str, *, no_auth: bool = False) -> AuthGate:
    return AuthGate(keys(tmp_path), host=host, no_auth=no_auth)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "10.1.2.3", "veil.example", "[::]"])
def test_beyond_loopback_auth_is_on_without_any_key(tmp_path: Path, host: str) -> None:
    g = gate(tmp_path, host)
    assert g.enabled()
    assert g.describe() == "auth=on"
    with pytest.raises(AuthenticationError) as info:
        g.authenticate(None)
    assert info.value.status == 401
    assert "veil keys create --role admin --data-dir" in info.value.message


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost"])
def test_loopback_without_keys_is_off_until_one_exists(tmp_path: Path, host: str) -> None:
    g = gate(tmp_path, host)
    assert not g.enabled()
    assert g.authenticate(None) == Principal.unauthenticated()
    assert g.describe().startswith("auth=off")
    # a key created by another process (here: another state on the same directory) counts at once
    key_id, secret = keys(tmp_path).create("user")
    assert g.enabled()
    with pytest.raises(AuthenticationError):
        g.authenticate(None)
    assert g.authenticate(secret) == Principal(key_id, "user")


def test_first_key_seen_even_within_one_timestamp_tick(tmp_path: Path) -> None:
    # The manifest's random header changes on every write, whatever the clock.
    g = gate(tmp_path, "127.0.0.1")
    for _ in range(5):
        assert not g.enabled()
    keys(tmp_path).create("owner")
    assert g.enabled()


def test_revoked_only_keys_keep_auth_on(tmp_path: Path) -> None:
    store = keys(tmp_path)
    key_id, secret = store.create("admin")
    store.revoke(key_id)
    g = AuthGate(store, host="127.0.0.1", no_auth=False)
    assert g.enabled()
    with pytest.raises(AuthenticationError, match="invalid or revoked"):
        g.authenticate(secret)


@pytest.mark.parametrize("host", ["0.0.0.0", "127.0.0.1"])
def test_no_auth_turns_it_off_even_with_keys(tmp_path: Path, host: str) -> None:
    keys(tmp_path).create("admin")
    g = gate(tmp_path, host, no_auth=True)
    assert not g.enabled()
    assert g.describe() == "auth=OFF (--no-auth)"
    assert g.authenticate(None) == Principal.unauthenticated()


def test_server_config_beyond_loopback_asks_for_keys(tmp_path: Path) -> None:
    state, _ = prepare_state(ServerConfig(tmp_path, platform="simulated", host="0.0.0.0"))
    assert state.auth.enabled()
    state, _ = prepare_state(ServerConfig(tmp_path, platform="simulated", host="127.0.0.1"))
    assert not state.auth.enabled()


def test_vanished_manifest_never_turns_auth_off(tmp_path: Path) -> None:
    g = gate(tmp_path, "127.0.0.1")
    keys(tmp_path).create("admin")
    assert g.enabled()
    (tmp_path / MANIFEST_FILENAME).unlink()
    with pytest.raises(SealedStateError, match="missing"):
        g.enabled()


def _no_key() -> bytes:
    raise EvidenceUnavailableError("configfs-tsm offers no sealing key")


def test_no_sealing_key_refuses_to_start(tmp_path: Path) -> None:
    with pytest.raises(EvidenceUnavailableError, match="--unsealed-store") as info:
        open_state(tmp_path, _no_key)
    assert "configfs-tsm offers no sealing key" in str(info.value)
    assert not (tmp_path / "models").exists()
    assert not (tmp_path / MANIFEST_FILENAME).exists()


def test_unsealed_store_is_plain_and_warns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = open_store(ServerConfig(tmp_path, unsealed_store=True), SealedState(tmp_path, KEY))
    assert isinstance(store, ModelStore)
    assert UNSEALED_STORE_WARNING in capsys.readouterr().err


def test_sealing_key_gives_a_sealed_store(tmp_path: Path) -> None:
    store = open_store(ServerConfig(tmp_path), SealedState(tmp_path, KEY))
    assert isinstance(store, SealedModelStore)
    assert store.directory == tmp_path / "sealed"


def test_unsealed_store_with_owned_models_and_no_keys_refuses_to_start(tmp_path: Path) -> None:
    # --unsealed-store: the plain files say keys were in use; a state without keys (removed, or
    # never there) must not turn authentication off for them.
    blob = b"not parsed before the check"
    meta = StoredModel("private", hashlib.sha256(blob).digest(), "", len(blob), owner="k" * 16)
    ModelStore(tmp_path / "models").put(meta, blob)
    config = ServerConfig(tmp_path, platform="simulated", unsealed_store=True)
    with pytest.raises(SealedStateError, match="state holds no API key"):
        prepare_state(config)


def test_anonymous_only_where_allowed_and_switched_on(tmp_path: Path) -> None:
    store = keys(tmp_path)
    _, secret = store.create("owner", name="alice")
    on = AuthGate(store, host="0.0.0.0", no_auth=False, now=lambda: 123.0)
    caller = on.authenticate(None, allow_anonymous=True)
    assert caller == Principal.anonymous_caller()
    with pytest.raises(AuthenticationError, match="missing API key"):
        on.authenticate(None)  # a route that does not allow it (upload, delete, list, admin)
    with pytest.raises(AuthenticationError, match="invalid or revoked"):
        on.authenticate("veil_0123456789abcdef_" + "0" * 64, allow_anonymous=True)
    off = AuthGate(store, host="0.0.0.0", no_auth=False, anonymous=False)
    with pytest.raises(AuthenticationError, match="missing API key"):
        off.authenticate(None, allow_anonymous=True)
    principal = on.authenticate(secret)
    assert principal.key_id is not None
    assert on.last_used(principal.key_id) == 123.0
    assert off.last_used(principal.key_id) is None


class _DatabaseLikeState(SealedState):
    """A sealed state whose reads stand for a database's: each may wait on the network."""

    @property
    def current_may_block(self) -> bool:
        return True


def test_only_state_behind_the_network_sends_authentication_to_a_thread(tmp_path: Path) -> None:
    # A local sealed state is checked on the event loop (a stat and a SHA-256); one behind the
    # network (PostgreSQL) from a worker thread, so a slow database never stalls the loop.
    assert gate(tmp_path / "local", "0.0.0.0").may_block is False
    remote = AuthGate(
        KeyStore(_DatabaseLikeState(tmp_path / "db", KEY)), host="0.0.0.0", no_auth=False
    )
    assert remote.may_block is True
    off = AuthGate(KeyStore(_DatabaseLikeState(tmp_path / "off", KEY)), host="::", no_auth=True)
    assert off.may_block is False  # nothing is looked up at all


def test_postgres_state_says_its_reads_may_block() -> None:
    from veil.server.pgstate import PostgresState

    assert PostgresState.current_may_block.fget is not None
    assert PostgresState.current_may_block.fget(object.__new__(PostgresState)) is True


def test_one_authentication_reads_one_manifest(tmp_path: Path) -> None:
    # Auth on, a key sent: whether keys are demanded, whether any exist and whose key it is all
    # come from one committed manifest, checked for a newer commit once per request.
    state = SealedState(tmp_path, KEY)
    store = KeyStore(state)
    _, secret = store.create("owner")
    reads = 0
    current = state.current

    def counted() -> object:
        nonlocal reads
        reads += 1
        return current()

    state.current = counted  # type: ignore[method-assign]
    g = AuthGate(store, host="127.0.0.1", no_auth=False)
    assert g.authenticate(secret).key_id is not None
    assert reads == 1
    with pytest.raises(AuthenticationError):
        g.authenticate(secret[:-1] + ("0" if secret[-1] != "0" else "1"))
    assert reads == 2
