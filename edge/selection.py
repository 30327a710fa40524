"""Adaptive token selection: keep the fewest patches that carry a share of the importance mass.

Pure numpy, no torch. ``splitinfer.export.tokens.select_tokens_mask`` is its exact torch mirror
(used in training and calibration); ``tests/export/test_mirrors.py`` holds the two equal.
"""
from __future__ import annotations

import numpy as np

__all__ = ["select_tokens", "tokens_for_mass"]


def tokens_for_mass(importance: np.ndarray, mass: float) -> tuple[np.ndarray, int]:
    """Rank patches by importance and count how many cover ``mass`` of the total.

    importance: (P,) non-negative float. Returns (order (P,) int64, most important first, with ties
    broken by lower index; k >= 1, the smallest count whose cumulative importance >= mass * total).
    """
    order = np.argsort(-importance, kind="stable")
    csum = np.cumsum(importance[order], dtype=np.float64)
    # csum is non-decreasing: the count of entries below the target is where the target would go
    k = int(np.searchsorted(csum, mass * csum[-1], side="left")) + 1
    return order, k


def select_tokens(importance: np.ndarray, mass: float, budget: int, min_tokens: int = 1) -> np.ndarray:
    """Patch indices to send, sorted ascending.

    importance: (P,) float, the device half's CLS attention per patch (sums to 1).
    mass: share of the importance mass to cover, in (0, 1]. budget: the most patches to keep.
    Returns int64 (K,) with min(min_tokens, budget) <= K <= budget, K <= P. CLS is not a patch:
    callers always send it in addition.
    """
    if not isinstance(importance, np.ndarray):
        importance = np.asarray(importance)
    if importance.ndim != 1 or importance.size == 0:
        raise ValueError(f"importance must be a non-empty 1-D array, got shape {importance.shape}")
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    if not np.isfinite(importance.sum()):  # one reduction: NaN or inf anywhere makes the sum non-finite
        raise ValueError("importance contains NaN or inf")
    order, k = tokens_for_mass(importance, mass)
    k = min(max(k, min_tokens), budget, importance.size)
    return np.sort(order[:k])
