from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

from splitinfer.edge.preprocess import (ImagePreprocessing, PreprocessSpec, image_paths, load_image, prepare_images,
                                        preprocess)

SPEC = {"color": "grayscale", "height": 16, "width": 16, "scale": 1 / 255, "mean": 0.1307, "std": 0.3081,
        "layout": "NCHW"}


def test_preprocess_matches_manifest_normalization():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 16, 16), dtype=np.uint8)
    x = preprocess(images, SPEC)
    expected = ((images.astype(np.float64) / 255.0 - 0.1307) / 0.3081)[:, None]
    assert x.dtype == np.float32 and x.shape == (3, 1, 16, 16)
    np.testing.assert_allclose(x, expected, rtol=0, atol=1e-5)


def test_preprocess_single_image_gets_batch_axis(tiny_manifest):
    spec = tiny_manifest.preprocessing
    x = preprocess(np.zeros((spec.height, spec.width), np.uint8), spec)
    assert x.shape == (1, 1, spec.height, spec.width)
    np.testing.assert_allclose(x, -spec.mean[0] / spec.std[0], rtol=1e-6)


def test_preprocess_resizes_other_sizes_bilinear():
    image = np.full((40, 24), 200, dtype=np.uint8)
    x = preprocess(image, SPEC)
    assert x.shape == (1, 1, 16, 16)
    np.testing.assert_allclose(x, (200 / 255 - 0.1307) / 0.3081, rtol=1e-5)


def test_preprocess_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        preprocess(np.zeros((16, 16), np.float32), SPEC)
    with pytest.raises(ValueError, match="shape"):
        preprocess(np.zeros((1, 1, 16, 16), np.uint8), SPEC)
    with pytest.raises(ValueError, match="std"):
        PreprocessSpec.from_dict({**SPEC, "std": 0})
    with pytest.raises(ValueError, match="color"):
        PreprocessSpec.from_dict({**SPEC, "color": "cmyk"})
    with pytest.raises(ValueError, match="mean"):  # an RGB model needs one mean per channel
        PreprocessSpec.from_dict({**SPEC, "color": "rgb", "mean": [0.1307]})
    with pytest.raises(ValueError, match="height"):
        PreprocessSpec.from_dict({k: v for k, v in SPEC.items() if k != "height"})


def test_load_image_grayscale_png(tmp_path):
    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(pixels).save(tmp_path / "gray.png")
    np.testing.assert_array_equal(load_image(tmp_path / "gray.png"), pixels)


def test_load_image_converts_colour_and_16_bit(tmp_path):
    rgb = np.zeros((4, 5, 3), dtype=np.uint8)
    rgb[..., 1] = 255
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(load_image(tmp_path / "rgb.png"), rgb)  # colour stays colour
    gray = load_image(tmp_path / "rgb.png", color="L")
    assert gray.dtype == np.uint8 and gray.shape == (4, 5)
    assert np.all(gray == 150)  # ITU-R 601 luma of pure green

    wide = np.full((3, 3), 65535, dtype=np.uint16)
    wide[0, 0] = 257 * 10
    Image.fromarray(wide).save(tmp_path / "wide.png")
    gray = load_image(tmp_path / "wide.png")
    assert gray[0, 0] == 10 and gray[1, 1] == 255


