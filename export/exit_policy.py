"""Exit policies: which inputs the device half should hand to the server.

Every policy is a *deferral score* per input, higher = offload first; a threshold on it is the
exit decision. The post-hoc scores read only the exit logits (max softmax, margin, entropy,
temperature-scaled max softmax). The learned one, :class:`DeferralHead`, reads the split block's
hidden states too and is trained against what offloading really changes: the server half's answer
on the pruned, quantized tokens the edge would send (:func:`collect`, the same computation as
``operating_points.simulate_configs``), not the whole model's answer on all tokens.

The head predicts, per input, one of three outcomes of offloading: it *breaks* the answer (exit
right, server wrong), changes nothing, or *fixes* it (exit wrong, server right); its score is
p(fix) - p(break), the expected accuracy gain of offloading this input, which is the ranking that
maximises accuracy for a given offload rate.

Shapes: B batch, N = 1 + P tokens (CLS first), d model dim, K classes, F feature count.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import SplitViT
from .operating_points import SCALE_DTYPE, gather_kept
from .preprocess import normalize
from .tokens import fake_quantize, select_tokens_mask, with_cls

__all__ = ["OffloadSetting", "Outcomes", "collect", "post_hoc_scores", "fit_temperature", "DeferralHead",
           "HeadConfig", "train_deferral_head", "outcome_classes", "POST_HOC", "head_scores", "gain_at_rates",
           "oracle_scores", "offload_curve", "offload_at_accuracy"]

log = logging.getLogger(__name__)

POST_HOC = ("max_softmax", "margin", "entropy", "temperature")
BREAK, NEUTRAL, FIX = 0, 1, 2


@dataclass(frozen=True)
class OffloadSetting:
    """What the edge sends when it offloads: importance mass share and patch cap, token encoding
    (int8/int4 with float16 scales, or fp16/fp32), bottleneck width (None = full dim)."""

    mass: float = 0.8
    budget: int = 8
    encoding: str = "int4"
    width: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.mass <= 1.0:
            raise ValueError(f"mass must be in (0, 1], got {self.mass}")
        if self.budget < 1:
            raise ValueError(f"budget must be >= 1, got {self.budget}")
        if self.encoding not in ("fp32", "fp16", "int8", "int4"):
            raise ValueError(f"unknown encoding {self.encoding!r}")


@dataclass
class Outcomes:
    """Per-input results on one set of canvases. labels, exit_pred, server_pred (offloaded answer on
    the pruned encoded tokens), full_pred (whole model, all tokens): int64 (n,); exit_logits float32
    (n, K); features float32 (n, F), what :meth:`DeferralHead.features` computes."""

    labels: np.ndarray
    exit_logits: np.ndarray
    server_pred: np.ndarray
    full_pred: np.ndarray
    features: np.ndarray

    @property
    def exit_pred(self) -> np.ndarray:
        return self.exit_logits.argmax(-1)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> "Outcomes":
        return Outcomes(self.labels[index], self.exit_logits[index], self.server_pred[index],
                        self.full_pred[index], self.features[index])

    def to_npz(self) -> dict:
        return {k: getattr(self, k) for k in ("labels", "exit_logits", "server_pred", "full_pred", "features")}


@torch.no_grad()
def collect(model: SplitViT, images: np.ndarray, labels: np.ndarray, setting: OffloadSetting = OffloadSetting(),
            batch_size: int = 500) -> Outcomes:
    """images uint8 (n, H, W) -> :class:`Outcomes`. The server's answer is computed as the edge and
    server would: top tokens by importance under (mass, budget), CLS kept, quantized round trip,
    through the bottleneck if one is set, server blocks with the padding mask."""
    model.eval()
    bottleneck = model.bottleneck(setting.width)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("exit_logits", "server_pred", "full_pred", "features")}
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(normalize(images[start:start + batch_size]))
        exit_logits, tokens, importance = model.device_forward(x)  # (B, K), (B, N, d), (B, P)
        parts["exit_logits"].append(exit_logits.numpy())
        parts["features"].append(DeferralHead.features(tokens, exit_logits).numpy())
        parts["full_pred"].append(model.server_forward(tokens).argmax(-1).numpy())
        codes = tokens if bottleneck is None else bottleneck.encode(tokens)
        keep = select_tokens_mask(importance, setting.mass, setting.budget)
        kept, mask = gather_kept(codes, with_cls(keep))
        if setting.encoding in ("int8", "int4"):
            sent = fake_quantize(kept, 8 if setting.encoding == "int8" else 4, 0, SCALE_DTYPE)
        else:
            sent = kept.half().float() if setting.encoding == "fp16" else kept
        received = sent if bottleneck is None else bottleneck.decode(sent)
        parts["server_pred"].append(model.server_forward(received, mask).argmax(-1).numpy())
    out = {k: np.concatenate(v) for k, v in parts.items()}
    return Outcomes(np.asarray(labels, np.int64), out["exit_logits"].astype(np.float32),
                    out["server_pred"].astype(np.int64), out["full_pred"].astype(np.int64),
                    out["features"].astype(np.float32))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, grid: np.ndarray | None = None) -> float:
    """The temperature T minimising the NLL of softmax(logits / T) (Guo et al. 2017), by a grid over
    log T then a finer grid around the best. logits (n, K), labels (n,)."""
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels)
    if logits.ndim != 2 or len(logits) != len(labels) or not len(labels):
        raise ValueError(f"logits must be (n, K) with n = len(labels) > 0, got {logits.shape} and {labels.shape}")

    def nll(t: float) -> float:
        return float(-_log_softmax(logits / t)[np.arange(len(labels)), labels].mean())

    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 61)) if grid is None else grid
    best = min(grid, key=nll)
    fine = best * np.exp(np.linspace(-0.1, 0.1, 41))
    return float(min(fine, key=nll))


def post_hoc_scores(exit_logits: np.ndarray, temperature: float = 1.0) -> dict[str, np.ndarray]:
    """Deferral scores from the exit logits alone (n, K) -> {policy: (n,)}, higher = offload first."""
    logp = _log_softmax(np.asarray(exit_logits, np.float64))
    p = np.exp(logp)
    top2 = np.sort(p, axis=-1)[:, -2:]
    return {
        "max_softmax": -top2[:, 1],
        "margin": -(top2[:, 1] - top2[:, 0]),
        "entropy": -(p * logp).sum(-1),
        "temperature": -np.exp(_log_softmax(np.asarray(exit_logits, np.float64) / temperature)).max(-1),
    }


def outcome_classes(exit_pred: np.ndarray, server_pred: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(n,) int64: BREAK (exit right, server wrong), NEUTRAL, FIX (exit wrong, server right)."""
    exit_right, server_right = exit_pred == labels, server_pred == labels
    return np.where(exit_right & ~server_right, BREAK, np.where(~exit_right & server_right, FIX, NEUTRAL))


