"""``veil verify-receipt``: verify a proof file offline (receipt, evidence at its time, log).

Exit status 0 iff the proof is valid, 1 if it is rejected, 2 on a usage or I/O error.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from veil.attestation.policy import Policy, SgxPolicy
from veil.attestation.trust import TrustStore
from veil.errors import AttestationError, ReceiptError, UnsafePolicyWarning
from veil.providers.measurement import simulated_measurement
from veil.receipts.payload import TreeHead, tensors_digest
from veil.receipts.proof import VerifiedReceipt, read_log_head, verify_proof
from veil.tensors import encode_inputs

__all__ = ["npz_digest", "register"]


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "verify-receipt",
        help="verify a proof file (receipt) offline",
        description=(
            "Verify a proof file written by result.receipt.save(): the evidence is appraised at "
            "the receipt's time with the collateral the file embeds, the policy applied, the "
            "signature, the key binding and the log inclusion checked. Exit status 0 iff valid."
        ),
    )
    parser.add_argument("proof", type=Path, metavar="FILE")
    parser.add_argument(
        "--policy",
        type=Path,
        help="policy TOML file (default: no measurement pinned, which is unsafe)",
    )
    parser.add_argument(
        "--inputs",
        type=Path,
        metavar="NPZ",
        help="the inputs sent (.npz: arr_0, arr_1… in order, or named by input)",
    )
    parser.add_argument(
        "--outputs", type=Path, metavar="NPZ", help="the outputs received (.npz, named by output)"
    )
    parser.add_argument(
        "--log-head",
        type=Path,
        metavar="HEAD",
        help="a signed log head kept earlier (SignedTreeHead.save): the receipt must be in it",
    )
    parser.add_argument(
        "--simulated",
        action="store_true",
        help="accept a simulated server's evidence (NO SECURITY: development only)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=_run)


def npz_digest(path: Path) -> bytes:
    """`tensors_digest` of the arrays in an ``.npz`` file, as the client encoded them: files
    saved positionally (``arr_0``, ``arr_1``…) are unnamed tensors in that order; others are
    named tensors in the file's order.

    Raises:
        OSError, ValueError: unreadable, or not an npz of arrays.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except zipfile.BadZipFile as exc:
        raise ValueError(f"{path}: not an .npz file ({exc})") from None
    positional = [f"arr_{i}" for i in range(len(arrays))]
    if list(arrays) == positional:
        return tensors_digest(encode_inputs(list(arrays.values())))
    return tensors_digest(encode_inputs(arrays))


def _policy(path: Path | None, simulated: bool) -> Policy:
    if path is not None:
        return Policy.from_toml(path)
    if simulated:
        # The measurement of this veil version's simulated server, as veil.connect pins it.
        return Policy(sgx=SgxPolicy(mr_enclave=(simulated_measurement(),)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UnsafePolicyWarning)
        policy = Policy.unsafe_unpinned()
    for warning in caught:
        print(f"veil verify-receipt: WARNING: {warning.message}", file=sys.stderr)
    return policy


def _run(args: argparse.Namespace) -> int:
    try:
        data = args.proof.read_bytes()
        policy = _policy(args.policy, args.simulated)
        inputs = npz_digest(args.inputs) if args.inputs else None
        outputs = npz_digest(args.outputs) if args.outputs else None
        head: TreeHead | None = read_log_head(args.log_head) if args.log_head else None
    except (OSError, ValueError, AttestationError, ReceiptError) as exc:
        print(f"veil verify-receipt: {exc}", file=sys.stderr)
        return 2
    trust = TrustStore.simulated_only() if args.simulated else None
    result: dict[str, Any] = {"verdict": "rejected", "error": None, "error_type": None}
    verified: VerifiedReceipt | None = None
    try:
        verified = verify_proof(
            data,
            policy=policy,
            trust=trust,
            inputs_digest=inputs,
            outputs_digest=outputs,
            log_head=head,
        )
        result["verdict"] = "accepted"
    except (AttestationError, ReceiptError) as exc:
        result["error"], result["error_type"] = str(exc), type(exc).__name__
    if verified is not None:
        payload, tree = verified.payload, verified.tree_head
        result |= {
            "op": payload.op,
            "model_id": payload.model_id,
            "model_hash": payload.model_hash.hex(),
            "inputs": payload.inputs.hex() if payload.inputs else None,
            "outputs": payload.outputs.hex() if payload.outputs else None,
            "time": payload.time.isoformat(),
            "seq": payload.seq,
            "evidence_sha256": payload.evidence.hex(),
            "platform": verified.evidence.platform.value,
            "tcb_status": verified.evidence.tcb_status,
            "simulated": verified.evidence.simulated,
            "measurements": {k: v.hex() for k, v in verified.evidence.measurements.items()},
            "log": {"size": tree.size, "root": tree.root.hex()},
            "inputs_checked": inputs is not None,
            "outputs_checked": outputs is not None,
            "log_head_checked": head is not None,
        }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"verdict:  {result['verdict'].upper()}")
        if result["error"]:
            print(f"error:    {result['error_type']}: {result['error']}")
        for name, value in result.items():
            if name not in ("verdict", "error", "error_type"):
                print(f"  {name + ':':<18}{value}")
    return 0 if result["verdict"] == "accepted" else 1
