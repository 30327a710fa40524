"""The export's guarantee, checked by simulation: the whole selection export runs (Learn-then-Test for
every setting at delta / K, then the default point chosen among the certified ones) over hundreds of
resampled calibration/test splits of one population; the share of splits whose deployed point loses
more than epsilon against the whole model on the test part must stay <= delta. A naive rule on the
same splits (the lowest threshold whose calibration loss is <= epsilon) breaks it, so the check can
fail."""
from __future__ import annotations

import numpy as np

from splitinfer.export.operating_points import (NEVER_EXIT, Simulation, SweepSpace, certify_configs, config_losses,
                                                default_point, points_for)
from splitinfer.protos.calibration import clopper_pearson_upper

# settings (width, encoding, mass, budget) -> (the server's share right where the whole model is right,
# bytes per offload): richer settings agree with the whole model more often and cost more
SETTINGS = {(None, "int8", 0.95, 32): (0.998, 900), (None, "int4", 0.9, 16): (0.995, 600),
            (None, "int4", 0.8, 8): (0.985, 400), (8, "int4", 0.8, 8): (0.96, 80)}
SPACE = SweepSpace(widths=(None, 8), encodings=("int8", "int4"), selections=((0.8, 8), (0.9, 16), (0.95, 32)))


def population(rng, n: int) -> Simulation:
    """Per-input outcomes with the demo's rates (whole model right on ~97%, the exit head on ~95%,
    its errors at low confidence, ~10% of inputs below a 0.8 threshold)."""
    confidence = np.clip(1.0 - rng.beta(0.35, 6.0, n), 0.1, 1.0)
    full_ok = rng.random(n) < 0.972
    p_exit = 1.0 / (1.0 + np.exp(-(25.0 * confidence - 19.0)))
    exit_ok = np.where(full_ok, rng.random(n) < np.maximum(p_exit, 0.15), rng.random(n) < 0.3 * p_exit)
    configs = {}
    for key, (agree, size) in SETTINGS.items():
        server_ok = np.where(full_ok, rng.random(n) < agree, rng.random(n) < 0.1)
        configs[key] = (server_ok.astype(float), np.full(n, size), np.full(n, 9))
    return Simulation(None, confidence, exit_ok.astype(float), full_ok.astype(float), configs)


def subset(sim: Simulation, rows: np.ndarray) -> Simulation:
    return Simulation(None, sim.confidence[rows], sim.exit_correct[rows], sim.full_correct[rows],
                      {k: tuple(a[rows] for a in v) for k, v in sim.configs.items()})


def naive_point(sim: Simulation, epsilon: float) -> tuple:
    """Each setting's lowest threshold whose calibration loss is <= epsilon, then the cheapest of those."""
    rows = []
    for key in sim.configs:
        mean = config_losses(sim, key, SPACE.thresholds).mean(1)
        ok = [t for t, m in zip(SPACE.thresholds, mean) if m <= epsilon]
        if ok:
            t = min(ok)
            rows.append(((sim.confidence < t).mean() * sim.configs[key][1][0], key, t))
    return min(rows)[1:] if rows else (next(iter(sim.configs)), NEVER_EXIT)


def interval(k: int, n: int) -> tuple[float, float]:
    """Two-sided 95% Clopper-Pearson interval of k successes in n."""
    return (0.0 if k == 0 else 1 - clopper_pearson_upper(n - k, n, 0.025)), clopper_pearson_upper(k, n, 0.025)


def test_export_guarantee_holds_over_resampled_splits(capsys):
    rng = np.random.default_rng(7)
    whole = population(rng, 30_000)
    epsilon, delta, n_cal, splits = 0.01, 0.1, 1000, 240
    bad = naive_bad = certified = 0
    exit_rates = []
    for _ in range(splits):
        perm = rng.permutation(len(whole.confidence))
        cal, test = subset(whole, perm[:n_cal]), subset(whole, perm[n_cal:])
        chosen, _ = default_point(points_for(cal, SPACE, certify_configs(cal, epsilon, delta)), 0.002)
        key = (chosen["width"], chosen["encoding"], chosen["mass"], chosen["budget"])
        certified += chosen["certified"]
        exit_rates.append(chosen["exit_rate"])
        bad += config_losses(test, key, [chosen["threshold"]]).mean() > epsilon
        naive_key, naive_t = naive_point(cal, epsilon)
        naive_bad += config_losses(test, naive_key, [naive_t]).mean() > epsilon
    share, naive = bad / splits, naive_bad / splits
    lo, hi = interval(bad, splits)
    nlo, nhi = interval(naive_bad, splits)
    with capsys.disabled():
        print(f"\nexport guarantee, eps={epsilon}, delta={delta}, n_cal={n_cal}, {len(SETTINGS)} settings: test loss > "
              f"eps in {bad}/{splits} splits = {share:.3f} (95% CI {lo:.3f}-{hi:.3f}); naive rule {naive:.3f} "
              f"({nlo:.3f}-{nhi:.3f}); certified in {certified}/{splits}, mean exit rate {np.mean(exit_rates):.3f}")
    assert certified > 0.9 * splits and np.mean(exit_rates) > 0.5  # not vacuous: it exits, and it is certified
    assert share <= delta
    assert naive > 2 * delta  # the same check on a rule without the guarantee fails


def test_a_model_whose_offloads_lose_more_than_its_exit_head_is_certified_upwards(capsys):
    """A narrow bottleneck: the server half on what the edge sends loses 4% against the whole model,
    the exit head 0.6%. Down from "never exit" nothing passes (offloading everything breaks epsilon);
    the upward sequence certifies exiting almost always, and still keeps the loss within epsilon."""
    rng = np.random.default_rng(11)
    n = 30_000
    full_ok = rng.random(n) < 0.97
    confidence = np.clip(1.0 - rng.beta(0.35, 6.0, n), 0.1, 1.0)
    exit_ok = np.where(full_ok, rng.random(n) > 0.006, rng.random(n) < 0.5)
    server_ok = np.where(full_ok, rng.random(n) < 0.96, rng.random(n) < 0.1)
    key = (8, "int4", 0.8, 8)
    whole = Simulation(None, confidence, exit_ok.astype(float), full_ok.astype(float),
                       {key: (server_ok.astype(float), np.full(n, 80), np.full(n, 9))})
    space = SweepSpace(widths=(8,), encodings=("int4",), selections=((0.8, 8),))
    epsilon, delta, splits = 0.02, 0.1, 200
    bad = certified = 0
    thresholds = []
    for _ in range(splits):
        perm = rng.permutation(n)
        cal, test = subset(whole, perm[:1000]), subset(whole, perm[1000:])
        chosen, _ = default_point(points_for(cal, space, certify_configs(cal, epsilon, delta)), 0.002)
        certified += chosen["certified"]
        thresholds.append(chosen["threshold"])
        bad += chosen["certified"] and config_losses(test, key, [chosen["threshold"]]).mean() > epsilon
    with capsys.disabled():
        print(f"\nupward sequence, eps={epsilon}: certified in {certified}/{splits} splits, certified and test loss > "
              f"eps in {bad}; median threshold {np.median(thresholds):.3f}")
    assert certified > 0.9 * splits and np.median(thresholds) < 0.2  # it exits (offloads lose accuracy here)
    assert bad / splits <= delta
    # offloading everything, the descending sequence's first candidate, really breaks epsilon here
    assert config_losses(whole, key, [NEVER_EXIT]).mean() > epsilon
