"""The built-in model's input normalization; what export writes to the manifest for it.

``builtin_preprocessing`` is the manifest's ``preprocessing`` section for the built-in ViT (a
plain bilinear resize to its input size, mean/std of MNIST, bright strokes on a dark background);
``normalize`` is the same arithmetic for canvases already at that size, used in training.
"""
from __future__ import annotations

import numpy as np

from splitinfer.protos.preprocessing import ImagePreprocessing

__all__ = ["PIXEL_MEAN", "PIXEL_STD", "builtin_preprocessing", "normalize", "preprocessing_spec"]

PIXEL_MEAN = 0.1307  # of pixel / 255
PIXEL_STD = 0.3081


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 (B, H, W) grayscale -> float32 (B, 1, H, W), (pixel / 255 - mean) / std."""
    x = images.astype(np.float32) / 255.0
    return ((x - PIXEL_MEAN) / PIXEL_STD)[:, None, :, :]


def builtin_preprocessing(image_size: int) -> ImagePreprocessing:
    """The built-in model's preprocessing: grayscale, resized straight to image_size x image_size
    (bilinear, no crop), MNIST mean/std, and polarity "light_on_dark" (it was trained on bright
    digits on black: a dark digit on white paper is inverted by the border rule)."""
    return ImagePreprocessing(
        color="L", height=image_size, width=image_size, mean=(PIXEL_MEAN,), std=(PIXEL_STD,),
        resize="squash", interpolation="bilinear", polarity="light_on_dark",
    )


def preprocessing_spec(image_size: int) -> dict:
    """The 0.1 manifest's preprocessing dict (no polarity rule); ``builtin_preprocessing(...).to_dict()``
    is the current one."""
    return {
        "color": "grayscale",
        "height": image_size,
        "width": image_size,
        "scale": 1 / 255,
        "mean": PIXEL_MEAN,
        "std": PIXEL_STD,
        "layout": "NCHW",
    }