@dataclass(frozen=True)
class HeadConfig:
    """Training of the deferral head. tokens: also read the hidden states (False: exit logits only)."""

    hidden: int = 64
    tokens: bool = True
    epochs: int = 10
    batch_size: int = 1024
    lr: float = 3e-3
    weight_decay: float = 1e-3
    dropout: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("hidden", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lr must be > 0 and dropout in [0, 1), got {self.lr}, {self.dropout}")


class DeferralHead(nn.Module):
    """tokens (B, N, d) after the split block, exit_logits (B, K) -> deferral score (B,), float32
    in [-1, 1]: p(offloading fixes the answer) - p(it breaks it). Export it inside device.onnx
    beside the exit head; a threshold on the score is the exit decision (offload when above)."""

    def __init__(self, dim: int, num_classes: int, hidden: int = 64, tokens: bool = True, dropout: float = 0.1):
        super().__init__()
        self.dim, self.num_classes, self.use_tokens = dim, num_classes, tokens
        n_features = self.feature_count(dim, num_classes)
        width = n_features if tokens else 2 * num_classes + 1
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("std", torch.ones(width))
        self.net = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 3))

    @staticmethod
    def feature_count(dim: int, num_classes: int) -> int:
        return 3 * dim + 2 * num_classes + 1

    @staticmethod
    def features(tokens: torch.Tensor, exit_logits: torch.Tensor) -> torch.Tensor:
        """(B, N, d), (B, K) -> (B, 3d + 2K + 1): CLS token, mean and max over patch tokens,
        log-softmax of the exit logits (class order), the same sorted descending, and entropy.
        The exit-logit part comes last, so a logits-only head reads the last 2K + 1 columns."""
        logp = exit_logits.log_softmax(-1)
        entropy = -(logp.exp() * logp).sum(-1, keepdim=True)
        patches = tokens[:, 1:]
        return torch.cat([tokens[:, 0], patches.mean(1), patches.amax(1), logp,
                          logp.sort(-1, descending=True).values, entropy], dim=-1)

    def _select(self, features: torch.Tensor) -> torch.Tensor:
        return features if self.use_tokens else features[:, -(2 * self.num_classes + 1):]

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """(B, F) -> outcome logits (B, 3): break, neutral, fix."""
        return self.net((self._select(features) - self.mean) / self.std)

    def score_from_features(self, features: torch.Tensor) -> torch.Tensor:
        p = self.logits_from_features(features).softmax(-1)
        return p[:, FIX] - p[:, BREAK]

    def forward(self, tokens: torch.Tensor, exit_logits: torch.Tensor) -> torch.Tensor:
        return self.score_from_features(self.features(tokens, exit_logits))


