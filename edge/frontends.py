"""Input front ends: what turns a user's input into the device half's inputs, as the manifest says.

    ImageFrontEnd  uint8 (H, W) gray or (H, W, 3) RGB, any size -> {"image": float32 (1, C, H', W')}
    TextFrontEnd   str -> {"input_ids", "attention_mask": int64 (1, T)}, T <= max_length (tokenizer.json)

``front_end_for(manifest)`` picks the one the model reads. Text needs ``tokenizers`` (the
``[text]`` extra); neither imports torch.
"""
from __future__ import annotations

from os import PathLike
from typing import Protocol

import numpy as np

from splitinfer.protos import graphs
from splitinfer.protos.errors import ManifestError
from splitinfer.protos.manifest import Manifest

__all__ = ["FrontEnd", "ImageFrontEnd", "TextFrontEnd", "TextTokenizer", "front_end_for"]


class FrontEnd(Protocol):
    kind: str

    def __call__(self, raw) -> dict: ...


class ImageFrontEnd:
    """Images preprocessed exactly as the manifest's ``input.preprocessing`` says."""

    kind = "image"

    def __init__(self, preprocessing) -> None:
        from .preprocess import as_preprocessing

        self.spec = as_preprocessing(preprocessing)

    def load(self, path) -> np.ndarray:
        """An image file as this model reads it (its colour: gray or RGB)."""
        from .preprocess import load_image

        return load_image(path, self.spec.color)

    def __call__(self, image) -> dict:
        from .preprocess import preprocess

        image = np.asarray(image)
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (1, 3, 4)):
            raise ValueError(f"an image is uint8 (H, W) or (H, W, 3), got shape {image.shape}; use classify_many "
                             "for a batch")
        return {graphs.IMAGE: preprocess(image, self.spec)}


class TextTokenizer:
    """A ``tokenizer.json`` (Hugging Face ``tokenizers``) -> int64 ids and attention mask, numpy."""

    def __init__(self, path: str | PathLike, max_length: int):
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise ImportError("the text path needs the tokenizers package: pip install 'splitinfer[text]'") from exc
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self.max_length = max_length
        self._tok = Tokenizer.from_file(str(path))
        self._tok.no_padding()
        self._tok.enable_truncation(max_length)

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """texts -> input_ids int64 (B, T), attention_mask int64 (B, T); padded to the longest, T <= max_length."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of strings")
        encodings = self._tok.encode_batch(list(texts))
        length = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(encodings), length), dtype=np.int64)
        mask = np.zeros((len(encodings), length), dtype=np.int64)
        for i, e in enumerate(encodings):
            ids[i, :len(e.ids)] = e.ids
            mask[i, :len(e.ids)] = 1
        return ids, mask

    def truncated_text(self, text: str) -> str:
        """The part of ``text`` the model reads (what the tokenizer keeps within max_length)."""
        enc = self._tok.encode(text)
        spans = [o for o in enc.offsets if o != (0, 0)]
        return text[spans[0][0]:spans[-1][1]] if spans else ""


class TextFrontEnd:
    kind = "text"

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self.tokenizer = tokenizer

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> "TextFrontEnd":
        path = manifest.path("tokenizer")
        if not path.is_file():
            raise ManifestError(f"{manifest.folder}: tokenizer {path.name} not found")
        manifest.verify(("tokenizer",))
        return cls(TextTokenizer(path, manifest.input.max_length))

    def __call__(self, text) -> dict:
        if not isinstance(text, str):
            raise ValueError(f"a text model takes a string, got {type(text).__name__}")
        if not text.strip():
            raise ValueError("empty text")
        ids, mask = self.tokenizer.encode([text])
        return {graphs.INPUT_IDS: ids, graphs.ATTENTION_MASK: mask}


def front_end_for(manifest: Manifest) -> FrontEnd:
    if manifest.input.kind == "image":
        return ImageFrontEnd(manifest.preprocessing)
    return TextFrontEnd.from_manifest(manifest)
