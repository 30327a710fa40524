"""The field audit: a random share of the inputs the edge answered itself is offloaded too, the
server's answer is compared with the device's, and sequential tests watch for drift.

Two tests, each a Bernoulli CUSUM of a log likelihood ratio (p1 against p0),

    S_t = max(0, S_{t-1} + x_t log(p1 / p0) + (1 - x_t) log((1 - p1) / (1 - p0))),

with an anytime-valid threshold h_t = log(t (t + 1) / alpha_i), t = observations since the test
(re)started:

- the *disagreement* test: x_t = 1 when an audited input's server answer differs from the device's;
  p0 = ``calibrated_disagreement``, p1 = ``alternative``;
- the *offload-rate* test (label-free, every input, no bytes): x_t = 1 when the calibrated policy
  (``exit_threshold``) would offload the input; p0 = ``calibrated_offload_rate``, an upper bound on
  that rate on the calibration split, p1 = :func:`default_offload_alternative`. Inputs the exit head
  finds harder than the calibration split's are inputs its guarantee says nothing about; on every
  shift surveyed for the built-in model (benchmarks/audit.py) the exit head's confident answers stay
  mostly agreed with the server's (a few % disagreement, too rare to show in ~10 audits per 500
  inputs), while its offload rate moves at once. Only a rise is tested: a stream of easier inputs
  is no reason to offload more, and a confidently wrong exit head is the disagreement test's case.

An alarm at observation t means that for some start s <= t the likelihood-ratio martingale started
at s reached exp(h_t) >= s (s + 1) / alpha_i; on in-distribution inputs (rate <= p0, audit choice
independent of the input) each of those crosses its level with probability <= alpha_i / (s (s + 1))
(Ville's inequality), so the probability of *any* false alarm of a test, over an endless stream, is
<= alpha_i. With both tests on each gets alpha / 2, so a false alarm of either stays <= alpha.
Unlike a plain SPRT from the first observation, the CUSUM forgets a long quiet past, so a shift that
starts late is still caught fast; the price is a threshold that grows like 2 log t.

The audit rate is a budget, not a coin: the device-answered inputs are cut into consecutive blocks
of 1 / ``rate`` and one input at a uniformly random place in each block is audited, so the share is
the rate itself rather than a binomial draw around it. To be fast with few audits, the draws rise to
``alert_rate`` (a coin per input) while the disagreement statistic is above ``alert_level`` (evidence
is building up); those extra audits are paid back afterwards by skipping every other block's audit
until the audits again number the blocks begun (skipping all of them would leave the test blind for
hundreds of inputs, long enough to miss a shift that starts then), so over a stream the share stays
near ``rate``: above it only by audits not yet paid back. Which input is audited depends only on the
random draws and past audits, never on the input, so the tests stay valid.

Recovery: on alarm, :attr:`threshold_boost` becomes 1.0 (offload everything). Every input then
goes to the server, so every input the *calibrated* policy would have answered on the device is a
free audit: the caller passes those to :meth:`record` too. Each test that alarmed runs a recovery
CUSUM (p0 against p1) over its observations; when it reaches log(1 / alpha_i) that test is judged
back in distribution and restarts from zero (a fresh test from there on). The boost returns to 0
when no test is in alarm.

``calibrated_disagreement`` and ``calibrated_offload_rate`` should be upper confidence bounds on the
calibration split's rates (protos/calibration.py clopper_pearson_upper), so an estimate that is low
by chance does not raise alarms: :func:`calibrated_disagreement` and :func:`calibrated_offload_rate`
make them from the manifest.

One input, the same code in :class:`~splitinfer.edge.runner.EdgeRunner` and in the benchmark that
replays streams (benchmarks/audit.py): :func:`route` says whether to offload, whose answer the user
gets and whether the server's answer is compared (and feeds the offload-rate test); after an
offload, :func:`settle` records the comparison.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from splitinfer.protos.calibration import clopper_pearson_upper

__all__ = ["Audit", "Route", "route", "settle", "calibrated_disagreement", "calibrated_offload_rate", "offload_rate_summary",
           "default_alternative", "default_offload_alternative", "audit_for",
           "DEFAULT_RATE", "DEFAULT_ALPHA", "MAX_DISAGREEMENT"]

log = logging.getLogger(__name__)


def default_alternative(p0: float) -> float:
    """The drifted disagreement rate the test is tuned for: four times p0, at least p0 + 0.1, at most 0.5."""
    return float(min(0.5, max(4.0 * p0, p0 + 0.1)))


def default_offload_alternative(r0: float) -> float:
    """The drifted offload rate the label-free test is tuned for: r0 + 0.1 (at least 1.5 r0), below 1."""
    return float(min(0.5 * (1.0 + r0), max(1.5 * r0, r0 + 0.1)))


class _Cusum:
    """One drift test: the Bernoulli CUSUM of rate p1 against p0 with the anytime threshold, and the
    recovery CUSUM (p0 against p1) that ends its alarm (see the module docstring)."""

    def __init__(self, p0: float, p1: float, alpha: float) -> None:
        self.p0, self.p1, self.alpha = p0, p1, alpha
        self._up = math.log(p1 / p0)  # increment on x = 1 (detection CUSUM)
        self._down = math.log((1.0 - p1) / (1.0 - p0))  # on x = 0 (< 0)
        self.recovery_level = math.log(1.0 / alpha)
        self.alarm = False
        self.alarms = self.recoveries = 0
        self.statistic = 0.0  # detection CUSUM S_t
        self.recovery_statistic = 0.0  # recovery CUSUM, while the alarm is on
        self._t = 0  # observations since the detection test (re)started

    @property
    def threshold(self) -> float:
        t = max(self._t, 1)
        return math.log(t * (t + 1) / self.alpha)

    def step(self, x: bool) -> str | None:
        """One observation; returns "alarm" or "recovered" when the state changes, else None."""
        if self.alarm:
            self.recovery_statistic = max(0.0, self.recovery_statistic - (self._up if x else self._down))
            if self.recovery_statistic < self.recovery_level:
                return None
            self.alarm = False
            self.recoveries += 1
            self.statistic, self.recovery_statistic, self._t = 0.0, 0.0, 0
            return "recovered"
        self._t += 1
        self.statistic = max(0.0, self.statistic + (self._up if x else self._down))
        if self.statistic < self.threshold:
            return None
        self.alarm = True
        self.alarms += 1
        self.recovery_statistic = 0.0
        return "alarm"


class Audit:
    """Field audit of the device's own answers.

    rate: share of device-answered inputs also offloaded (0 <= rate <= 1; one per block of 1 / rate,
    see :meth:`should_audit`). calibrated_disagreement:
    p0, the disagreement rate (device vs server) expected on those inputs. alpha: the bound on the
    probability of a false alarm. rng: a numpy Generator (or seed) for the audit draws. alternative:
    p1 > p0, the drifted rate the test is tuned for. alert_rate / alert_level: the raised audit rate
    and the statistic above which it applies. calibrated_offload_rate and exit_threshold (both or
    neither): the label-free test, on the share of inputs whose exit confidence is below
    ``exit_threshold`` (the manifest's calibrated threshold, whatever operating point is in use).
    """

    def __init__(self, rate: float = 0.02, calibrated_disagreement: float = 0.02, alpha: float = 0.05,
                 rng: np.random.Generator | int | None = None, alternative: float | None = None,
                 alert_rate: float = 0.5, alert_level: float = 1.0, calibrated_offload_rate: float | None = None,
                 exit_threshold: float | None = None) -> None:
        for name, value in (("rate", rate), ("alert_rate", alert_rate)):
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if not 0.0 < float(calibrated_disagreement) < 1.0:
            raise ValueError(f"calibrated_disagreement must be in (0, 1), got {calibrated_disagreement}")
        if not 0.0 < float(alpha) < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        p0 = float(calibrated_disagreement)
        p1 = default_alternative(p0) if alternative is None else float(alternative)
        if not p0 < p1 < 1.0:
            raise ValueError(f"alternative must be in (calibrated_disagreement={p0}, 1), got {alternative}")
        if not alert_level > 0.0:
            raise ValueError(f"alert_level must be > 0, got {alert_level}")
        if (calibrated_offload_rate is None) != (exit_threshold is None):
            raise ValueError("calibrated_offload_rate and exit_threshold come together (the label-free test needs both)")
        if calibrated_offload_rate is not None and not 0.0 < float(calibrated_offload_rate) < 1.0:
            raise ValueError(f"calibrated_offload_rate must be in (0, 1), got {calibrated_offload_rate}")
        self.rate, self.alert_rate, self.alert_level = float(rate), max(float(alert_rate), float(rate)), float(alert_level)
        self.alpha = float(alpha)
        share = self.alpha / 2 if calibrated_offload_rate is not None else self.alpha
        self._disagreement = _Cusum(p0, p1, share)
        self._offload = None if calibrated_offload_rate is None else _Cusum(
            float(calibrated_offload_rate), default_offload_alternative(float(calibrated_offload_rate)), share)
        self.exit_threshold = None if exit_threshold is None else float(exit_threshold)
        self.rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        self.audits = self.disagreements = 0  # lifetime counts of recorded comparisons
        self.observed = self.below_threshold = 0  # lifetime counts of the label-free test's inputs
        self.eligible = self.drawn = 0  # device-answered inputs drawn for, and audits drawn
        self._blocks, self._block_end, self._slot = 0, 0, -1  # the audit schedule (see should_audit)

    @property
    def p0(self) -> float:
        return self._disagreement.p0

    @property
    def p1(self) -> float:
        return self._disagreement.p1

    @property
    def statistic(self) -> float:
        """The disagreement test's CUSUM S_t."""
        return self._disagreement.statistic

    @property
    def threshold(self) -> float:
        """h_t: the disagreement test's threshold at its current audit count."""
        return self._disagreement.threshold

    def _tests(self) -> "tuple[_Cusum, ...]":
        return (self._disagreement,) if self._offload is None else (self._disagreement, self._offload)

    @property
    def alarm(self) -> bool:
        return any(t.alarm for t in self._tests())

    @property
    def alarms(self) -> int:
        return sum(t.alarms for t in self._tests())

    @property
    def recoveries(self) -> int:
        return sum(t.recoveries for t in self._tests())

    @property
    def threshold_boost(self) -> float:
        """How much stricter the exit decision should be: 0 = the calibrated policy, 1 = offload
        everything (see :meth:`stricter`)."""
        return 1.0 if self.alarm else 0.0

    def stricter(self, threshold: float, ceiling: float = 1.0 + 1e-6) -> float:
        """The exit threshold to use now: ``threshold`` moved towards ``ceiling`` (a value no input
        reaches, i.e. offload everything) by :attr:`threshold_boost`."""
        return threshold + self.threshold_boost * (ceiling - threshold)

    @property
    def current_rate(self) -> float:
        """The audit rate that applies to the next device-answered input."""
        if self.alarm:
            return 0.0  # everything is offloaded: no input is answered on the device to audit
        return self.alert_rate if self.statistic >= self.alert_level else self.rate

    def should_audit(self) -> bool:
        """Draw for one input the device answered itself: also offload it for comparison?

        Outside an alert, the input at the scheduled place of its block (one per 1 / rate
        device-answered inputs), but only every other block's while audits drawn at the alert rate
        are being paid back; during an alert, a coin at :attr:`current_rate`. Never during an alarm
        (nothing is answered on the device then)."""
        if self.alarm or self.rate <= 0.0:
            return False
        i = self.eligible
        self.eligible += 1
        if i >= self._block_end:  # a new block begins: place its audit
            start = self._block_end
            self._blocks += 1
            self._block_end = max(start + 1, int(math.floor(self._blocks / self.rate + 1e-9)))
            self._slot = start + int(self.rng.integers(self._block_end - start))
        rate = self.current_rate
        if rate > self.rate:  # an alert
            draw = bool(self.rng.random() < rate)
        else:
            # paying back audits drawn at the alert rate: only every other block's, so the test never starves
            draw = i == self._slot and (self.drawn < self._blocks or self._blocks % 2 == 0)
        self.drawn += draw
        return draw

    def observe(self, confidence: float) -> bool:
        """The label-free test's observation for one input (its exit confidence; a no-op without the
        test). Returns whether the alarm is on afterwards."""
        if self._offload is not None:
            below = confidence < self.exit_threshold
            self.observed += 1
            self.below_threshold += below
            change = self._offload.step(below)
            if change is not None:  # the message is built only then: this runs for every input
                self._log(self._offload, change, "offload rate",
                          f"{self.below_threshold} of {self.observed} inputs below the calibrated exit threshold, "
                          f"calibrated rate {self._offload.p0:.4f}")
        return self.alarm

    def record(self, device_label: int, server_label: int) -> bool:
        """One comparison: an audited input, or (during an alarm) an input the calibrated policy
        would have answered on the device. Returns whether the alarm is on afterwards."""
        disagree = int(device_label) != int(server_label)
        self.audits += 1
        self.disagreements += disagree
        change = self._disagreement.step(disagree)
        if change is not None:
            self._log(self._disagreement, change, "disagreement",
                      f"{self.disagreements} of {self.audits} audits disagree, calibrated rate {self.p0:.4f}")
        return self.alarm

    def _log(self, test: _Cusum, change: str, name: str, counts: str) -> None:
        if change == "alarm":
            log.warning("field audit: drift flagged by the %s test (%s; CUSUM %.2f >= %.2f at level alpha %.3g): "
                        "offloading every input until it is back in distribution", name, counts, test.statistic,
                        test.threshold, test.alpha)
        else:
            log.warning("field audit: the %s test is back in distribution (%s)%s", name, counts,
                        "" if self.alarm else ": back to the calibrated exit threshold")

    @property
    def drift_tests(self) -> tuple[str, ...]:
        """The tests in alarm now ("disagreement", "offload_rate")."""
        names = (("disagreement", self._disagreement), ("offload_rate", self._offload))
        return tuple(name for name, t in names if t is not None and t.alarm)

    def state(self) -> dict:
        """What a summary, a log line or the JSON report shows."""
        out = {
            "audits": self.audits, "disagreements": self.disagreements, "alarm": self.alarm,
            "alarms": self.alarms, "recoveries": self.recoveries, "statistic": round(self.statistic, 4),
            "threshold": round(self.threshold, 4), "recovery_statistic": round(self._disagreement.recovery_statistic, 4),
            "threshold_boost": self.threshold_boost, "audit_rate": self.current_rate, "rate": self.rate,
            "calibrated_disagreement": self.p0, "alternative": self.p1, "alpha": self.alpha,
            "drift_tests": list(self.drift_tests), "device_answers_drawn_for": self.eligible,
            "audits_drawn": self.drawn,
        }
        if self._offload is not None:
            t = self._offload
            out["offload_rate_test"] = {
                "observed": self.observed, "below_threshold": self.below_threshold, "alarms": t.alarms,
                "recoveries": t.recoveries, "statistic": round(t.statistic, 4), "threshold": round(t.threshold, 4),
                "calibrated_offload_rate": t.p0, "alternative": t.p1, "exit_threshold": self.exit_threshold}
        return out


@dataclass(frozen=True)
class Route:
    """What to do with one input. offload: send it to the server. answer: whose answer the user
    gets, "device" or "server". compare: record the server's answer against the device's.
    An audit (purpose AUDIT on the wire) is an offload whose answer is the device's."""

    offload: bool
    answer: str
    compare: bool = False

    @property
    def audit(self) -> bool:
        return self.offload and self.answer == "device"


DEVICE = Route(offload=False, answer="device")
SERVER = Route(offload=True, answer="server")
AUDIT = Route(offload=True, answer="device", compare=True)
FREE_AUDIT = Route(offload=True, answer="server", compare=True)


def route(confidence: float | None, threshold: float, audit: Audit | None) -> Route:
    """The exit decision for one input. confidence: the exit confidence (None: the model
    cannot exit, e.g. an embedding model). threshold: the calibrated exit threshold of the operating
    point in use. audit: the field audit, or None when it is off.

    Confident under the audit's (maybe stricter) threshold: the device answers, and a random share
    of those inputs is audited. Otherwise the server answers; an input the calibrated threshold
    would have answered on the device (offloaded only because of a drift alarm) is compared too.
    Every input's confidence also goes to the audit's label-free test (:meth:`Audit.observe`).
    """
    if confidence is None:
        return SERVER
    if audit is None:
        return DEVICE if confidence >= threshold else SERVER
    audit.observe(confidence)
    if confidence >= audit.stricter(threshold):
        return AUDIT if audit.should_audit() else DEVICE
    return FREE_AUDIT if confidence >= threshold else SERVER


def settle(decision: Route, audit: Audit | None, device_label: int, server_label: int) -> int:
    """After the server answered an offloaded input: record the comparison when the route asks for
    one, and return the label the user gets."""
    if decision.compare and audit is not None:
        audit.record(device_label, server_label)
    return int(device_label if decision.answer == "device" else server_label)


def calibrated_disagreement(manifest, delta: float = 0.05) -> float | None:
    """p0 for :class:`Audit`: a one-sided (1 - delta) Clopper-Pearson upper bound on the rate at which
    the server's answer differs from the exit head's among the inputs the default operating point
    answers on the device, from the manifest's calibration figures; None when they cannot tell
    (not a classifier, or no input answered on the device).

    With ``calibration.disagreement`` (measured at export) the bound is on that rate over the
    n x exit_rate inputs answered on the device. Without it, from the operating-point table: two
    answers that differ are not both right, so the rate is at most (error of the exit head alone +
    error of the server alone) / exit_rate, the errors read from the table's points that exit
    everything and nothing (the whole model's error when the table has no point that exits nothing);
    a looser bound, which makes the audit slower to flag drift, never quicker to raise false alarms.
    """
    cal = manifest.calibration
    answered = int(round(cal.n * cal.exit_rate))
    if manifest.task != "classification" or answered < 1:
        return None
    rate = cal.disagreement
    if rate is None:
        points = manifest.operating_points
        exit_all = [p.accuracy for p in points if p.exit_rate >= 1.0]
        server_all = [p.accuracy for p in points if p.exit_rate <= 0.0]
        if not exit_all:
            return None
        server_error = 1.0 - (max(server_all) if server_all else cal.accuracy_full)
        rate = min(1.0, (1.0 - max(exit_all) + server_error) / cal.exit_rate)
    return clopper_pearson_upper(min(answered, int(math.ceil(rate * answered - 1e-9))), answered, delta)


def offload_rate_summary(state: dict) -> str:
    """The label-free test's counts for a summary line, from :meth:`Audit.state` ("" without the test)."""
    t = state.get("offload_rate_test")
    if t is None:
        return ""
    return (f"{t['below_threshold']} of {t['observed']} inputs below the calibrated exit threshold "
            f"(calibrated rate <= {t['calibrated_offload_rate']:.4f})")


def calibrated_offload_rate(manifest, delta: float = 0.05) -> float | None:
    """r0 for the label-free test: a one-sided (1 - delta) Clopper-Pearson upper bound on the share of
    the calibration split that the manifest's exit threshold offloads; None when it cannot tell (not
    a classifier, or a calibrated policy that offloads nothing or everything)."""
    cal = manifest.calibration
    offloaded = int(round(cal.n * (1.0 - cal.exit_rate)))
    if manifest.task != "classification" or not 0 < offloaded < cal.n:
        return None
    return clopper_pearson_upper(offloaded, cal.n, delta)


DEFAULT_RATE = 0.02  # share of device-answered inputs audited
DEFAULT_ALPHA = 0.05  # bound on the probability of a false drift alarm
MAX_DISAGREEMENT = 0.4  # above it the drifted rate the test looks for (at most 0.5) is too close to tell


def audit_for(manifest, rate: float = DEFAULT_RATE, alpha: float = DEFAULT_ALPHA,
              disagreement: float | None = None, rng=None) -> "tuple[Audit | None, str]":
    """The field audit a model supports: (Audit, "") or (None, why not): rate 0, not a classifier, or
    no usable calibrated disagreement rate. ``disagreement``: p0 to use instead of the manifest's bound."""
    if rate == 0:
        return None, "--audit-rate is 0"
    if manifest.task != "classification":
        return None, "the model is not a classifier (it never answers on the device)"
    p0 = disagreement if disagreement is not None else calibrated_disagreement(manifest, delta=alpha)
    if p0 is None or p0 >= MAX_DISAGREEMENT:
        return None, ("the manifest gives no usable calibrated disagreement rate "
                      f"({'none' if p0 is None else f'{p0:.3f}'}); pass --audit-disagreement to set one")
    r0 = calibrated_offload_rate(manifest, delta=alpha)
    return Audit(rate, p0, alpha, rng=rng, calibrated_offload_rate=r0,
                 exit_threshold=None if r0 is None else manifest.exit_threshold), ""
