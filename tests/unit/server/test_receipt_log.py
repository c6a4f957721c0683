"""The server's receipt log: it survives restarts, and an edited, reordered, cut or foreign log
stops the start (SealedStateError); receipts name their sequence number and log position."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from veil.errors import LogError, SealedStateError
from veil.receipts.cose import Signer, verify_sign1
from veil.receipts.merkle import leaf_hash, verify_consistency, verify_inclusion
from veil.receipts.payload import ReceiptPayload, TreeHead
from veil.receipts.proof import check_receipt, decode_bundle
from veil.server.receipts import LOG_FILENAME, ReceiptIssuer, ReceiptLog

KEY = b"\x07" * 32
EVIDENCE = b"a quote"
WHEN = datetime(2026, 3, 1, tzinfo=UTC)


def issuer(path: Path, key: bytes = KEY, signer: Signer | None = None) -> ReceiptIssuer:
    return ReceiptIssuer(
        signer or Signer(), EVIDENCE, ReceiptLog(path / LOG_FILENAME, key), clock=lambda: WHEN
    )


def head_of(issuer: ReceiptIssuer) -> TreeHead:
    return TreeHead.decode(verify_sign1(issuer.head(), issuer.public_key))


def test_receipts_are_sequenced_and_included(tmp_path: Path) -> None:
    server = issuer(tmp_path)
    for seq in range(5):
        message, head, path = decode_bundle(
            server.issue("predict", "m", b"\x01" * 32, inputs=b"\x02" * 32, outputs=b"\x03" * 32)
        )
        payload, tree = check_receipt(
            message, head, path, public_key=server.public_key, evidence=EVIDENCE
        )
        assert payload.seq == seq
        assert tree.size == seq + 1
        assert payload.time == WHEN


def test_the_log_survives_a_restart_with_a_new_key(tmp_path: Path) -> None:
    first = issuer(tmp_path)
    messages = [decode_bundle(first.issue("upload", f"m{i}", b"\x01" * 32))[0] for i in range(6)]
    before = head_of(first)
    second = issuer(tmp_path)  # a restart: a new receipt key, the same log
    assert head_of(second).root == before.root
    decode_bundle(second.issue("delete", "m0", b"\x01" * 32))
    after = head_of(second)
    assert after.size == 7
    verify_consistency(
        before.size, after.size, before.root, after.root, second.consistency(before.size, 7)
    )
    for index, message in enumerate(messages):
        verify_inclusion(leaf_hash(message), index, 7, second.inclusion(index, 7), after.root)


def write_some(tmp_path: Path, count: int = 4) -> Path:
    server = issuer(tmp_path)
    for i in range(count):
        server.issue("upload", f"m{i}", b"\x01" * 32)
    return tmp_path / LOG_FILENAME


def test_an_edited_record_stops_the_start(tmp_path: Path) -> None:
    path = write_some(tmp_path)
    data = bytearray(path.read_bytes())
    data[64 + 3] ^= 1  # a leaf hash of record 1
    path.write_bytes(bytes(data))
    with pytest.raises(SealedStateError, match="record 1 fails authentication"):
        issuer(tmp_path)


def test_reordered_records_stop_the_start(tmp_path: Path) -> None:
    path = write_some(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[64:128] + data[:64] + data[128:])
    with pytest.raises(SealedStateError, match="record 0 fails authentication"):
        issuer(tmp_path)


def test_a_cut_record_stops_the_start(tmp_path: Path) -> None:
    path = write_some(tmp_path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(SealedStateError, match="not whole records"):
        issuer(tmp_path)


def test_a_log_under_another_key_stops_the_start(tmp_path: Path) -> None:
    write_some(tmp_path)
    with pytest.raises(SealedStateError, match="record 0 fails authentication"):
        issuer(tmp_path, key=b"\x08" * 32)


def test_a_cut_log_is_caught_by_an_auditors_head(tmp_path: Path) -> None:
    """Dropping whole trailing records is not detectable at start (no trusted counter), but a
    head kept by anyone shows the rewrite as soon as the log grows again."""
    path = write_some(tmp_path, 5)
    kept = head_of(issuer(tmp_path))
    path.write_bytes(path.read_bytes()[: 3 * 64])
    server = issuer(tmp_path)
    for i in range(4):
        server.issue("upload", f"other{i}", b"\x02" * 32)
    now = head_of(server)
    with pytest.raises(LogError, match="rewritten"):
        verify_consistency(
            kept.size, now.size, kept.root, now.root, server.consistency(kept.size, now.size)
        )


def test_receipt_payload_names_the_evidence(tmp_path: Path) -> None:
    server = issuer(tmp_path)
    message, _, _ = decode_bundle(server.issue("upload", "m", b"\x01" * 32))
    payload = ReceiptPayload.decode(verify_sign1(message, server.public_key))
    assert payload.evidence != b"\x00" * 32
    assert payload.op == "upload"
    assert payload.inputs is None


def test_a_receipt_leaves_only_once_its_record_is_on_disk_and_fsyncs_are_shared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Group commit: while the first fsync runs, two more receipts are written; one more fsync
    covers both, and no receipt is returned before an fsync that covers its record."""
    server = issuer(tmp_path)
    log = server.log
    release = threading.Event()
    syncs: list[int] = []

    def slow_fsync(path: Path) -> None:
        syncs.append(log.tree.size)
        if len(syncs) == 1:
            assert release.wait(timeout=60)

    monkeypatch.setattr("veil.server.receipts._fsync", slow_fsync)
    issued: dict[int, str] = {}

    def issue(n: int) -> None:
        issued[n] = server.issue("upload", f"m{n}", b"\x01" * 32)

    first = threading.Thread(target=issue, args=(0,))
    first.start()
    give_up = time.monotonic() + 60
    while not syncs:  # the first fsync has begun (and waits)
        assert time.monotonic() < give_up
        time.sleep(0.01)
    others = [threading.Thread(target=issue, args=(n,)) for n in (1, 2)]
    for thread in others:
        thread.start()
    while log.tree.size < 3:  # both written, both waiting for their fsync
        assert time.monotonic() < give_up
        time.sleep(0.01)
    assert issued == {}  # nothing handed out before its record is durable
    assert log.durable == 0
    release.set()
    for thread in (first, *others):
        thread.join(timeout=60)
    assert sorted(issued) == [0, 1, 2]
    assert syncs == [1, 3]  # two fsyncs for three receipts: the second covered records 1 and 2
    assert log.durable == 3


def test_a_failed_fsync_hands_out_no_receipt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = issuer(tmp_path)

    def failing(path: Path) -> None:
        raise OSError(5, "I/O error")

    monkeypatch.setattr("veil.server.receipts._fsync", failing)
    with pytest.raises(OSError, match="I/O error"):
        server.issue("upload", "m", b"\x01" * 32)
    assert server.log.durable == 0


def test_a_new_log_makes_its_directory(tmp_path: Path) -> None:
    server = issuer(tmp_path / "not" / "yet")
    decode_bundle(server.issue("upload", "m", b"\x01" * 32))
    assert (tmp_path / "not" / "yet" / LOG_FILENAME).stat().st_size == 64
