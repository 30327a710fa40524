"""The field audit on simulated streams: no false alarm in distribution (at most alpha over
repetitions), few extra offloads, a shift caught within 500 inputs, recovery when it ends."""
from __future__ import annotations

import math

import numpy as np
import pytest

from splitinfer.edge.audit import AUDIT, DEVICE, FREE_AUDIT, SERVER, Audit, calibrated_disagreement, \
    default_alternative, route, settle

EXIT_RATE = 0.9  # share of inputs the calibrated policy answers on the device
P0 = 0.02


def run_stream(seed: int, n: int = 10_000, shift: tuple[int, int] | None = None, p_shift: float = 0.3,
               alpha: float = 0.05, p_true: float = P0):
    """Drive an Audit through the runner's per-input decision (route, settle). Returns (audit, extra
    offloads / n, first alarm index, first recovery index after the shift ends)."""
    rng = np.random.default_rng(seed)
    audit = Audit(0.02, P0, alpha, rng=np.random.default_rng(10_000 + seed))
    extra, first_alarm, recovered = 0, None, None
    for i in range(n):
        shifted = shift is not None and shift[0] <= i < shift[1]
        p = p_shift if shifted else p_true
        confidence = 0.9 if rng.random() < EXIT_RATE else 0.1  # the calibrated policy (threshold 0.5) answers 90%
        decision = route(confidence, 0.5, audit)
        if not decision.offload:
            continue
        extra += confidence >= 0.5  # offloaded although the calibrated policy would have answered
        was_on = audit.alarm
        settle(decision, audit, 3, 3 if rng.random() >= p else 5)
        if audit.alarm and not was_on and first_alarm is None:
            first_alarm = i
        if was_on and not audit.alarm and recovered is None and shift is not None and i >= shift[1]:
            recovered = i
    return audit, extra / n, first_alarm, recovered


def test_in_distribution_no_alarm_and_few_extra_offloads(capsys):
    runs = [run_stream(seed) for seed in range(100)]
    false_alarms = sum(a.alarms > 0 for a, *_ in runs) / len(runs)
    extra = np.array([e for _, e, *_ in runs])
    with capsys.disabled():
        print(f"\naudit in distribution: 100 streams of 10,000 inputs, false alarm share {false_alarms:.3f} "
              f"(alpha 0.05), extra offloads mean {extra.mean():.4f}, p95 {np.percentile(extra, 95):.4f}")
    assert false_alarms <= 0.05
    assert extra.mean() <= 0.025
    assert all(a.audits > 100 for a, *_ in runs)  # the audit really ran


def test_false_alarms_stay_below_a_loose_level():
    """At alpha = 0.5 the test is easy to trip; the share of streams with a false alarm still stays <= alpha,
    and the bound is not vacuous: a stream whose true rate is above p0 does alarm."""
    runs = [run_stream(seed, n=4000, alpha=0.5) for seed in range(100)]
    assert sum(a.alarms > 0 for a, *_ in runs) / len(runs) <= 0.5
    drifted = [run_stream(seed, n=4000, alpha=0.5, p_true=0.1) for seed in range(20)]
    assert sum(a.alarms > 0 for a, *_ in drifted) >= 15


@pytest.mark.parametrize("p_shift,within", [(0.3, 0.85), (0.6, 0.97)])
def test_shift_is_flagged_within_500_inputs(p_shift, within, capsys):
    """At a 2% audit rate a 500-input window holds about 9 audits: at 30% disagreement one stream in
    25 sees no disagreement at all in them, so 'within 500' cannot hold every time at that rate."""
    delays = []
    for seed in range(100):
        _, _, first, _ = run_stream(1000 + seed, n=4000, shift=(3000, 4000), p_shift=p_shift)
        delays.append(math.inf if first is None else first - 3000)
    delays = np.array(delays)
    share = float((delays <= 500).mean())
    with capsys.disabled():
        print(f"\naudit, disagreement {P0} -> {p_shift} at input 3,000: flagged within 500 inputs in {share:.2f} "
              f"of 100 streams, median delay {np.median(delays):.0f} inputs")
    assert (delays >= 0).all()  # no alarm before the shift
    assert share >= within
    assert np.median(delays) <= 300


