"""The curated public API: every name in each `__all__` exists, and the essentials are there."""

from __future__ import annotations

import importlib

import pytest

import veil

PUBLIC_MODULES = [
    "veil",
    "veil.client",
    "veil.errors",
    "veil.tensors",
    "veil.wire",
    "veil.tls",
    "veil.keymap",
    "veil.receipts",
    "veil.server.store",
    "veil.server.models",
    "veil.server.app",
    "veil.server.config",
    "veil.server.runner",
]


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_all_names_exist(name: str) -> None:
    module = importlib.import_module(name)
    exported = module.__all__
    assert len(exported) == len(set(exported)), "duplicate names in __all__"
    missing = [item for item in exported if not hasattr(module, item)]
    assert missing == []


def test_top_level_api() -> None:
    for name in ("connect", "Connection", "Tensor", "Policy", "SimulationModeWarning"):
        assert name in veil.__all__
    assert veil.connect is veil.client.connect
    assert issubclass(veil.BindingError, veil.AttestationError)
    assert issubclass(veil.LogError, veil.ReceiptError)
    assert veil.__version__ == "0.1.0"
