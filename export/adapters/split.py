"""A :class:`SplittableModel` cut at a layer, with an exit head and a token importance score.

Device half: ``embed -> blocks[:split] -> (exit output, tokens, importance)``; server half:
``blocks[split:] -> head`` over any subset of tokens (CLS first) with a padding mask. Importance is
either the CLS token's attention in the last device block (no training) or a learned,
budget-conditioned :class:`TokenScorer` (DynamicViT-style), trained by ``splitinfer.export.finetune``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..bottleneck import Bottleneck
from .base import SplittableModel, UnsupportedModelError, weighted_mean

__all__ = ["SplitModel", "Bottleneck", "ExitHead", "TokenScorer", "cls_attention_importance", "attention_priors", "top_k_token_mask",
           "keep_counts", "IMPORTANCE_KINDS"]

IMPORTANCE_KINDS = ("cls_attention", "learned")


def cls_attention_importance(attn: torch.Tensor, key_weights: torch.Tensor | None) -> torch.Tensor:
    """attn (B, h, N, N), key_weights (B, N) or None -> (B, N - 1): CLS attention to each non-CLS
    token, averaged over heads, zero on padding, each row summing to 1."""
    a = attn[:, :, 0, 1:].mean(dim=1)
    if key_weights is not None:
        a = a * key_weights[:, 1:].to(a.dtype)
    return a / a.sum(dim=-1, keepdim=True).clamp_min(1e-12)


def keep_counts(key_weights: torch.Tensor | None, num_tokens: int, batch: int, keep_ratio: float | torch.Tensor) -> torch.Tensor:
    """How many non-CLS tokens each row keeps: max(1, round(ratio * real non-CLS tokens)). int64 (B,)."""
    real = torch.full((batch,), num_tokens - 1, dtype=torch.float32) if key_weights is None \
        else key_weights[:, 1:].float().sum(dim=-1)
    ratio = torch.as_tensor(keep_ratio, dtype=torch.float32)
    return torch.clamp(torch.round(ratio * real), min=1).minimum(real.clamp_min(1)).long()


def top_k_token_mask(scores: torch.Tensor, k: torch.Tensor, key_weights: torch.Tensor | None) -> torch.Tensor:
    """scores (B, P), k (B,) int, key_weights (B, 1 + P) or None -> bool (B, 1 + P): CLS and the k
    best real tokens per row. Ties break towards the lower index (as the edge's stable argsort)."""
    if key_weights is not None:
        scores = scores.masked_fill(key_weights[:, 1:] <= 0, float("-inf"))
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    keep = ranks < k[:, None]
    if key_weights is not None:
        keep = keep & (key_weights[:, 1:] > 0)
    return torch.cat([torch.ones_like(keep[:, :1]), keep], dim=1)


class ExitHead(nn.Module):
    """tokens (B, N, d), key_weights (B, N) -> logits (B, K) from CLS, or an embedding (B, D) from
    the mean of real tokens (initialised to the identity when D == d)."""

    def __init__(self, dim: int, out_dim: int, task: str, normalize: bool = False):
        super().__init__()
        self.task, self.normalize = task, normalize
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, out_dim)
        if task == "embedding" and out_dim == dim:
            nn.init.eye_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)
        else:
            nn.init.trunc_normal_(self.proj.weight, std=0.02)
            nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, key_weights: torch.Tensor | None) -> torch.Tensor:
        if self.task == "classification":
            return self.proj(self.norm(x[:, 0]))
        out = self.proj(weighted_mean(self.norm(x), key_weights))
        return F.normalize(out, dim=-1) if self.normalize else out


def attention_priors(attn: torch.Tensor, key_weights: torch.Tensor | None) -> torch.Tensor:
    """attn (B, h, N, N), key_weights (B, N) or None -> (B, N - 1, 2): per non-CLS token, the log of
    the CLS token's attention to it and the log of the mean attention it receives from real tokens."""
    cls = attn[:, :, 0, 1:].mean(dim=1)  # (B, P)
    per_query = attn[:, :, :, 1:].mean(dim=1)  # (B, N, P)
    if key_weights is None:
        received = per_query.mean(dim=1)
    else:
        q = key_weights.to(attn.dtype)[:, :, None]  # (B, N, 1)
        received = (per_query * q).sum(dim=1) / q.sum(dim=1).clamp_min(1.0)
    return torch.stack([torch.log(cls + 1e-6), torch.log(received + 1e-6)], dim=-1)


