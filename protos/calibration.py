"""A calibrated exit threshold: Learn-then-Test (Angelopoulos, Bates, Candes, Jordan, Lei 2021), as
CALM (Schuster et al. 2022) uses it for early exits. numpy and the standard library only.

The loss of the split system on one input is 1 when it answers wrong where the whole model answers
right (:func:`split_losses`); its mean bounds the accuracy lost against the whole model, since
acc_full - acc_split = P(full right, split wrong) - P(full wrong, split right) <= P(full right,
split wrong). For each candidate threshold lambda_j, ordered from the most conservative (offloads
most) to the least, the null hypothesis H_j: R(lambda_j) > epsilon is tested on the calibration
split with a binomial tail p-value; fixed-sequence testing walks down the list while p_j <= delta
and certifies every threshold it passed. With probability >= 1 - delta over the calibration draw,
every certified threshold has risk <= epsilon on exchangeable inputs, whatever the dependence
between thresholds (fixed-sequence testing controls the family-wise error rate at delta without a
correction, because it stops at the first non-rejection).

p-values (``method``):
- ``"binomial"`` (default, exact for 0/1 losses): p = P(Binomial(n, epsilon) <= n * R_hat), the
  probability of seeing this few losses if the risk were epsilon; valid for risks >= epsilon
  because the binomial tail decreases in the risk.
- ``"hoeffding_bentkus"`` (for losses anywhere in [0, 1]; Bates et al. 2021, eq. 16):
  p = min(exp(-n h(min(R_hat, epsilon), epsilon)), e * P(Binomial(n, epsilon) <= ceil(n R_hat))),
  h(a, b) = a log(a / b) + (1 - a) log((1 - a) / (1 - b)).
Binomial tails are summed in log space (log binomial coefficients from cumulative sums of logs),
so n in the hundreds of thousands and tails near 1e-300 stay exact to float64 rounding.

Per operating point, :func:`upper_bounds` gives a one-sided (1 - delta) Clopper-Pearson upper
confidence bound on its loss (each point on its own, not simultaneously).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

__all__ = ["Certificate", "binomial_cdf", "binomial_p_value", "hoeffding_bentkus_p_value", "clopper_pearson_upper",
           "upper_bounds", "learn_then_test", "split_losses", "min_calibration_size", "METHODS"]

METHODS = ("binomial", "hoeffding_bentkus")


@dataclass(frozen=True)
class Certificate:
    """What Learn-then-Test certified. threshold: the least conservative certified candidate (None
    when none is: offload everything); index: its position in the candidate list (None likewise);
    bound: the (1 - delta) Clopper-Pearson upper bound on its loss (1.0 when none is certified);
    p_value: its p-value (of the first candidate when none is certified); empirical: its mean loss
    on the calibration split."""

    epsilon: float
    delta: float
    n: int
    threshold: float | None
    bound: float
    p_value: float
    index: int | None = None
    empirical: float | None = None
    method: str = "binomial"

    @property
    def certified(self) -> bool:
        return self.threshold is not None

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("epsilon", "delta", "n", "threshold", "bound", "p_value", "index",
                                              "empirical", "method")}


def _check_probability(name: str, value: float, open_low: bool = True) -> float:
    value = float(value)
    if not (0.0 < value < 1.0 if open_low else 0.0 <= value <= 1.0) or math.isnan(value):
        raise ValueError(f"{name} must be in {'(0, 1)' if open_low else '[0, 1]'}, got {value}")
    return value


def _check_n(n) -> int:
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    return int(n)


@lru_cache(maxsize=16)
def _log_binomial_coefficients(n: int) -> np.ndarray:
    """log C(n, j) for j = 0..n, (n + 1,) float64, from cumulative sums of log((n - i + 1) / i)."""
    i = np.arange(1, n + 1, dtype=np.float64)
    out = np.r_[0.0, np.cumsum(np.log(n - i + 1) - np.log(i))]
    out.setflags(write=False)
    return out


def binomial_cdf(k, n: int, p: float) -> np.ndarray:
    """P(Binomial(n, p) <= k) for each k (scalar or array; k < 0 gives 0, k >= n gives 1)."""
    n = _check_n(n)
    p = _check_probability("p", p, open_low=False)
    ks = np.atleast_1d(np.asarray(k, dtype=np.float64))
    if np.isnan(ks).any():
        raise ValueError("k must not be NaN")
    ks = np.floor(ks)
    out = np.empty(ks.shape, np.float64)
    if p == 0.0 or p == 1.0:
        out[:] = np.where(ks >= (n if p == 1.0 else 0), 1.0, 0.0)
        out[ks < 0] = 0.0
        return out if np.ndim(k) else out[:1].reshape(())
    top = int(np.clip(ks.max(), 0, n))  # only the terms up to the largest k asked for
    j = np.arange(top + 1, dtype=np.float64)
    log_pmf = _log_binomial_coefficients(n)[: top + 1] + j * math.log(p) + (n - j) * math.log1p(-p)
    log_cdf = np.logaddexp.accumulate(log_pmf)  # log P(X <= k) for k = 0..top, summed in log space
    inside = np.clip(ks, 0, top).astype(np.int64)
    out = np.minimum(1.0, np.exp(log_cdf[inside]))
    out[ks < 0] = 0.0
    out[ks >= n] = 1.0
    return out if np.ndim(k) else out.reshape(())


def binomial_p_value(losses: float, n: int, epsilon: float) -> float:
    """Exact p-value of H: risk > epsilon given ``losses`` (a count, 0..n) of 0/1 losses among n."""
    n = _check_n(n)
    epsilon = _check_probability("epsilon", epsilon)
    if not 0 <= losses <= n:
        raise ValueError(f"losses must be in [0, n={n}], got {losses}")
    return float(binomial_cdf(math.floor(losses + 1e-9), n, epsilon))


def hoeffding_bentkus_p_value(mean_loss: float, n: int, epsilon: float) -> float:
    """Hoeffding-Bentkus p-value of H: risk > epsilon for losses in [0, 1] with mean ``mean_loss``."""
    n = _check_n(n)
    epsilon = _check_probability("epsilon", epsilon)
    r = _check_probability("mean_loss", mean_loss, open_low=False)
    a = min(r, epsilon)
    if a == 0.0:
        h = math.log(1.0 / (1.0 - epsilon))
    else:
        h = a * math.log(a / epsilon) + (1.0 - a) * math.log((1.0 - a) / (1.0 - epsilon))
    hoeffding = math.exp(-n * h)
    bentkus = math.e * float(binomial_cdf(math.ceil(n * r - 1e-9), n, epsilon))
    return float(min(1.0, hoeffding, bentkus))


def clopper_pearson_upper(losses: int, n: int, delta: float) -> float:
    """One-sided (1 - delta) upper confidence bound on a Bernoulli rate from ``losses`` of n: the u
    with P(Binomial(n, u) <= losses) = delta (1.0 when losses = n), by bisection to 1e-12."""
    n = _check_n(n)
    delta = _check_probability("delta", delta)
    if not 0 <= losses <= n or int(losses) != losses:
        raise ValueError(f"losses must be an integer in [0, n={n}], got {losses}")
    losses = int(losses)
    if losses == n:
        return 1.0
    lo, hi = losses / n, 1.0
    while hi - lo > 1e-12:
        mid = 0.5 * (lo + hi)
        if float(binomial_cdf(losses, n, mid)) > delta:
            lo = mid
        else:
            hi = mid
    return hi


def _loss_matrix(losses) -> np.ndarray:
    arr = np.asarray(losses, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"losses must be (candidates, n) with both >= 1, got shape {np.shape(losses)}")
    if not np.isfinite(arr).all() or arr.min() < 0.0 or arr.max() > 1.0:
        raise ValueError("losses must be finite and in [0, 1]")
    return arr


def upper_bounds(losses, delta: float) -> np.ndarray:
    """losses (m, n) 0/1 per operating point and calibration input -> (m,) Clopper-Pearson (1 - delta)
    upper bounds on each point's loss."""
    arr = _loss_matrix(losses)
    delta = _check_probability("delta", delta)
    if not np.isin(arr, (0.0, 1.0)).all():
        raise ValueError("Clopper-Pearson bounds need 0/1 losses")
    n = arr.shape[1]
    return np.array([clopper_pearson_upper(int(row.sum()), n, delta) for row in arr])


