"""Proofs of inference: signed receipts, proof files and the server's transparency log.

- `veil.receipts.payload`: what a receipt says, and the digests of inputs and outputs;
- `veil.receipts.cose`: COSE_Sign1 with EdDSA (RFC 9052), through pycose;
- `veil.receipts.merkle`: the RFC 9162 Merkle tree, inclusion and consistency proofs;
- `veil.receipts.proof`: `Receipt` (``result.receipt.save(path)``) and `verify_proof`, what
  ``veil verify-receipt`` runs.

The receipt key is made inside the TEE at start; the evidence binds it through the key map
(`veil.keymap`), so a receipt is worth exactly what the evidence is.
"""

from veil.receipts.merkle import MerkleTree, verify_consistency, verify_inclusion
from veil.receipts.payload import ReceiptPayload, TreeHead, evidence_digest, tensors_digest
from veil.receipts.proof import Receipt, SignedTreeHead, VerifiedReceipt, verify_proof

__all__ = [
    "MerkleTree",
    "Receipt",
    "ReceiptPayload",
    "SignedTreeHead",
    "TreeHead",
    "VerifiedReceipt",
    "evidence_digest",
    "tensors_digest",
    "verify_consistency",
    "verify_inclusion",
    "verify_proof",
]
