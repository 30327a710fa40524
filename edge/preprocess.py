"""Images in, model input out: decoding and preprocessing exactly as the manifest's ``preprocessing``.

``ImagePreprocessing`` (``splitinfer.protos.preprocessing``) says what to do; this module does it
with Pillow, the way timm's and torchvision's eval transforms do on PIL images (Pillow's resize,
torchvision's center crop, ``(pixel * scale - mean) / std``), so a timm model sees the pixels it
would see under ``timm.data.create_transform``. export's data loaders call the same functions.

Decoding rule (``load_image``): PNG, JPEG, WebP (anything Pillow reads), any size; the EXIF
orientation is applied; the first frame of a multi-frame file; then one of two arrays:

- grayscale modes ("1", "L", 16-bit "I;16*" and 32-bit "I" scaled as ``value / 257`` rounded,
  clipped to 16 bits) -> uint8 (H, W);
- colour modes (RGB, palette, CMYK, YCbCr, ...) -> uint8 (H, W, 3);
- transparency (RGBA, LA, palette with a transparent entry) is composited over white, then as above.

Pillow and numpy only; no torch.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from os import PathLike
from pathlib import Path
from typing import Iterable, Mapping, Sequence, Union

import numpy as np
from PIL import Image, ImageOps

from splitinfer.protos.preprocessing import POLARITY_BRIGHT_LEVEL, ImagePreprocessing

__all__ = [
    "IMAGE_SUFFIXES",
    "ImagePreprocessing",
    "PreparedImages",
    "PreprocessSpec",
    "as_preprocessing",
    "image_paths",
    "load_image",
    "prepare_images",
    "preprocess",
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "hamming": Image.Resampling.HAMMING,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
_WIDE_GRAY_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}

ImageInput = Union[np.ndarray, Image.Image, Sequence[Union[np.ndarray, Image.Image]]]


class PreprocessSpec:
    """The 0.1 name: ``PreprocessSpec.from_dict(d)`` reads either format into an ImagePreprocessing."""

    from_dict = staticmethod(ImagePreprocessing.load)


def as_preprocessing(spec: ImagePreprocessing | Mapping) -> ImagePreprocessing:
    """An ImagePreprocessing as given, or read from the manifest's dict (this format or 0.1)."""
    if isinstance(spec, ImagePreprocessing):
        return spec
    return ImagePreprocessing.load(spec)


# -- files ---------------------------------------------------------------------------------------

def load_image(path: str | PathLike, color: str | None = None) -> np.ndarray:
    """Read an image file: uint8 (H, W) for grayscale, (H, W, 3) for colour (the module's rule).

    color: None keeps the file's own ("L" or "RGB"); "L" or "RGB" converts (ITU-R 601 luma, or
    the gray value in all three channels). A missing, unreadable or non-image file raises
    ValueError naming the file.
    """
    if color not in (None, "L", "RGB"):
        raise ValueError(f"color must be None, 'L' or 'RGB', got {color!r}")
    try:
        with Image.open(path) as img:
            img.load()
            img = _standard_mode(ImageOps.exif_transpose(img))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from exc
    if color is not None and img.mode != color:
        img = img.convert(color)
    return np.asarray(img, dtype=np.uint8).copy()


def image_paths(paths: Iterable[str | PathLike]) -> list[tuple[Path, str | None]]:
    """The inputs a command line names: each (path, problem or None).

    A file is kept as given (whatever its name; decoding tells whether it is an image). A
    directory gives its files ending in .png, .jpg, .jpeg or .webp (any case), sorted by name, not
    descending into sub-directories; a directory without one gives one problem entry, as does a
    path that does not exist.
    """
    out: list[tuple[Path, str | None]] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                out.append((path, f"{path}: no {'/'.join(IMAGE_SUFFIXES)} files in this directory"))
            out.extend((p, None) for p in found)
        elif path.exists():
            out.append((path, None))
        else:
            out.append((path, f"{path}: no such file or directory"))
    return out


