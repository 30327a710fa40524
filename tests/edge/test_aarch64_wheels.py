"""``pip install "splitinfer[edge]"`` on aarch64 resolves to wheels only, for every target that can work.

The resolution test asks the package registry (``pip download --only-binary=:all: --platform …
--python-version …``, see scripts/aarch64_wheels.py) and is skipped where it cannot be reached.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load_script():
    spec = importlib.util.spec_from_file_location("aarch64_wheels", ROOT / "scripts" / "aarch64_wheels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


wheels = _load_script()


def _registry_reachable() -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
               "--only-binary=:all:", "--retries", "1", "--timeout", "15", "--platform", "manylinux2014_aarch64",
               "--python-version", "3.11", "--implementation", "cp", "--dest", tmp, "zstandard>=0.21"]
        try:
            return subprocess.run(cmd, capture_output=True, timeout=90).returncode == 0
        except subprocess.TimeoutExpired:
            return False


def test_requirements_with_markers_for_aarch64():
    for python in wheels.PYTHONS:
        reqs = wheels.edge_requirements(python)
        names = {r.split("<")[0].split(">")[0].split("=")[0].strip() for r in reqs}
        assert {"numpy", "protobuf", "grpcio", "zstandard", "onnxruntime", "pillow"} <= names
        assert not names & wheels.FORBIDDEN
        assert ("numpy<2" in reqs) == (python in ("3.10", "3.11"))  # onnxruntime 1.16.3 needs NumPy 1.x


def test_declared_python_range_matches_what_can_work():
    from packaging.specifiers import SpecifierSet

    requires = SpecifierSet(wheels.load_pyproject()["project"]["requires-python"])
    assert "3.9" not in requires  # grpcio >= 1.81.1 has no cp39 wheels
    assert all(p in requires for p in wheels.PYTHONS)


def test_problems_are_reported():
    ok = {"ok": True, "wheels": {"onnxruntime": "1.16.3", "numpy": "2.2.6"}, "files": ["x.tar.gz"], "error": ""}
    found = wheels.problems(ok, None)
    assert any("NumPy 1.x" in p for p in found) and any("not a wheel" in p for p in found)
    assert wheels.problems({**ok, "wheels": {"torch": "2.0"}, "files": []}, None) == ["pulls torch"]
    assert wheels.problems({"ok": False, "wheels": {}, "files": [], "error": "no onnxruntime"}, "onnxruntime") == []
    assert wheels.problems(ok | {"files": []}, "onnxruntime")  # resolving where EXPECTED says it cannot


def test_edge_wheels_resolve_for_aarch64():
    if not _registry_reachable():
        pytest.skip("the package registry cannot be reached")
    results = wheels.check_matrix()
    table = wheels.format_matrix(results)
    assert not any(r["problems"] for r in results.values()), table
    for (glibc, python), r in results.items():
        assert r["ok"] == (wheels.EXPECTED[(glibc, python)] is None), table
