"""A user's own pictures as training, calibration and test data: ``--data imagefolder:DIR``.

The folder holds one sub-folder per class (its name is the class name; classes are sorted by
name, label = index)::

    DIR/cat/0001.jpg  DIR/cat/more/0002.png  DIR/dog/a.webp ...

Files ending in .png, .jpg, .jpeg or .webp (any case) anywhere below a class folder count; other
files, hidden entries (a leading ".") and files directly in DIR are skipped. Every image goes
through exactly the edge's code (``splitinfer.edge.preprocess``: decode, colour, resize, crop,
polarity, mean/std), so a model is fine-tuned and calibrated on the pixels the device will feed it.

The split is stratified and deterministic: within each class, files sorted by path are shuffled by
a generator seeded with ``(seed, crc32(class name))`` (so one class's split does not depend on the
others) and cut into test (``round(0.2 n)``, at least 1), calibration (``round(0.1 n)``, at least
1) and train (the rest, at least 1): 70 / 10 / 20. A class therefore needs at least 3 images.
"""
from __future__ import annotations

import logging
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from splitinfer.edge.preprocess import IMAGE_SUFFIXES, as_preprocessing, load_image, prepare_images
from splitinfer.protos.preprocessing import ImagePreprocessing

__all__ = [
    "IMAGEFOLDER_PREFIX",
    "MIN_IMAGES_PER_CLASS",
    "SHARES",
    "ImageFolder",
    "imagefolder_root",
    "load_imagefolder",
    "scan_imagefolder",
    "split_counts",
    "split_imagefolder",
]

logger = logging.getLogger(__name__)

IMAGEFOLDER_PREFIX = "imagefolder:"
SPLITS = ("train", "calibration", "test")
SHARES = {"train": 0.7, "calibration": 0.1, "test": 0.2}  # of each class; train takes the rest
MIN_IMAGES_PER_CLASS = 3  # one for each split


@dataclass(frozen=True)
class ImageFolder:
    """A scanned image folder. class_names: sorted; files[i]: class i's image paths, sorted."""

    root: Path
    class_names: tuple[str, ...]
    files: tuple[tuple[Path, ...], ...]

    def __len__(self) -> int:
        return sum(len(f) for f in self.files)


def imagefolder_root(data: str) -> Path | None:
    """``"imagefolder:DIR"`` -> Path(DIR); any other data name -> None. An empty DIR is a ValueError."""
    if not data.startswith(IMAGEFOLDER_PREFIX):
        return None
    root = data[len(IMAGEFOLDER_PREFIX):]
    if not root:
        raise ValueError(f"--data {data!r}: name the folder, e.g. {IMAGEFOLDER_PREFIX}photos/")
    return Path(root).expanduser()


def scan_imagefolder(root: str | os.PathLike) -> ImageFolder:
    """List the classes and their images; ValueError if the folder cannot make a classifier's data
    (missing, no class sub-folders, fewer than two classes, a class with too few images)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"imagefolder {root}: not a directory")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    stray = [p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if stray:
        logger.warning("imagefolder %s: %d image(s) directly in the folder are skipped (not in a class "
                       "sub-folder), e.g. %s", root, len(stray), sorted(stray)[0])
    if not class_dirs:
        raise ValueError(f"imagefolder {root}: no class sub-folders; put each class's images in "
                         f"{root}/<class name>/ ({'/'.join(IMAGE_SUFFIXES)})")
    files = []
    for folder in class_dirs:
        found = sorted(
            (p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(folder).parts)),
            key=lambda p: p.relative_to(folder).as_posix(),
        )
        if len(found) < MIN_IMAGES_PER_CLASS:
            raise ValueError(f"imagefolder {root}: class {folder.name!r} has {len(found)} image(s); each class "
                             f"needs at least {MIN_IMAGES_PER_CLASS} (one for each of train, calibration, test)")
        files.append(tuple(found))
    if len(class_dirs) < 2:
        raise ValueError(f"imagefolder {root}: one class ({class_dirs[0].name!r}); a classifier needs at least two")
    return ImageFolder(root, tuple(p.name for p in class_dirs), tuple(files))


def split_counts(n: int) -> dict[str, int]:
    """Images of a class of n (>= 3) in each split: test round(0.2 n), calibration round(0.1 n),
    both at least 1, train the rest."""
    if n < MIN_IMAGES_PER_CLASS:
        raise ValueError(f"a class needs at least {MIN_IMAGES_PER_CLASS} images, got {n}")
    test = max(1, round(SHARES["test"] * n))
    calibration = max(1, round(SHARES["calibration"] * n))
    return {"train": n - test - calibration, "calibration": calibration, "test": test}


def split_imagefolder(folder: ImageFolder, split: str, seed: int = 0) -> list[tuple[Path, int]]:
    """(path, label) of one split, class by class, each class's files in path order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    out: list[tuple[Path, int]] = []
    for label, (name, files) in enumerate(zip(folder.class_names, folder.files)):
        counts = split_counts(len(files))
        order = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))]).permutation(len(files))
        start = {"test": 0, "calibration": counts["test"], "train": counts["test"] + counts["calibration"]}[split]
        chosen = np.sort(order[start:start + counts[split]])
        out.extend((files[i], label) for i in chosen)
    return out


def load_imagefolder(
    root: str | os.PathLike,
    spec: ImagePreprocessing | Mapping,
    split: str,
    seed: int = 0,
    workers: int | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One split of an image folder, preprocessed as ``spec`` says (the edge's code).

    Returns images float32 (n, C, H, W), labels int64 (n,) and the class names (label i is
    class_names[i]). workers: decoding threads (None: up to 8, by CPU count). An unreadable file is
    a ValueError naming it.
    """
    spec = as_preprocessing(spec)
    folder = scan_imagefolder(root)
    items = split_imagefolder(folder, split, seed)
    images = np.empty((len(items), spec.channels, spec.height, spec.width), dtype=np.float32)
    labels = np.array([label for _, label in items], dtype=np.int64)

    def prepare(index: int) -> bool:
        path = items[index][0]
        try:
            prepared = prepare_images(load_image(path), spec)
        except ValueError as exc:
            raise ValueError(f"imagefolder {folder.root}: {exc}") from exc
        images[index] = prepared.pixels[0]
        return bool(prepared.inverted[0])

    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:  # Pillow decodes and resizes without the GIL
        inverted = sum(pool.map(prepare, range(len(items))))
    logger.info("imagefolder %s: %s split, %d image(s) in %d classes%s", folder.root, split, len(items),
                len(folder.class_names), f", {inverted} inverted by the polarity rule" if inverted else "")
    return images, labels, list(folder.class_names)
