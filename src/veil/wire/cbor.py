"""A strict, incremental CBOR decoder (RFC 8949) for the protocol's bodies.

Only what the BlindAI 0.6 protocol and veil's extensions use is accepted: unsigned and negative
integers (64 bits at most), byte and text strings, arrays, maps with text keys, ``false``,
``true``, ``null`` and floats. Every tag is refused: the protocol uses none, and the semantic tags
a general decoder honours cost a server dearly (tag 36 runs Python's email parser, 2/3 build
integers of any size, 258 builds sets). Indefinite lengths are accepted, since they cost nothing
more than definite ones here.

Limits hold whatever the body declares: nesting depth, decoded items (each Python object the
decoder builds counts, so a body of empty maps cannot become gigabytes of dicts), and container
or string sizes larger than the bytes left in the body are refused before anything is built.
Nothing is allocated from a declared size: strings grow as their bytes arrive.

Arrays of small unsigned integers under a key named in ``byte_array_keys`` (BlindAI sends a
model as ``list(model_bytes)``) decode to a ``bytearray`` with numpy a window at a time, never
one Python int per byte. Those arrays must use the shortest encoding, as every CBOR encoder
writes it: anything else in them is refused, so no slow path exists for an attacker to pick.

`StrictDecoder` takes a body in pieces (`feed`, then `finish`); `decode` takes it whole, with the
same rules written as plain recursion (a generator per item costs more than the item on every
small request; ``tests/fuzz/test_fuzz_wire.py`` holds the two to the same answers). Both raise
`BadRequestError` (status 400) naming what was wrong and where.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import numpy as np

from veil.errors import BadRequestError

__all__ = ["DecodeLimits", "StrictDecoder", "decode"]

# A generator that asks for "at least n bytes from the read position" and returns a value.
_Step = Generator[int, None, Any]
_WINDOW = 256 << 10  # bytes of an integer array decoded at once (numpy temporaries: ~30x)
_UINT_WIDTH = {24: 1, 25: 2, 26: 4, 27: 8}
_FLOAT = {25: ">e", 26: ">f", 27: ">d"}
_SIMPLE = {20: False, 21: True, 22: None}
_NO_BYTES = np.zeros(0, dtype=np.uint8)


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    """How much structure one body may hold.

    Attributes:
        max_depth: nested arrays and maps (the protocol needs 5: run → inputs → tensor → info →
            fact).
        max_items: decoded items of every kind, containers included; the bytes of a byte array
            (see `StrictDecoder`) are not items. Each costs Python 30 to 100 bytes, so the default
            bounds a body's objects to a few MiB however it is built.
        max_text_bytes: one text string. The protocol's texts are ids, names, hex hashes and
            client details; a long one would only cost its bytes again as a Python str.
    """

    max_depth: int = 16
    max_items: int = 1 << 16
    max_text_bytes: int = 1 << 16


def _bad(what: str, message: str) -> BadRequestError:
    return BadRequestError(400, f"{what}: malformed CBOR ({message})")


class StrictDecoder:
    """Decode one CBOR item from a body fed in pieces of any size.

    Args:
        what: names the body in error messages ("RunModel").
        limits: depth and item limits.
        size: the body's length when known (Content-Length, or the whole body): declared sizes
            past it are refused at once.
        byte_array_keys: map keys whose value, when it is an array, must be an array of
            integers 0..255 and decodes to a ``bytearray``.
        on_size: called with (key, declared size) when a byte string or byte array under one of
            `byte_array_keys` begins, before its bytes arrive; it may raise (a size limit).

    Raises:
        BadRequestError: from `feed` or `finish`: malformed, refused or over a limit.
    """

    def __init__(
        self,
        what: str,
        *,
        limits: DecodeLimits | None = None,
        size: int | None = None,
        byte_array_keys: frozenset[str] = frozenset(),
        on_size: Callable[[str, int], None] | None = None,
    ) -> None:
        self._what = what
        self._limits = limits or DecodeLimits()
        self._size = size
        self._byte_array_keys = byte_array_keys
        self._on_size = on_size
        self._buf = bytearray()
        self._pos = 0  # read position in _buf
        self._dropped = 0  # bytes consumed and dropped from the front of _buf
        self._items = 0
        self._step: _Step | None = self._item(0, None)
        self._need = 1
        self._value: Any = None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Take the next piece of the body and decode as far as it allows."""
        if not data:
            return
        if self._step is None:
            raise _bad(self._what, "bytes after the end of the message")
        if self._pos:
            del self._buf[: self._pos]
            self._dropped += self._pos
            self._pos = 0
        self._buf += data
        self._advance()

    def finish(self) -> Any:
        """The decoded item, once the whole body was fed (handed over: a second call is None)."""
        if self._step is not None:
            self._step.close()
            raise _bad(self._what, f"the body ends inside an item, at byte {self._offset()}")
        if self._pos != len(self._buf):
            raise _bad(self._what, "bytes after the end of the message")
        # Handed over, not kept: a decoder in a reference cycle (a bound `on_size`) lives until
        # the cyclic collector runs, and would keep a model's bytes alive with it.
        value, self._value = self._value, None
        return value

    # -- driving the decoding generator ------------------------------------------------------

    def _advance(self) -> None:
        step = self._step
        assert step is not None
        try:
            while len(self._buf) - self._pos >= self._need:
                self._need = step.send(None)
        except StopIteration as stop:
            self._step = None
            self._value = stop.value
        except BaseException:
            self._step = None
            raise

    def _offset(self) -> int:
        return self._dropped + self._pos

    def _left(self) -> int | None:
        """Bytes of the body not yet read, when its size is known."""
        return None if self._size is None else self._size - self._offset()

    def _error(self, message: str) -> BadRequestError:
        return _bad(self._what, f"{message}, at byte {self._offset()}")

    def _count(self, n: int) -> None:
        self._items += n
        if self._items > self._limits.max_items:
            raise self._error(f"more than {self._limits.max_items} items")

    # -- CBOR --------------------------------------------------------------------------------

    def _head(self) -> _Step:
        """(major type, additional information, argument) of the next item."""
        if self._pos >= len(self._buf):
            yield 1
        initial = self._buf[self._pos]
        major, info = initial >> 5, initial & 0x1F
        if info < 24:
            self._pos += 1
            return major, info, info
        width = _UINT_WIDTH.get(info)
        if width is not None:
            if len(self._buf) - self._pos < 1 + width:
                yield 1 + width
            start = self._pos + 1
            self._pos = start + width
            return major, info, int.from_bytes(self._buf[start : self._pos], "big")
        if info == 31 and major in (2, 3, 4, 5, 7):
            self._pos += 1
            return major, info, None
        raise self._error(f"reserved additional information {info}")

    def _at_break(self) -> _Step:
        """Whether the next byte ends an indefinite-length item (consumed if so)."""
        if self._pos >= len(self._buf):
            yield 1
        if self._buf[self._pos] == 0xFF:
            self._pos += 1
            return True
        return False

    def _check_declared(self, size: int, unit: int, what: str) -> None:
        left = self._left()
        if left is not None and size * unit > left:
            raise self._error(f"{what} of {size} declared, but {left} bytes are left")

    def _item(self, depth: int, key: str | None) -> _Step:
        major, info, arg = yield from self._head()
        if major == 0:
            self._count(1)
            return arg
        if major == 1:
            self._count(1)
            return -1 - arg
        if major in (2, 3):
            self._count(1)
            if major == 3 and arg is not None and arg > self._limits.max_text_bytes:
                raise self._error(
                    f"a text string of {arg} bytes, more than {self._limits.max_text_bytes}"
                )
            if major == 2 and key in self._byte_array_keys and self._on_size is not None:
                self._on_size(key, -1 if arg is None else arg)
            raw = yield from self._string(major, arg)
            if major == 2:
                return raw
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                raise self._error("a text string that is not UTF-8") from None
        if major in (4, 5):
            if depth >= self._limits.max_depth:
                raise self._error(f"nesting deeper than {self._limits.max_depth}")
            if major == 4 and key in self._byte_array_keys:
                if self._on_size is not None:
                    self._on_size(key, -1 if arg is None else arg)
                self._count(1)
                return (yield from self._byte_array(arg))
            self._count(1)
            if arg is not None:
                unit = 1 if major == 4 else 2
                self._check_declared(arg, unit, "items" if major == 4 else "pairs")
                if arg * unit > self._limits.max_items - self._items:
                    raise self._error(f"a container of {arg} entries, over the item limit")
            if major == 4:
                return (yield from self._array(depth + 1, arg))
            return (yield from self._map(depth + 1, arg))
        if major == 6:
            raise self._error(f"tag {arg}: the protocol uses no CBOR tags")
        # major 7
        if arg is None:
            raise self._error("a break outside an indefinite-length item")
        if info in _FLOAT:
            self._count(1)
            width = _UINT_WIDTH[info]
            return struct.unpack(_FLOAT[info], arg.to_bytes(width, "big"))[0]
        if info < 24 and arg in _SIMPLE:
            self._count(1)
            return _SIMPLE[arg]
        raise self._error(f"simple value {arg}: expected false, true, null or a float")

    def _string(self, major: int, size: int | None) -> _Step:
        if size is not None:
            return (yield from self._chunk(size))
        # Indefinite length: definite chunks of the same major type, then a break.
        out = bytearray()
        while not (yield from self._at_break()):
            chunk_major, _, chunk_size = yield from self._head()
            if chunk_major != major or chunk_size is None:
                raise self._error("a string chunk of another type or of indefinite length")
            if major == 3 and len(out) + chunk_size > self._limits.max_text_bytes:
                raise self._error(f"a text string of more than {self._limits.max_text_bytes} bytes")
            out += yield from self._chunk(chunk_size)
        return bytes(out)

    def _chunk(self, size: int) -> _Step:
        self._check_declared(size, 1, "string bytes")
        if len(self._buf) - self._pos >= size:
            with memoryview(self._buf) as view:
                raw = bytes(view[self._pos : self._pos + size])
            self._pos += size
            return raw
        # Grow with what arrives: a declared size allocates nothing.
        out = bytearray()
        while len(out) < size:
            if self._pos >= len(self._buf):
                yield 1
            take = min(size - len(out), len(self._buf) - self._pos)
            with memoryview(self._buf) as view:
                out += view[self._pos : self._pos + take]
            self._pos += take
        return out

    def _array(self, depth: int, count: int | None) -> _Step:
        out: list[Any] = []
        while (count is None and not (yield from self._at_break())) or (
            count is not None and len(out) < count
        ):
            out.append((yield from self._item(depth, None)))
        return out

    def _map(self, depth: int, count: int | None) -> _Step:
        out: dict[str, Any] = {}
        pairs = 0
        while (count is None and not (yield from self._at_break())) or (
            count is not None and pairs < count
        ):
            key = yield from self._item(depth, None)
            if not isinstance(key, str):
                raise self._error(f"a map key of type {type(key).__name__}, expected text")
            if key in out:
                raise self._error(f"map key {key[:40]!r} given twice")
            out[key] = yield from self._item(depth, key)
            pairs += 1
        return out

    def _byte_array(self, count: int | None) -> _Step:
        """An array of integers 0..255 in shortest form, as a bytearray."""
        if count is not None:
            self._check_declared(count, 1, "items")
        out = bytearray()
        while True:
            if count is None:
                if (yield from self._at_break()):
                    return out
                wanted = _WINDOW
            else:
                wanted = count - len(out)
                if wanted == 0:
                    return out
            if self._pos >= len(self._buf):
                yield 1
            end = min(len(self._buf), self._pos + min(_WINDOW, 2 * wanted))
            with memoryview(self._buf) as view:
                window = np.frombuffer(view[self._pos : end], dtype=np.uint8)
                values, used = _uint8_prefix(window, wanted)
                out += values.tobytes()
                del window, values  # no view of the buffer may outlive it
            self._pos += used
            if used == 0 or (count is None and self._pos < len(self._buf)):
                # A split item, the end of an indefinite array, or a refusal: one at a time.
                if count is None and (yield from self._at_break()):
                    return out
                _, info, value = yield from self._head_of_byte()
                if info > 24 or (info == 24 and value < 24):
                    raise self._error("an integer not in shortest form in a byte array")
                out.append(value)

    def _head_of_byte(self) -> _Step:
        major, info, value = yield from self._head()
        if major != 0 or value is None or value > 255:
            raise self._error("an array of bytes holding something else than 0..255")
        return major, info, value


