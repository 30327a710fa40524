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
so an estimate that is low by chance does not raise alarms.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["Audit", "default_alternative"]


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
            return self.alarm
        self._t += 1
        self.statistic = max(0.0, self.statistic + (self._up if disagree else self._down))
        if self.statistic >= self.threshold:
            self.alarm = True
            self.alarms += 1
            self.recovery_statistic = 0.0
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
