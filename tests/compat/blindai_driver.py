"""Drive the genuine BlindAI 0.6.3 client against a running `veil serve --platform simulated`.

Runs INSIDE the compatibility venv (scripts/compat-venv), with tests/compat/stubs on PYTHONPATH,
never in veil's own environment: the point is that the unmodified 2023 client and its pinned
stack (numpy 1.23, cryptography 39, cbor2 5) talk to veil's server.

    python blindai_driver.py PLAN.json

PLAN.json (written by test_blindai_client.py):
    addr, unattested_port, attested_port, management_port
    arrays:    path of an .npz holding every input and expected output, by key
    models:    [{key, path}]                         ONNX files to upload
    runs:      [{case, model, select: "id"|"hash",
                 style: "numpy"|"list"|"dict"|"flat",
                 inputs: [{array, name}], expected: [{array, name}]}]
    rejections: [{case, model | model_id | model_hash, select, style, inputs}]
                                                     bad requests: must fail with an HTTP error
    deletions: [{model, probe}]                      delete, then re-run case `probe`: must fail
    simulated_root: path of veil's simulated SGX root CA (PEM)

Besides the simulation-mode session it checks that the client, left in production mode, refuses
the simulated server, and feeds the served quote and collateral to Intel's quote verification
library (the sgx-dcap-quote-verify binding the client itself uses) to see how far it gets.

Prints one JSON summary on its last stdout line; exits 1 on any mismatch or error.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import blindai.core
import cbor2
import numpy as np
import requests
import sgx_dcap_quote_verify
from blindai._dcap_attestation import Collateral
from blindai.client import translate_dtype
from importlib_metadata import version

FLOAT_RTOL = 1e-5
FLOAT_ATOL = 1e-6


def describe(exc: BaseException) -> str:
    """One line naming the exception; for an HTTP error, the status and the start of the body."""
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        body = exc.response.content[:300]
        return f"HTTPError {exc.response.status_code} on {exc.response.url}: {body!r}"
    return f"{type(exc).__name__}: {exc}"


def status_of(exc: BaseException) -> int | None:
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return int(exc.response.status_code)
    return None


def run_args(run: dict[str, Any], arrays: Any) -> dict[str, Any]:
    """Keyword arguments for run_model, in the input style the case asks for."""
    inputs = [arrays[spec["array"]] for spec in run["inputs"]]
    style = run["style"]
    if style == "numpy":  # a bare array: the client wraps it into a one-element list
        (only,) = inputs
        return {"input_tensors": only}
    if style == "list":  # positional: list of arrays, in the model's input order
        return {"input_tensors": inputs}
    if style == "dict":  # keyed by input name; the client sends node_name with each tensor
        return {"input_tensors": {s["name"]: a for s, a in zip(run["inputs"], inputs, strict=True)}}
    if style == "flat":  # flat Python lists + dtypes/shapes
        flats = [a.flatten().tolist() for a in inputs]
        dtypes = [translate_dtype(a.dtype) for a in inputs]
        shapes = [tuple(a.shape) for a in inputs]
        if len(inputs) == 1:  # the unwrapped single-tensor form
            return {"input_tensors": flats[0], "dtypes": dtypes[0], "shapes": shapes[0]}
        return {"input_tensors": flats, "dtypes": dtypes, "shapes": shapes}
    raise ValueError(f"unknown input style {style!r}")


def compare(outputs: list[Any], run: dict[str, Any], arrays: Any) -> list[str]:
    """Mismatches between the client's decoded outputs and the expected arrays."""
    problems = []
    expected = run["expected"]
    if len(outputs) != len(expected):
        return [f"got {len(outputs)} outputs, expected {len(expected)}"]
    for i, (tensor, spec) in enumerate(zip(outputs, expected, strict=True)):
        want = arrays[spec["array"]]
        got = tensor.as_numpy()
        if got.dtype != want.dtype:
            problems.append(f"output {i}: dtype got {got.dtype}, expected {want.dtype}")
            continue
        if got.shape != want.shape:
            problems.append(f"output {i}: shape got {got.shape}, expected {want.shape}")
            continue
        if np.issubdtype(want.dtype, np.floating):
            same = np.allclose(got, want, rtol=FLOAT_RTOL, atol=FLOAT_ATOL)
        else:
            same = np.array_equal(got, want)
        if not same:
            problems.append(f"output {i}: values differ from onnxruntime's")
        node_name = tensor.info.node_name
        if node_name not in (None, spec["name"]):
            problems.append(f"output {i}: node_name got {node_name!r}, expected {spec['name']!r}")
    return problems