def _standard_mode(img: Image.Image) -> Image.Image:
    """Any Pillow image -> mode "L" or "RGB" by the module's rule."""
    if img.mode in ("L", "RGB"):
        return img
    if img.mode in _WIDE_GRAY_MODES:
        wide = np.asarray(img, dtype=np.int64)
        return Image.fromarray(np.rint(np.clip(wide, 0, 65535) / 257.0).astype(np.uint8))
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in _ALPHA_MODES:
        gray = img.mode in ("LA", "La")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img.convert("RGBA"))
        return img.convert("L" if gray else "RGB")
    if img.mode in ("1", "F"):
        return img.convert("L")
    return img.convert("RGB")


# -- preprocessing ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class PreparedImages:
    """pixels: float32 (B, C, H, W), the model input. inverted: bool (B,), which images the
    polarity rule inverted (all False unless the polarity is "light_on_dark")."""

    pixels: np.ndarray
    inverted: np.ndarray


def preprocess(images: ImageInput, spec: ImagePreprocessing | Mapping) -> np.ndarray:
    """Images -> float32 (B, C, H, W), exactly as ``spec`` says (see ``prepare_images``)."""
    return prepare_images(images, spec).pixels


def prepare_images(images: ImageInput, spec: ImagePreprocessing | Mapping) -> PreparedImages:
    """Images -> the model input and the polarity decisions.

    images: uint8 (H, W) one grayscale image, (H, W, 3) one RGB image, (B, H, W) grayscale or
    (B, H, W, 3) RGB batch, a PIL image, or a sequence of such single images of any sizes. (A
    3-D array whose last axis is 3 is one RGB image.) spec: an ImagePreprocessing or the manifest's
    dict. A batch already at the model's size and colour takes a vectorized path without Pillow.
    """
    spec = as_preprocessing(spec)
    batch = _as_batch(images)
    if isinstance(batch, np.ndarray):
        b, h, w = batch.shape[:3]
        native_color = "RGB" if batch.ndim == 4 else "L"
        if spec.is_identity_geometry(h, w) and not (native_color == "RGB" and spec.color == "L"):
            return _normalize(batch, spec)
        batch = list(batch)
    resized = [_to_model_size(image, spec) for image in batch]
    if spec.color == "RGB" and any(r.ndim == 2 for r in resized):
        resized = [np.repeat(r[:, :, None], 3, axis=2) if r.ndim == 2 else r for r in resized]
    return _normalize(np.stack(resized), spec)


def _as_batch(images: ImageInput) -> np.ndarray | list:
    """A uint8 batch array (B, H, W) / (B, H, W, 3), or a list of single images."""
    if isinstance(images, Image.Image):
        return [images]
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("images is an empty sequence")
        for image in images:
            if not isinstance(image, Image.Image):
                _check_array(np.asarray(image), single=True)
        return list(images)
    array = np.asarray(images)
    _check_array(array, single=False)
    if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] == 3):
        array = array[None]
    return array


def _check_array(array: np.ndarray, single: bool) -> None:
    if array.dtype != np.uint8:
        raise ValueError(f"images must be uint8 pixels, got dtype {array.dtype} (load_image reads files)")
    rgb = array.ndim >= 3 and array.shape[-1] == 3
    allowed = (2, 3) if single else (2, 3, 4)
    if array.ndim not in allowed or (array.ndim == 4 and not rgb) or (single and array.ndim == 3 and not rgb) \
            or 0 in array.shape:
        what = "(H, W) or (H, W, 3)" if single else "(H, W), (H, W, 3), (B, H, W) or (B, H, W, 3)"
        raise ValueError(f"images must have shape {what}, got {array.shape}")