def learn_then_test(losses, thresholds, epsilon: float, delta: float, method: str = "binomial") -> Certificate:
    """Pick the least conservative threshold certified to keep the risk <= epsilon w.p. >= 1 - delta.

    losses: (m, n), the loss of every calibration input (n) under every candidate threshold (m),
    candidates ordered from the most conservative to the least; thresholds: (m,) their values.
    """
    arr = _loss_matrix(losses)
    thresholds = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if len(thresholds) != arr.shape[0]:
        raise ValueError(f"{len(thresholds)} thresholds for {arr.shape[0]} rows of losses")
    epsilon = _check_probability("epsilon", epsilon)
    delta = _check_probability("delta", delta)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "binomial" and not np.isin(arr, (0.0, 1.0)).all():
        raise ValueError("the exact binomial p-value needs 0/1 losses; use method='hoeffding_bentkus'")
    n = arr.shape[1]
    sums = arr.sum(axis=1)
    if method == "binomial":  # every candidate's p-value at once: P(Binomial(n, epsilon) <= its losses)
        p_values = np.atleast_1d(binomial_cdf(np.floor(sums + 1e-9), n, epsilon))
    else:
        p_values = np.array([hoeffding_bentkus_p_value(total / n, n, epsilon) for total in sums])
    failed = np.flatnonzero(p_values > delta)
    stop = int(failed[0]) if failed.size else len(sums)  # fixed-sequence: the first non-rejection ends it
    if stop == 0:
        return Certificate(epsilon, delta, n, None, 1.0, float(p_values[0]), None, None, method)
    chosen, p_chosen = stop - 1, float(p_values[stop - 1])
    k = int(round(sums[chosen])) if method == "binomial" else math.ceil(sums[chosen] - 1e-9)
    return Certificate(epsilon, delta, n, float(thresholds[chosen]), clopper_pearson_upper(k, n, delta),
                       float(p_chosen), chosen, float(sums[chosen] / n), method)


