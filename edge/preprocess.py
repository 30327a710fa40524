"""Image loading and normalization on the device, as the manifest's ``preprocessing`` says.

The model folder's manifest holds the exact normalization the model was trained with::

    {"color": "grayscale", "height": 64, "width": 64, "scale": 1/255,
     "mean": 0.1307, "std": 0.3081, "layout": "NCHW"}

and ``preprocess`` applies ``(pixel * scale - mean) / std`` to uint8 pixels, the same arithmetic
as ``splitinfer.export.preprocess.normalize``. Pillow and numpy only.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from os import PathLike
from typing import Mapping

import numpy as np
from PIL import Image

__all__ = ["PreprocessSpec", "load_image", "preprocess"]

logger = logging.getLogger(__name__)

_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


@dataclass(frozen=True)
class PreprocessSpec:
    """The manifest's ``preprocessing`` block, validated.

    height, width: the model's input size in pixels. scale: multiplies uint8 pixels (1/255 maps to
    [0, 1]). mean, std: applied after scaling, ``(pixel * scale - mean) / std``.
    """

    height: int
    width: int
    scale: float = 1 / 255
    mean: float = 0.0
    std: float = 1.0
    color: str = "grayscale"
    layout: str = "NCHW"

    def __post_init__(self) -> None:
        if self.color != "grayscale":
            raise ValueError(f"preprocessing.color must be 'grayscale', got {self.color!r}")
        if self.layout != "NCHW":
            raise ValueError(f"preprocessing.layout must be 'NCHW', got {self.layout!r}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"preprocessing.{name} must be a positive integer, got {value!r}")
        for name in ("scale", "mean", "std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
                raise ValueError(f"preprocessing.{name} must be a finite number, got {value!r}")
        if self.std <= 0:
            raise ValueError(f"preprocessing.std must be > 0, got {self.std}")
        if self.scale <= 0:
            raise ValueError(f"preprocessing.scale must be > 0, got {self.scale}")

    @classmethod
    def from_dict(cls, spec: Mapping) -> "PreprocessSpec":
        """Build from the manifest's dict; a one-element list for mean/std (one channel) is accepted."""
        try:
            return cls(
                height=spec["height"],
                width=spec["width"],
                scale=spec.get("scale", 1 / 255),
                mean=_one_channel(spec.get("mean", 0.0), "mean"),
                std=_one_channel(spec.get("std", 1.0), "std"),
                color=spec.get("color", "grayscale"),
                layout=spec.get("layout", "NCHW"),
            )
        except KeyError as exc:
            raise ValueError(f"preprocessing is missing the field {exc.args[0]!r}") from exc


def _one_channel(value, name: str):
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise ValueError(f"preprocessing.{name} must have one value (grayscale), got {value!r}")
        return value[0]
    return value


def load_image(path: str | PathLike) -> np.ndarray:
    """Read an image file as grayscale: returns uint8 (H, W).

    Any Pillow mode is converted to "L" (ITU-R 601 luma for colour; alpha is dropped). 16-bit
    grayscale is scaled to 8 bits (value / 257) rather than clipped. Multi-frame files give their
    first frame. A missing, unreadable or non-image file raises ValueError naming the file.
    """
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in _SIXTEEN_BIT_MODES:
                wide = np.asarray(img, dtype=np.int64)
                return np.rint(np.clip(wide, 0, 65535) / 257.0).astype(np.uint8)
            return np.asarray(img.convert("L"), dtype=np.uint8).copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from exc


def preprocess(images: np.ndarray, spec: Mapping | PreprocessSpec) -> np.ndarray:
    """uint8 (H, W) or (B, H, W) grayscale -> float32 (B, 1, H', W'), (pixel * scale - mean) / std.

    (H', W') is the manifest's (height, width). Images of another size are resized to it with
    Pillow's bilinear filter (which widens its support when shrinking, so downscaling is
    antialiased); the aspect ratio is not preserved.
    """
    if not isinstance(spec, PreprocessSpec):
        spec = PreprocessSpec.from_dict(spec)
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 grayscale pixels, got dtype {images.dtype}")
    if images.ndim == 2:
        images = images[None]
    if images.ndim != 3 or images.shape[0] == 0 or images.shape[1] == 0 or images.shape[2] == 0:
        raise ValueError(f"images must have shape (H, W) or (B, H, W), got {images.shape}")
    if images.shape[1:] != (spec.height, spec.width):
        logger.debug("resizing %s to %dx%d (bilinear)", images.shape[1:], spec.height, spec.width)
        images = np.stack([_resize(img, spec.height, spec.width) for img in images])
    x = images.astype(np.float32) * np.float32(spec.scale)
    x = (x - np.float32(spec.mean)) / np.float32(spec.std)
    return x[:, None, :, :]  # (B, 1, H, W)


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (h, w) -> uint8 (height, width), Pillow bilinear."""
    resized = Image.fromarray(np.ascontiguousarray(image)).resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8)
