"""The RFC 9162 Merkle tree: roots against the RFC's recursive definition, every proof of small
trees verified by the RFC's algorithms, and each kind of tampering refused with LogError."""

from __future__ import annotations

import hashlib

import pytest

from veil.errors import LogError
from veil.receipts.merkle import (
    MerkleTree,
    leaf_hash,
    node_hash,
    verify_consistency,
    verify_inclusion,
)

LEAVES = [f"entry {i}".encode() for i in range(33)]


def mth(entries: list[bytes]) -> bytes:
    """RFC 9162 §2.1.1, written as the RFC defines it."""
    n = len(entries)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return hashlib.sha256(b"\x00" + entries[0]).digest()
    k = 1 << ((n - 1).bit_length() - 1)
    return hashlib.sha256(b"\x01" + mth(entries[:k]) + mth(entries[k:])).digest()


@pytest.fixture(scope="module")
def tree() -> MerkleTree:
    built = MerkleTree()
    for entry in LEAVES:
        built.append(leaf_hash(entry))
    return built


def test_hash_prefixes() -> None:
    assert leaf_hash(b"x") == hashlib.sha256(b"\x00x").digest()
    assert (
        node_hash(b"a" * 32, b"b" * 32) == hashlib.sha256(b"\x01" + b"a" * 32 + b"b" * 32).digest()
    )


def test_roots_match_the_rfc_definition(tree: MerkleTree) -> None:
    for size in range(len(LEAVES) + 1):
        assert tree.root(size) == mth(LEAVES[:size])


def test_every_inclusion_proof_verifies(tree: MerkleTree) -> None:
    for size in range(1, len(LEAVES) + 1):
        for index in range(size):
            path = tree.inclusion_proof(index, size)
            verify_inclusion(leaf_hash(LEAVES[index]), index, size, path, tree.root(size))


def test_every_consistency_proof_verifies(tree: MerkleTree) -> None:
    for second in range(len(LEAVES) + 1):
        for first in range(second + 1):
            path = tree.consistency_proof(first, second)
            verify_consistency(first, second, tree.root(first), tree.root(second), path)


def test_rfc_example_shapes(tree: MerkleTree) -> None:
    # RFC 9162 §2.1.5: in the tree of 7 leaves, d0's path is [c, h, l]: 3 hashes; consistency
    # from 3 to 7 is [c, d, g, l]: 4 hashes; from 4 to 7 is [l]: 1 hash.
    assert len(tree.inclusion_proof(0, 7)) == 3
    assert len(tree.consistency_proof(3, 7)) == 4
    assert tree.consistency_proof(4, 7) == [mth(LEAVES[4:7])]


def test_mutated_inclusion_proofs_are_refused(tree: MerkleTree) -> None:
    size, index = 21, 13
    leaf, root = leaf_hash(LEAVES[index]), tree.root(size)
    path = tree.inclusion_proof(index, size)
    flipped = [path[0][:-1] + bytes([path[0][-1] ^ 1]), *path[1:]]
    with pytest.raises(LogError, match="leads to root"):
        verify_inclusion(leaf, index, size, flipped, root)
    with pytest.raises(LogError, match="leads to root"):
        verify_inclusion(leaf_hash(b"another entry"), index, size, path, root)
    with pytest.raises(LogError, match="leads to root"):
        verify_inclusion(leaf, index + 1, size, path, root)
    with pytest.raises(LogError, match="shorter"):
        verify_inclusion(leaf, index, size, path[:-1], root)
    with pytest.raises(LogError, match="longer"):
        verify_inclusion(leaf, index, size, [*path, bytes(32)], root)
    with pytest.raises(LogError, match="outside"):
        verify_inclusion(leaf, size, size, path, root)
    with pytest.raises(LogError, match="leads to root"):
        verify_inclusion(leaf, index, size, path, tree.root(size - 1))


def test_a_rewritten_log_fails_consistency(tree: MerkleTree) -> None:
    rewritten = MerkleTree()
    for i, entry in enumerate(LEAVES):
        rewritten.append(leaf_hash(b"withheld" if i == 5 else entry))
    old_size, old_root = 9, tree.root(9)  # the head an auditor kept before the rewrite
    new_size = len(LEAVES)
    path = rewritten.consistency_proof(old_size, new_size)
    with pytest.raises(LogError, match="rewritten"):
        verify_consistency(old_size, new_size, old_root, rewritten.root(new_size), path)
    with pytest.raises(LogError, match="rewritten"):
        verify_consistency(old_size, old_size, old_root, rewritten.root(old_size), [])


def test_mutated_consistency_proofs_are_refused(tree: MerkleTree) -> None:
    first, second = 6, 27
    a, b = tree.root(first), tree.root(second)
    path = tree.consistency_proof(first, second)
    with pytest.raises(LogError, match="rewritten"):
        verify_consistency(first, second, a, b, [bytes(32), *path[1:]])
    with pytest.raises(LogError, match="shrank"):
        verify_consistency(second, first, b, a, path)
    with pytest.raises(LogError, match="empty proof"):
        verify_consistency(first, second, a, b, [])
    with pytest.raises(LogError):
        verify_consistency(first, second, a, b, path[:-1])
    with pytest.raises(LogError, match="empty tree"):
        verify_consistency(0, second, tree.root(0), b, path)


def test_proof_requests_outside_the_tree(tree: MerkleTree) -> None:
    with pytest.raises(ValueError, match="tree size"):
        tree.root(len(LEAVES) + 1)
    with pytest.raises(ValueError, match="leaf index"):
        tree.inclusion_proof(5, 5)
    with pytest.raises(ValueError, match="first <= second"):
        tree.consistency_proof(6, 5)