def min_calibration_size(epsilon: float, delta: float) -> int:
    """The fewest calibration inputs with which Learn-then-Test can certify anything at (epsilon,
    delta): even zero losses give the p-value (1 - epsilon)^n, which must reach delta."""
    epsilon = _check_probability("epsilon", epsilon)
    delta = _check_probability("delta", delta)
    return max(1, math.ceil(math.log(delta) / math.log1p(-epsilon) - 1e-9))


def split_losses(exit_score, thresholds, exit_correct, offload_correct, full_correct) -> np.ndarray:
    """The split system's 0/1 loss against the whole model per (threshold, input): (m, n) float64.

    exit_score (n,): higher = more sure on the device (the device answers when score >= threshold);
    thresholds (m,); exit_correct, offload_correct (the server half's answer on what the edge
    sends), full_correct: bool (n,). Loss = the split system is wrong where the whole model is right.
    """
    score = np.asarray(exit_score, dtype=np.float64).reshape(-1)
    t = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    flags = [np.asarray(a).reshape(-1) for a in (exit_correct, offload_correct, full_correct)]
    if any(len(a) != len(score) for a in flags) or not len(score):
        raise ValueError(f"exit_score and the correctness arrays must share one length >= 1, got "
                         f"{[len(score)] + [len(a) for a in flags]}")
    if np.isnan(score).any() or np.isnan(t).any():
        raise ValueError("scores and thresholds must not be NaN")
    exit_ok, off_ok, full_ok = (a.astype(bool) for a in flags)
    exits = score[None, :] >= t[:, None]
    system_ok = np.where(exits, exit_ok[None, :], off_ok[None, :])
    return (full_ok[None, :] & ~system_ok).astype(np.float64)
