"""`KeyStore.authenticate` answers from memory, yet a change by another process counts at once."""

from __future__ import annotations

import threading
from pathlib import Path

from veil.server.keys import KeyStore
from veil.server.state import SealedState

KEY = bytes(range(32))


def test_revocation_by_another_process_is_seen_on_the_next_call(tmp_path: Path) -> None:
    server = KeyStore(SealedState(tmp_path, KEY))
    key_id, secret = server.create("user")
    info = server.authenticate(secret)
    assert info is not None
    assert info.key_id == key_id
    # `veil keys revoke` runs in another process: another state on the same directory.
    KeyStore(SealedState(tmp_path, KEY)).revoke(key_id)
    assert server.authenticate(secret) is None


def test_key_created_elsewhere_is_seen_from_every_thread(tmp_path: Path) -> None:
    server = KeyStore(SealedState(tmp_path, KEY))
    assert server.authenticate("veil_" + "0" * 16 + "_" + "0" * 64) is None
    _, secret = KeyStore(SealedState(tmp_path, KEY)).create("owner")
    results: list[bool] = []

    def check() -> None:
        results.append(server.authenticate(secret) is not None)

    threads = [threading.Thread(target=check) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [True] * 4
    assert server.authenticate(secret) is not None


def test_many_commits_within_one_clock_tick_are_all_seen(tmp_path: Path) -> None:
    # The cache is keyed on the file's random header, not only its time stamp and inode.
    server = KeyStore(SealedState(tmp_path, KEY))
    other = KeyStore(SealedState(tmp_path, KEY))
    for _ in range(20):
        key_id, secret = other.create("user")
        assert server.authenticate(secret) is not None
        other.revoke(key_id)
        assert server.authenticate(secret) is None
