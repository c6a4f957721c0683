"""The simulated MRENCLAVE: a length-prefixed hash of veil's .py sources."""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

from veil.providers.measurement import measure_tree, simulated_measurement


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return root


def test_encoding_is_the_documented_one(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"b.py": b"B", "a/x.py": b"XY", "notes.txt": b"ignored"})
    # built step by step, in sorted path order: "a/x.py" < "b.py"
    parts = [b"veil simulated MRENCLAVE v1\0", (2).to_bytes(8, "big")]
    for path, content in ((b"a/x.py", b"XY"), (b"b.py", b"B")):
        parts += [len(path).to_bytes(8, "big"), path, len(content).to_bytes(8, "big"), content]
    expected = hashlib.sha256(b"".join(parts))
    assert measure_tree(root) == expected.digest()


def test_any_change_changes_the_measurement(tmp_path: Path) -> None:
    base = measure_tree(_tree(tmp_path / "1", {"m.py": b"ab", "n.py": b"c"}))
    # same concatenated bytes, different split between files: lengths keep them apart
    assert measure_tree(_tree(tmp_path / "2", {"m.py": b"a", "n.py": b"bc"})) != base
    assert measure_tree(_tree(tmp_path / "3", {"m.py": b"ab", "o.py": b"c"})) != base
    assert measure_tree(_tree(tmp_path / "4", {"m.py": b"ab"})) != base
    same = _tree(tmp_path / "5", {"m.py": b"ab", "n.py": b"c", "__pycache__/m.py": b"zz"})
    (same / "data.bin").write_bytes(b"not python")
    assert measure_tree(same) == base


def test_simulated_measurement_covers_the_installed_package() -> None:
    value = simulated_measurement()
    assert len(value) == 32
    assert value == measure_tree(resources.files("veil"))
