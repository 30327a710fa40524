"""Fine-tune an existing model's exit head and token scorer, by distillation from its own output.

For a :class:`~splitinfer.export.adapters.split.SplitModel`, per batch (no labels needed):

    teacher      = the full model on all tokens (the original model, frozen)
    exit loss    = D(exit_head(tokens at the split), teacher output)
    scorer loss  = rollout_weight * CE(rollout, softmax(scores))
                 + straight_through_weight * D(server_half(tokens, straight-through top-k mask), teacher output)

D is KL divergence at a temperature for classifiers and ``1 - cosine`` for embedding models; with
labels, cross-entropy is added. ``rollout`` is what the teacher's server half reads: the attention
rollout from its final CLS back to the split-layer tokens, on all tokens. Each sample draws a keep
ratio r and the scorer is conditioned on it. The straight-through term (as in DynamicViT and
2505.17604: the hard top-k mask at k = round(r * real tokens), Gumbel-perturbed, goes forward; a
sigmoid around the k-th standardised score carries the gradient; attention keys and pooling are
weighted by the mask) trains the scorer directly on the server half's output on pruned tokens.
Measured here it degrades the CLS-initialised ranking on held-out data at every weight tried
(MiniLM: 0.02 already costs 2 points of cosine), so it is off by default and kept as an option;
the rollout target alone beats CLS attention (benchmarks/token_selection.py). Plain top-k at
inference. The backbone stays frozen, or is tuned lightly (``backbone="light"``: a small learning
rate, the teacher kept as a frozen copy). With a frozen backbone, ``cache_batches`` batches are
run through the device half and the teacher once and then reused, so a step costs only the scorer
(and, with the straight-through term, the server half).
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from .adapters.split import (SplitModel, TokenScorer, attention_priors, cls_attention_importance, keep_counts,
                             top_k_token_mask)

__all__ = ["FinetuneConfig", "finetune", "distill_loss", "straight_through_mask", "standardize_scores", "pruned_output",
           "SELECTORS", "rollout_importance"]

log = logging.getLogger(__name__)

SELECTORS = ("cls_attention", "learned")
Batch = tuple[dict[str, torch.Tensor], "torch.Tensor | None"]


@dataclass(frozen=True)
class FinetuneConfig:
    """steps, batch size (set by the batch source) and learning rates; keep ratios drawn per sample
    from [min_keep, max_keep]; tau: Gumbel noise and relaxation temperature; distill_temperature:
    KL temperature for classifiers; backbone: "frozen" or "light" (tuned at backbone_lr)."""

    steps: int = 300
    lr: float = 1e-3
    weight_decay: float = 0.01
    min_keep: float = 0.2
    max_keep: float = 0.6
    tau: float = 0.5
    distill_temperature: float = 2.0
    label_weight: float = 1.0
    backbone: str = "frozen"
    backbone_lr: float = 1e-5
    cache_batches: int = 0
    rollout_weight: float = 1.0
    straight_through_weight: float = 0.0
    train_exit: bool = True
    train_scorer: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.lr <= 0 or self.backbone_lr <= 0:
            raise ValueError(f"learning rates must be > 0, got {self.lr}, {self.backbone_lr}")
        if not 0.0 < self.min_keep <= self.max_keep <= 1.0:
            raise ValueError(f"need 0 < min_keep <= max_keep <= 1, got {self.min_keep}, {self.max_keep}")
        if self.tau <= 0 or self.distill_temperature <= 0:
            raise ValueError(f"tau and distill_temperature must be > 0, got {self.tau}, {self.distill_temperature}")
        if self.backbone not in ("frozen", "light"):
            raise ValueError(f"backbone must be 'frozen' or 'light', got {self.backbone!r}")
        if self.rollout_weight < 0 or self.straight_through_weight < 0 or not (self.rollout_weight or self.straight_through_weight):
            raise ValueError(f"loss weights must be >= 0 and not both 0, got {self.rollout_weight}, {self.straight_through_weight}")
        if self.cache_batches < 0 or self.cache_batches and self.backbone != "frozen":
            raise ValueError(f"cache_batches must be >= 0 and needs a frozen backbone, got {self.cache_batches}")
        if not (self.train_exit or self.train_scorer):
            raise ValueError("nothing to train: train_exit and train_scorer are both False")


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, task: str, temperature: float = 2.0) -> torch.Tensor:
    """student, teacher (B, K) logits or (B, D) embeddings -> scalar loss."""
    if task == "classification":
        t = temperature
        return F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1),
                        log_target=True, reduction="batchmean") * t * t
    return (1.0 - F.cosine_similarity(student, teacher, dim=-1)).mean()


def straight_through_mask(scores: torch.Tensor, k: torch.Tensor, key_weights: torch.Tensor | None,
                          tau: float) -> torch.Tensor:
    """scores (B, P), k (B,), key_weights (B, 1 + P) -> float (B, 1 + P): the hard top-k mask
    (CLS kept) forward, the gradient of sigmoid((score - boundary) / tau) backward."""
    hard = top_k_token_mask(scores, k, key_weights).to(scores.dtype)
    masked = scores if key_weights is None else scores.masked_fill(key_weights[:, 1:] <= 0, float("-inf"))
    ranked = masked.sort(dim=-1, descending=True).values.detach()
    s_k = ranked.gather(-1, (k - 1).clamp_min(0)[:, None])
    s_next = ranked.gather(-1, k.clamp(max=scores.shape[-1] - 1)[:, None])
    boundary = torch.where(torch.isfinite(s_next) & (k[:, None] < scores.shape[-1]), (s_k + s_next) / 2, s_k - 1.0)
    soft = torch.sigmoid((scores - boundary) / tau)
    soft = torch.cat([torch.ones_like(soft[:, :1]), soft], dim=1)
    mask = hard + soft - soft.detach()
    return mask if key_weights is None else mask * key_weights.to(mask.dtype)


def standardize_scores(scores: torch.Tensor, key_weights: torch.Tensor | None) -> torch.Tensor:
    """scores (B, P) -> (scores - mean) / std over each row's real tokens (both detached): the same
    ranking, on a fixed scale, so the relaxation temperature and the noise keep their meaning."""
    valid = torch.ones_like(scores) if key_weights is None else (key_weights[:, 1:] > 0).to(scores.dtype)
    n = valid.sum(-1, keepdim=True).clamp_min(1.0)
    mean = ((scores * valid).sum(-1, keepdim=True) / n).detach()
    std = torch.sqrt((((scores - mean) ** 2) * valid).sum(-1, keepdim=True) / n).detach().clamp_min(1e-3)
    return (scores - mean) / std


def pruned_output(model: SplitModel, x: torch.Tensor, w: torch.Tensor | None, attn: torch.Tensor,
                  keep_ratio: float, selector: str) -> torch.Tensor:
    """The server half's output on the tokens ``selector`` keeps at ``keep_ratio`` (plain top-k)."""
    if selector == "cls_attention":
        scores = cls_attention_importance(attn, w)
    elif selector == "learned":
        if model.scorer is None:
            raise ValueError("selector 'learned' needs a trained scorer")
        scores = model.scorer(x, w, keep_ratio, attention_priors(attn, w))
    else:
        raise ValueError(f"selector must be one of {SELECTORS}, got {selector!r}")
    k = keep_counts(w, x.shape[1], x.shape[0], keep_ratio)
    return model.server_forward(x, top_k_token_mask(scores, k, w))


