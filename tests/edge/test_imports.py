"""The edge path must stay light: no torch, no matplotlib, no export code."""
from __future__ import annotations

import subprocess
import sys

CHECK = """
import importlib, pkgutil, sys
import splitinfer.edge
import splitinfer.edge.cli
for info in pkgutil.iter_modules(splitinfer.edge.__path__):
    importlib.import_module("splitinfer.edge." + info.name)
for name in splitinfer.edge.__all__:
    getattr(splitinfer.edge, name)
heavy = sorted(m for m in sys.modules
               if m.split(".")[0] in ("torch", "matplotlib") or m.startswith("splitinfer.export"))
print(",".join(heavy))
"""


def test_edge_imports_no_torch():
    proc = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"heavy modules loaded: {proc.stdout.strip()}"
