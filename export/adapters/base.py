"""The view every adapter gives of an upstream transformer: embed, blocks, final norm + head.

Shapes: B batch, N tokens (CLS first), d width, h heads. ``key_weights`` is float (B, N) in [0, 1]:
1 for a real token, 0 for padding or a pruned token. Attention uses it multiplicatively,
``softmax_w(s)_j = w_j exp(s_j) / sum_k w_k exp(s_k)``, which equals masked softmax when the
weights are 0/1 and lets a straight-through token mask pass gradients to a scorer in training.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn as nn

__all__ = ["SplittableModel", "UnsupportedModelError", "weighted_attention", "weighted_mean", "TASKS", "INPUT_KINDS"]

MASKED_SCORE = -1e9
TASKS = ("classification", "embedding")
INPUT_KINDS = ("image", "text")


class UnsupportedModelError(ValueError):
    """The model lacks a part the split needs (the message names it)."""


def weighted_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_weights: torch.Tensor | None,
                       scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k, v (B, h, N, hs), key_weights (B, N) float or None -> out (B, h, N, hs), attn (B, h, N, N)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q * scale) @ k.transpose(-2, -1)  # (B, h, N, N)
    if key_weights is None:
        attn = scores.softmax(dim=-1)
    else:
        w = key_weights[:, None, None, :].to(scores.dtype)  # (B, 1, 1, N)
        top = (scores + (w <= 0).to(scores.dtype) * MASKED_SCORE).amax(dim=-1, keepdim=True).detach()
        e = torch.exp((scores - top).clamp(max=0.0)) * w
        attn = e / e.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    return attn @ v, attn


def weighted_mean(x: torch.Tensor, key_weights: torch.Tensor | None) -> torch.Tensor:
    """x (B, N, d), key_weights (B, N) or None -> (B, d): the mean over real tokens."""
    if key_weights is None:
        return x.mean(dim=1)
    w = key_weights.to(x.dtype)[..., None]  # (B, N, 1)
    return (x * w).sum(dim=1) / w.sum(dim=1).clamp_min(1e-9)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, d) -> (B, h, N, d / h)."""
    B, N, d = x.shape
    return x.reshape(B, N, heads, d // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, h, N, hs) -> (B, N, h * hs)."""
    B, h, N, hs = x.shape
    return x.transpose(1, 2).reshape(B, N, h * hs)


class SplittableModel(nn.Module, ABC):
    """An upstream model seen as ``embed -> blocks[0..depth) -> head``, without copying its weights.

    Subclasses hold the upstream module (so ``state_dict`` keys stay the upstream ones under
    ``model.``) and recompute each block with :func:`weighted_attention`, which equals the
    upstream result on unmasked inputs and returns the attention the split needs.

    input_kind: "image" (inputs {"image": float (B, C, H, W)}) or "text" (inputs {"input_ids":
    int64 (B, T), "attention_mask": int64 (B, T)}). task: "classification" (head gives logits
    (B, K)) or "embedding" (head gives a vector (B, D)).
    """

    input_kind: str = "image"
    task: str = "classification"

    @property
    @abstractmethod
    def dim(self) -> int: ...

    @property
    @abstractmethod
    def depth(self) -> int: ...

    @property
    @abstractmethod
    def output_dim(self) -> int:
        """K classes or D embedding width."""

    @abstractmethod
    def embed(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """inputs -> tokens (B, N, d) with CLS at 0, and key weights (B, N) float (None: all real)."""

    @abstractmethod
    def block(self, index: int, x: torch.Tensor, key_weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Block ``index``: x (B, N, d) -> (B, N, d), attention (B, h, N, N)."""

    def cls_block(self, index: int, x: torch.Tensor, key_weights: torch.Tensor | None) -> torch.Tensor:
        """Block ``index``'s output at CLS alone: x (B, N, d) -> (B, 1, d), what a CLS exit head
        reads (an exit policy's second view needs no more). Adapters whose blocks can compute one
        query row override this; the default runs the whole block."""
        return self.block(index, x, key_weights)[0][:, :1]

    @abstractmethod
    def head(self, x: torch.Tensor, key_weights: torch.Tensor | None) -> torch.Tensor:
        """Final norm, pooling and head: x (B, N, d) -> (B, K) logits or (B, D) embedding."""

    @abstractmethod
    def example_inputs(self, batch: int = 2, length: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
        """Valid random inputs for export and parity checks (text: ``length`` tokens, ragged padding)."""

    @abstractmethod
    def manifest_fields(self) -> dict:
        """Manifest entries this model fixes: architecture, preprocessing, input, classes, tokens."""

    def classes(self) -> list[str]:
        return [] if self.task == "embedding" else [str(i) for i in range(self.output_dim)]

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The whole model on all tokens, as upstream computes it."""
        x, w = self.embed(inputs)
        for i in range(self.depth):
            x, _ = self.block(i, x, w)
        return self.head(x, w)

    def check(self) -> None:
        """Raise UnsupportedModelError when a structural assumption fails (subclasses extend)."""
        if self.task not in TASKS:
            raise UnsupportedModelError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.input_kind not in INPUT_KINDS:
            raise UnsupportedModelError(f"input kind must be one of {INPUT_KINDS}, got {self.input_kind!r}")


def missing_parts(module: nn.Module, parts: list[tuple[str, str]]) -> list[str]:
    """The ``(dotted path, what it is)`` entries that ``module`` lacks, as "path (what)" strings."""
    out = []
    for dotted, what in parts:
        try:
            require(module, dotted, what)
        except UnsupportedModelError:
            out.append(f"{dotted!r} ({what})")
    return out


def require(module: nn.Module, dotted: str, what: str) -> nn.Module:
    """``module.a.b`` or UnsupportedModelError naming the missing attribute and what it is for."""
    node = module
    for part in dotted.split("."):
        if part.isdigit() and isinstance(node, (nn.ModuleList, nn.Sequential)):
            node = node[int(part)] if int(part) < len(node) else None
        else:
            node = getattr(node, part, None)
        if node is None:
            raise UnsupportedModelError(
                f"{type(module).__name__} has no {dotted!r} ({what}); the split needs it")
    return node
