"""A battery budget in the unit people think in: "no more than P% of the battery over H hours".

    capacity (Wh)        from Linux's /sys/class/power_supply/*/ when a battery is there
                         (energy_full in uWh, or charge_full in uAh x voltage_min_design in uV),
                         else from the device profile's ``battery_wh`` (edge/profiles/devices.json)
    budget (mJ)          = capacity x 3600 x 1000 x P / 100
    limit (mJ/request)   = budget / (observed request rate x H x 3600)

The limit is what :class:`~splitinfer.edge.controller.Constraints` takes as
``max_device_energy_mj`` (a long-run mean per request of the energy drawn on the device: the device
half and the radio, not the server's), so the budget controller keeps the run's share of the battery
at P. :class:`BatteryLimit` keeps the controller's limit there as the request rate is observed. Energies here are the edge's own accounting (edge/energy.py): the marginal energy of the
inference work and the radio, not the idle draw of keeping the device on.
"""
from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

__all__ = ["POWER_SUPPLY", "BatteryCapacity", "read_sysfs_capacity", "battery_capacity", "energy_limit_mj",
           "projected_percent", "RequestRate", "BatteryBudget", "BatteryLimit"]

log = logging.getLogger(__name__)

POWER_SUPPLY = Path("/sys/class/power_supply")
MJ_PER_WH = 3600.0 * 1000.0


@dataclass(frozen=True)
class BatteryCapacity:
    """Full-charge capacity in Wh and where it came from (a sysfs path or the device profile)."""

    wh: float
    source: str

    def __post_init__(self) -> None:
        if not (self.wh > 0.0 and math.isfinite(self.wh)):
            raise ValueError(f"battery capacity must be a finite number of Wh > 0, got {self.wh!r}")


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def read_sysfs_capacity(root: Path = POWER_SUPPLY) -> BatteryCapacity | None:
    """Sum of the full-charge capacities of the batteries under ``root`` (a laptop may have two), or
    None when there is none. A supply whose ``type`` is not "Battery" is skipped; so is one whose
    files are missing or unreadable (with a debug log line)."""
    root = Path(root)
    if not root.is_dir():
        return None
    total, used = 0.0, []
    for supply in sorted(root.iterdir()):
        kind = (supply / "type")
        if kind.is_file() and kind.read_text().strip() != "Battery":
            continue
        energy = _read_int(supply / "energy_full")  # uWh
        if energy is not None and energy > 0:
            total += energy / 1e6
            used.append(str(supply / "energy_full"))
            continue
        charge, volts = _read_int(supply / "charge_full"), _read_int(supply / "voltage_min_design")  # uAh, uV
        if charge is not None and volts is not None and charge > 0 and volts > 0:
            total += charge * volts / 1e12
            used.append(f"{supply / 'charge_full'} x {supply / 'voltage_min_design'}")
            continue
        log.debug("%s: no usable energy_full or charge_full x voltage_min_design", supply)
    if not used:
        return None
    return BatteryCapacity(total, " + ".join(used))


def battery_capacity(profile=None, root: Path = POWER_SUPPLY) -> BatteryCapacity:
    """The battery this device runs on: sysfs first, else ``profile.battery_wh`` (a
    :class:`~splitinfer.edge.energy.DeviceProfile`); ValueError when neither knows one."""
    found = read_sysfs_capacity(root)
    if found is not None:
        return found
    wh = float(getattr(profile, "battery_wh", 0.0) or 0.0)
    if wh > 0.0:
        return BatteryCapacity(wh, f"device profile {getattr(profile, 'name', '?')!r}")
    name = getattr(profile, "name", None)
    raise ValueError(f"no battery found under {root} and the device profile {name!r} has no battery_wh: "
                     "a --max-battery-percent budget needs a battery (or a profile file with battery_wh)")


def _check(name: str, value: float, upper: float | None = None) -> float:
    value = float(value)
    if not (value > 0.0 and math.isfinite(value)) or (upper is not None and value > upper):
        bound = f"in (0, {upper:g}]" if upper is not None else "> 0 and finite"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return value


def energy_limit_mj(capacity_wh: float, max_percent: float, horizon_h: float, requests_per_s: float) -> float:
    """The mean energy per request (mJ) that spends ``max_percent`` of the battery over ``horizon_h``
    hours at ``requests_per_s``."""
    budget_mj = _check("capacity_wh", capacity_wh) * MJ_PER_WH * _check("max_percent", max_percent, 100.0) / 100.0
    requests = _check("horizon_h", horizon_h) * 3600.0 * _check("requests_per_s", requests_per_s)
    return budget_mj / requests


