"""``--data imagefolder:DIR``: a small image folder written from scikit-image's photographs."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

skimage_data = pytest.importorskip("skimage.data")

from splitinfer.edge.preprocess import load_image, preprocess  # noqa: E402
from splitinfer.export.imagefolder import (  # noqa: E402
    imagefolder_root,
    load_imagefolder,
    scan_imagefolder,
    split_counts,
    split_imagefolder,
)
from splitinfer.export.preprocess import builtin_preprocessing  # noqa: E402
from splitinfer.protos.preprocessing import ImagePreprocessing  # noqa: E402

DEIT = ImagePreprocessing.from_timm({"input_size": (3, 224, 224), "interpolation": "bicubic",
                                     "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
                                     "crop_pct": 0.875, "crop_mode": "center"})
SUFFIXES = (".png", ".JPG", ".jpeg", ".webp")


def crops(photo: np.ndarray, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """n random crops (some mirrored) of a photo, each a different size."""
    h, w = photo.shape[:2]
    out = []
    for _ in range(n):
        ch, cw = rng.integers(h // 3, h // 2), rng.integers(w // 3, w // 2)
        y, x = rng.integers(0, h - ch), rng.integers(0, w - cw)
        crop = photo[y:y + ch, x:x + cw]
        out.append(crop[:, ::-1] if rng.random() < 0.5 else crop)
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple:
    """root/{cat,coffee,rocket}: 10, 7 and 5 crops as PNG/JPEG/WebP, one in a nested folder."""
    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    sizes = {"cat": ("chelsea", 10), "coffee": ("coffee", 7), "rocket": ("rocket", 5)}
    for name, (photo, n) in sizes.items():
        (root / name / "nested").mkdir(parents=True)
        for i, crop in enumerate(crops(getattr(skimage_data, photo)(), n, rng)):
            where = root / name / "nested" if i == 0 else root / name
            Image.fromarray(np.ascontiguousarray(crop)).save(where / f"{i:02d}{SUFFIXES[i % 4]}", quality=90)
        (root / name / "notes.txt").write_text("not an image")
        (root / name / ".hidden.png").write_bytes(b"")
    (root / ".cache").mkdir()
    return root, sizes


def test_scan_sorts_classes_and_picks_up_image_files(folder):
    root, sizes = folder
    scanned = scan_imagefolder(root)
    assert scanned.class_names == ("cat", "coffee", "rocket")
    assert [len(f) for f in scanned.files] == [n for _, n in sizes.values()] and len(scanned) == 22
    assert scanned.files[0][-1].parent.name == "nested"  # "nested/00.png" sorts after "09.JPG"
    assert imagefolder_root(f"imagefolder:{root}") == root and imagefolder_root("cluttered-mnist") is None
    with pytest.raises(ValueError, match="name the folder"):
        imagefolder_root("imagefolder:")


def test_split_is_stratified_disjoint_and_deterministic(folder):
    root, sizes = folder
    scanned = scan_imagefolder(root)
    splits = {name: split_imagefolder(scanned, name, seed=0) for name in ("train", "calibration", "test")}
    paths = [p for items in splits.values() for p, _ in items]
    assert len(paths) == len(set(paths)) == len(scanned)  # every file in exactly one split
    for label, (_, n) in enumerate(sizes.values()):
        for name, items in splits.items():
            assert sum(1 for _, y in items if y == label) == split_counts(n)[name]
    assert split_counts(10) == {"train": 7, "calibration": 1, "test": 2}
    assert split_counts(3) == {"train": 1, "calibration": 1, "test": 1}
    assert split_counts(100) == {"train": 70, "calibration": 10, "test": 20}
    assert split_imagefolder(scanned, "test", seed=0) == splits["test"]
    assert any(split_imagefolder(scanned, "test", seed=s) != splits["test"] for s in (1, 2, 3))
    with pytest.raises(ValueError, match="split"):
        split_imagefolder(scanned, "validation")


def test_load_gives_the_edge_pixels(folder):
    root, _ = folder
    images, labels, classes = load_imagefolder(root, DEIT, "test", seed=0)
    items = split_imagefolder(scan_imagefolder(root), "test", seed=0)
    assert images.shape == (len(items), 3, 224, 224) and images.dtype == np.float32
    assert labels.dtype == np.int64 and labels.tolist() == [y for _, y in items]
    assert classes == ["cat", "coffee", "rocket"]
    for x, (path, _) in zip(images, items):
        np.testing.assert_array_equal(x, preprocess(load_image(path), DEIT)[0])
    gray, _, _ = load_imagefolder(root, builtin_preprocessing(64).to_dict(), "calibration", seed=0)
    assert gray.shape == (3, 1, 64, 64)


def test_clear_errors(tmp_path, folder):
    with pytest.raises(ValueError, match="not a directory"):
        load_imagefolder(tmp_path / "missing", DEIT, "train")
    with pytest.raises(ValueError, match="no class sub-folders"):
        scan_imagefolder(tmp_path)
    photo = skimage_data.chelsea()
    for name, n in (("a", 3), ("b", 2)):
        (tmp_path / name).mkdir()
        for i in range(n):
            Image.fromarray(photo).save(tmp_path / name / f"{i}.png")
    with pytest.raises(ValueError, match="class 'b' has 2 image"):
        scan_imagefolder(tmp_path)
    (tmp_path / "b" / "2.jpg").write_text("this is not a JPEG")
    with pytest.raises(ValueError, match=r"b/2\.jpg"):  # the unreadable file, by name
        for split in ("train", "calibration", "test"):
            load_imagefolder(tmp_path, DEIT, split)
    single = tmp_path / "single"
    (single / "only").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(photo).save(single / "only" / f"{i}.png")
    with pytest.raises(ValueError, match="at least two"):
        scan_imagefolder(single)
