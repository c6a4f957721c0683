"""Mutation strategies over real byte vectors: flips, overwrites with edge values, cuts, splices."""

from __future__ import annotations

from hypothesis import strategies as st

_EDGE_WORDS = [
    b"\x00" * 4,
    b"\xff" * 4,
    b"\x7f\xff\xff\xff",
    b"\x00\x00\x00\x80",
    b"\x01\x00\x00\x00",
]


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A real vector with 1..4 random mutations applied."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "word", "cut", "insert", "delete", "dup"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "word":
            word = draw(st.sampled_from(_EDGE_WORDS) | st.binary(min_size=1, max_size=8))
            data[at : at + len(word)] = word
        elif kind == "cut":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 64))]
        elif kind == "dup":
            n = draw(st.integers(1, 256))
            data[at:at] = data[at : at + n]
    return bytes(data)
