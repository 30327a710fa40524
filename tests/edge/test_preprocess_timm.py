"""The edge's image preprocessing equals timm's own eval transform on real photographs.

timm side: ``timm.data.resolve_data_config`` + ``timm.data.create_transform`` on a PIL image, as a
timm user classifies a photo. Edge side: ``ImagePreprocessing.from_timm`` of the same config, then
``splitinfer.edge.preprocess`` (no torch). Photos: scikit-image's chelsea, astronaut, coffee,
rocket (and camera, grayscale, for an RGB model), as arrays and as JPEG/WebP files.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
skimage_data = pytest.importorskip("skimage.data")

from PIL import Image  # noqa: E402
from timm.data import create_transform, resolve_data_config  # noqa: E402
from timm.models import get_pretrained_cfg  # noqa: E402

from splitinfer.edge.preprocess import load_image, preprocess  # noqa: E402
from splitinfer.protos.preprocessing import ImagePreprocessing  # noqa: E402

PHOTOS = ("chelsea", "astronaut", "coffee", "rocket")
ATOL = 1e-5

# (pretrained config name, overriding args): bicubic / bilinear, crop_pct 0.875 / 0.9 / 1.0 / 1.25
# (the crop pads), square and non-square inputs (keep-ratio resize), center and squash crop modes.
CONFIGS = {
    "deit_tiny": ("deit_tiny_patch16_224.fb_in1k", {}),
    "vit_bilinear_miil": ("vit_base_patch16_224_miil.in21k_ft_in1k", {}),
    "vit_tiny_crop0.9": ("vit_tiny_patch16_224.augreg_in21k_ft_in1k", {}),
    "vit_384_crop1.0": ("vit_small_patch16_384.augreg_in21k_ft_in1k", {}),
    "vit_squash_1024x768": ("vit_base_patch16_sapiens2.fb", {}),
    "deit_160x224_lanczos_pad": ("deit_tiny_patch16_224.fb_in1k",
                                 {"input_size": (3, 160, 224), "crop_pct": 1.25, "interpolation": "lanczos"}),
    "deit_nearest_squash": ("deit_tiny_patch16_224.fb_in1k", {"interpolation": "nearest", "crop_mode": "squash"}),
}


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    return {name: getattr(skimage_data, name)() for name in PHOTOS}


def data_config(key: str) -> dict:
    name, args = CONFIGS[key]
    return resolve_data_config(args=dict(args), pretrained_cfg=get_pretrained_cfg(name).to_dict())


def timm_pixels(config: dict, images: list[Image.Image]) -> np.ndarray:
    transform = create_transform(**config, is_training=False)
    return torch.stack([transform(img) for img in images]).numpy()  # float32 (B, C, H, W)


def assert_same(ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.dtype == np.float32 and ours.shape == theirs.shape
    worst = float(np.abs(ours - theirs).max())
    assert worst <= ATOL, f"max |edge - timm| = {worst:.3g}"


def test_deit_tiny_model_config_is_what_from_timm_reads():
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    config = resolve_data_config(model=model)
    spec = ImagePreprocessing.from_timm(config)
    assert (spec.color, spec.size, spec.interpolation) == ("RGB", (224, 224), "bicubic")
    side = int(224 // config["crop_pct"])  # timm: floor(224 / crop_pct), 248 for deit's 0.9
    assert (spec.resize, spec.resize_size) == ("shorter_side", (side, side))
    assert spec.mean == pytest.approx(config["mean"]) and spec.std == pytest.approx(config["std"])


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_rgb_photos_equal_timm_eval_transform(key, photos):
    config = data_config(key)
    spec = ImagePreprocessing.from_timm(config)
    images = [photos[name] for name in PHOTOS]  # different sizes: a list, each resized on its own
    theirs = timm_pixels(config, [Image.fromarray(img) for img in images])
    assert_same(preprocess(images, spec), theirs)
    for i, img in enumerate(images):  # one image at a time, and through the manifest's dict
        assert_same(preprocess(img, spec.to_dict()), theirs[i:i + 1])


def test_grayscale_photo_into_rgb_model_equals_timm(photos):
    config = data_config("deit_tiny")
    camera = skimage_data.camera()  # uint8 (512, 512), grayscale
    theirs = timm_pixels(config, [Image.fromarray(camera).convert("RGB")])
    assert_same(preprocess(camera, ImagePreprocessing.from_timm(config)), theirs)


@pytest.mark.parametrize("fmt,options", [("JPEG", {"quality": 85}), ("WEBP", {"quality": 80}), ("PNG", {})])
@pytest.mark.parametrize("key", ["deit_tiny", "vit_bilinear_miil"])
def test_photo_files_equal_timm_eval_transform(fmt, options, key, photos, tmp_path):
    config = data_config(key)
    spec = ImagePreprocessing.from_timm(config)
    paths = []
    for name, img in photos.items():
        path = tmp_path / f"{name}.{fmt.lower()}"
        Image.fromarray(img).save(path, format=fmt, **options)
        paths.append(path)
    ours = preprocess([load_image(p) for p in paths], spec)
    theirs = []
    for p in paths:
        with Image.open(p) as img:
            theirs.append(img.convert("RGB"))
    assert_same(ours, timm_pixels(config, theirs))