def test_recovers_when_the_shift_ends():
    recoveries = []
    for seed in range(50):
        audit, _, first, recovered = run_stream(2000 + seed, n=4500, shift=(2000, 4000), p_shift=0.3)
        assert first is not None and 2000 <= first < 4000
        recoveries.append(math.inf if recovered is None else recovered - 4000)
        assert not audit.alarm and audit.threshold_boost == 0.0
    assert np.percentile(recoveries, 95) <= 300


def test_alarm_boosts_to_offloading_everything_and_clears_on_agreement():
    audit = Audit(0.02, P0, 0.05, rng=0)
    assert audit.threshold_boost == 0.0 and audit.stricter(0.8) == 0.8
    up = math.log(default_alternative(P0) / P0)
    audit.record(1, 2)
    assert audit.statistic == pytest.approx(up) and audit.disagreements == 1 and audit.audits == 1
    assert audit.current_rate == 0.5  # evidence building up: audit more
    while not audit.alarm:
        audit.record(1, 2)
    state = audit.state()
    assert state["alarm"] and state["alarms"] == 1 and state["threshold_boost"] == 1.0
    assert audit.stricter(0.8) > 1.0 and not audit.should_audit()
    for _ in range(1000):
        if not audit.record(4, 4):
            break
    assert not audit.alarm and audit.recoveries == 1 and audit.statistic == 0.0
    assert audit.current_rate == 0.02


@pytest.mark.parametrize("rate", [0.1, 0.02, 0.03, 1.0])
def test_should_audit_draws_exactly_one_per_block(rate):
    """The share is the rate itself (one audit in each block of 1 / rate, at a random place), not a
    binomial draw around it; the places differ from block to block and between seeds."""
    draws = np.array([Audit(rate, P0, 0.05, rng=seed) for seed in (3, 4)])
    picks = np.array([[a.should_audit() for _ in range(20_000)] for a in draws])
    assert abs(picks.sum(axis=1) - rate * 20_000).max() <= 1
    if rate < 1.0:
        places = [np.flatnonzero(row) % int(round(1 / rate)) for row in picks]
        assert len(set(places[0][:50])) > 5  # not a fixed stride
        assert not np.array_equal(places[0], places[1])
    assert not any(Audit(0.0, P0, 0.05, rng=1).should_audit() for _ in range(100))


def test_alert_audits_are_paid_back():
    """Audits drawn at the alert rate are paid back by skipping every other scheduled one: after the
    alert the audits drawn number the blocks begun again, at half the rate until they do."""
    audit = Audit(0.02, P0, 0.05, rng=5)
    for _ in range(500):  # 10 blocks, 10 audits
        if audit.should_audit():
            audit.record(3, 3)
    assert audit.drawn == 10
    audit.record(3, 5)  # one disagreement: the alert rate applies
    assert audit.current_rate == 0.5
    alert_audits = 0
    while audit.current_rate == 0.5:
        if audit.should_audit():
            alert_audits += 1
            audit.record(3, 3)
    assert alert_audits > 3 and not audit.alarm
    over = audit.drawn - audit._blocks
    assert over > 0
    calls = drawn = 0
    while audit.drawn > audit._blocks - 1:
        drawn += audit.should_audit()  # paying back: every other block's audit
        calls += 1
    assert calls >= 100 * (over - 1) and 0 < drawn <= calls / 100 + 1
    for _ in range(2000):
        if audit.should_audit():
            audit.record(3, 3)
    assert abs(audit.drawn - audit._blocks) <= 1