@torch.no_grad()
def rollout_importance(backbone, split: int, x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """How much the final CLS reads each split-layer token, through the server blocks on all tokens.

    x (B, N, d) at the split -> (B, N - 1), rows summing to 1 over real tokens: attention rollout
    (Abnar & Zuidema 2020), R = prod_l (A_l + I) / 2 over blocks[split:], heads averaged, row R[0].
    """
    B, N, _ = x.shape
    eye = torch.eye(N, dtype=x.dtype)
    rollout, h = eye.expand(B, N, N), x
    for i in range(split, backbone.depth):
        h, attn = backbone.block(i, h, w)
        rollout = (0.5 * attn.mean(dim=1) + 0.5 * eye) @ rollout
    t = rollout[:, 0, 1:]
    if w is not None:
        t = t * (w[:, 1:] > 0).to(t.dtype)
    return t / t.sum(dim=-1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def _forward_frozen(model: SplitModel, teacher, inputs, labels):
    x, w, attn = model.device_tokens(inputs)
    return x, w, attention_priors(attn, w), teacher(inputs), rollout_importance(teacher, model.split, x, w), labels


def finetune(model: SplitModel, batches: Callable[[int], Iterator[Batch]], cfg: FinetuneConfig = FinetuneConfig(),
             progress: bool = False) -> dict:
    """Train ``model.exit_head`` and ``model.scorer`` (created if missing) in place.

    batches(seed) yields (inputs, labels or None) forever (or at least ``cfg.steps`` times).
    Sets ``model.importance = "learned"`` when the scorer was trained. Returns a summary dict.
    """
    torch.manual_seed(cfg.seed)
    backbone, task = model.backbone, model.backbone.task
    if cfg.train_scorer and model.scorer is None:
        model.scorer = TokenScorer(backbone.dim)
    teacher = copy.deepcopy(backbone).eval() if cfg.backbone == "light" else backbone
    for p in teacher.parameters():
        p.requires_grad_(False)
    for p in backbone.parameters():
        p.requires_grad_(cfg.backbone == "light")
    groups = []
    if cfg.train_exit:
        groups.append({"params": [p for p in model.exit_head.parameters()], "lr": cfg.lr})
        for p in model.exit_head.parameters():
            p.requires_grad_(True)
    if cfg.train_scorer:
        groups.append({"params": list(model.scorer.parameters()), "lr": cfg.lr})
    if cfg.backbone == "light":
        exit_ids = {id(p) for p in model.exit_head.parameters()}
        groups.append({"params": [p for p in backbone.parameters() if id(p) not in exit_ids], "lr": cfg.backbone_lr})
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    base_lrs = [g["lr"] for g in groups]
    gen = torch.Generator().manual_seed(cfg.seed)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, desc="finetune", unit="step")
    model.train()
    backbone.eval()  # no dropout: the teacher and the student see the same tokens
    t0, history = time.perf_counter(), []
    source = batches(cfg.seed)
    cache = [_forward_frozen(model, teacher, *next(source)) for _ in range(cfg.cache_batches)]
    for step in range(cfg.steps):
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        if cache:
            x, w, priors, target, reads, labels = cache[int(torch.randint(len(cache), (1,), generator=gen))]
        else:
            inputs, labels = next(source)
            with torch.no_grad():
                target = teacher(inputs)
            with torch.set_grad_enabled(cfg.backbone == "light"):
                x, w, attn = model.device_tokens(inputs)
            priors = attention_priors(attn, w)
            with torch.no_grad():
                reads = rollout_importance(teacher, model.split, x.detach(), w)
        loss = x.new_zeros(())
        parts = {}
        if cfg.train_exit:
            exit_out = model.exit_head(x, w)
            parts["exit"] = distill_loss(exit_out, target, task, cfg.distill_temperature)
            if labels is not None and task == "classification":
                parts["exit"] = parts["exit"] + cfg.label_weight * F.cross_entropy(exit_out, labels)
        if cfg.train_scorer:
            B, N = x.shape[:2]
            r = cfg.min_keep + (cfg.max_keep - cfg.min_keep) * torch.rand(B, generator=gen)
            scores = model.scorer(x, w, r, priors)
            parts["scorer"] = x.new_zeros(())
            if cfg.rollout_weight:
                masked = scores if w is None else scores.masked_fill(w[:, 1:] <= 0, -1e9)
                parts["scorer"] = cfg.rollout_weight * -(reads * F.log_softmax(masked, dim=-1)).sum(-1).mean()
            if cfg.straight_through_weight:
                z = standardize_scores(scores, w)
                u = torch.rand(z.shape, generator=gen).clamp(1e-6, 1 - 1e-6)
                noisy = z + cfg.tau * -torch.log(-torch.log(u))  # Gumbel noise: explore near the boundary
                mask = straight_through_mask(noisy, keep_counts(w, N, B, r), w, cfg.tau)
                pruned = model.server_forward(x, mask)
                parts["scorer"] = parts["scorer"] + cfg.straight_through_weight * distill_loss(
                    pruned, target, task, cfg.distill_temperature)
            if labels is not None and task == "classification" and cfg.straight_through_weight:
                parts["scorer"] = parts["scorer"] + cfg.label_weight * F.cross_entropy(pruned, labels)
        loss = sum(parts.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        history.append({k: float(v.detach()) for k, v in parts.items()})
        if bar is not None:
            bar.update(1)
            bar.set_postfix({k: f"{v:.4f}" for k, v in history[-1].items()})
    if bar is not None:
        bar.close()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.train_scorer:
        model.importance = "learned"
    tail = history[-max(1, cfg.steps // 10):]
    summary = {"steps": cfg.steps, "seconds": round(time.perf_counter() - t0, 1), "backbone": cfg.backbone,
               "final_loss": {k: round(sum(h[k] for h in tail) / len(tail), 5) for k in tail[0]}}
    log.info("finetune: %s", summary)
    return summary
