"""Torch mirrors of the edge's numpy token functions, for training and calibration.

``select_tokens_mask`` mirrors ``splitinfer.edge.selection.select_tokens`` and
``fake_quantize_int8`` mirrors the int8 per-token codec in ``splitinfer.protos.codec``; the parity
tests in tests/export feed both the same input.
"""
from __future__ import annotations

import torch

__all__ = ["select_tokens_mask", "keep_top_k_mask", "fake_quantize_int8", "with_cls"]

INT8_MAX = 127.0


def keep_top_k_mask(importance: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """importance (B, P), k (B,) int -> bool (B, P): the k most important patches per row.

    Ties break towards the lower index, as ``np.argsort(-x, kind="stable")`` does.
    """
    order = torch.argsort(importance, dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return ranks < k[:, None]


def select_tokens_mask(importance: torch.Tensor, mass: float, budget: int, min_tokens: int = 1) -> torch.Tensor:
    """importance (B, P) -> bool (B, P): per row, the patches ``select_tokens`` would send."""
    order = torch.argsort(importance, dim=-1, descending=True, stable=True)
    csum = importance.gather(-1, order).double().cumsum(-1)
    k = (csum < mass * csum[:, -1:]).sum(-1) + 1
    k = k.clamp(min=min(min_tokens, budget)).clamp(max=min(budget, importance.shape[-1]))
    return keep_top_k_mask(importance, k)


def with_cls(patch_mask: torch.Tensor) -> torch.Tensor:
    """(B, P) bool -> (B, 1 + P) bool with the CLS position always kept."""
    return torch.cat([torch.ones_like(patch_mask[:, :1]), patch_mask], dim=1)


def fake_quantize_int8(tokens: torch.Tensor) -> torch.Tensor:
    """tokens (..., d) float32 -> the same values after an int8 round trip with one scale per token.

    scale = max|x| / 127 (1 for an all-zero token); q = round-half-even(x / scale), in [-127, 127].
    """
    amax = tokens.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    q = torch.round(tokens / scale).clamp(-INT8_MAX, INT8_MAX)
    return q * scale
