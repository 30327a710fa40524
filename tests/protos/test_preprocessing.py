"""ImagePreprocessing: the manifest's preprocessing section (standard library only, no Pillow)."""
from __future__ import annotations

import json

import pytest

from splitinfer.protos.preprocessing import ImagePreprocessing

DEIT = {"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225), "crop_pct": 0.875, "crop_mode": "center"}
V01 = {"color": "grayscale", "height": 64, "width": 64, "scale": 1 / 255, "mean": 0.1307, "std": 0.3081,
       "layout": "NCHW"}


def test_dict_round_trip_through_json():
    spec = ImagePreprocessing.from_timm(DEIT)
    data = json.loads(json.dumps(spec.to_dict()))
    assert data["kind"] == "image" and data["resize_size"] == [256, 256] and data["channel_order"] == "RGB"
    assert ImagePreprocessing.from_dict(data) == spec
    gray = ImagePreprocessing(color="L", height=64, width=64, mean=[0.1307], std=[0.3081], polarity="light_on_dark")
    assert ImagePreprocessing.load(gray.to_dict()) == gray
    assert gray.resize_size == (64, 64) and gray.channel_order == "L" and gray.channels == 1


def test_from_dict_names_unknown_missing_and_bad_fields():
    data = ImagePreprocessing.from_timm(DEIT).to_dict()
    with pytest.raises(ValueError, match="unknown field.*'gamma'"):
        ImagePreprocessing.from_dict({**data, "gamma": 2.2})
    with pytest.raises(ValueError, match="missing.*'interpolation'"):
        ImagePreprocessing.from_dict({k: v for k, v in data.items() if k != "interpolation"})
    with pytest.raises(ValueError, match="kind"):
        ImagePreprocessing.from_dict({**data, "kind": "text"})
    bad = [
        ("color", "CMYK", "color.*'CMYK'"),
        ("interpolation", "cubic", "interpolation.*'cubic'"),
        ("mean", [0.5, 0.5], r"mean must have 3 value\(s\)"),
        ("std", [0.2, 0.0, 0.2], "std must be > 0"),
        ("std", [0.2, float("nan"), 0.2], "std must be a finite number"),
        ("height", 0, "height must be a positive integer, got 0"),
        ("resize", "crop", "resize.*'crop'"),
        ("resize_size", [256, 300], "square for resize 'shorter_side'"),
        ("resize_size", 256, r"resize_size must be \[height, width\]"),
        ("scale", -1.0, "scale must be > 0"),
        ("channel_order", "L", "channel_order.*for color 'RGB'"),
        ("polarity", "light_on_dark", "needs color 'L'"),
        ("polarity", "dark", "polarity.*'dark'"),
        ("layout", "NHWC", "layout.*'NHWC'"),
    ]
    for field, value, message in bad:
        with pytest.raises(ValueError, match=message):
            ImagePreprocessing.from_dict({**data, field: value})
    ImagePreprocessing.from_dict({**data, "channel_order": "BGR"})  # the other RGB order is fine
    with pytest.raises(ValueError, match="object"):
        ImagePreprocessing.from_dict([1, 2])


def test_reads_the_01_format():
    spec = ImagePreprocessing.load(V01)  # what export/preprocess.py:preprocessing_spec wrote in 0.1
    assert (spec.color, spec.size, spec.resize, spec.resize_size) == ("L", (64, 64), "squash", (64, 64))
    assert spec.mean == (0.1307,) and spec.std == (0.3081,) and spec.polarity == "any"
    assert spec.interpolation == "bilinear" and spec.scale == pytest.approx(1 / 255)
    rgb = ImagePreprocessing.from_v01({"color": "rgb", "height": 224, "width": 224, "scale": 1 / 255,
                                       "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "layout": "NCHW"})
    assert rgb.color == "RGB" and rgb.mean == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="unknown field.*'crop'"):
        ImagePreprocessing.from_v01({**V01, "crop": 1})
    with pytest.raises(ValueError, match="'width'"):
        ImagePreprocessing.from_v01({k: v for k, v in V01.items() if k != "width"})
    with pytest.raises(ValueError, match="color.*'cmyk'"):
        ImagePreprocessing.from_v01({**V01, "color": "cmyk"})
    with pytest.raises(ValueError, match=r"mean must have 3 value\(s\)"):
        ImagePreprocessing.from_v01({**V01, "color": "rgb", "mean": [0.1]})


def test_from_timm_modes():
    assert ImagePreprocessing.from_timm({**DEIT, "crop_pct": 0.9}).resize_size == (248, 248)  # floor(248.9)
    assert ImagePreprocessing.from_timm({**DEIT, "crop_pct": None}).resize_size == (256, 256)  # timm's 0.875
    wide = ImagePreprocessing.from_timm({**DEIT, "input_size": (3, 224, 320), "crop_pct": 1.0})
    assert (wide.resize, wide.resize_size, wide.size) == ("keep_ratio", (224, 320), (224, 320))
    squash = ImagePreprocessing.from_timm({**DEIT, "crop_mode": "squash", "crop_pct": 1.0})
    assert (squash.resize, squash.resize_size) == ("squash", (224, 224))
    gray = ImagePreprocessing.from_timm({**DEIT, "input_size": (1, 32, 32), "mean": (0.5,), "std": (0.25,)})
    assert gray.color == "L" and gray.channels == 1


def test_from_timm_refuses_what_it_cannot_reproduce():
    with pytest.raises(ValueError, match="crop_mode 'border'"):
        ImagePreprocessing.from_timm({**DEIT, "crop_mode": "border"})
    with pytest.raises(ValueError, match="interpolation 'random'"):
        ImagePreprocessing.from_timm({**DEIT, "interpolation": "random"})
    with pytest.raises(ValueError, match="'crop_border_pixels'"):
        ImagePreprocessing.from_timm({**DEIT, "crop_border_pixels": 2})
    with pytest.raises(ValueError, match="4 channels"):
        ImagePreprocessing.from_timm({**DEIT, "input_size": (4, 224, 224)})
    with pytest.raises(ValueError, match="input_size"):
        ImagePreprocessing.from_timm({k: v for k, v in DEIT.items() if k != "input_size"})
    with pytest.raises(ValueError, match=r"mean must have 1 value\(s\)"):  # timm's RGB mean on a 1-channel input
        ImagePreprocessing.from_timm({**DEIT, "input_size": (1, 224, 224)})


def test_geometry_follows_torchvision_and_timm():
    shorter = ImagePreprocessing.from_timm(DEIT)  # shorter side -> 256, longer int(256 * long / short)
    assert shorter.resized_size(300, 451) == (256, 384)  # int(384.85)
    assert shorter.resized_size(640, 427) == (383, 256)  # int(383.70)
    keep = ImagePreprocessing.from_timm({**DEIT, "input_size": (3, 160, 224), "crop_pct": 1.25})
    assert keep.resize_size == (128, 179)
    assert keep.resized_size(300, 451) == (128, 192)  # / min(300/128, 451/179), rounded
    # torchvision CenterCrop: pad where smaller (left/top get the floor half), round((H - h) / 2)
    pads, top, left = keep.crop_window(128, 192)
    assert pads == (16, 16, 16, 16) and (top, left) == (0, 0)
    pads, top, left = shorter.crop_window(256, 384)
    assert pads == (0, 0, 0, 0) and (top, left) == (16, 80)
    pads, top, left = shorter.crop_window(225, 300)
    assert pads == (0, 0, 0, 0) and (top, left) == (0, 38)  # round(0.5) == 0, round(38.0)
    odd = ImagePreprocessing(color="L", height=5, width=5, mean=[0], std=[1])
    assert odd.crop_window(2, 8) == ((1, 2, 0, 0), 0, 2)
    assert odd.is_identity_geometry(5, 5) and not odd.is_identity_geometry(5, 6)