def _to_model_size(image: np.ndarray | Image.Image, spec: ImagePreprocessing) -> np.ndarray:
    """One image -> uint8 (height, width) or (height, width, 3): colour, resize, center crop.

    A grayscale image for an RGB model stays one channel here (the caller repeats it: resizing
    one channel and repeating it gives the same pixels as resizing its RGB copy).
    """
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.ascontiguousarray(image))
    img = _standard_mode(img)
    if spec.color == "L" and img.mode == "RGB":
        img = img.convert("L")
    rh, rw = spec.resized_size(img.height, img.width)
    if (rh, rw) != (img.height, img.width):
        img = img.resize((rw, rh), _FILTERS[spec.interpolation])
    pixels = np.asarray(img, dtype=np.uint8)
    (pt, pb, pl, pr), top, left = spec.crop_window(rh, rw)
    if pt or pb or pl or pr:
        pixels = np.pad(pixels, ((pt, pb), (pl, pr)) + ((0, 0),) * (pixels.ndim - 2))
    return pixels[top:top + spec.height, left:left + spec.width]


def _normalize(batch: np.ndarray, spec: ImagePreprocessing) -> PreparedImages:
    """uint8 (B, H, W) or (B, H, W, 3) at the model's size -> float32 (B, C, H, W) and polarity."""
    any_inverted = False
    if spec.polarity == "light_on_dark":  # spec.color is "L", so batch is (B, H, W)
        inverted = _bright_border(batch)
        any_inverted = bool(inverted.any())
    else:
        inverted = np.zeros(len(batch), dtype=bool)
    gain, offset = _affine(spec)  # float32 (C,) each, in RGB order
    if spec.color == "L":
        x = batch.astype(np.float32)
        x *= gain[0]
        x += offset[0]
        if any_inverted:  # (255 - v) * gain + offset == (255 * gain + 2 * offset) - x
            x[inverted] = np.float32(255 * gain[0] + 2 * offset[0]) - x[inverted]
            logger.debug("polarity: inverted %d of %d image(s) with a bright border", inverted.sum(), len(x))
        return PreparedImages(x[:, None], inverted)  # (B, 1, H, W)
    out = np.empty((len(batch), 3, spec.height, spec.width), dtype=np.float32)
    order = (0, 1, 2) if spec.channel_order == "RGB" else (2, 1, 0)
    for k, c in enumerate(order):
        np.multiply(batch if batch.ndim == 3 else batch[..., c], gain[c], out=out[:, k], dtype=np.float32)
        out[:, k] += offset[c]
    return PreparedImages(out, inverted)


def _bright_border(batch: np.ndarray) -> np.ndarray:
    """uint8 (B, H, W) -> bool (B,): more than half of the outermost ring is >= the bright level."""
    ring = _ring_indices(*batch.shape[1:])
    bright = batch.reshape(len(batch), -1)[:, ring] >= POLARITY_BRIGHT_LEVEL  # (B, n)
    if len(batch) == 1:  # the edge's usual call: a scalar count is several times cheaper
        return np.array([2 * np.count_nonzero(bright) > ring.size])
    return 2 * bright.sum(axis=1) > ring.size


@lru_cache(maxsize=32)
def _ring_indices(height: int, width: int) -> np.ndarray:
    """int64 (n,): flat indices of the outermost ring of pixels of a (height, width) image."""
    mask = np.zeros((height, width), dtype=bool)
    mask[[0, -1], :] = True
    mask[:, [0, -1]] = True
    return np.flatnonzero(mask)


@lru_cache(maxsize=32)
def _affine(spec: ImagePreprocessing) -> tuple[np.ndarray, np.ndarray]:
    """float32 (C,) gain and offset with ``v * gain + offset == (v * scale - mean) / std``
    (computed in float64, rounded once: within 1e-6 of the three float32 steps)."""
    mean = np.asarray(spec.mean, dtype=np.float64)
    std = np.asarray(spec.std, dtype=np.float64)
    return (spec.scale / std).astype(np.float32), (-mean / std).astype(np.float32)
