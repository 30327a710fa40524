"""Shared fixtures: the committed tiny model folders (tests/models, made by the real export
pipeline with scripts/make_test_models.py), and the shipped checkpoint exported when torch is here."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "checkpoints" / "vit-cluttered-mnist.pt"
MODELS = ROOT / "tests" / "models"


def _copy(tmp_path_factory, name: str) -> Path:
    """A private copy of a committed model folder (tests may not change the committed one)."""
    out = tmp_path_factory.mktemp(name) / name
    shutil.copytree(MODELS / name, out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny ViT's model folder: random weights (dim 32, 3 blocks, split after 1), float and INT8
    device halves, a zstd dictionary, a width-8 bottleneck trained-from-nothing (random)."""
    return _copy(tmp_path_factory, "tiny-image")


@pytest.fixture(scope="session")
def tiny_int8_model_dir(tiny_model_dir) -> Path:
    """The tiny model with its INT8 device half (the same folder)."""
    return tiny_model_dir


@pytest.fixture(scope="session")
def tiny_text_model_dir(tmp_path_factory) -> Path:
    """A tiny random 3-class BERT text model folder (tokenizer.json, split after 1)."""
    return _copy(tmp_path_factory, "tiny-text")


@pytest.fixture(scope="session")
def trained_model_dir(tmp_path_factory) -> Path:
    """The committed checkpoint, exported (what the demo deploys)."""
    pytest.importorskip("torch")
    from splitinfer.export.pipeline import ExportOptions, export_checkpoint

    out = tmp_path_factory.mktemp("trained_model")
    export_checkpoint(CHECKPOINT, out, ExportOptions(name="vit-cluttered-mnist", calibration_size=200, epsilon=0.05))
    return out


@pytest.fixture(autouse=True)
def _energy_cache(tmp_path_factory, monkeypatch) -> None:
    """The edge caches its energy reference per model and device: keep each test session's apart."""
    monkeypatch.setenv("SPLITINFER_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
