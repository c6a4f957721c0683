"""deploy/gramine: the manifest template renders to the TOML Gramine reads, with the choices the
deploy guide promises; build.sh parses and refuses bad options before touching Gramine.

Gramine itself (gramine-manifest, gramine-sgx-sign, gramine-sgx) cannot run here: the template is
rendered with Jinja2 and stand-ins for the variables gramine-manifest provides (gramine.libos,
gramine.runtimedir(), python.stdlib, python.distlib).
"""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

jinja2 = pytest.importorskip("jinja2")

GRAMINE = Path(__file__).resolve().parents[2] / "deploy" / "gramine"


class _Gramine:
    libos = "/gramine/libsysdb.so"

    @staticmethod
    def runtimedir() -> str:
        return "/gramine/runtime/glibc"


class _Python:
    stdlib = "/usr/lib/python3.11"
    distlib = "/usr/lib/python3/dist-packages"


def render(**overrides: object) -> dict[str, Any]:
    variables: dict[str, object] = {
        "gramine": _Gramine(),
        "python": _Python(),
        "log_level": "error",
        "arch_libdir": "/lib/x86_64-linux-gnu",
        "interpreter": "/usr/bin/python3.11",
        "python_version": "3.11",
        "venv": "/build/venv",
        "data": "/build/data",
        "seal_key": "_sgx_mrenclave",
        "isvprodid": "1",
        "isvsvn": "2",
        "enclave_size": "8G",
        "max_threads": "64",
        "edmm": "false",
        "host_argv": "false",
    } | overrides
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False)
    text = env.from_string((GRAMINE / "veil.manifest.template").read_text()).render(variables)
    return tomllib.loads(text)


def test_manifest_fixes_the_command_line_and_attests_with_dcap() -> None:
    m = render()
    assert m["loader"]["argv"][1:] == [
        "-m", "veil.cli", "serve", "--platform", "sgx", "--data-dir", "/veil/data",
        "--host", "0.0.0.0",
    ]  # fmt: skip
    assert "insecure__use_cmdline_argv" not in m["loader"]
    sgx = m["sgx"]
    assert sgx["debug"] is False
    assert sgx["remote_attestation"] == "dcap"
    assert (sgx["isvprodid"], sgx["isvsvn"]) == (1, 2)
    assert "allowed_files" not in sgx
    assert "file:/build/venv/" in sgx["trusted_files"]


@pytest.mark.parametrize("key", ["_sgx_mrenclave", "_sgx_mrsigner"])
def test_data_directory_is_an_encrypted_mount_with_the_chosen_sealing_key(key: str) -> None:
    mounts = render(seal_key=key)["fs"]["mounts"]
    data = [mount for mount in mounts if mount["path"] == "/veil/data"]
    assert data == [
        {"type": "encrypted", "path": "/veil/data", "uri": "file:/build/data", "key_name": key}
    ]


def test_host_argv_is_opt_in() -> None:
    m = render(host_argv="true")
    assert m["loader"]["insecure__use_cmdline_argv"] is True
    assert "argv" not in m["loader"]


def test_build_script_parses() -> None:
    subprocess.run(["bash", "-n", str(GRAMINE / "build.sh")], check=True)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seal-to", "mrfoo"], "--seal-to: got mrfoo, expected mrenclave or mrsigner"),
        (["--isvsvn", "x1"], "expected a number, got 'x1'"),
        (["--isvprodid", "70000"], "16-bit"),
        (["--frobnicate"], "unknown option --frobnicate"),
    ],
)
def test_build_script_refuses_bad_options(tmp_path: Path, args: list[str], message: str) -> None:
    result = subprocess.run(
        ["bash", str(GRAMINE / "build.sh"), *args, "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "out").exists()