@pytest.mark.parametrize("kwargs,match", [
    ({"rate": 1.5}, "rate"), ({"rate": -0.1}, "rate"), ({"calibrated_disagreement": 0.0}, "calibrated"),
    ({"calibrated_disagreement": 1.0}, "calibrated"), ({"alpha": 0.0}, "alpha"), ({"alpha": 1.0}, "alpha"),
    ({"alternative": 0.01}, "alternative"), ({"alert_level": 0.0}, "alert_level"), ({"alert_rate": 2.0}, "alert_rate"),
])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Audit(**{"rate": 0.02, "calibrated_disagreement": P0, "alpha": 0.05, **kwargs})


def test_route_without_audit_is_the_plain_threshold():
    assert route(0.9, 0.8, None) is DEVICE and route(0.5, 0.8, None) is SERVER
    assert route(None, 0.8, None) is SERVER  # a model that cannot exit
    assert not DEVICE.audit and not SERVER.audit and AUDIT.audit and not FREE_AUDIT.audit


def test_route_audits_device_answers_and_offloads_everything_under_an_alarm():
    audit = Audit(1.0, P0, 0.05, rng=0)
    assert route(0.9, 0.8, audit) is AUDIT and route(0.5, 0.8, audit) is SERVER
    assert settle(AUDIT, audit, 3, 5) == 3 and audit.disagreements == 1  # the user keeps the device's answer
    while not audit.alarm:
        audit.record(3, 5)
    assert route(0.99, 0.8, audit) is FREE_AUDIT and route(0.5, 0.8, audit) is SERVER
    before = audit.audits
    assert settle(FREE_AUDIT, audit, 3, 5) == 5 and audit.audits == before + 1  # the server's answer, compared
    assert settle(SERVER, audit, 3, 5) == 5 and audit.audits == before + 1


def test_calibrated_disagreement_from_the_manifest(tiny_manifest):
    import dataclasses

    cal = dataclasses.replace(tiny_manifest.calibration, n=1000, exit_rate=0.9, disagreement=0.01, guarantee=None)
    p0 = calibrated_disagreement(dataclasses.replace(tiny_manifest, calibration=cal), delta=0.05)
    assert 0.01 < p0 < 0.02  # an upper bound on 9 of 900
    # without the field: (exit head error + server error) / exit rate, from the table (the tiny model is never right)
    older = dataclasses.replace(tiny_manifest, calibration=dataclasses.replace(tiny_manifest.calibration,
                                                                                disagreement=None))
    assert calibrated_disagreement(older) == 1.0
    # export measures it: the tiny model's exit head and server never agree
    assert tiny_manifest.calibration.disagreement == 1.0 and calibrated_disagreement(tiny_manifest) == 1.0


def offload_stream(seed: int, n: int, r0: float, rate: float, shift: tuple[int, int] | None = None,
                   rate_shift: float = 0.4, alpha: float = 0.05):
    """The label-free test alone drives the alarm (every audit agrees). Returns (audit, first alarm,
    first recovery after the shift ends)."""
    rng = np.random.default_rng(seed)
    audit = Audit(0.02, P0, alpha, rng=np.random.default_rng(20_000 + seed), calibrated_offload_rate=r0,
                  exit_threshold=0.5)
    first_alarm = recovered = None
    for i in range(n):
        shifted = shift is not None and shift[0] <= i < shift[1]
        confidence = 0.1 if rng.random() < (rate_shift if shifted else rate) else 0.9
        was_on = audit.alarm
        decision = route(confidence, 0.5, audit)
        if decision.offload:
            settle(decision, audit, 3, 3)
        if audit.alarm and not was_on and first_alarm is None:
            first_alarm = i
        if was_on and not audit.alarm and recovered is None and shift is not None and i >= shift[1]:
            recovered = i
    return audit, first_alarm, recovered