def _uint8_prefix(window: np.ndarray[Any, Any], max_count: int) -> tuple[np.ndarray[Any, Any], int]:
    """The leading shortest-form CBOR integers 0..255 of `window` (at most `max_count`): their
    values and the bytes they take.

    Each item is one byte (0x00-0x17) or 0x18 and its value (0x18-0xff). A run of 0x18 bytes
    starts at an item boundary (the byte before it ends an item), so inside a run even offsets
    are headers and odd offsets the value 24. Decoding stops before the first byte that breaks
    the form and before a header whose value is not in the window.
    """
    n = int(window.size)
    if n == 0 or max_count <= 0:
        return _NO_BYTES, 0
    is18 = window == 0x18
    idx = np.arange(n, dtype=np.int32)
    run_start = is18.copy()
    run_start[1:] &= ~is18[:-1]
    last_run = np.maximum.accumulate(np.where(run_start, idx, 0))
    head18 = is18 & (((idx - last_run) & 1) == 0)
    value = np.zeros(n, dtype=bool)
    value[1:] = head18[:-1]  # the byte after a 0x18 header is its value
    head = ~value & ((window < 0x18) | head18)
    ok = np.where(value, window >= 0x18, head)
    bad = np.flatnonzero(~ok)
    limit = int(bad[0]) if bad.size else n
    heads = np.flatnonzero(head[:limit])
    if heads.size and head18[heads[-1]] and int(heads[-1]) + 1 >= limit:
        heads = heads[:-1]  # its value lies beyond the window, or is refused
    heads = heads[:max_count]
    if heads.size == 0:
        return _NO_BYTES, 0
    last = int(heads[-1])
    end = last + (2 if head18[last] else 1)
    values = np.where(head18[heads], window[np.minimum(heads + 1, n - 1)], window[heads])
    return values.astype(np.uint8), end


