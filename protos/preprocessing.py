"""How an image becomes the model's input: the manifest's ``preprocessing`` section for image models.

Export writes it, the edge applies it (``splitinfer.edge.preprocess``, Pillow) and export's own
data loaders apply it through the same code, so a model sees on the device exactly what it saw in
training and calibration. The steps, in order::

    decode -> colour ("L": ITU-R 601 luma, or "RGB") -> resize -> center crop to (height, width)
           -> polarity rule (grayscale only) -> (pixel * scale - mean[c]) / std[c] -> channel order
           -> float32 (B, C, height, width)

Resize modes (``resize_size`` = (rh, rw); timm's eval transform computes it as
``floor(size / crop_pct)``):

- ``"shorter_side"``: torchvision's ``Resize(int)``: the shorter side becomes rh (= rw), the
  longer ``int(rh * long / short)``; timm's center mode for square inputs.
- ``"keep_ratio"``: timm's ``ResizeKeepRatio(resize_size)``: scale by ``min(h / rh, w / rw)``,
  each side rounded; timm's center mode for non-square inputs.
- ``"squash"``: straight to (rh, rw), aspect ratio not kept; timm's squash mode, and the built-in
  model's plain resize to its input size (resize_size = (height, width): the crop then does nothing).

The center crop is torchvision's ``CenterCrop``: an image smaller than the crop is padded with
zeros, the offsets are ``int(round((H - height) / 2))``. Polarity ``"light_on_dark"`` (the
built-in model: bright strokes on a dark background, as MNIST) inverts an image whose border is
bright: more than half of the outermost ring of pixels at >= 128 (its median is bright), after
resize and crop, before normalization. ``"any"`` leaves every image as it is.

Standard library only: the pixel work lives with Pillow in ``splitinfer.edge.preprocess``.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

__all__ = [
    "ImagePreprocessing",
    "COLORS",
    "INTERPOLATIONS",
    "POLARITIES",
    "RESIZE_MODES",
    "POLARITY_BRIGHT_LEVEL",
]

KIND = "image"
COLORS = ("L", "RGB")
INTERPOLATIONS = ("nearest", "box", "bilinear", "hamming", "bicubic", "lanczos")  # Pillow's filters
POLARITIES = ("any", "light_on_dark")
RESIZE_MODES = ("shorter_side", "keep_ratio", "squash")
CHANNEL_ORDERS = {"L": ("L",), "RGB": ("RGB", "BGR")}
POLARITY_BRIGHT_LEVEL = 128  # a border pixel at or above this level counts as bright
TIMM_DEFAULT_CROP_PCT = 0.875  # timm.data.constants.DEFAULT_CROP_PCT, used when crop_pct is None

_V01_COLORS = {"grayscale": "L", "rgb": "RGB"}
_V01_FIELDS = ("color", "height", "width", "scale", "mean", "std", "layout")
_TIMM_FIELDS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
_REQUIRED = ("kind", "color", "height", "width", "resize", "resize_size", "interpolation", "scale", "mean", "std")


@dataclass(frozen=True)
class ImagePreprocessing:
    """The preprocessing of an image model, validated; see the module docstring for the steps.

    color: the model's input colour, "L" (1 channel) or "RGB" (3). height, width: the model's
    input size in pixels. resize, resize_size: how the decoded image is resized before the center
    crop to (height, width). interpolation: the Pillow filter for the resize. scale: multiplies
    uint8 pixels (1/255 maps them to [0, 1]). mean, std: one per channel, in RGB order, applied as
    ``(pixel * scale - mean) / std``. channel_order: the order of the channels in the model input,
    "L", "RGB" or "BGR" (None: "L" or "RGB" from color). polarity: "any" or "light_on_dark".
    layout: "NCHW" (the only one).
    """

    color: str
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: str = "squash"
    resize_size: tuple[int, int] | None = None  # None: (height, width)
    interpolation: str = "bilinear"
    scale: float = 1 / 255
    channel_order: str | None = None
    polarity: str = "any"
    layout: str = "NCHW"

    def __post_init__(self) -> None:
        _choice("color", self.color, COLORS)
        for name in ("height", "width"):
            _positive_int(name, getattr(self, name))
            object.__setattr__(self, name, int(getattr(self, name)))
        size = (self.height, self.width) if self.resize_size is None else self.resize_size
        if isinstance(size, (str, bytes)) or not hasattr(size, "__len__") or len(size) != 2:
            raise ValueError(f"preprocessing.resize_size must be [height, width], got {size!r}")
        for value in size:
            _positive_int("resize_size", value)
        object.__setattr__(self, "resize_size", (int(size[0]), int(size[1])))
        _choice("resize", self.resize, RESIZE_MODES)
        if self.resize == "shorter_side" and size[0] != size[1]:
            raise ValueError(f"preprocessing.resize_size must be square for resize 'shorter_side' "
                             f"(one length for the shorter side), got {list(size)}")
        _choice("interpolation", self.interpolation, INTERPOLATIONS)
        _finite("scale", self.scale)
        if self.scale <= 0:
            raise ValueError(f"preprocessing.scale must be > 0, got {self.scale!r}")
        object.__setattr__(self, "scale", float(self.scale))
        for name in ("mean", "std"):
            values = getattr(self, name)
            if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
                raise ValueError(f"preprocessing.{name} must be a list of {self.channels} number(s), got {values!r}")
            if len(values) != self.channels:
                raise ValueError(f"preprocessing.{name} must have {self.channels} value(s) for color "
                                 f"{self.color!r}, got {list(values)!r}")
            for value in values:
                _finite(name, value)
            object.__setattr__(self, name, tuple(float(v) for v in values))
        if any(s <= 0 for s in self.std):
            raise ValueError(f"preprocessing.std must be > 0, got {list(self.std)!r}")
        order = self.channel_order if self.channel_order is not None else CHANNEL_ORDERS[self.color][0]
        _choice("channel_order", order, CHANNEL_ORDERS[self.color], f" for color {self.color!r}")
        object.__setattr__(self, "channel_order", order)
        _choice("polarity", self.polarity, POLARITIES)
        if self.polarity == "light_on_dark" and self.color != "L":
            raise ValueError(f"preprocessing.polarity 'light_on_dark' needs color 'L', got {self.color!r}")
        _choice("layout", self.layout, ("NCHW",))

    # -- geometry (pure integers; the edge's Pillow code follows these) --------------------------

    @property
    def channels(self) -> int:
        return 1 if self.color == "L" else 3

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the model input."""
        return self.height, self.width

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of an image of (height, width) pixels after the resize step."""
        rh, rw = self.resize_size
        if self.resize == "squash":
            return rh, rw
        if self.resize == "shorter_side":  # torchvision.transforms.functional._compute_resized_output_size
            if width <= height:
                return int(rh * height / width), rh
            return rh, int(rh * width / height)
        ratio = min(height / rh, width / rw)  # timm.data.transforms.ResizeKeepRatio, longest=0
        return round(height / ratio), round(width / ratio)

    def crop_window(self, height: int, width: int) -> tuple[tuple[int, int, int, int], int, int]:
        """Center crop of an image of (height, width) to (self.height, self.width), as torchvision.

        Returns ((pad_top, pad_bottom, pad_left, pad_right), top, left): zero padding applied
        first (only where the image is smaller than the crop), then the crop's top-left corner in
        the padded image.
        """
        ch, cw = self.height, self.width
        pad_left = (cw - width) // 2 if cw > width else 0
        pad_top = (ch - height) // 2 if ch > height else 0
        pad_right = (cw - width + 1) // 2 if cw > width else 0
        pad_bottom = (ch - height + 1) // 2 if ch > height else 0
        height, width = height + pad_top + pad_bottom, width + pad_left + pad_right
        top = int(round((height - ch) / 2.0))
        left = int(round((width - cw) / 2.0))
        return (pad_top, pad_bottom, pad_left, pad_right), top, left

    def is_identity_geometry(self, height: int, width: int) -> bool:
        """True when an image of this size reaches the model unchanged by resize and crop."""
        return self.resized_size(height, width) == (height, width) == (self.height, self.width)

    # -- the manifest's dict ---------------------------------------------------------------------

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"kind": KIND}
        for key, value in asdict(self).items():
            out[key] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping) -> "ImagePreprocessing":
        """Read what ``to_dict`` writes. A missing required field or an unknown one is a ValueError."""
        if not isinstance(data, Mapping):
            raise ValueError(f"preprocessing must be an object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)} | {"kind"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"preprocessing has unknown field(s) {unknown}; known: {sorted(known)}")
        missing = [name for name in _REQUIRED if name not in data]
        if missing:
            raise ValueError(f"preprocessing is missing the field(s) {missing}")
        if data["kind"] != KIND:
            raise ValueError(f"preprocessing.kind must be {KIND!r} for an image model, got {data['kind']!r}")
        return cls(**{k: v for k, v in data.items() if k != "kind"})

    @classmethod
    def from_v01(cls, data: Mapping) -> "ImagePreprocessing":
        """Read the 0.1 format (``{"color": "grayscale", "height", "width", "scale", "mean", "std",
        "layout"}``): a plain bilinear resize to (height, width), no crop, no polarity rule, as the
        0.1 edge did. mean/std may be a number or a list."""
        if not isinstance(data, Mapping):
            raise ValueError(f"preprocessing must be an object, got {type(data).__name__}")
        unknown = sorted(set(data) - set(_V01_FIELDS))
        if unknown:
            raise ValueError(f"preprocessing (format 0.1) has unknown field(s) {unknown}; known: {list(_V01_FIELDS)}")
        for name in ("height", "width"):
            if name not in data:
                raise ValueError(f"preprocessing is missing the field {name!r}")
        color = data.get("color", "grayscale")
        if color not in _V01_COLORS:
            raise ValueError(f"preprocessing.color must be one of {sorted(_V01_COLORS)}, got {color!r}")
        color = _V01_COLORS[color]
        channels = 1 if color == "L" else 3
        return cls(
            color=color,
            height=data["height"],
            width=data["width"],
            mean=_per_channel("mean", data.get("mean", 0.0), channels),
            std=_per_channel("std", data.get("std", 1.0), channels),
            resize="squash",
            resize_size=None,
            interpolation="bilinear",
            scale=data.get("scale", 1 / 255),
            layout=data.get("layout", "NCHW"),
        )

    @classmethod
    def load(cls, data: Mapping) -> "ImagePreprocessing":
        """This format when the dict says ``"kind"``, else the 0.1 format."""
        if isinstance(data, Mapping) and "kind" in data:
            return cls.from_dict(data)
        return cls.from_v01(data)

    @classmethod
    def from_timm(cls, data_config: Mapping) -> "ImagePreprocessing":
        """From ``timm.data.resolve_data_config(...)``: the same pixels as timm's eval transform
        (``create_transform(**data_config)``: Resize, CenterCrop, ToTensor, Normalize).

        Crop modes "center" (or None) and "squash" are reproduced; "border" (pads with the mean
        colour), ``interpolation="random"`` and unknown keys are refused with a ValueError.
        """
        if not isinstance(data_config, Mapping):
            raise ValueError(f"timm data config must be a dict, got {type(data_config).__name__}")
        unknown = sorted(set(data_config) - set(_TIMM_FIELDS))
        if unknown:
            raise ValueError(f"timm data config has key(s) {unknown} that cannot be reproduced; "
                             f"known: {list(_TIMM_FIELDS)}")
        if "input_size" not in data_config:
            raise ValueError("timm data config is missing 'input_size'")
        input_size = data_config["input_size"]
        if not isinstance(input_size, (list, tuple)) or len(input_size) != 3:
            raise ValueError(f"timm input_size must be (channels, height, width), got {input_size!r}")
        channels, height, width = (int(v) for v in input_size)
        if channels not in (1, 3):
            raise ValueError(f"timm input_size has {channels} channels; only 1 (L) and 3 (RGB) are supported")
        interpolation = data_config.get("interpolation") or "bicubic"
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"timm interpolation {interpolation!r} cannot be reproduced at inference; "
                             f"use one of {list(INTERPOLATIONS)}")
        crop_pct = data_config.get("crop_pct") or TIMM_DEFAULT_CROP_PCT
        _finite("crop_pct", crop_pct)
        if not 0 < crop_pct <= 8:
            raise ValueError(f"timm crop_pct must be in (0, 8], got {crop_pct!r}")
        crop_mode = data_config.get("crop_mode") or "center"
        scale_size = (math.floor(height / crop_pct), math.floor(width / crop_pct))
        if crop_mode == "squash":
            resize = "squash"
        elif crop_mode == "center":
            resize = "shorter_side" if scale_size[0] == scale_size[1] else "keep_ratio"
        else:
            raise ValueError(f"timm crop_mode {crop_mode!r} cannot be reproduced; supported: 'center', 'squash'")
        mean = tuple(data_config.get("mean", (0.485, 0.456, 0.406)))
        std = tuple(data_config.get("std", (0.229, 0.224, 0.225)))
        return cls(
            color="L" if channels == 1 else "RGB",
            height=height,
            width=width,
            mean=mean,
            std=std,
            resize=resize,
            resize_size=scale_size,
            interpolation=interpolation,
            scale=1 / 255,
        )


def _choice(name: str, value, allowed, where: str = "") -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"preprocessing.{name} must be one of {list(allowed)}{where}, got {value!r}")


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"preprocessing.{name} must be a positive integer, got {value!r}")


def _finite(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"preprocessing.{name} must be a finite number, got {value!r}")


def _per_channel(name: str, value, channels: int) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != channels:
            raise ValueError(f"preprocessing.{name} must have {channels} value(s), got {list(value)!r}")
        return tuple(value)
    return (value,) * channels