def test_offload_rate_test_false_alarms_at_its_calibrated_rate():
    """Inputs offloaded at exactly r0 (the null's edge): a false alarm in at most alpha / 2 of the
    streams at a loose alpha, and no disagreement-test alarm (every audit agrees)."""
    runs = [offload_stream(seed, 3000, 0.1, 0.1, alpha=0.5) for seed in range(100)]
    assert sum(a.alarms > 0 for a, *_ in runs) / len(runs) <= 0.25
    assert all(a.observed == 3000 and a.disagreements == 0 for a, *_ in runs)
    quiet = [offload_stream(seed, 3000, 0.1, 0.08) for seed in range(20)]
    assert not any(a.alarms for a, *_ in quiet)


def test_offload_rate_shift_is_flagged_fast_and_clears(capsys):
    delays, back = [], []
    for seed in range(30):
        audit, first, recovered = offload_stream(100 + seed, 3000, 0.1, 0.08, shift=(1000, 2000))
        assert first is not None and first >= 1000  # nothing before the shift
        delays.append(first - 1000)
        back.append(math.inf if recovered is None else recovered - 2000)
        assert not audit.alarm and audit.state()["offload_rate_test"]["alarms"] >= 1
    with capsys.disabled():
        print(f"\noffload-rate test, 0.08 -> 0.4 at input 1,000: delay median {np.median(delays):.0f}, max "
              f"{max(delays)} inputs; back median {np.median(back):.0f} inputs after the shift ends")
    assert max(delays) <= 200 and np.percentile(back, 90) <= 300


def test_an_alarm_of_either_test_offloads_everything():
    audit = Audit(0.02, P0, 0.05, rng=0, calibrated_offload_rate=0.1, exit_threshold=0.5)
    assert audit.state()["alpha"] == 0.05 and audit._offload.alpha == 0.025 == audit._disagreement.alpha
    while not audit.alarm:
        route(0.1, 0.5, audit)  # the calibrated policy offloads every input
    assert audit.drift_tests == ("offload_rate",) and audit.threshold_boost == 1.0
    assert route(0.9, 0.5, audit) is FREE_AUDIT  # a confident input goes to the server too
    while "disagreement" not in audit.drift_tests:
        audit.record(3, 5)  # free audits that disagree
    assert audit.drift_tests == ("disagreement", "offload_rate") and audit.alarms == 2
    for _ in range(200):
        route(0.9, 0.5, audit)
    assert audit.drift_tests == ("disagreement",)  # one test back in distribution, the other still in alarm
    assert route(0.9, 0.5, audit) is FREE_AUDIT
    for _ in range(200):
        settle(route(0.9, 0.5, audit), audit, 3, 3)
    assert not audit.alarm and audit.recoveries == 2 and route(0.9, 0.5, audit) in (DEVICE, AUDIT)


@pytest.mark.parametrize("kwargs,match", [({"calibrated_offload_rate": 0.1}, "come together"),
                                          ({"exit_threshold": 0.5}, "come together"),
                                          ({"calibrated_offload_rate": 0.0, "exit_threshold": 0.5}, "offload_rate")])
def test_bad_offload_rate_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Audit(0.02, P0, 0.05, **kwargs)


def test_audit_for_builds_the_label_free_test_from_the_manifest(tiny_manifest):
    import dataclasses

    from splitinfer.edge.audit import audit_for, calibrated_offload_rate

    cal = dataclasses.replace(tiny_manifest.calibration, n=1000, exit_rate=0.9, disagreement=0.01, guarantee=None)
    manifest = dataclasses.replace(tiny_manifest, calibration=cal)
    r0 = calibrated_offload_rate(manifest, delta=0.05)
    assert 0.1 < r0 < 0.125  # an upper bound on 100 of 1000
    audit, why = audit_for(manifest)
    assert why == "" and audit.exit_threshold == manifest.exit_threshold
    assert audit.state()["offload_rate_test"]["calibrated_offload_rate"] == pytest.approx(r0)
    never = dataclasses.replace(manifest, calibration=dataclasses.replace(cal, exit_rate=1.0))
    assert calibrated_offload_rate(never) is None and "offload_rate_test" not in audit_for(never)[0].state()
