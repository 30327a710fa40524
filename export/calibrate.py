"""Pick the exit threshold on the calibration split.

Simulates the deployed path with the torch mirrors of the edge's functions (adaptive selection
under the budget, int8 per-token round trip) and chooses the lowest threshold on the exit head's
confidence whose end-to-end accuracy stays within ``max_accuracy_drop`` of the full model's.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .model import SplitViT
from .preprocess import normalize
from .tokens import fake_quantize_int8, select_tokens_mask, with_cls

__all__ = ["CalibrationResult", "simulate", "choose_threshold"]


@dataclass(frozen=True)
class CalibrationResult:
    threshold: float
    accuracy_full: float
    accuracy_split: float
    exit_rate: float
    mean_patches_offloaded: float
    operating_points: list  # [{threshold, exit_rate, accuracy}], a few thresholds for the manifest


@torch.no_grad()
def simulate(model: SplitViT, images: np.ndarray, labels: np.ndarray, mass: float, budget: int,
             batch_size: int = 256) -> dict[str, np.ndarray]:
    """Per-input arrays: exit confidence and prediction, full-model and pruned-offload predictions."""
    model.eval()
    out: dict[str, list] = {k: [] for k in ("confidence", "exit_pred", "full_pred", "split_pred", "patches")}
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(normalize(images[start:start + batch_size]))
        exit_logits, tokens, importance = model.device_forward(x)
        probs = exit_logits.softmax(-1)
        keep = select_tokens_mask(importance, mass, budget)
        logits = model.server_forward(fake_quantize_int8(tokens), with_cls(keep))
        out["confidence"].append(probs.max(-1).values.numpy())
        out["exit_pred"].append(probs.argmax(-1).numpy())
        out["full_pred"].append(model.server_forward(tokens).argmax(-1).numpy())
        out["split_pred"].append(logits.argmax(-1).numpy())
        out["patches"].append(keep.sum(-1).numpy())
    arrays = {k: np.concatenate(v) for k, v in out.items()}
    arrays["labels"] = np.asarray(labels)
    return arrays


def _accuracy_at(sim: dict[str, np.ndarray], threshold: float) -> tuple[float, float]:
    exits = sim["confidence"] >= threshold
    pred = np.where(exits, sim["exit_pred"], sim["split_pred"])
    return float((pred == sim["labels"]).mean()), float(exits.mean())


def choose_threshold(sim: dict[str, np.ndarray], max_accuracy_drop: float) -> CalibrationResult:
    """Lowest confidence threshold t such that every threshold >= t keeps the split accuracy within
    ``max_accuracy_drop`` of the full model's (scanning down from "never exit" and stopping at the
    first failure, so one lucky low threshold is not chosen)."""
    if not 0.0 <= max_accuracy_drop < 1.0:
        raise ValueError(f"max_accuracy_drop must be in [0, 1), got {max_accuracy_drop}")
    labels = sim["labels"]
    accuracy_full = float((sim["full_pred"] == labels).mean())
    candidates = np.unique(np.r_[sim["confidence"], 1.0 + 1e-6])  # ascending; the last one never exits
    chosen = candidates[-1]
    for t in candidates[::-1]:
        acc, _ = _accuracy_at(sim, t)
        if acc < accuracy_full - max_accuracy_drop:
            break
        chosen = t
    accuracy_split, exit_rate = _accuracy_at(sim, chosen)
    offloaded = sim["confidence"] < chosen
    points = []
    for t in sorted({0.5, 0.7, 0.8, 0.9, 0.95, 0.99, float(chosen)}):
        acc, rate = _accuracy_at(sim, t)
        points.append({"threshold": round(float(t), 6), "exit_rate": round(rate, 4), "accuracy": round(acc, 4)})
    return CalibrationResult(
        threshold=float(chosen),
        accuracy_full=accuracy_full,
        accuracy_split=accuracy_split,
        exit_rate=exit_rate,
        mean_patches_offloaded=float(sim["patches"][offloaded].mean()) if offloaded.any() else 0.0,
        operating_points=points,
    )