def train_deferral_head(train: Outcomes, valid: Outcomes, dim: int, num_classes: int,
                        cfg: HeadConfig = HeadConfig()) -> tuple[DeferralHead, dict]:
    """Fit a :class:`DeferralHead` on ``train`` (cross-entropy over the three outcomes); keep the
    epoch whose scores give ``valid`` the most accuracy gained over the first 2% .. 10% offloaded
    (mean over that range). Both sets must come from data the calibration split never sees.
    Returns the head (eval mode) and a training log."""
    torch.manual_seed(cfg.seed)
    head = DeferralHead(dim, num_classes, cfg.hidden, cfg.tokens, cfg.dropout)
    x = head._select(torch.from_numpy(train.features))
    head.mean.copy_(x.mean(0))
    head.std.copy_(x.std(0).clamp_min(1e-6))
    y = torch.from_numpy(outcome_classes(train.exit_pred, train.server_pred, train.labels))
    xs = torch.from_numpy(train.features)
    gain_valid = (valid.server_pred == valid.labels).astype(np.float64) - (valid.exit_pred == valid.labels)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * ((len(xs) + cfg.batch_size - 1) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    best, best_state, history = -np.inf, None, []
    for epoch in range(cfg.epochs):
        head.train()
        for idx in torch.randperm(len(xs), generator=gen).split(cfg.batch_size):
            loss = F.cross_entropy(head.logits_from_features(xs[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        head.eval()
        with torch.no_grad():
            score = head.score_from_features(torch.from_numpy(valid.features)).numpy()
        quality = gain_at_rates(score, gain_valid, np.linspace(0.02, 0.10, 9))
        history.append({"epoch": epoch + 1, "loss": loss.item(), "valid_gain": quality})
        if quality > best:
            best, best_state = quality, {k: v.clone() for k, v in head.state_dict().items()}
    head.load_state_dict(best_state)
    head.eval()
    log.info("deferral head (%s): best valid gain %.5f", "tokens + logits" if cfg.tokens else "logits", best)
    return head, {"history": history, "best_valid_gain": float(best)}


def gain_at_rates(score: np.ndarray, gain: np.ndarray, rates: np.ndarray) -> float:
    """Mean accuracy gained (per input) when offloading the top share r of inputs by ``score``,
    averaged over ``rates``. gain (n,): server right - exit right, in {-1, 0, 1}."""
    order = np.argsort(-score, kind="stable")
    cum = np.r_[0.0, np.cumsum(gain[order])]
    return float(np.mean([cum[int(round(r * len(score)))] / len(score) for r in rates]))


@torch.no_grad()
def head_scores(head: DeferralHead, features: np.ndarray) -> np.ndarray:
    """(n, F) float32 -> deferral scores (n,) float64."""
    head.eval()
    return head.score_from_features(torch.from_numpy(features)).double().numpy()


def oracle_scores(exit_correct: np.ndarray, server_correct: np.ndarray) -> np.ndarray:
    """The oracle's deferral score: fixes first, then the inputs offloading does not change, breaks last."""
    return server_correct.astype(np.float64) - exit_correct.astype(np.float64)


def offload_curve(score: np.ndarray, exit_correct: np.ndarray, server_correct: np.ndarray,
                  weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Offload the top-k inputs by ``score`` for k = 0..n -> (offload rate (n + 1,), accuracy (n + 1,)).
    ``weights`` (n,): per-input weights (a bootstrap resample's counts); ties in score keep input order."""
    order = np.argsort(-np.asarray(score, np.float64), kind="stable")
    e = exit_correct[order].astype(np.float64)
    v = server_correct[order].astype(np.float64)
    w = np.ones(len(order)) if weights is None else np.asarray(weights, np.float64)[order]
    total = w.sum()
    if not total > 0:
        raise ValueError("weights must not all be zero")
    rate = np.r_[0.0, np.cumsum(w)] / total
    accuracy = (float((w * e).sum()) + np.r_[0.0, np.cumsum(w * (v - e))]) / total
    return rate, accuracy


def offload_at_accuracy(rate: np.ndarray, accuracy: np.ndarray, target: float) -> float:
    """The smallest offload rate on a curve whose accuracy reaches ``target`` (NaN if none does)."""
    reached = np.flatnonzero(accuracy >= target - 1e-12)
    return float(rate[reached[0]]) if reached.size else float("nan")
