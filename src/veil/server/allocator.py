"""The C allocator's footprint: fewer malloc arenas, and freed memory given back.

glibc gives each thread that contends for the heap its own arena, up to 8 per core; ONNX
Runtime's pool threads, the request thread pool and the admission helpers each end up with one, and
memory freed in one arena (a deleted model's session) is not reused by the others, so a server
that keeps uploading and deleting models grows for no model it holds. One arena per core keeps
contention at what the cores allow anyway. ``MALLOC_ARENA_MAX`` in the environment, glibc's own
knob, takes precedence. Elsewhere than glibc these are no-ops.
"""

from __future__ import annotations

import asyncio
import ctypes
import mmap
import os
from functools import cache

_M_ARENA_MAX = -8  # glibc's mallopt parameter number (malloc.h)
TRIM_INTERVAL_S = 10.0
"""How often, at most, freed memory is handed back after models were unloaded."""


@cache
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt  # noqa: B018 - present only in glibc (and compatible libcs)
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def limit_arenas() -> int | None:
    """Cap glibc's malloc arenas at one per core (at least 2) unless ``MALLOC_ARENA_MAX`` is set.

    Returns the cap set, or None when the environment's or the platform's default stands.
    """
    libc = _glibc()
    if libc is None or "MALLOC_ARENA_MAX" in os.environ:
        return None
    arenas = max(2, os.cpu_count() or 1)
    if libc.mallopt(_M_ARENA_MAX, arenas) != 1:
        return None
    return arenas


def release_free_memory() -> None:
    """Give memory freed to the C allocator back to the system, so that resident memory counts
    what is in use."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


# The allocator is one per process, and so is this count.
_unloads = 0


def note_unload() -> None:
    """A model's session is being released: the next `trim_after_unloads` round trims."""
    global _unloads
    _unloads += 1


async def trim_after_unloads(interval_s: float = TRIM_INTERVAL_S) -> None:
    """Every `interval_s`, if models were unloaded since the last look, trim in a thread (a trim
    walks the arenas: never on the event loop), and once more a round later: a session is freed
    when its last run ends, which can be after its unload."""
    seen = _unloads
    rounds = 0
    while True:
        await asyncio.sleep(interval_s)
        if _unloads != seen:
            seen, rounds = _unloads, 2
        if rounds:
            rounds -= 1
            await asyncio.to_thread(release_free_memory)


class ConsumedPages:
    """Gives a bytearray's pages back to the system as its contents are consumed, front to back.

    For a buffer read once, in order, and then freed (a model's bytes fed to ONNX Runtime): its
    memory shrinks while the reader's copy grows, instead of both existing in full at once. The
    caller guarantees that nothing else holds the buffer: a released page reads as zeros after.
    Only whole pages inside the buffer are released (never the allocator's headers around it);
    where ``madvise`` is missing or refuses, nothing is released and nothing else changes.
    """

    def __init__(self, buffer: bytearray) -> None:
        self._libc = _glibc()
        self._address = self._released = self._end = 0
        if self._libc is None or len(buffer) < 2 * mmap.PAGESIZE:
            self._libc = None
            return
        # The address, read once; the export ends here (the buffer is not resized while read).
        exported = (ctypes.c_char * len(buffer)).from_buffer(buffer)
        address = ctypes.addressof(exported)
        del exported
        self._address, self._released = address, _page_ceil(address)
        self._end = address + len(buffer)

    @property
    def released(self) -> bool:
        """Whether any page was released (the buffer no longer holds what it held)."""
        return self._released > _page_ceil(self._address)

    def consumed(self, upto: int) -> None:
        """The first `upto` bytes will not be read again: release the whole pages among them."""
        if self._libc is None:
            return
        end = min(self._address + upto, self._end) & ~(mmap.PAGESIZE - 1)
        if end <= self._released:
            return
        result = self._libc.madvise(
            ctypes.c_void_p(self._released),
            ctypes.c_size_t(end - self._released),
            ctypes.c_int(mmap.MADV_DONTNEED),
        )
        if result != 0:
            self._libc = None  # refused: keep the memory, as without this class
            return
        self._released = end


def _page_ceil(address: int) -> int:
    return (address + mmap.PAGESIZE - 1) & ~(mmap.PAGESIZE - 1)