def projected_percent(mean_mj_per_request: float, requests_per_s: float, horizon_h: float, capacity_wh: float) -> float:
    """Share of the battery (percent) that ``mean_mj_per_request`` at ``requests_per_s`` spends over the horizon."""
    if not (mean_mj_per_request >= 0.0 and math.isfinite(mean_mj_per_request)):
        raise ValueError(f"mean_mj_per_request must be finite and >= 0, got {mean_mj_per_request!r}")
    spent = mean_mj_per_request * _check("requests_per_s", requests_per_s) * _check("horizon_h", horizon_h) * 3600.0
    return 100.0 * spent / (_check("capacity_wh", capacity_wh) * MJ_PER_WH)


class RequestRate:
    """Requests per second over the last ``window`` requests (a sliding window of arrival times).
    ``clock``: seconds, monotonic (injected for tests)."""

    def __init__(self, window: int = 256, clock=time.monotonic) -> None:
        if window < 2:
            raise ValueError(f"window must be >= 2, got {window}")
        self._times: deque[float] = deque(maxlen=window)
        self._clock = clock

    def observe(self, at: float | None = None) -> None:
        self._times.append(self._clock() if at is None else float(at))

    @property
    def rate(self) -> float | None:
        """Requests per second, or None before two arrivals (or when they share one instant)."""
        if len(self._times) < 2:
            return None
        span = self._times[-1] - self._times[0]
        return (len(self._times) - 1) / span if span > 0 else None


@dataclass(frozen=True)
class BatteryBudget:
    """``max_percent`` of a battery of ``capacity`` over ``horizon_h`` hours."""

    capacity: BatteryCapacity
    max_percent: float
    horizon_h: float

    def __post_init__(self) -> None:
        _check("max_percent", self.max_percent, 100.0)
        _check("horizon_h", self.horizon_h)

    @property
    def budget_mj(self) -> float:
        return self.capacity.wh * MJ_PER_WH * self.max_percent / 100.0

    def limit_mj(self, requests_per_s: float) -> float:
        """``max_device_energy_mj`` for the controller at this request rate."""
        return energy_limit_mj(self.capacity.wh, self.max_percent, self.horizon_h, requests_per_s)

    def projected_percent(self, mean_mj_per_request: float, requests_per_s: float) -> float:
        return projected_percent(mean_mj_per_request, requests_per_s, self.horizon_h, self.capacity.wh)

    def summary(self, mean_mj_per_request: float, requests_per_s: float) -> dict:
        """What the edge's summary reports."""
        return {"battery_wh": round(self.capacity.wh, 3), "battery_source": self.capacity.source,
                "max_battery_percent": self.max_percent, "horizon_h": self.horizon_h,
                "requests_per_s": requests_per_s, "limit_mj_per_request": self.limit_mj(requests_per_s),
                "mean_mj_per_request": mean_mj_per_request,
                "projected_battery_percent": self.projected_percent(mean_mj_per_request, requests_per_s)}


class BatteryLimit:
    """Holds a :class:`~splitinfer.edge.controller.BudgetController`'s ``max_device_energy_mj`` at what
    ``budget`` allows for the request rate: ``fixed_rate`` (requests/s) when given, else the rate
    observed over the last ``window`` requests (``prior_rate`` until two have arrived). Call
    :meth:`before_request` before each request."""

    def __init__(self, budget: BatteryBudget, fixed_rate: float | None = None, prior_rate: float = 1.0,
                 window: int = 256, clock=time.monotonic) -> None:
        self.budget = budget
        self.fixed_rate = None if fixed_rate is None else _check("request rate", fixed_rate)
        self.prior_rate = _check("prior_rate", prior_rate)
        self.observed = RequestRate(window, clock)

    @property
    def requests_per_s(self) -> float:
        if self.fixed_rate is not None:
            return self.fixed_rate
        return self.observed.rate or self.prior_rate

    @property
    def limit_mj(self) -> float:
        return self.budget.limit_mj(self.requests_per_s)

    def before_request(self, controller, at: float | None = None) -> None:
        """One request arrives (``at``: its time in seconds, default the clock): refresh the limit."""
        self.observed.observe(at)
        controller.set_limit("max_device_energy_mj", self.limit_mj)

    def summary(self, mean_mj_per_request: float) -> dict:
        return self.budget.summary(mean_mj_per_request, self.requests_per_s)
