import numpy as np
import pytest

from splitinfer.export.data import ClutterConfig, DigitSplits, load_mnist_digits, make_canvases, make_split, split_digits


@pytest.fixture(scope="module")
def digits():
    return load_mnist_digits()


def test_real_digits_load(digits):
    images, labels = digits
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [500] * 10
    assert images.max() == 255 and images.mean() > 20  # real strokes, not zeros


def test_splits_are_disjoint_and_balanced(digits):
    splits = split_digits(*digits)
    flat = {name: {img.tobytes() for img in imgs} for name, (imgs, _) in splits.items()}
    assert not flat["train"] & flat["test"] and not flat["train"] & flat["calibration"]
    assert not flat["calibration"] & flat["test"]
    for name, n in [("train", 350), ("calibration", 50), ("test", 100)]:
        assert np.bincount(splits[name][1]).tolist() == [n] * 10


def test_canvases_are_deterministic_and_contain_the_digit(digits):
    imgs, labels = split_digits(*digits)["test"]
    a, ya = make_canvases(imgs, labels, 50, seed=7)
    b, yb = make_canvases(imgs, labels, 50, seed=7)
    c, _ = make_canvases(imgs, labels, 50, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(ya, labels[:50])
    clean, _ = make_canvases(imgs, labels, 50, ClutterConfig(fragments=0), seed=7)
    for canvas, digit in zip(clean, imgs[:50]):  # without clutter the canvas is the digit, placed
        assert canvas.sum() == digit.astype(np.int64).sum()
    assert (a > 0).mean() > (clean > 0).mean()  # clutter adds strokes


def test_make_split_sizes():
    x, y = make_split("calibration")
    assert x.shape == (1000, 64, 64) and len(y) == 1000
    with pytest.raises(ValueError, match="split"):
        make_split("validation")
    with pytest.raises(ValueError, match="fragment_size"):
        ClutterConfig(fragment_size=0)
    with pytest.raises(ValueError, match="train"):
        DigitSplits(train=0)


def test_builtin_preprocessing_is_normalize_and_keeps_cluttered_canvases_as_they_are():
    """The edge's preprocessing of the built-in model equals training's normalize, and its
    polarity rule leaves every real canvas (bright strokes on black) uninverted."""
    from splitinfer.edge.preprocess import prepare_images
    from splitinfer.export.preprocess import builtin_preprocessing, normalize

    x, _ = make_split("calibration")
    prepared = prepare_images(x, builtin_preprocessing(64))
    assert not prepared.inverted.any()
    np.testing.assert_allclose(prepared.pixels, normalize(x), rtol=0, atol=1e-5)
    paper = prepare_images(255 - x[:50], builtin_preprocessing(64))  # dark digits on white paper
    assert paper.inverted.all()
    np.testing.assert_allclose(paper.pixels, normalize(x[:50]), rtol=0, atol=1e-5)


def test_load_image_data_names_both_sources(tmp_path):
    from PIL import Image

    from splitinfer.export.data import load_image_data
    from splitinfer.export.preprocess import builtin_preprocessing, normalize
    from splitinfer.protos.preprocessing import ImagePreprocessing

    x, y, classes = load_image_data("cluttered-mnist", builtin_preprocessing(64), "test", n=20)
    canvases, labels = make_split("test", n=20)
    np.testing.assert_allclose(x, normalize(canvases), atol=1e-5)
    assert y.tolist() == labels.tolist() and classes == [str(c) for c in range(10)]
    rgb = ImagePreprocessing(color="RGB", height=32, width=32, mean=[0.5] * 3, std=[0.5] * 3)
    assert load_image_data("cluttered-mnist", rgb, "test", n=4)[0].shape == (4, 3, 32, 32)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.fromarray(canvases[i]).save(tmp_path / name / f"{i}.png")
    x, y, classes = load_image_data(f"imagefolder:{tmp_path}", builtin_preprocessing(64), "train")
    assert x.shape == (2, 1, 64, 64) and classes == ["a", "b"] and y.tolist() == [0, 1]
    with pytest.raises(ValueError, match="cluttered-mnist"):
        load_image_data("cifar10", rgb, "test")
    with pytest.raises(ValueError, match="n applies"):
        load_image_data(f"imagefolder:{tmp_path}", rgb, "test", n=5)
