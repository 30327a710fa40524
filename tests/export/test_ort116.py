"""The exported halves load and compute the same in ONNX Runtime 1.16.3, the newest for manylinux2014
aarch64 (older Raspberry Pi OS), as in the current one.

1.16.3 runs in its own virtual environment, ``.venv-ort116/`` in the repository (gitignored),
created on first use with ``onnxruntime==1.16.3`` and ``numpy<2`` from the package registry. The
edge's own code is put on its path from the working tree. Where the registry cannot be reached the
test is skipped, except under CI (``CI=true``), where it fails with the reason.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from splitinfer.edge.preprocess import preprocess
from splitinfer.edge.runner import EdgeRunner
from splitinfer.edge.session import DeviceSession
from splitinfer.export.datasets import Dataset
from splitinfer.export.quantize import QUANT_FORMATS, quantize_device_half
from splitinfer.protos.manifest import load_manifest

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv-ort116"
ORT_VERSION = "1.16.3"
REQUIREMENTS = [f"onnxruntime=={ORT_VERSION}", "numpy<2", "protobuf>=6.33.5,<7", "grpcio>=1.81.1",
                "zstandard>=0.21", "pillow>=9"]
PACKAGES = {"splitinfer.edge": ROOT / "edge", "splitinfer.protos": ROOT / "protos"}


def _base_python() -> str | None:
    """An interpreter that onnxruntime 1.16.3 has wheels for (CPython 3.8-3.11)."""
    if sys.version_info[:2] <= (3, 11):
        return sys.executable
    return shutil.which("python3.11") or shutil.which("python3.10")


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"cannot set up ONNX Runtime {ORT_VERSION} in {VENV}: {reason}")
    pytest.skip(f"ONNX Runtime {ORT_VERSION} unavailable: {reason}")


def _ort116_python() -> Path:
    """The venv's python, created (once) with REQUIREMENTS and a path to the working tree's edge code."""
    python, stamp = VENV / "bin" / "python", VENV / ".installed"
    wanted = "\n".join(REQUIREMENTS)
    if not (stamp.is_file() and stamp.read_text() == wanted and python.exists()):
        base = _base_python()
        if base is None:
            _unavailable("no CPython 3.10 or 3.11 interpreter found")
        try:
            subprocess.run([base, "-m", "venv", "--clear", str(VENV)], check=True, capture_output=True, timeout=120)
            subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                            "--retries", "2", "--timeout", "30", *REQUIREMENTS],
                           check=True, capture_output=True, text=True, timeout=600)
        except subprocess.CalledProcessError as exc:
            _unavailable(f"{' '.join(map(str, exc.cmd[:4]))}... failed: {(exc.stderr or '')[-800:]}")
        except subprocess.TimeoutExpired as exc:
            _unavailable(f"timed out: {exc}")
        stamp.write_text(wanted)
    shim = VENV / "src" / "splitinfer"
    if not (shim / "__init__.py").is_file():
        shim.mkdir(parents=True, exist_ok=True)
        (shim / "__init__.py").write_text("")
    for name, folder in PACKAGES.items():
        link = shim / name.split(".")[1]
        if not link.is_symlink() or link.resolve() != folder:
            link.unlink(missing_ok=True)
            link.symlink_to(folder, target_is_directory=True)
    return python


def test_halves_match_in_ort_1_16_3(tiny_int8_model_dir, tmp_path):
    python = _ort116_python()
    manifest = load_manifest(tiny_int8_model_dir)
    rng = np.random.default_rng(0)
    images = np.zeros((4, 64, 64), dtype=np.uint8)  # sparse bright strokes on black, like cluttered digits
    for img in images:
        for y, x0 in rng.integers(0, 56, size=(6, 2)):
            img[y:y + 8, x0:x0 + 3] = rng.integers(128, 256)
    x = preprocess(images, manifest.preprocessing)
    tokens = rng.normal(size=(3, 9, manifest.dim)).astype(np.float32)
    mask = np.ones((3, 9), dtype=bool)
    mask[1, 6:] = False
    extra = [quantize_device_half(manifest.device_path, tmp_path / f"{fmt}.onnx", Dataset("x", {"image": x}),
                                  quant_format=fmt)
             for fmt in QUANT_FORMATS]
    np.savez(tmp_path / "inputs.npz", x=x, tokens=tokens, mask=mask, image=images[0])

    env = {**os.environ, "PYTHONPATH": str(VENV / "src")}
    proc = subprocess.run([str(python), str(Path(__file__).with_name("ort116_probe.py")), str(tiny_int8_model_dir),
                           str(tmp_path / "inputs.npz"), str(tmp_path / "out.npz"), *map(str, extra)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    old = np.load(tmp_path / "out.npz")
    assert str(old["onnxruntime_version"]) == ORT_VERSION

    for half in ("float", "int8"):
        new = DeviceSession.from_manifest(manifest, device_half=half).run(x)
        tol = 1e-4 if half == "float" else 0.05 * float(np.abs(new.tokens).max())
        for name, value in zip(("exit_logits", "tokens", "importance"), new):
            np.testing.assert_allclose(old[f"{half}.{name}"], value, atol=tol,
                                       err_msg=f"{half} device half, {name}: ORT {ORT_VERSION} vs {ort.__version__}")
    server = ort.InferenceSession(str(manifest.server_path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(old["server.logits"], server.run(["logits"], {"tokens": tokens, "mask": mask})[0],
                               atol=1e-4)
    for i, path in enumerate(extra):
        new = DeviceSession(path).run(x).exit
        np.testing.assert_allclose(old[f"extra{i}.exit"], new, atol=0.05 * float(np.abs(new).max()) + 1e-3,
                                   err_msg=f"{QUANT_FORMATS[i]} INT8 half")
    assert int(old["runner.label"]) == EdgeRunner(DeviceSession.from_manifest(manifest), None, manifest).classify(
        images[0]).label
