"""Shared fixtures: real model folders made by the real export pipeline."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "checkpoints" / "vit-cluttered-mnist.pt"


def _export_tiny(tmp_path_factory, folder: str, **options) -> Path:
    """A small random-weight ViT (dim 32, 3 blocks, split after 1, seed 0) exported with the real pipeline."""
    torch = pytest.importorskip("torch")
    from splitinfer.export.model import SplitViT, ViTConfig
    from splitinfer.export.pipeline import ExportOptions, export_split_model

    torch.manual_seed(0)
    model = SplitViT(ViTConfig(dim=32, depth=3, heads=2, split=1)).eval()
    out = tmp_path_factory.mktemp(folder)
    export_split_model(model, out, ExportOptions(name="tiny", calibration_size=40, budget=8, **options))
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny ViT's model folder (float device half)."""
    return _export_tiny(tmp_path_factory, "tiny_model")


@pytest.fixture(scope="session")
def tiny_int8_model_dir(tmp_path_factory) -> Path:
    """The tiny model of ``tiny_model_dir`` (same weights), exported with an INT8 device half beside the float one."""
    return _export_tiny(tmp_path_factory, "tiny_int8_model", quantize="int8")


@pytest.fixture(scope="session")
def trained_model_dir(tmp_path_factory) -> Path:
    """The committed checkpoint, exported (what the demo deploys)."""
    pytest.importorskip("torch")
    from splitinfer.export.pipeline import ExportOptions, export_model

    out = tmp_path_factory.mktemp("trained_model")
    export_model(CHECKPOINT, out, ExportOptions(calibration_size=200))
    return out
