"""Adapters: upstream transformers seen as :class:`SplittableModel`, one module per library.

``vit`` (the built-in ViT), ``timm_vit`` (timm VisionTransformer), ``hf_bert`` (Hugging Face
BERT / MiniLM / DistilBERT). ``split`` cuts any of them into device and server halves with an exit
head and a token importance; ``split_export`` writes and verifies the ONNX halves.
"""
from __future__ import annotations

from .base import SplittableModel, UnsupportedModelError
from .split import ExitHead, SplitModel, TokenScorer

__all__ = ["SplittableModel", "UnsupportedModelError", "SplitModel", "ExitHead", "TokenScorer", "ADAPTERS"]

ADAPTERS = ("builtin", "timm", "hf")
