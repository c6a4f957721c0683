"""`KeyStore.authenticate` keeps a connection per thread, yet a revocation counts at once."""

from __future__ import annotations

import threading
from pathlib import Path

from veil.server.keys import KEYS_FILENAME, KeyStore


def test_revocation_by_another_process_is_seen_on_the_next_call(tmp_path: Path) -> None:
    server = KeyStore(tmp_path / KEYS_FILENAME)
    key_id, secret = server.create("user")
    info = server.authenticate(secret)
    assert info is not None
    assert info.key_id == key_id
    # `veil keys revoke` runs in another process: another KeyStore on the same file.
    KeyStore(tmp_path / KEYS_FILENAME).revoke(key_id)
    assert server.authenticate(secret) is None


def test_key_created_elsewhere_is_seen_and_threads_have_their_own_connection(
    tmp_path: Path,
) -> None:
    server = KeyStore(tmp_path / KEYS_FILENAME)
    assert server.authenticate("veil_" + "0" * 16 + "_" + "0" * 64) is None  # opens the reader
    _, secret = KeyStore(tmp_path / KEYS_FILENAME).create("owner")
    results: list[bool] = []

    def check() -> None:
        results.append(server.authenticate(secret) is not None)

    threads = [threading.Thread(target=check) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == [True] * 4
    assert server.authenticate(secret) is not None
