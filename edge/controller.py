"""A budget the user sets, held per request by choosing an operating point: drift-plus-penalty.

Export measures a table of operating points (exit threshold, token selection, codec) ->
(accuracy, exit rate, mean bytes per request, device and server ms) and keeps its Pareto front in
the manifest. The user states long-run limits (mean bytes, mean latency, mean energy per request,
least accuracy, any combination); before each request :class:`BudgetController` picks the point

    argmin_p  V * penalty(p)  +  sum_k (Q_k / G_k) * y_k(p)          y_k = cost_k(p) / limit_k - 1

and afterwards updates one virtual queue per constraint with what the request *really* cost:

    Q_k <- max(Q_k + realised_cost_k / limit_k - 1, -credit * G_k)

(Neely, "Stochastic Network Optimization with Application to Communication and Queueing Systems",
2010, ch. 4). penalty is minus the point's accuracy, rescaled to [-1, 0] over the table; with a
``min_accuracy`` constraint it is the point's bytes (or energy, given an energy model) rescaled to
[0, 1], and only points whose accuracy floor (the lower confidence bound export recorded, or the
measured accuracy in older folders) meets it are ever chosen: no request is served by a point that
cannot promise the accuracy asked for. Latency and energy costs are predicted from the measured bandwidth and round-trip time
(:class:`LinkMonitor`, an exponentially weighted least-squares fit of network time against bytes).

Choice of V and what it buys. G_k is one worst-case request's cost in units of the limit (the
largest bytes per offload over the budget, ...), so Q_k / G_k counts backlog in requests. With a
queue-stable policy drift-plus-penalty guarantees

    time-average penalty  <=  optimum + B / V         (B bounds the squared per-request costs)
    time-average cost_k   <=  limit_k + (Q_k(T) - Q_k(0)) / T,   Q_k = O(V G_k)

so a larger V gets closer to the best accuracy the budget allows (time-sharing between the two
Pareto points either side of the budget emerges from the queue) and a smaller one keeps the
backlog, and so the excess over the limit in any window, small. Early exits make per-request
bytes bursty (most requests send nothing, a few send kilobytes), so the backlog wanders by about
sqrt(T) offloads even at a point that exactly meets the budget; V = 100 (the default) puts the
next switch far enough away that this wandering alone does not move the choice, and a queue may
fall ``credit`` worst-case requests below zero (bytes saved earlier may be spent later) so that
the wandering is not lost at the floor either. On the benchmark's traces (about 5% of requests
offloaded) this holds a bytes budget within 2% over 10,000 requests.

Three refinements keep the O(V) backlog from turning into O(V) error. (1) Live estimates: every
request's exit confidence shows which points would have exited, so each point's exit rate is
re-estimated from all requests, and each point's bytes per offload from its own offloads (the
table, measured on the calibration split, is the prior). (2) Place-holder backlog (Huang and
Neely, "Delay Reduction via Lagrange Multipliers in Stochastic Network Optimization", IEEE TAC
2011): the queues start at, and every ``rebalance_every`` requests are shifted by the change of,
the backlog where the expected drift is zero, found by bisection on the live estimates; a shift
keeps the realised debt (queue minus place-holder), which is what the long-run mean is made of.
(3) That backlog sits one mean excursion above a tie between two points, and in the middle of a
point's range when the limit equals that point's cost within estimation noise.

Starvation: when no point can meet a constraint on expected cost (a latency bound with the
bandwidth near zero), the controller picks the point cheapest in the starved constraints and does
not grow their queues (a debt that can never be paid back would otherwise starve later requests).
With no constraint it returns the manifest's default point.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from splitinfer.protos.points import OperatingPoint

__all__ = ["Constraints", "RequestCost", "LinkEstimate", "LinkMonitor", "BudgetController"]

CONSTRAINTS = ("max_bytes", "max_latency_ms", "max_energy_mj", "max_device_energy_mj", "min_accuracy")
ENERGY_CONSTRAINTS = ("max_energy_mj", "max_device_energy_mj")
OFFLOAD_PRIOR = 20  # the table's bytes per offload counts as this many observed offloads
MAX_Y = 1e9  # cap on a normalised cost (an offload at zero bandwidth)


@dataclass(frozen=True)
class Constraints:
    """Long-run limits per request; None = unconstrained. Any combination.

    max_bytes: mean request bytes. max_latency_ms: mean latency. max_energy_mj: mean energy (needs
    an energy model). max_device_energy_mj: mean energy drawn on the device itself, device half +
    radio, what a battery pays (edge/battery.py); needs an energy model. min_accuracy: least accuracy
    of every point used: only points whose
    :attr:`~splitinfer.protos.points.OperatingPoint.accuracy_floor` (the export's lower confidence
    bound, or the measured accuracy in older folders; the edge has no labels) reaches it are chosen.
    """

    max_bytes: float | None = None
    max_latency_ms: float | None = None
    max_energy_mj: float | None = None
    max_device_energy_mj: float | None = None
    min_accuracy: float | None = None

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_latency_ms", *ENERGY_CONSTRAINTS):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if self.min_accuracy is not None and not 0.0 <= self.min_accuracy < 1.0:
            raise ValueError(f"min_accuracy must be in [0, 1), got {self.min_accuracy!r}")

    @property
    def active(self) -> tuple[str, ...]:
        return tuple(name for name in CONSTRAINTS if getattr(self, name) is not None)

    def __bool__(self) -> bool:
        return bool(self.active)


@dataclass(frozen=True)
class RequestCost:
    """What one request really cost: bytes sent, latency (ms), energy (mJ, None if not estimated),
    the expected accuracy of the point that served it (the edge cannot see correctness), and the
    part of the energy drawn on the device (device half + radio; None: not estimated)."""

    bytes: float
    latency_ms: float
    energy_mj: float | None
    accuracy: float
    device_energy_mj: float | None = None

    @classmethod
    def from_result(cls, result, point: OperatingPoint) -> "RequestCost":
        energy = getattr(result, "energy", None)
        if energy is None:
            return cls(result.bytes_sent, result.latency_ms, None, point.accuracy)
        return cls(result.bytes_sent, result.latency_ms, energy.total_mj, point.accuracy,
                   energy.device_mj + energy.radio_mj)


@dataclass(frozen=True)
class LinkEstimate:
    """Bandwidth (bits/s) and round-trip time (ms) of the path to the server."""

    bandwidth_bps: float
    rtt_ms: float

    def __post_init__(self) -> None:
        if not self.bandwidth_bps >= 0 or not self.rtt_ms >= 0:
            raise ValueError(f"bandwidth_bps and rtt_ms must be >= 0, got {self.bandwidth_bps}, {self.rtt_ms}")

    def transfer_ms(self, nbytes: float) -> float:
        """Round trip plus serialisation of ``nbytes``; inf with no bandwidth."""
        if nbytes <= 0:
            return 0.0
        if self.bandwidth_bps <= 0:
            return math.inf
        return self.rtt_ms + 8e3 * nbytes / self.bandwidth_bps


class LinkMonitor:
    """Bandwidth and RTT from the offloads the edge makes.

    Each offload gives (bytes sent, network ms = round trip - server time). An exponentially weighted
    least-squares fit of network_ms = rtt + 8e3 * bytes / bandwidth separates the two (forgetting
    factor ``1 - alpha``); while the packet sizes seen are too alike to fit a slope, the bandwidth
    keeps its last value and the RTT absorbs the rest. ``set`` injects a value (a recorded trace).
    """

    def __init__(self, initial: LinkEstimate = LinkEstimate(20e6, 5.0), alpha: float = 0.2) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self.estimate = initial
        self._sums = np.zeros(5)  # weight, x, y, xx, xy with x = bytes, y = network ms
        self.samples = 0

    def set(self, estimate: LinkEstimate) -> None:
        self.estimate = estimate

    def observe(self, bytes_sent: float, round_trip_ms: float, server_ms: float = 0.0) -> LinkEstimate:
        if bytes_sent <= 0 or not math.isfinite(round_trip_ms):
            return self.estimate
        y = max(round_trip_ms - max(server_ms, 0.0), 1e-3)
        x = float(bytes_sent)
        self._sums = (1.0 - self.alpha) * self._sums + np.array([1.0, x, y, x * x, x * y])
        self.samples += 1
        w, sx, sy, sxx, sxy = self._sums
        mx, my = sx / w, sy / w
        var = sxx / w - mx * mx
        slope = (sxy / w - mx * my) / var if var > (0.05 * mx) ** 2 else None  # ms per byte
        if slope is not None and slope > 0:
            bandwidth = 8e3 / slope
            rtt = max(my - slope * mx, 0.0)
        else:
            bandwidth = self.estimate.bandwidth_bps
            rtt = max(my - (8e3 * mx / bandwidth if bandwidth > 0 else 0.0), 0.0)
        self.estimate = LinkEstimate(bandwidth, rtt)
        return self.estimate


def _floor_name(point: OperatingPoint) -> str:
    return "measured accuracy" if point.accuracy_lower_bound is None else "guaranteed accuracy (lower confidence bound)"


class BudgetController:
    """Picks an operating point per request under long-run :class:`Constraints` (module docstring).

    points: the table (cheapest first or not). constraints: the limits. default: the point used
    with no constraint (default: the most accurate). energy: an
    :class:`~splitinfer.edge.energy.EnergyModel`, needed for ``max_energy_mj``. v: the
    penalty weight V (>0). link: a :class:`LinkMonitor` (its estimate prices latency and energy).
    credit: how far (in worst-case requests) a queue may fall below zero. rebalance_every: requests
    between place-holder updates (also after 16, 32, ... requests before the first; 0 = never).
    exit_window, exit_prior: the live exit-rate estimate's window and the table's weight, in
    requests. tolerance: extra slack on y when deciding that a limit binds. warm_start: start the
    queues at the place-holder backlog (else at 0).
    """

    @classmethod
    def from_manifest(cls, manifest, constraints: Constraints, energy=None, **kwargs) -> "BudgetController":
        """A controller over the manifest's operating points, its default point as the default."""
        return cls(manifest.operating_points, constraints, default=manifest.point(), energy=energy, **kwargs)

    def __init__(self, points: Sequence[OperatingPoint], constraints: Constraints = Constraints(),
                 default: OperatingPoint | None = None, energy=None, v: float = 100.0,
                 link: LinkMonitor | None = None, credit: float = 100.0, rebalance_every: int = 256,
                 exit_window: int = 1_000_000, exit_prior: int = 100, tolerance: float = 0.0,
                 warm_start: bool = True) -> None:
        if not points:
            raise ValueError("the controller needs at least one operating point")
        original = points
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"v must be a finite number > 0, got {v!r}")
        for name in ENERGY_CONSTRAINTS:
            if getattr(constraints, name) is not None and energy is None:
                raise ValueError(f"{name} needs an energy model")
        if constraints.min_accuracy is not None:
            points = [p for p in points if p.accuracy_floor >= constraints.min_accuracy]
            if not points:
                best = max(original, key=lambda p: p.accuracy_floor)
                raise ValueError(f"min_accuracy {constraints.min_accuracy} is above every operating point's "
                                 f"{_floor_name(best)} (the best, {best.id}: {best.accuracy_floor:.4f})")
        self.points = list(points)
        self.constraints = constraints
        self.default = default if default is not None and default in self.points else max(self.points, key=lambda p: (p.accuracy, -p.mean_bytes_per_request))
        self.energy = energy
        self.v = float(v)
        self.link = link if link is not None else LinkMonitor()
        if not credit >= 0:
            raise ValueError(f"credit must be >= 0, got {credit!r}")
        self.credit = float(credit)
        self.thresholds = np.array([p.threshold for p in self.points])
        self.exit_rates = np.array([p.exit_rate for p in self.points])
        self.exit_window, self.exit_prior, self._seen = exit_window, exit_prior, 0
        self.bytes_per_offload = np.array([p.bytes_per_offload for p in self.points])
        self.device_ms = float(np.mean([p.device_ms for p in self.points]))
        self._offloads = np.zeros(len(self.points))
        self._index = {p: k for k, p in enumerate(self.points)}
        self.names = constraints.active
        self.limits = np.array([self._limit(name) for name in self.names])
        self.queues = np.zeros(len(self.names))
        self.scales = self._granularity()
        self.floors = -self.credit * self.scales
        self.penalty = self._penalty()
        self.starved: tuple[str, ...] = ()
        self.requests = 0
        self.placeholder = np.zeros(len(self.names))
        self.tolerance = tolerance
        self.rebalance_every = rebalance_every
        if warm_start and self.names:
            self.placeholder = self._balanced_queues(self._expected_costs())
            self.queues = self.placeholder.copy()

    def choose(self) -> OperatingPoint:
        """The operating point for the next request."""
        if not self.names:
            return self.default
        y = self._expected_costs()  # (K, P) normalised: cost / limit - 1
        feasible = (y <= 1e-12).any(axis=1)
        self.starved = tuple(name for name, ok in zip(self.names, feasible) if not ok)
        if self.starved:
            rows = [i for i, ok in enumerate(feasible) if not ok]
            cost = y[rows].sum(axis=0)
            bytes_ = np.array([p.mean_bytes_per_request for p in self.points])
            return self.points[int(np.lexsort((bytes_, cost))[0])]
        score = self.v * self.penalty + (np.maximum(self.queues, 0.0) / self.scales) @ y  # credit is not a reward
        return self.points[int(np.argmin(score))]

    def update(self, point: OperatingPoint, cost: RequestCost) -> None:
        """Charge the queues with what the request really cost (starved constraints excepted)."""
        self.requests += 1
        k = self._index.get(point)
        if k is not None and cost.bytes > 0:  # an offload: refresh the point's bytes per offload
            self._offloads[k] += 1
            weight = 1.0 / min(OFFLOAD_PRIOR + self._offloads[k], self.exit_window)
            self.bytes_per_offload[k] += weight * (cost.bytes - self.bytes_per_offload[k])
        for i, name in enumerate(self.names):
            if name in self.starved:
                continue
            realised = self._realised(name, cost)
            self.queues[i] = max(self.queues[i] + realised / self.limits[i] - 1.0, self.floors[i])
        n = self.requests
        due = n % self.rebalance_every == 0 or (n < self.rebalance_every and n & (n - 1) == 0 and n >= 16) \
            if self.rebalance_every else False
        if due and not self.starved:
            placeholder = self._balanced_queues(self._expected_costs())
            self.queues = np.maximum(self.queues + placeholder - self.placeholder, self.floors)
            self.placeholder = placeholder

    def set_limit(self, name: str, value: float) -> None:
        """Move one constraint's limit (a battery budget re-priced at the observed request rate). The
        backlog, counted in worst-case requests, is kept."""
        if name not in self.names:
            raise ValueError(f"{name} is not one of this controller's constraints {self.names}")
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        k = self.names.index(name)
        if value == self.limits[k]:
            return
        old_scale = self.scales[k]
        self.limits[k] = float(value)
        self.scales[k] = self._granularity()[k]
        ratio = self.scales[k] / old_scale
        self.queues[k] *= ratio
        self.placeholder[k] *= ratio
        self.floors[k] = -self.credit * self.scales[k]

    def observe_confidence(self, confidence: float, device_ms: float | None = None) -> None:
        """The exit head's max probability on a request (and the device half's time, ms): refreshes
        every point's live exit rate and the device time.

        Whether a point would have exited depends only on its threshold, so each request tells the
        exit rate of every point, not only the one used; every point runs the same device half. A
        running mean over the last ``exit_window`` requests, started from the table weighted as
        ``exit_prior`` requests.
        """
        self._seen += 1
        weight = 1.0 / min(self.exit_prior + self._seen, self.exit_window)
        self.exit_rates += weight * ((confidence >= self.thresholds) - self.exit_rates)
        if device_ms is not None and math.isfinite(device_ms):
            self.device_ms += weight * (device_ms - self.device_ms)

    def offload_rate(self, k: int) -> float:
        """Live offload rate of point k (table rate until confidences are observed)."""
        return 1.0 - float(self.exit_rates[k])

    def expected_cost(self, name: str, k: int) -> float:
        """Expected cost of point k in the constraint's own unit, at the live exit rate and link estimate."""
        base, per_offload = self._cost_parts(name, k)
        rate = self.offload_rate(k)
        return base + rate * per_offload if rate > 0 else base

    def expected_energy_mj(self, k: int) -> float:
        """Device + offload rate x (radio + server) for one request under the current link estimate."""
        return self.expected_cost("max_energy_mj", k)

    def _cost_parts(self, name: str, k: int) -> tuple[float, float]:
        """(cost of every request, extra cost of an offload) of point k, in the constraint's unit."""
        point, nbytes = self.points[k], float(self.bytes_per_offload[k])
        if name == "max_bytes":
            return 0.0, nbytes
        if name == "max_latency_ms":
            return self.device_ms, point.server_ms + self.link.estimate.transfer_ms(nbytes)
        if name in ENERGY_CONSTRAINTS:
            round_trip_ms = point.server_ms + self.link.estimate.transfer_ms(nbytes)
            offload = self.energy.radio_mj(nbytes, 64.0, round_trip_ms / 1e3)
            if name == "max_energy_mj":
                offload += self.energy.server_mj(point.server_ms / 1e3)
            return self.energy.device_mj(self.device_ms / 1e3), offload
        return 1.0 - point.accuracy_floor, 0.0  # min_accuracy, as an error rate

    def state(self) -> dict:
        """Queues (normalised backlog, in worst-case requests), the link estimate and starved constraints."""
        return {
            "queues": {name: float(q / s) for name, q, s in zip(self.names, self.queues, self.scales)},
            "bandwidth_bps": self.link.estimate.bandwidth_bps, "rtt_ms": self.link.estimate.rtt_ms,
            "starved": list(self.starved), "requests": self.requests,
        }

    def _limit(self, name: str) -> float:
        value = getattr(self.constraints, name)
        return 1.0 - value if name == "min_accuracy" else float(value)

    def _realised(self, name: str, cost: RequestCost) -> float:
        if name == "max_bytes":
            return cost.bytes
        if name == "max_latency_ms":
            return cost.latency_ms
        if name == "max_energy_mj":
            return cost.energy_mj if cost.energy_mj is not None else 0.0
        if name == "max_device_energy_mj":
            return cost.device_energy_mj if cost.device_energy_mj is not None else 0.0
        return 1.0 - cost.accuracy

    def _expected_costs(self) -> np.ndarray:
        costs = np.array([[self.expected_cost(name, k) for k in range(len(self.points))] for name in self.names])
        return np.minimum(costs / self.limits[:, None] - 1.0, MAX_Y)  # finite: 0 * inf would be NaN

    def _granularity(self) -> np.ndarray:
        """G_k: the largest single-request cost over the limit (at least 1), at the initial link estimate."""
        out = []
        for name, limit in zip(self.names, self.limits):
            worst = max(sum(self._cost_parts(name, k)) for k in range(len(self.points)))
            out.append(min(max(worst / limit, 1.0), MAX_Y))
        return np.array(out)

    def _penalty(self) -> np.ndarray:
        if self.constraints.min_accuracy is not None:
            if self.energy is not None:
                value = np.array([self.expected_energy_mj(k) for k in range(len(self.points))])
            else:
                value = np.array([p.mean_bytes_per_request for p in self.points])
            return value / value.max() if value.max() > 0 else np.zeros(len(self.points))
        acc = np.array([p.accuracy for p in self.points])
        spread = acc.max() - acc.min()
        return -(acc - acc.min()) / spread if spread > 0 else np.zeros(len(self.points))

    def _noise(self, k_point: int, k_constraint: int) -> float:
        """Two standard errors of point k_point's expected y_k: its offload rate is estimated from the
        requests seen (and the table's prior weight), so a limit this close to its cost may not bind."""
        rate = self.offload_rate(k_point)
        per_offload = self._cost_parts(self.names[k_constraint], k_point)[1] / self.limits[k_constraint]
        if not 0 < rate < 1 or not math.isfinite(per_offload):
            return 0.0
        n_eff = min(self.exit_prior + self._seen, self.exit_window)
        return 2.0 * per_offload * math.sqrt(rate * (1.0 - rate) / n_eff)

    def _balanced_queues(self, y: np.ndarray, rounds: int = 3, steps: int = 50) -> np.ndarray:
        """The place-holder backlog: where each queue's expected drift is zero.

        Coordinate bisection on mu_k = Q_k / G_k (the chosen point's expected y_k falls as mu_k
        rises). A point whose expected cost is within its estimation noise of the limit can carry
        the budget alone: the queue starts in the middle of the range of mu_k where that point is
        chosen, so ordinary fluctuations do not push it off either edge; with no such point it
        starts at the tie between the two points either side of the limit; 0 where the limit
        does not bind.
        """
        if not (y <= 1e-12).any(axis=1).all():
            return np.zeros(len(self.names))  # starved: nothing to balance
        mu = np.zeros(len(self.names))
        cap = self.v * 1e6

        def chosen(m: np.ndarray) -> int:
            return int(np.argmin(self.v * self.penalty + m @ y))

        def first_true(pred, m: np.ndarray, k: int) -> float:
            def at(value: float) -> np.ndarray:
                out = m.copy()
                out[k] = value
                return out
            if pred(at(0.0)):
                return 0.0
            lo, hi = 0.0, 1.0
            while not pred(at(hi)):
                if hi >= cap:
                    return cap
                lo, hi = hi, hi * 2.0
            for _ in range(steps):
                mid = 0.5 * (lo + hi)
                lo, hi = (lo, mid) if pred(at(mid)) else (mid, hi)
            return hi

        for _ in range(rounds):
            for k in range(len(mu)):
                def slack(m: np.ndarray) -> float:
                    p = chosen(m)
                    return self.tolerance + self._noise(p, k), float(y[k, p])

                def within_or_below(m: np.ndarray) -> bool:
                    tol, value = slack(m)
                    return value <= tol

                def below(m: np.ndarray) -> bool:
                    tol, value = slack(m)
                    return value < -tol

                lo = first_true(within_or_below, mu, k)
                hi = first_true(below, mu, k)
                mu[k] = 0.0 if lo == 0.0 else lo if hi >= cap else 0.5 * (lo + hi)
                if 0.0 < lo and hi - lo < 1e-9 * max(hi, 1.0):  # a tie: add the mean excursion above it
                    above = mu.copy()
                    above[k] = hi * (1 + 1e-6) + 1e-9
                    mu[k] += self._excursion(chosen(above), k) / self.scales[k]
        return mu * self.scales

    def _excursion(self, k_point: int, k_constraint: int) -> float:
        """Mean height of the backlog above a tie while the cheaper point drains it: a reflected random
        walk with drift -d and per-request variance s^2 sits on average s^2 / (2 d) above its floor.
        Starting there, the queue ends a run, on average, where it started."""
        rate = self.offload_rate(k_point)
        drift = -(self.expected_cost(self.names[k_constraint], k_point) / self.limits[k_constraint] - 1.0)
        per_offload = self._cost_parts(self.names[k_constraint], k_point)[1] / self.limits[k_constraint]
        if not 0 < rate < 1 or drift <= 0 or not math.isfinite(per_offload):
            return 0.0
        variance = rate * (1.0 - rate) * per_offload ** 2
        return min(variance / (2.0 * drift), 10.0 * self.scales[k_constraint])
