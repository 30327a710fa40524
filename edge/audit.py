"""The field audit: a random share of the inputs the edge answered itself is offloaded too, the
server's answer is compared with the device's, and a sequential test watches the disagreement rate.

The test (documented choice): a Bernoulli CUSUM of the log likelihood ratio of the disagreement
rate ``alternative`` (p1) against ``calibrated_disagreement`` (p0),

    S_t = max(0, S_{t-1} + x_t log(p1 / p0) + (1 - x_t) log((1 - p1) / (1 - p0))),   x_t = 1 on disagreement,

with an anytime-valid threshold h_t = log(t (t + 1) / alpha), t = audits since the test (re)started.
An alarm at audit t means that for some start s <= t the likelihood-ratio martingale started at s
reached exp(h_t) >= s (s + 1) / alpha; on in-distribution inputs (disagreement rate <= p0, audit
choice independent of the input) each of those martingales crosses its level with probability <=
alpha / (s (s + 1)) (Ville's inequality), so the probability of *any* false alarm, over an endless
stream, is <= sum_s alpha / (s (s + 1)) < alpha. Unlike a plain SPRT from the first audit, the
CUSUM forgets a long quiet past, so a shift that starts late is still caught fast; the price is a
threshold that grows like 2 log t.

To be fast with few audits, the audit rate rises to ``alert_rate`` while S_t is above ``alert_level``
(evidence is building up); under in-distribution inputs S_t rarely climbs that high, so this costs
few extra offloads. The rate depends only on past audits, never on the input, so the test stays valid.

Recovery: on alarm, :attr:`threshold_boost` becomes 1.0 (offload everything). Every input then
goes to the server, so every input the *calibrated* policy would have answered on the device is a
free audit: the caller passes those to :meth:`record` too. A second CUSUM (p0 against p1) runs over
them; when it reaches log(1 / alpha) the shift is judged over, the boost returns to 0 and the
detection test restarts from zero (a fresh level-alpha test from there on).

``calibrated_disagreement`` should be an upper confidence bound on the calibration split's
disagreement rate among the inputs the device answers (protos/calibration.py clopper_pearson_upper),
so an estimate that is low by chance does not raise alarms: :func:`calibrated_disagreement` makes it
from the manifest.

One input, the same code in :class:`~splitinfer.edge.runner.EdgeRunner` and in the benchmark that
replays streams (benchmarks/audit.py): :func:`route` says whether to offload, whose answer the user
gets and whether the server's answer is compared; after an offload, :func:`settle` records the
comparison.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from splitinfer.protos.calibration import clopper_pearson_upper

__all__ = ["Audit", "Route", "route", "settle", "calibrated_disagreement", "default_alternative", "audit_for",
           "DEFAULT_RATE", "DEFAULT_ALPHA", "MAX_DISAGREEMENT"]

log = logging.getLogger(__name__)


def default_alternative(p0: float) -> float:
    """The drifted disagreement rate the test is tuned for: four times p0, at least p0 + 0.1, at most 0.5."""
    return float(min(0.5, max(4.0 * p0, p0 + 0.1)))


class Audit:
    """Field audit of the device's own answers.

    rate: share of device-answered inputs also offloaded (0 <= rate <= 1). calibrated_disagreement:
    p0, the disagreement rate (device vs server) expected on those inputs. alpha: the bound on the
    probability of a false alarm. rng: a numpy Generator (or seed) for the audit draws. alternative:
    p1 > p0, the drifted rate the test is tuned for. alert_rate / alert_level: the raised audit rate
    and the statistic above which it applies.
    """

    def __init__(self, rate: float = 0.02, calibrated_disagreement: float = 0.02, alpha: float = 0.05,
                 rng: np.random.Generator | int | None = None, alternative: float | None = None,
                 alert_rate: float = 0.5, alert_level: float = 1.0) -> None:
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
        self.rate, self.alert_rate, self.alert_level = float(rate), max(float(alert_rate), float(rate)), float(alert_level)
        self.p0, self.p1, self.alpha = p0, p1, float(alpha)
        self.rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        self._up = math.log(p1 / p0)  # increment on a disagreement (detection CUSUM)
        self._down = math.log((1.0 - p1) / (1.0 - p0))  # on an agreement (< 0)
        self.recovery_level = math.log(1.0 / self.alpha)
        self.audits = self.disagreements = 0  # lifetime counts of recorded comparisons
        self.alarms = self.recoveries = 0
        self.alarm = False
        self.statistic = 0.0  # detection CUSUM S_t
        self.recovery_statistic = 0.0  # recovery CUSUM, while the alarm is on
        self._t = 0  # audits since the detection test (re)started

    @property
    def threshold(self) -> float:
        """h_t: the detection threshold at the current audit count."""
        t = max(self._t, 1)
        return math.log(t * (t + 1) / self.alpha)

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
        """Draw for one input the device answered itself: also offload it for comparison?"""
        rate = self.current_rate
        return bool(rate > 0.0 and self.rng.random() < rate)

    def record(self, device_label: int, server_label: int) -> bool:
        """One comparison: an audited input, or (during an alarm) an input the calibrated policy
        would have answered on the device. Returns whether the alarm is on afterwards."""
        disagree = int(device_label) != int(server_label)
        self.audits += 1
        self.disagreements += disagree
        if self.alarm:
            # recovery CUSUM: evidence for p0 against p1
            step = -self._up if disagree else -self._down
            self.recovery_statistic = max(0.0, self.recovery_statistic + step)
            if self.recovery_statistic >= self.recovery_level:
                self.alarm = False
                self.recoveries += 1
                self.statistic, self.recovery_statistic, self._t = 0.0, 0.0, 0
                log.warning("field audit: audits agree again (%d of %d disagree overall): back to the calibrated "
                            "exit threshold", self.disagreements, self.audits)
            return self.alarm
        self._t += 1
        self.statistic = max(0.0, self.statistic + (self._up if disagree else self._down))
        if self.statistic >= self.threshold:
            self.alarm = True
            self.alarms += 1
            self.recovery_statistic = 0.0
            log.warning("field audit: drift flagged (%d of %d audits disagree, calibrated rate %.4f; CUSUM %.2f >= "
                        "%.2f at level alpha %.3g): offloading every input until audits agree again",
                        self.disagreements, self.audits, self.p0, self.statistic, self.threshold, self.alpha)
        return self.alarm

    def state(self) -> dict:
        """What a summary, a log line or the JSON report shows."""
        return {
            "audits": self.audits, "disagreements": self.disagreements, "alarm": self.alarm,
            "alarms": self.alarms, "recoveries": self.recoveries, "statistic": round(self.statistic, 4),
            "threshold": round(self.threshold, 4), "recovery_statistic": round(self.recovery_statistic, 4),
            "threshold_boost": self.threshold_boost, "audit_rate": self.current_rate, "rate": self.rate,
            "calibrated_disagreement": self.p0, "alternative": self.p1, "alpha": self.alpha,
        }


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
    """The exit decision for one input. confidence: the exit head's max softmax (None: the model
    cannot exit, e.g. an embedding model). threshold: the calibrated exit threshold of the operating
    point in use. audit: the field audit, or None when it is off.

    Confident under the audit's (maybe stricter) threshold: the device answers, and a random share
    of those inputs is audited. Otherwise the server answers; an input the calibrated threshold
    would have answered on the device (offloaded only because of a drift alarm) is compared too.
    """
    if confidence is None:
        return SERVER
    if audit is None:
        return DEVICE if confidence >= threshold else SERVER
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
    return Audit(rate, p0, alpha, rng=rng), ""
