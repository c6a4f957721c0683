"""torch and transformers stay optional: veil imports without them and says what to install."""

from __future__ import annotations

import subprocess
import sys

import pytest

from veil.errors import ExportError, VeilError


def test_core_modules_do_not_import_torch() -> None:
    # torch and transformers are an optional extra: importing veil and its commands must not pull
    # them in (they cost seconds and may be absent).
    code = (
        "import sys, veil, veil.export, veil.cli, veil.commands.demo, veil.commands.export\n"
        "veil.cli.build_parser()\n"
        "bad = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_require_transformers_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from veil import export

    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(ImportError, match=r"veil\[transformers\]"):
        export.require_transformers()
    with pytest.raises(ImportError, match=r"veil\[transformers\]"):
        export.export_transformers_model(object(), "x.onnx", example_inputs={})  # type: ignore[arg-type]


def test_export_error_is_a_veil_error() -> None:
    assert issubclass(ExportError, VeilError)