class TokenScorer(nn.Module):
    """Budget-conditioned token scorer: tokens (B, N, d), key_weights, keep ratio, attention priors
    -> scores (B, N - 1). Higher = keep.

    Each non-CLS token is scored from its own features, the mean of the real tokens (global
    context, as in DynamicViT), the keep ratio it will be selected at, and the attention at the
    split (:func:`attention_priors`). It starts as CLS-attention ranking (prior weights (1, 0), the
    MLP's last layer at zero) and learns the correction.
    """

    def __init__(self, dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or max(32, dim // 2)
        self.norm = nn.LayerNorm(dim)
        self.local = nn.Linear(dim, hidden)
        self.context = nn.Linear(dim, hidden)
        self.ratio = nn.Linear(1, hidden)
        self.prior_in = nn.Linear(2, hidden)
        self.out = nn.Sequential(nn.GELU(), nn.Linear(hidden, hidden // 2), nn.GELU(), nn.Linear(hidden // 2, 1))
        self.prior = nn.Linear(2, 1)
        with torch.no_grad():
            self.out[-1].weight.zero_()
            self.out[-1].bias.zero_()
            self.prior.weight.copy_(torch.tensor([[1.0, 0.0]]))
            self.prior.bias.zero_()

    def forward(self, x: torch.Tensor, key_weights: torch.Tensor | None, keep_ratio, priors: torch.Tensor) -> torch.Tensor:
        """keep_ratio: float (B,) or scalar in (0, 1]; priors (B, N - 1, 2)."""
        h = self.norm(x)
        ctx = self.context(weighted_mean(h, key_weights))[:, None, :]  # (B, 1, hidden)
        r = torch.as_tensor(keep_ratio, dtype=x.dtype).reshape(-1, 1).expand(x.shape[0], 1)
        z = self.local(h[:, 1:]) + ctx + self.ratio(r)[:, None, :] + self.prior_in(priors)
        return self.prior(priors).squeeze(-1) + self.out(z).squeeze(-1)


class SplitModel(nn.Module):
    """backbone cut after ``split`` blocks, plus an exit head, (optionally) a learned scorer, and the
    learned bottlenecks trained for this split (width -> :class:`Bottleneck`; the backbone's own,
    ``native_bottlenecks(split)``, when it has them, as the built-in ViT does).

    keep_ratio: the share of real non-CLS tokens the scorer is conditioned on when exported.
    """

    def __init__(self, backbone: SplittableModel, split: int, exit_head: nn.Module | None = None,
                 scorer: TokenScorer | None = None, importance: str = "cls_attention", keep_ratio: float = 0.25,
                 bottlenecks: dict[int, Bottleneck] | None = None):
        super().__init__()
        backbone.check()
        if not 1 <= split < backbone.depth:
            raise ValueError(f"split must be in [1, depth={backbone.depth}), got {split}")
        if importance not in IMPORTANCE_KINDS:
            raise ValueError(f"importance must be one of {IMPORTANCE_KINDS}, got {importance!r}")
        if importance == "learned" and scorer is None:
            raise ValueError("importance='learned' needs a scorer")
        if not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
        self.backbone, self.split = backbone, split
        native = getattr(backbone, "native_exit_head", lambda s: None)(split)
        self.exit_head = exit_head or native or ExitHead(
            backbone.dim, backbone.output_dim, backbone.task, getattr(backbone, "normalize_output", False))
        self.scorer = scorer
        self.importance = importance
        self.keep_ratio = keep_ratio
        if bottlenecks is None:
            bottlenecks = getattr(backbone, "native_bottlenecks", lambda s: {})(split)
        self.bottlenecks = nn.ModuleDict({str(int(w)): b for w, b in sorted(bottlenecks.items())})
        for w, b in self.bottlenecks.items():
            if b.encoder.in_features != backbone.dim or b.encoder.out_features != int(w):
                raise ValueError(f"bottleneck {w} maps {b.encoder.in_features} -> {b.encoder.out_features}, "
                                 f"expected {backbone.dim} -> {w}")

    @property
    def bottleneck_widths(self) -> tuple[int, ...]:
        return tuple(int(w) for w in self.bottlenecks)

    def bottleneck(self, width: int | None) -> Bottleneck | None:
        """The bottleneck of ``width`` (None: no bottleneck); ValueError naming the trained widths."""
        if width is None:
            return None
        if str(width) not in self.bottlenecks:
            raise ValueError(f"this model has no learned bottleneck of width {width}; trained widths: "
                             f"{list(self.bottleneck_widths) or 'none'}")
        return self.bottlenecks[str(width)]

    def add_bottleneck(self, width: int) -> Bottleneck:
        """A fresh bottleneck of ``width`` (to train), registered with the model."""
        self.bottlenecks[str(int(width))] = Bottleneck(self.backbone.dim, int(width))
        return self.bottlenecks[str(int(width))]

    def device_tokens(self, inputs: dict[str, torch.Tensor]):
        """-> tokens (B, N, d), key_weights (B, N) or None, attention of the last device block."""
        x, w = self.backbone.embed(inputs)
        attn = None
        for i in range(self.split):
            x, attn = self.backbone.block(i, x, w)
        return x, w, attn

    def exit_only(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The exit output alone (a classifier's exit head reads CLS, so the last device block runs
        for CLS's row only): what an exit policy's second view computes."""
        x, w = self.backbone.embed(inputs)
        for i in range(self.split - 1):
            x, _ = self.backbone.block(i, x, w)
        if self.backbone.task == "classification":
            return self.exit_head(self.backbone.cls_block(self.split - 1, x, w), w)
        x, _ = self.backbone.block(self.split - 1, x, w)
        return self.exit_head(x, w)

    def importance_of(self, x, w, attn, keep_ratio=None) -> torch.Tensor:
        """(B, N - 1) non-negative, zero on padding, rows summing to 1."""
        if self.importance == "cls_attention":
            return cls_attention_importance(attn, w)
        scores = self.scorer(x, w, self.keep_ratio if keep_ratio is None else keep_ratio, attention_priors(attn, w))
        if w is not None:
            scores = scores + (w[:, 1:] <= 0).to(scores.dtype) * -1e9
        return scores.softmax(dim=-1)

    def device_forward(self, inputs: dict[str, torch.Tensor], keep_ratio=None):
        """-> exit output (B, K|D), tokens (B, N, d), importance (B, N - 1), key_weights (B, N) or None."""
        x, w, attn = self.device_tokens(inputs)
        return self.exit_head(x, w), x, self.importance_of(x, w, attn, keep_ratio), w

    def server_forward(self, tokens: torch.Tensor, key_weights: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T, d), CLS first; key_weights (B, T) bool or float (1 = real) -> (B, K|D)."""
        x = tokens
        w = None if key_weights is None else key_weights.to(tokens.dtype)
        for i in range(self.split, self.backbone.depth):
            x, _ = self.backbone.block(i, x, w)
        return self.backbone.head(x, w)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        _, x, _, w = self.device_forward(inputs)
        return self.server_forward(x, w)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The parts the recipe adds: exit head and scorer (the backbone comes from upstream)."""
        state = {f"exit_head.{k}": v for k, v in self.exit_head.state_dict().items()}
        state.update({f"bottlenecks.{k}": v for k, v in self.bottlenecks.state_dict().items()})
        if self.scorer is not None:
            state.update({f"scorer.{k}": v for k, v in self.scorer.state_dict().items()})
        return state


def require_task(backbone: SplittableModel, task: str) -> None:
    if backbone.task != task:
        raise UnsupportedModelError(f"this needs a {task} model, {type(backbone).__name__} is {backbone.task}")
