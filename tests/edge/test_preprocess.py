from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from splitinfer.edge.preprocess import PreprocessSpec, load_image, preprocess

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
    x = preprocess(np.zeros((spec["height"], spec["width"]), np.uint8), spec)
    assert x.shape == (1, 1, spec["height"], spec["width"])
    np.testing.assert_allclose(x, -spec["mean"] / spec["std"], rtol=1e-6)


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