def test_load_image_not_an_image_names_the_file(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("this is not a PNG")
    with pytest.raises(ValueError, match="notes.png"):
        load_image(bad)
    with pytest.raises(ValueError, match="missing.png"):
        load_image(tmp_path / "missing.png")


MNIST_LIKE = ImagePreprocessing(color="L", height=16, width=16, mean=[0.1307], std=[0.3081], polarity="light_on_dark")


def digit(background: int, stroke: int) -> np.ndarray:
    """uint8 (16, 16): a bar of ``stroke`` on ``background``."""
    img = np.full((16, 16), background, dtype=np.uint8)
    img[3:13, 7:10] = stroke
    return img


def test_polarity_inverts_dark_digits_on_white_paper_and_says_so():
    light_on_dark, dark_on_light = digit(0, 250), digit(235, 20)
    out = prepare_images(np.stack([light_on_dark, dark_on_light]), MNIST_LIKE)
    np.testing.assert_array_equal(out.inverted, [False, True])
    np.testing.assert_allclose(out.pixels[1], preprocess(255 - dark_on_light, MNIST_LIKE)[0], atol=1e-6)
    np.testing.assert_allclose(out.pixels[0], preprocess(light_on_dark, MNIST_LIKE)[0], atol=1e-6)
    # a digit touching the border does not flip the decision: the rule is the border's majority
    touching = digit(0, 250)
    touching[0, :7] = 250
    assert not prepare_images(touching, MNIST_LIKE).inverted[0]
    # polarity "any" (timm models, 0.1 manifests) leaves every image as it is
    kept = prepare_images(dark_on_light, SPEC)
    assert not kept.inverted.any()
    np.testing.assert_allclose(kept.pixels[0, 0], (dark_on_light / 255 - 0.1307) / 0.3081, atol=1e-5)


def test_polarity_is_decided_at_the_model_size():
    paper = np.full((100, 60, 3), 230, dtype=np.uint8)  # an RGB photo of a dark digit on paper
    paper[30:70, 25:35] = (30, 20, 10)
    out = prepare_images(paper, MNIST_LIKE)
    assert out.pixels.shape == (1, 1, 16, 16) and out.inverted.tolist() == [True]
    assert out.pixels[0, 0, 0, 0] == pytest.approx((1 - 230 / 255 - 0.1307) / 0.3081, abs=1e-5)


def test_rgb_batches_lists_and_channel_orders():
    rng = np.random.default_rng(1)
    spec = ImagePreprocessing(color="RGB", height=8, width=8, mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3])
    batch = rng.integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)
    x = preprocess(batch, spec)  # vectorized path
    expected = (batch / 255.0 - np.array([0.4, 0.5, 0.6])) / np.array([0.2, 0.25, 0.3])
    np.testing.assert_allclose(x, expected.transpose(0, 3, 1, 2), atol=1e-5)
    np.testing.assert_array_equal(preprocess(list(batch), spec), x)  # Pillow path, same size
    np.testing.assert_array_equal(preprocess(Image.fromarray(batch[0]), spec), x[:1])
    bgr = preprocess(batch, dataclasses.replace(spec, channel_order="BGR"))
    np.testing.assert_array_equal(bgr, x[:, ::-1])
    gray = rng.integers(0, 256, size=(8, 8), dtype=np.uint8)  # grayscale into an RGB model: repeated
    np.testing.assert_allclose(preprocess(gray, spec)[0], preprocess(np.repeat(gray[..., None], 3, 2), spec)[0])
    mixed = preprocess([gray, rng.integers(0, 256, size=(20, 13, 3), dtype=np.uint8)], spec)
    assert mixed.shape == (2, 3, 8, 8) and mixed.dtype == np.float32
    # an RGB image for a grayscale model: ITU-R 601 luma, as Pillow's convert("L")
    np.testing.assert_allclose(preprocess(batch[0], SPEC.copy() | {"height": 8, "width": 8})[0, 0],
                               (np.asarray(Image.fromarray(batch[0]).convert("L")) / 255 - 0.1307) / 0.3081,
                               atol=1e-5)
    with pytest.raises(ValueError, match="empty"):
        preprocess([], spec)
    with pytest.raises(ValueError, match="shape"):
        preprocess([np.zeros((4, 4, 2), np.uint8)], spec)


def test_load_image_formats_alpha_palette_and_orientation(tmp_path):
    rgb = np.zeros((6, 10, 3), dtype=np.uint8)
    rgb[:, :5] = (200, 30, 40)
    for fmt, suffix in (("JPEG", "jpg"), ("WEBP", "webp")):
        Image.fromarray(rgb).save(tmp_path / f"a.{suffix}", format=fmt, quality=95)
        loaded = load_image(tmp_path / f"a.{suffix}")
        assert loaded.shape == (6, 10, 3) and np.abs(loaded.astype(int) - rgb).mean() < 8
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (0, 0, 0, 255)  # opaque black
    rgba[0, 1] = (0, 0, 0, 0)  # transparent: white after compositing
    rgba[1, :] = (100, 100, 100, 128)  # half: between the colour and white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    out = load_image(tmp_path / "alpha.png")
    assert out.shape == (2, 2, 3) and out[0, 0].tolist() == [0, 0, 0] and out[0, 1].tolist() == [255, 255, 255]
    assert 170 <= out[1, 0, 0] <= 180
    la = Image.fromarray(rgba[..., [0, 3]], "LA")
    la.save(tmp_path / "la.png")
    assert load_image(tmp_path / "la.png").tolist() == out[..., 0].tolist()
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(tmp_path / "pal.png")
    np.testing.assert_array_equal(load_image(tmp_path / "pal.png"), rgb)
    tall = Image.fromarray(rgb)  # stored 10 wide, 6 high; EXIF says "rotate 90 CW to display"
    exif = tall.getexif()
    exif[0x0112] = 6
    tall.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    assert load_image(tmp_path / "rotated.jpg").shape == (10, 6, 3)
    with pytest.raises(ValueError, match="color"):
        load_image(tmp_path / "a.jpg", color="CMYK")


def test_image_paths_picks_up_image_suffixes_sorted(tmp_path):
    for name in ("b.JPG", "a.png", "c.webp", "d.jpeg", "notes.txt", "e.Png"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub.png").mkdir()
    found = image_paths([tmp_path])
    assert [p.name for p, _ in found] == ["a.png", "b.JPG", "c.webp", "d.jpeg", "e.Png"]
    assert all(problem is None for _, problem in found)
    empty = tmp_path / "empty"
    empty.mkdir()
    explicit = tmp_path / "notes.txt"
    (p0, e0), (p1, e1), (p2, e2) = image_paths([empty, explicit, tmp_path / "missing"])
    assert "no .png/.jpg/.jpeg/.webp files" in e0 and p1 == explicit and e1 is None
    assert "no such file" in e2
