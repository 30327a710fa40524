"""Learn-then-Test threshold selection: p-values checked against exact sums (and scipy when
installed), and the guarantee checked by simulation over resampled calibration/test splits."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from splitinfer.protos.calibration import (Certificate, binomial_cdf, binomial_p_value, clopper_pearson_upper,
                                           hoeffding_bentkus_p_value, learn_then_test, split_losses, upper_bounds)


def exact_cdf(k: int, n: int, p: Fraction) -> float:
    """P(Binomial(n, p) <= k) in exact rational arithmetic."""
    return float(sum(math.comb(n, j) * p ** j * (1 - p) ** (n - j) for j in range(k + 1)))


@pytest.mark.parametrize("k,n,p", [(0, 1, "1/2"), (3, 10, "1/5"), (0, 50, "1/100"), (7, 200, "1/50"),
                                   (49, 100, "1/2"), (100, 1000, "1/20"), (10, 2000, "1/100")])
def test_binomial_cdf_matches_exact_rational_sums(k, n, p):
    frac = Fraction(p)
    assert float(binomial_cdf(k, n, float(frac))) == pytest.approx(exact_cdf(k, n, frac), rel=1e-10, abs=1e-300)


def test_binomial_cdf_edges_and_deep_tails():
    assert float(binomial_cdf(-1, 10, 0.3)) == 0.0
    assert float(binomial_cdf(10, 10, 0.3)) == 1.0
    assert float(binomial_cdf(0, 10, 0.0)) == 1.0
    assert float(binomial_cdf(9, 10, 1.0)) == 0.0
    # P(X = 0) for n = 200,000 at p = 0.01 is exp(200000 * log(0.99)) ~ 1e-873: underflows to 0, no NaN
    assert float(binomial_cdf(0, 200_000, 0.01)) == 0.0
    tail = float(binomial_cdf(1000, 200_000, 0.01))  # mean 2,000: a deep but representable tail
    assert 0.0 < tail < 1e-100
    np.testing.assert_allclose(binomial_cdf(np.array([2, 5]), 10, 0.5),
                               [exact_cdf(2, 10, Fraction(1, 2)), exact_cdf(5, 10, Fraction(1, 2))], rtol=1e-12)


def test_p_values_against_scipy_when_installed():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(10, 5000))
        eps = float(rng.uniform(0.001, 0.3))
        k = int(rng.integers(0, n + 1))
        assert binomial_p_value(k, n, eps) == pytest.approx(stats.binom.cdf(k, n, eps), rel=1e-9, abs=1e-300)
        u = clopper_pearson_upper(k, n, 0.05)
        expected = 1.0 if k == n else stats.beta.ppf(0.95, k + 1, n - k)
        assert u == pytest.approx(expected, abs=1e-9)


def test_hoeffding_bentkus_is_the_smaller_of_its_two_parts():
    n, eps, r = 1000, 0.05, 0.03
    h = r * math.log(r / eps) + (1 - r) * math.log((1 - r) / (1 - eps))
    bentkus = math.e * exact_cdf(30, n, Fraction(1, 20))
    assert hoeffding_bentkus_p_value(r, n, eps) == pytest.approx(min(math.exp(-n * h), bentkus), rel=1e-9)
    assert hoeffding_bentkus_p_value(0.2, n, eps) == 1.0  # empirical risk above epsilon: no evidence
    assert hoeffding_bentkus_p_value(0.0, n, eps) < binomial_p_value(0, n, eps) * math.e + 1e-300


def test_clopper_pearson_known_values():
    # zero losses: u = 1 - delta^(1/n) exactly
    assert clopper_pearson_upper(0, 100, 0.05) == pytest.approx(1 - 0.05 ** (1 / 100), abs=1e-10)
    assert clopper_pearson_upper(10, 10, 0.05) == 1.0
    u = clopper_pearson_upper(20, 1000, 0.1)
    assert exact_cdf(20, 1000, Fraction(u)) == pytest.approx(0.1, abs=1e-8)
    bounds = upper_bounds(np.array([[0, 0, 1, 0], [1, 1, 1, 0]]), 0.1)
    assert bounds.shape == (2,) and bounds[0] < bounds[1] <= 1.0


def test_fixed_sequence_stops_at_the_first_failure():
    n = 2000
    # risks per candidate (most conservative first): 0, 0.002, 0.03 (fails), then 0.001 again
    losses = np.zeros((4, n))
    losses[1, :4] = 1
    losses[2, :60] = 1
    losses[3, :2] = 1
    cert = learn_then_test(losses, [1.0, 0.9, 0.8, 0.7], epsilon=0.01, delta=0.1)
    assert isinstance(cert, Certificate) and cert.certified
    assert cert.threshold == 0.9 and cert.index == 1  # 0.7 looks safe but comes after a failure
    assert cert.p_value == pytest.approx(binomial_p_value(4, n, 0.01))
    assert cert.bound == pytest.approx(clopper_pearson_upper(4, n, 0.1))
    assert cert.empirical == pytest.approx(4 / n)
    assert (cert.epsilon, cert.delta, cert.n) == (0.01, 0.1, n)
    with pytest.raises(AttributeError):
        cert.threshold = 0.5  # frozen


def test_nothing_certified_when_even_the_first_candidate_fails():
    losses = np.zeros((2, 100))
    losses[:, :5] = 1  # 5% against epsilon 1%
    cert = learn_then_test(losses, [1.0, 0.5], epsilon=0.01, delta=0.1)
    assert not cert.certified and cert.threshold is None and cert.bound == 1.0 and cert.p_value > 0.1


@pytest.mark.parametrize("kwargs,match", [
    ({"losses": np.zeros((2, 5)), "thresholds": [1.0]}, "thresholds"),
    ({"losses": np.full((1, 5), 2.0), "thresholds": [1.0]}, r"\[0, 1\]"),
    ({"losses": np.full((1, 5), np.nan), "thresholds": [1.0]}, "finite"),
    ({"losses": np.zeros((0, 5)), "thresholds": []}, "candidates"),
    ({"losses": np.full((1, 5), 0.5), "thresholds": [1.0]}, "0/1"),
    ({"losses": np.zeros((1, 5)), "thresholds": [1.0], "epsilon": 0.0}, "epsilon"),
    ({"losses": np.zeros((1, 5)), "thresholds": [1.0], "delta": 1.5}, "delta"),
    ({"losses": np.zeros((1, 5)), "thresholds": [1.0], "method": "hoeffding"}, "method"),
])
def test_learn_then_test_rejects_bad_input(kwargs, match):
    args = {"epsilon": 0.05, "delta": 0.1, **kwargs}
    with pytest.raises(ValueError, match=match):
        learn_then_test(**args)


def test_bad_scalars_are_refused():
    for call in (lambda: binomial_cdf(1, 0, 0.5), lambda: binomial_cdf(1, 10, 1.5), lambda: binomial_p_value(11, 10, 0.1),
                 lambda: clopper_pearson_upper(2.5, 10, 0.1), lambda: hoeffding_bentkus_p_value(-0.1, 10, 0.1)):
        with pytest.raises(ValueError):
            call()
    with pytest.raises(ValueError, match="length"):
        split_losses([0.5, 0.6], [0.5], [True], [True, True], [True, True])


def test_split_losses_counts_only_answers_the_whole_model_gets_right():
    score = np.array([0.9, 0.9, 0.2, 0.2])
    exit_ok = np.array([False, True, False, True])
    off_ok = np.array([True, True, False, True])
    full_ok = np.array([True, True, True, False])
    losses = split_losses(score, [1.0, 0.5, 0.0], exit_ok, off_ok, full_ok)
    np.testing.assert_array_equal(losses, [[0, 0, 1, 0],   # all offloaded: input 2 lost (server wrong)
                                           [1, 0, 1, 0],   # inputs 0, 1 exit: input 0 wrong on the device
                                           [1, 0, 1, 0]])  # all exit: input 3 wrong but the whole model is too


def synthetic_population(rng, n: int):
    """Scores whose errors concentrate at low confidence: the whole model right 97% of the time,
    the exit head right with a probability that climbs with its confidence, the server mostly
    agreeing with the whole model on what it receives."""
    conf = rng.beta(6.0, 1.2, n)
    full_ok = rng.random(n) < 0.97
    p_exit = 1 / (1 + np.exp(-(12 * conf - 6.5)))
    exit_ok = np.where(full_ok, rng.random(n) < np.maximum(p_exit, 0.2), rng.random(n) < 0.3 * p_exit)
    off_ok = np.where(full_ok, rng.random(n) < 0.997, rng.random(n) < 0.1)
    return conf, exit_ok, off_ok, full_ok


def test_guarantee_holds_over_resampled_splits(capsys):
    """Over 300 calibration/test splits of one population, the share of splits whose realised test loss
    exceeds epsilon stays <= delta; the naive rule (the lowest threshold whose calibration loss is
    <= epsilon) breaks it on the same splits, so the check can fail."""
    rng = np.random.default_rng(12)
    conf, exit_ok, off_ok, full_ok = synthetic_population(rng, 40_000)
    thresholds = np.r_[np.inf, np.linspace(1.0, 0.0, 101)]  # most conservative (offload all) first
    eps, delta, n_cal, splits = 0.02, 0.1, 2000, 300
    population_losses = split_losses(conf, thresholds, exit_ok, off_ok, full_ok)
    ltt_bad = naive_bad = certified = 0
    for _ in range(splits):
        perm = rng.permutation(len(conf))
        cal, test = perm[:n_cal], perm[n_cal:]
        cal_losses = population_losses[:, cal]
        cert = learn_then_test(cal_losses, thresholds, eps, delta)
        j = cert.index if cert.certified else 0
        certified += cert.certified
        ltt_bad += population_losses[j, test].mean() > eps
        ok = np.flatnonzero(cal_losses.mean(1) <= eps)
        naive_bad += population_losses[ok.max() if ok.size else 0, test].mean() > eps
    share, naive = ltt_bad / splits, naive_bad / splits
    lo = 0.0 if ltt_bad == 0 else 1 - clopper_pearson_upper(splits - ltt_bad, splits, 0.025)
    hi = clopper_pearson_upper(ltt_bad, splits, 0.025)
    with capsys.disabled():
        print(f"\nLearn-then-Test, eps={eps}, delta={delta}, n_cal={n_cal}: realised test loss > eps in "
              f"{ltt_bad}/{splits} splits = {share:.3f} (95% CI {lo:.3f}-{hi:.3f}); naive rule {naive:.3f}; "
              f"certified in {certified}/{splits}")
    assert certified > 0.9 * splits  # the test is not vacuous: a threshold is certified almost always
    assert share <= delta
    assert naive > delta