class _WholeBody:
    """The same grammar and limits as `StrictDecoder`, over a body that is all here.

    Recursive calls instead of generators: a RunModel body of a few hundred bytes decodes in a
    fifth of the incremental decoder's time, which a null model's round trip pays on each side.
    Where the incremental decoder would wait for more bytes, the body is truncated.
    """

    __slots__ = ("_buf", "_end", "_items", "_keys", "_limits", "_pos", "_what")

    def __init__(
        self, body: memoryview, what: str, limits: DecodeLimits, byte_array_keys: frozenset[str]
    ) -> None:
        self._buf = body
        self._end = len(body)
        self._pos = 0
        self._items = 0
        self._what = what
        self._limits = limits
        self._keys = byte_array_keys

    def decode(self) -> Any:
        value = self._item(0, None)
        if self._pos != self._end:
            raise _bad(self._what, "bytes after the end of the message")
        return value

    def _error(self, message: str) -> BadRequestError:
        return _bad(self._what, f"{message}, at byte {self._pos}")

    def _truncated(self) -> BadRequestError:
        return _bad(self._what, f"the body ends inside an item, at byte {self._pos}")

    def _count(self, n: int) -> None:
        self._items += n
        if self._items > self._limits.max_items:
            raise self._error(f"more than {self._limits.max_items} items")

    def _check_declared(self, size: int, unit: int, what: str) -> None:
        left = self._end - self._pos
        if size * unit > left:
            raise self._error(f"{what} of {size} declared, but {left} bytes are left")

    def _head(self) -> tuple[int, int, int | None]:
        pos = self._pos
        if pos >= self._end:
            raise self._truncated()
        initial = self._buf[pos]
        major, info = initial >> 5, initial & 0x1F
        if info < 24:
            self._pos = pos + 1
            return major, info, info
        width = _UINT_WIDTH.get(info)
        if width is not None:
            if self._end - pos < 1 + width:
                raise self._truncated()
            self._pos = pos + 1 + width
            return major, info, int.from_bytes(self._buf[pos + 1 : self._pos], "big")
        if info == 31 and major in (2, 3, 4, 5, 7):
            self._pos = pos + 1
            return major, info, None
        raise self._error(f"reserved additional information {info}")

    def _at_break(self) -> bool:
        if self._pos >= self._end:
            raise self._truncated()
        if self._buf[self._pos] == 0xFF:
            self._pos += 1
            return True
        return False

    def _item(self, depth: int, key: str | None) -> Any:
        # `_head` and the string and count steps inlined: this runs once per item.
        buf, pos, end = self._buf, self._pos, self._end
        if pos >= end:
            raise self._truncated()
        initial = buf[pos]
        major, info = initial >> 5, initial & 0x1F
        arg: int | None
        if info < 24:
            arg = info
            pos += 1
        elif info < 28:
            width = _UINT_WIDTH[info]
            if end - pos <= width:
                raise self._truncated()
            arg = int.from_bytes(buf[pos + 1 : pos + 1 + width], "big")
            pos += 1 + width
        elif info == 31 and major in (2, 3, 4, 5, 7):
            arg = None
            pos += 1
        else:
            raise self._error(f"reserved additional information {info}")
        self._pos = pos
        if major < 4:
            self._items += 1
            if self._items > self._limits.max_items:
                raise self._error(f"more than {self._limits.max_items} items")
            if major == 0:
                return arg
            if major == 1:
                return -1 - arg  # type: ignore[operator]  # an integer's argument is never None
            if major == 3 and arg is not None and arg > self._limits.max_text_bytes:
                raise self._error(
                    f"a text string of {arg} bytes, more than {self._limits.max_text_bytes}"
                )
            raw: bytes | memoryview
            if arg is not None and arg <= end - pos:
                self._pos = pos + arg
                raw = buf[pos : pos + arg]
            else:
                raw = self._string(major, arg)
            if major == 2:
                return bytes(raw)
            try:
                return str(raw, "utf-8")
            except UnicodeDecodeError:
                raise self._error("a text string that is not UTF-8") from None
        if major < 6:
            if depth >= self._limits.max_depth:
                raise self._error(f"nesting deeper than {self._limits.max_depth}")
            self._count(1)
            if major == 4 and key in self._keys:
                return self._byte_array(arg)
            if arg is not None:
                unit = 1 if major == 4 else 2
                self._check_declared(arg, unit, "items" if major == 4 else "pairs")
                if arg * unit > self._limits.max_items - self._items:
                    raise self._error(f"a container of {arg} entries, over the item limit")
            if major == 4:
                return self._array(depth + 1, arg)
            return self._map(depth + 1, arg)
        if major == 6:
            raise self._error(f"tag {arg}: the protocol uses no CBOR tags")
        if arg is None:
            raise self._error("a break outside an indefinite-length item")
        if info in _FLOAT:
            self._count(1)
            return struct.unpack(_FLOAT[info], arg.to_bytes(_UINT_WIDTH[info], "big"))[0]
        if info < 24 and arg in _SIMPLE:
            self._count(1)
            return _SIMPLE[arg]
        raise self._error(f"simple value {arg}: expected false, true, null or a float")

    def _string(self, major: int, size: int | None) -> bytes:
        if size is not None:
            return self._chunk(size)
        out = bytearray()
        while not self._at_break():
            chunk_major, _, chunk_size = self._head()
            if chunk_major != major or chunk_size is None:
                raise self._error("a string chunk of another type or of indefinite length")
            if major == 3 and len(out) + chunk_size > self._limits.max_text_bytes:
                raise self._error(f"a text string of more than {self._limits.max_text_bytes} bytes")
            out += self._chunk(chunk_size)
        return bytes(out)

    def _chunk(self, size: int) -> bytes:
        self._check_declared(size, 1, "string bytes")
        start = self._pos
        self._pos = start + size
        return bytes(self._buf[start : self._pos])

    def _array(self, depth: int, count: int | None) -> list[Any]:
        if count is not None:
            return [self._item(depth, None) for _ in range(count)]
        out: list[Any] = []
        while not self._at_break():
            out.append(self._item(depth, None))
        return out

    def _map(self, depth: int, count: int | None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        pairs = 0
        while (count is None and not self._at_break()) or (count is not None and pairs < count):
            key = self._item(depth, None)
            if not isinstance(key, str):
                raise self._error(f"a map key of type {type(key).__name__}, expected text")
            if key in out:
                raise self._error(f"map key {key[:40]!r} given twice")
            out[key] = self._item(depth, key)
            pairs += 1
        return out

    def _byte_array(self, count: int | None) -> bytearray:
        """`StrictDecoder._byte_array` over the whole body: integers 0..255 in shortest form."""
        if count is not None:
            self._check_declared(count, 1, "items")
        out = bytearray()
        while True:
            if count is None:
                if self._at_break():
                    return out
                wanted = _WINDOW
            else:
                wanted = count - len(out)
                if wanted == 0:
                    return out
            if self._pos >= self._end:
                raise self._truncated()
            end = min(self._end, self._pos + min(_WINDOW, 2 * wanted))
            window = np.frombuffer(self._buf[self._pos : end], dtype=np.uint8)
            values, used = _uint8_prefix(window, wanted)
            out += values.tobytes()
            del window, values
            self._pos += used
            if used == 0 or (count is None and self._pos < self._end):
                if count is None and self._at_break():
                    return out
                major, info, value = self._head()
                if major != 0 or value is None or value > 255:
                    raise self._error("an array of bytes holding something else than 0..255")
                if info > 24 or (info == 24 and value < 24):
                    raise self._error("an integer not in shortest form in a byte array")
                out.append(value)


def decode(
    body: bytes | bytearray | memoryview,
    what: str,
    *,
    limits: DecodeLimits | None = None,
    byte_array_keys: frozenset[str] = frozenset(),
) -> Any:
    """Decode a whole body: what `StrictDecoder` would, fed it at once, decodes.

    Raises:
        BadRequestError: (400) malformed, refused or over a limit.
    """
    with memoryview(body) as view, view.cast("B") as octets:
        return _WholeBody(octets, what, limits or DecodeLimits(), byte_array_keys).decode()
