"""Edge fixtures: the tiny model's manifest, a real ORT session on it, and sample images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from splitinfer.edge.session import DeviceSession
from splitinfer.protos.manifest import Manifest, load_manifest


@pytest.fixture(scope="session")
def tiny_manifest(tiny_model_dir: Path) -> Manifest:
    return load_manifest(tiny_model_dir, need=("device",))


@pytest.fixture(scope="session")
def device_session(tiny_manifest: Manifest) -> DeviceSession:
    return DeviceSession.from_manifest(tiny_manifest)


@pytest.fixture(scope="session")
def images(tiny_manifest: Manifest) -> np.ndarray:
    """uint8 (4, H, W): sparse bright strokes on black, like cluttered digits."""
    h, w = tiny_manifest.preprocessing.height, tiny_manifest.preprocessing.width
    rng = np.random.default_rng(0)
    out = np.zeros((4, h, w), dtype=np.uint8)
    for img in out:
        for _ in range(6):
            y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
            img[y:y + 8, x:x + 3] = rng.integers(128, 256)
    return out


@pytest.fixture
def png_folder(tmp_path: Path, images: np.ndarray) -> Path:
    """A folder of three PNGs written with Pillow, named so that sorting is meaningful."""
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, img in enumerate(images[:3]):
        Image.fromarray(img).save(folder / f"img_{i}.png")
    return folder
