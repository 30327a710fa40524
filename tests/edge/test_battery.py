"""Battery budget: capacity from a fake /sys tree or the device profile, the controller's energy
limit from a share of it, and the projected share."""
from __future__ import annotations

import pytest

from splitinfer.edge.battery import (BatteryBudget, BatteryCapacity, RequestRate, battery_capacity, energy_limit_mj,
                                     projected_percent, read_sysfs_capacity)
from splitinfer.edge.energy import device_profile, load_profiles


def supply(root, name, **files):
    folder = root / name
    folder.mkdir(parents=True)
    for key, value in files.items():
        (folder / key).write_text(f"{value}\n")
    return folder


def test_energy_full_in_microwatt_hours(tmp_path):
    supply(tmp_path, "BAT0", type="Battery", energy_full=52_000_000)
    supply(tmp_path, "AC", type="Mains", online=1)
    cap = read_sysfs_capacity(tmp_path)
    assert cap.wh == pytest.approx(52.0) and "BAT0/energy_full" in cap.source


def test_charge_full_times_design_voltage_and_two_batteries(tmp_path):
    supply(tmp_path, "BAT0", type="Battery", charge_full=4_000_000, voltage_min_design=11_400_000)  # 4 Ah x 11.4 V
    supply(tmp_path, "BAT1", type="Battery", energy_full=24_000_000)
    cap = read_sysfs_capacity(tmp_path)
    assert cap.wh == pytest.approx(45.6 + 24.0)
    assert "charge_full" in cap.source and "BAT1" in cap.source


def test_garbage_and_missing_files_are_skipped(tmp_path):
    supply(tmp_path, "BAT0", type="Battery", energy_full="not a number")
    supply(tmp_path, "BAT1", type="Battery", charge_full=3_000_000)  # no voltage
    supply(tmp_path, "hid-mouse", type="Battery", energy_full=0)
    assert read_sysfs_capacity(tmp_path) is None
    assert read_sysfs_capacity(tmp_path / "absent") is None


def test_profile_is_the_fallback_and_a_board_without_battery_is_refused(tmp_path):
    laptop = device_profile("laptop")
    assert laptop.battery_wh == 52.0 and "Dell" in laptop.sources["battery_wh"]
    cap = battery_capacity(laptop, root=tmp_path)
    assert cap.wh == 52.0 and "laptop" in cap.source
    supply(tmp_path, "BAT0", type="Battery", energy_full=40_000_000)
    assert battery_capacity(laptop, root=tmp_path).wh == pytest.approx(40.0)  # the real battery wins
    with pytest.raises(ValueError, match="no battery"):
        battery_capacity(device_profile("pi4"), root=tmp_path / "absent")
    assert set(load_profiles("devices")) >= {"pi4", "pi5", "laptop"}  # the profile file still loads


def test_limit_and_projection_are_inverse():
    # 3% of 52 Wh over 8 h at 2 requests/s: 5616 J over 57,600 requests = 97.5 mJ each
    limit = energy_limit_mj(52.0, 3.0, 8.0, 2.0)
    assert limit == pytest.approx(52.0 * 3600 * 1000 * 0.03 / (8 * 3600 * 2))
    assert projected_percent(limit, 2.0, 8.0, 52.0) == pytest.approx(3.0)
    assert projected_percent(limit / 2, 2.0, 8.0, 52.0) == pytest.approx(1.5)
    budget = BatteryBudget(BatteryCapacity(52.0, "test"), 3.0, 8.0)
    summary = budget.summary(50.0, 2.0)
    assert summary["limit_mj_per_request"] == pytest.approx(limit)
    assert summary["projected_battery_percent"] == pytest.approx(3.0 * 50.0 / limit)


def test_request_rate_from_arrivals():
    now = [0.0]
    rate = RequestRate(window=5, clock=lambda: now[0])
    assert rate.rate is None
    for _ in range(10):
        rate.observe()
        now[0] += 0.5
    assert rate.rate == pytest.approx(2.0)
    rate.observe(at=100.0)  # a long pause pulls the windowed rate down
    assert rate.rate < 0.1


@pytest.mark.parametrize("args", [(0.0, 3.0, 8.0, 2.0), (52.0, 0.0, 8.0, 2.0), (52.0, 101.0, 8.0, 2.0),
                                  (52.0, 3.0, -1.0, 2.0), (52.0, 3.0, 8.0, 0.0), (52.0, 3.0, float("nan"), 2.0)])
def test_bad_budgets_are_refused(args):
    with pytest.raises(ValueError):
        energy_limit_mj(*args)


def test_bad_values_are_refused():
    with pytest.raises(ValueError):
        BatteryCapacity(-1.0, "x")
    with pytest.raises(ValueError):
        BatteryBudget(BatteryCapacity(10.0, "x"), 200.0, 1.0)
    with pytest.raises(ValueError):
        projected_percent(-5.0, 1.0, 1.0, 10.0)
    with pytest.raises(ValueError):
        RequestRate(window=1)


def test_battery_limit_follows_the_observed_rate_and_moves_the_controller():
    from splitinfer.edge.battery import BatteryLimit
    from splitinfer.edge.controller import BudgetController, Constraints
    from splitinfer.edge.energy import EnergyModel
    from splitinfer.protos.points import OperatingPoint

    budget = BatteryBudget(BatteryCapacity(10.0, "test"), 1.0, 2.0)  # 360,000 mJ over 2 h
    limit = BatteryLimit(budget, prior_rate=1.0)
    assert limit.limit_mj == pytest.approx(360_000 / 7200)
    points = [OperatingPoint("a", 0.0, 0.8, 8, "int8", 0.9, 1.0, 0.0, 0.0, device_ms=1.0),
              OperatingPoint("b", 2.0, 0.8, 8, "int8", 0.95, 0.0, 600.0, 600.0, device_ms=1.0)]
    controller = BudgetController(points, Constraints(max_device_energy_mj=limit.limit_mj),
                                  energy=EnergyModel.named("laptop", "wifi"))
    for t in range(10):
        limit.before_request(controller, at=t * 0.25)  # 4 requests/s
    assert limit.requests_per_s == pytest.approx(4.0)
    assert controller.limits[0] == pytest.approx(360_000 / (4 * 7200))
    assert BatteryLimit(budget, fixed_rate=2.0).requests_per_s == 2.0
    with pytest.raises(ValueError, match="max_bytes"):
        controller.set_limit("max_bytes", 1.0)
    with pytest.raises(ValueError, match="finite"):
        controller.set_limit("max_device_energy_mj", -1.0)
