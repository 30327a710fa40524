"""Input normalization; its parameters are written to the manifest so the edge applies the same."""
from __future__ import annotations

import numpy as np

__all__ = ["PIXEL_MEAN", "PIXEL_STD", "normalize", "preprocessing_spec"]

PIXEL_MEAN = 0.1307  # of pixel / 255
PIXEL_STD = 0.3081


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 (B, H, W) grayscale -> float32 (B, 1, H, W), (pixel / 255 - mean) / std."""
    x = images.astype(np.float32) / 255.0
    return ((x - PIXEL_MEAN) / PIXEL_STD)[:, None, :, :]


def preprocessing_spec(image_size: int) -> dict:
    return {
        "color": "grayscale",
        "height": image_size,
        "width": image_size,
        "scale": 1 / 255,
        "mean": PIXEL_MEAN,
        "std": PIXEL_STD,
        "layout": "NCHW",
    }
