"""Torch mirrors of the edge's numpy token functions, for training and calibration.

``select_tokens_mask`` mirrors ``splitinfer.edge.selection.select_tokens`` and
``fake_quantize_int8`` mirrors the int8 per-token codec in ``splitinfer.protos.codec``; the parity
tests in tests/export feed both the same input.
"""
from __future__ import annotations

import torch

__all__ = ["select_tokens_mask", "keep_top_k_mask", "fake_quantize", "fake_quantize_int8", "with_cls"]

QMAX = {8: 127.0, 4: 7.0}


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


def fake_quantize(tokens: torch.Tensor, bits: int = 8, group_size: int = 0, scale_dtype: str = "fp32") -> torch.Tensor:
    """tokens (..., d) float32 -> the same values after the codec's int8/int4 round trip.

    Mirrors ``splitinfer.protos.codec.quantize``: scale = max|x| / qmax per token or per group of
    ``group_size`` values (rounded to float16 when ``scale_dtype`` is "fp16"; 1 where it is 0),
    q = round-half-even(x / scale) clipped to [-qmax, qmax].
    """
    qmax = QMAX[bits]
    shape = tokens.shape
    d = shape[-1]
    g = 1 if group_size == 0 else d // group_size
    grouped = tokens.reshape(*shape[:-1], g, d // g)
    scale = grouped.abs().amax(dim=-1, keepdim=True) / qmax
    if scale_dtype == "fp16":
        scale = scale.half().float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(grouped / scale).clamp(-qmax, qmax)
    return (q * scale).reshape(shape)


def fake_quantize_int8(tokens: torch.Tensor) -> torch.Tensor:
    """tokens (..., d) float32 -> the int8 per-token (float32 scale) round trip."""
    return fake_quantize(tokens, 8)
