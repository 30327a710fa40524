"""Adapters: upstream transformers seen as :class:`SplittableModel`, one module per library, and
the one registry the CLI reads.

``builtin`` (the built-in ViT, :mod:`.vit`), ``timm`` (timm VisionTransformer / DeiT,
:mod:`.timm_vit`), ``hf`` (Hugging Face BERT / MiniLM / DistilBERT, :mod:`.hf_bert`).
:class:`SplitModel` cuts any of them into device and server halves with an exit head, a token
importance and learned bottlenecks. A new adapter is one module plus one :class:`Adapter` entry.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .base import SplittableModel, UnsupportedModelError
from .split import Bottleneck, ExitHead, SplitModel, TokenScorer

__all__ = ["SplittableModel", "UnsupportedModelError", "SplitModel", "ExitHead", "TokenScorer", "Bottleneck",
           "Adapter", "ADAPTERS", "load_backbone"]


@dataclass(frozen=True)
class Adapter:
    """name: the ``--adapter`` value. options: the CLI options it reads (any other model option
    given with it is refused). load: (options dict) -> SplittableModel. default_split: blocks on
    the device when ``--split`` is not given."""

    name: str
    help: str
    options: tuple[str, ...]
    load: Callable[[dict], SplittableModel]
    default_split: Callable[[SplittableModel], int]


def _builtin(o: dict) -> SplittableModel:
    if o.get("checkpoint") is None:
        raise ValueError("--adapter builtin needs --checkpoint (a file written by 'splitinfer-export train')")
    from ..train import load_checkpoint
    from .vit import BuiltinViT

    vit, _ = load_checkpoint(o["checkpoint"])
    return BuiltinViT(vit)


def _timm(o: dict) -> SplittableModel:
    if not o.get("timm_model"):
        raise ValueError("--adapter timm needs --timm-model NAME (and --checkpoint for weights)")
    from .timm_vit import load_timm_vit

    return load_timm_vit(o["timm_model"], o.get("checkpoint"), num_classes=o.get("num_classes"))


def _hf(o: dict) -> SplittableModel:
    if o.get("hf_model") is None:
        raise ValueError("--adapter hf needs --hf-model DIR")
    from .hf_bert import load_hf_encoder

    return load_hf_encoder(Path(o["hf_model"]), max_length=o.get("max_length"))


ADAPTERS = {a.name: a for a in (
    Adapter("builtin", "the built-in ViT, from a checkpoint of 'splitinfer-export train'", ("checkpoint",),
            _builtin, lambda b: b.cfg.split),
    Adapter("timm", "a timm VisionTransformer / DeiT (weights from --checkpoint)",
            ("timm_model", "checkpoint", "num_classes"), _timm, lambda b: b.depth // 2),
    Adapter("hf", "a Hugging Face BERT-family folder (config, weights, tokenizer.json)",
            ("hf_model", "max_length"), _hf, lambda b: b.depth // 2),
)}
MODEL_OPTIONS = ("checkpoint", "timm_model", "num_classes", "hf_model", "max_length")


def load_backbone(adapter: str, options: dict) -> tuple[SplittableModel, Adapter]:
    """The adapter's backbone from ``options``; ValueError for an unknown adapter or an option
    that does not apply to it (never silently ignored)."""
    if adapter not in ADAPTERS:
        raise ValueError(f"unknown adapter {adapter!r}; known: {', '.join(ADAPTERS)}")
    entry = ADAPTERS[adapter]
    stray = [k for k in MODEL_OPTIONS if options.get(k) is not None and k not in entry.options]
    if stray:
        flags = ", ".join("--" + k.replace("_", "-") for k in stray)
        raise ValueError(f"{flags} do(es) not apply to --adapter {adapter} (it takes "
                         f"{', '.join('--' + k.replace('_', '-') for k in entry.options)})")
    return entry.load(options), entry
