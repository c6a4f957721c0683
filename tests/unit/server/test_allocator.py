"""`veil.server.allocator`: the arena cap, and freed memory handed back after models unload."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

from veil.server import allocator

glibc_only = pytest.mark.skipif(
    not sys.platform.startswith("linux") or allocator._glibc() is None, reason="glibc malloc"
)


def _rss() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@glibc_only
def test_arenas_capped_at_one_per_core(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert allocator.limit_arenas() == max(2, os.cpu_count() or 1)


@glibc_only
def test_the_environment_knob_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "8")
    assert allocator.limit_arenas() is None


@glibc_only
def test_trim_gives_fragmented_free_memory_back() -> None:
    # 1 KiB blocks come from the heap, not from mmap; keeping every 64th pins the heap's top, so
    # only a trim can give the freed pages between them back.
    blocks = [bytes(1024) for _ in range(160_000)]
    kept = blocks[::64]
    del blocks
    before = _rss()
    allocator.release_free_memory()
    after = _rss()
    assert len(kept) == 2500
    assert before - after > 64 * 2**20, (before, after)


def test_trimmed_after_an_unload_and_a_round_later(monkeypatch: pytest.MonkeyPatch) -> None:
    trims: list[int] = []
    monkeypatch.setattr(allocator, "release_free_memory", lambda: trims.append(1))

    async def scenario() -> list[int]:
        task = asyncio.create_task(allocator.trim_after_unloads(interval_s=0.01))
        await asyncio.sleep(0.1)
        idle = len(trims)  # nothing unloaded: no trim
        allocator.note_unload()
        for _ in range(500):
            await asyncio.sleep(0.01)
            if len(trims) >= 2:
                break
        await asyncio.sleep(0.1)
        task.cancel()
        return [idle, len(trims)]

    assert asyncio.run(scenario()) == [0, 2]
