"""Adaptive token selection: keep the fewest patches that carry a share of the importance mass.

Pure numpy, no torch. ``splitinfer.export.tokens.select_tokens_mask`` is its exact torch mirror
(used in training and calibration); ``tests/export/test_mirrors.py`` holds the two equal.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["select_positions", "select_tokens"]


def select_positions(importance: np.ndarray, mass: float, budget: int, min_tokens: int = 1) -> np.ndarray:
    """Sequence positions to send: 0 (CLS), then 1 + each chosen patch index, ascending.

    importance: (P,) float, the device half's CLS attention per patch (sums to 1).
    mass: share of the importance mass to cover, in (0, 1]. budget: the most patches to keep.
    Patches are ranked by importance (ties: lower index first); K is the smallest count whose
    cumulative importance reaches ``mass`` of the total, then clamped to [min_tokens, budget] and P.
    Returns int64 (1 + K,) with min(min_tokens, budget) <= K <= budget, K <= P.
    """
    if not isinstance(importance, np.ndarray):
        importance = np.asarray(importance)
    if importance.ndim != 1 or importance.size == 0:
        raise ValueError(f"importance must be a non-empty 1-D array, got shape {importance.shape}")
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    # This runs once per offload on the device, where each numpy call costs a microsecond or more:
    # one stable argsort over [-inf, -importance] ranks the patches and puts CLS (position 0) first,
    # so the ranking is already in positions. Methods and ufunc methods, not the np.* wrappers.
    p = importance.size
    key = np.empty(p + 1, dtype=np.float32)
    key[0] = -np.inf
    np.negative(importance, out=key[1:])
    order = key.argsort(kind="stable")
    neg_csum = np.add.accumulate(key[order[1:]], dtype=np.float64)  # -(cumulative importance), exact
    total = -float(neg_csum[-1])
    if not math.isfinite(total):  # NaN or inf anywhere makes the total non-finite
        raise ValueError("importance contains NaN or inf")
    # K = 1 + #(cumulative < mass * total) = 1 + #(neg_csum > -mass * total); neg_csum descends and K
    # is clamped to the budget, so only the first ``budget`` ranks need counting (a short list)
    limit, k = -(mass * total), 1
    for value in neg_csum[:budget].tolist():
        if value <= limit:
            break
        k += 1
    k = min(max(k, min_tokens), budget, p)
    positions = order[:k + 1]  # a view of a fresh array: sort it in place
    positions.sort()
    return positions


def select_tokens(importance: np.ndarray, mass: float, budget: int, min_tokens: int = 1) -> np.ndarray:
    """Patch indices to send, sorted ascending: :func:`select_positions` without CLS, minus one.

    Returns int64 (K,). CLS is not a patch: callers always send it in addition.
    """
    return select_positions(importance, mass, budget, min_tokens)[1:] - 1