def output_facts(outputs: list[Any]) -> list[dict[str, Any]]:
    return [
        {
            "shape": list(t.shape),
            "datum_type": int(t.datum_type),
            "node_name": t.info.node_name,
        }
        for t in outputs
    ]


def production_mode_check(plan: dict[str, Any]) -> dict[str, Any]:
    """connect() without simulation_mode must refuse a simulated server with AttestationError."""
    try:
        conn = blindai.core.connect(
            plan["addr"],
            unattested_server_port=plan["unattested_port"],
            attested_server_port=plan["attested_port"],
            model_management_port=plan["management_port"],
            hazmat_http_on_unattested_port=True,
            simulation_mode=False,
        )
    except blindai.core.AttestationError as exc:
        return {"rejected": True, "error": describe(exc)}
    except Exception as exc:  # refused, but not the way the client documents
        return {"rejected": False, "error": describe(exc)}
    conn.close()
    return {"rejected": False, "error": None}


def qvl_check(plan: dict[str, Any]) -> dict[str, Any]:
    """Run the served quote + collateral through Intel's QVL, anchored at veil's simulated root.

    Facts only (statuses, whether QVL parsed the report and whether its report data binds the
    served certificate); the test decides what it requires.
    """
    base = f"http://{plan['addr']}:{plan['unattested_port']}"
    session = requests.Session()
    session.hooks = {"response": lambda r, *args, **kwargs: r.raise_for_status()}
    cert = cbor2.loads(session.get(base).content)
    quote = cbor2.loads(session.get(f"{base}/quote").content)
    collateral = Collateral(**cbor2.loads(session.get(f"{base}/collateral").content))
    result = sgx_dcap_quote_verify.verify(
        trusted_root_ca_certificate=Path(plan["simulated_root"]).read_text(),
        pck_certificate=collateral.pck_certificate,
        pck_signing_chain=collateral.pck_signing_chain,
        root_ca_crl=collateral.root_ca_crl,
        intermediate_ca_crl=collateral.pck_crl,
        tcb_info=collateral.tcb_info,
        tcb_signing_chain=collateral.tcb_info_issuer_chain,
        quote=quote,
        qe_identity=collateral.qe_identity,
        expiration_date=datetime.datetime.now(),
    )
    report = result.enclave_report
    return {
        "pck_certificate_status": result.pck_certificate_status.name,
        "tcb_info_status": result.tcb_info_status.name,
        "qe_identity_status": result.qe_identity_status.name,
        "quote_status": result.quote_status.name,
        "report_parsed": report is not None,
        "report_data_binds_certificate": (
            report is not None and bytes(report.report_data[:32]) == hashlib.sha256(cert).digest()
        ),
    }


def main(plan_path: str) -> int:
    plan = json.loads(Path(plan_path).read_text())
    arrays = np.load(plan["arrays"])
    summary: dict[str, Any] = {
        "blindai_version": version("blindai"),
        "numpy_version": np.__version__,
        "connected": False,
        "uploads": {},
        "runs": {},
        "rejections": {},
        "deletions": {},
        "failures": [],
    }
    failures: list[str] = summary["failures"]

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            conn = blindai.core.connect(
                plan["addr"],
                unattested_server_port=plan["unattested_port"],
                attested_server_port=plan["attested_port"],
                model_management_port=plan["management_port"],
                hazmat_http_on_unattested_port=True,
                simulation_mode=True,
            )
        summary["simulation_warning"] = any(
            type(w.message).__name__ == "SimulationModeWarning" for w in caught
        )
    except Exception as exc:
        failures.append(f"connect: {describe(exc)}")
        summary["connect_traceback"] = traceback.format_exc(limit=6)
        print(json.dumps(summary))
        return 1
    summary["connected"] = True

    with conn:
        ids: dict[str, str] = {}
        hashes: dict[str, str] = {}
        for model in plan["models"]:
            key, path = model["key"], model["path"]
            started = time.monotonic()
            try:
                reply = conn.upload_model(path, model_name=f"{key}.onnx")
            except Exception as exc:
                failures.append(f"upload {key}: {describe(exc)}")
                continue
            file_sha256 = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            hash_hex = bytes(reply.hash).hex()
            ids[key], hashes[key] = reply.model_id, hash_hex
            summary["uploads"][key] = {
                "model_id": reply.model_id,
                "model_id_type": type(reply.model_id).__name__,
                "hash": hash_hex,
                "hash_type": type(reply.hash).__name__,
                "hash_is_sha256_of_file": hash_hex == file_sha256,
                "size": Path(path).stat().st_size,
                "seconds": round(time.monotonic() - started, 3),
            }
            if not isinstance(reply.model_id, str) or not reply.model_id:
                failures.append(f"upload {key}: model_id {reply.model_id!r} is not a non-empty str")
            if not isinstance(reply.hash, bytes):
                failures.append(f"upload {key}: hash is {type(reply.hash).__name__}, not bytes")
            if hash_hex != file_sha256:
                failures.append(f"upload {key}: hash is not SHA-256 of the ONNX file")

        runs_by_case = {run["case"]: run for run in plan["runs"]}
        for run in plan["runs"]:
            case, key = run["case"], run["model"]
            if key not in ids:
                failures.append(f"run {case}: model {key} was not uploaded")
                continue
            select = (
                {"model_id": ids[key]} if run["select"] == "id" else {"model_hash": hashes[key]}
            )
            try:
                reply = conn.run_model(**select, **run_args(run, arrays))
                outputs = list(reply.output)
                problems = compare(outputs, run, arrays)
                summary["runs"][case] = {"ok": not problems, "outputs": output_facts(outputs)}
            except Exception as exc:
                problems = [describe(exc)]
                summary["runs"][case] = {"ok": False}
            if problems:
                summary["runs"][case]["problems"] = problems
                failures.extend(f"run {case}: {p}" for p in problems)

        for bad in plan["rejections"]:
            case = bad["case"]
            if "model" in bad:
                ref = ids if bad["select"] == "id" else hashes
                if bad["model"] not in ref:
                    failures.append(f"reject {case}: model {bad['model']} was not uploaded")
                    continue
                target = ref[bad["model"]]
            else:
                target = bad["model_id"] if bad["select"] == "id" else bad["model_hash"]
            select = {"model_id": target} if bad["select"] == "id" else {"model_hash": target}
            entry = {"status": None}
            summary["rejections"][case] = entry
            try:
                conn.run_model(**select, **run_args(bad, arrays))
            except requests.HTTPError as exc:
                entry["status"] = status_of(exc)
            except Exception as exc:
                failures.append(f"reject {case}: unexpected {describe(exc)}")
            else:
                failures.append(f"reject {case}: the server accepted it")

        for deletion in plan["deletions"]:
            key, probe = deletion["model"], runs_by_case[deletion["probe"]]
            entry: dict[str, Any] = {"deleted": False, "run_after_delete_status": None}
            summary["deletions"][key] = entry
            if key not in ids:
                failures.append(f"delete {key}: model was not uploaded")
                continue
            try:
                conn.delete_model(ids[key])
                entry["deleted"] = True
            except Exception as exc:
                failures.append(f"delete {key}: {describe(exc)}")
                continue
            try:
                conn.run_model(model_id=ids[key], **run_args(probe, arrays))
            except requests.HTTPError as exc:
                entry["run_after_delete_status"] = status_of(exc)
            except Exception as exc:
                failures.append(f"run after delete {key}: unexpected {describe(exc)}")
            else:
                failures.append(f"run after delete {key}: the deleted model still answered")

    summary["production_mode"] = production_mode_check(plan)
    if not summary["production_mode"]["rejected"]:
        failures.append(f"production mode: not refused ({summary['production_mode']['error']})")
    try:
        summary["qvl"] = qvl_check(plan)
    except Exception as exc:
        failures.append(f"qvl: {describe(exc)}")
    else:
        if not summary["qvl"]["report_data_binds_certificate"]:
            failures.append("qvl: the quote's report data does not bind the served certificate")

    print(json.dumps(summary))
    return 1 if failures else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: blindai_driver.py PLAN.json")
    sys.exit(main(sys.argv[1]))
