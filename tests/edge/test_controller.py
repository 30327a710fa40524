from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from splitinfer.edge.controller import BudgetController, Constraints, LinkEstimate, LinkMonitor, RequestCost
from splitinfer.edge.energy import EnergyModel
from splitinfer.edge.runner import EdgeRunner
from splitinfer.protos.codec import CodecConfig
from splitinfer.protos.points import OperatingPoint, pareto_front

from .test_runner import FakeTransport

OFFLOAD_BYTES = {"never": 0, "t50": 700, "t70": 900, "t90": 1500, "always": 2000}
THRESHOLDS = {"never": 0.0, "t50": 0.5, "t70": 0.7, "t90": 0.9, "always": 1.5}
ACCURACY = {"never": 0.90, "t50": 0.93, "t70": 0.95, "t90": 0.96, "always": 0.965}


def point(pid: str, **overrides) -> OperatingPoint:
    """A synthetic point whose exit rate follows from a uniform confidence in [0, 1]."""
    exit_rate = 1.0 - min(THRESHOLDS[pid], 1.0) if pid != "never" else 1.0
    offload = OFFLOAD_BYTES[pid]
    fields = dict(id=pid, threshold=THRESHOLDS[pid], mass=0.9, budget=16, encoding="int8",
                  accuracy=ACCURACY[pid], exit_rate=exit_rate, mean_bytes_per_request=(1 - exit_rate) * offload,
                  mean_bytes_per_offload=float(offload), device_ms=0.5, server_ms=0.4)
    fields.update(overrides)
    return OperatingPoint(**fields)


@pytest.fixture
def points() -> list[OperatingPoint]:
    return [point(pid) for pid in THRESHOLDS]


def run(controller: BudgetController, n: int, seed: int = 0, bandwidth=None, rtt_ms: float = 10.0) -> dict:
    """Synthetic requests: confidence ~ U(0, 1); a point offloads below its threshold and sends a
    size that jitters by +-20% around its bytes per offload."""
    rng = np.random.default_rng(seed)
    sent, chosen = np.zeros(n), []
    for t in range(n):
        if bandwidth is not None:
            controller.link.set(LinkEstimate(bandwidth(t), rtt_ms))
        p = controller.choose()
        confidence = rng.random()
        offload = confidence < p.threshold
        nbytes = p.mean_bytes_per_offload * rng.uniform(0.8, 1.2) if offload else 0.0
        latency = p.device_ms + (controller.link.estimate.transfer_ms(nbytes) + p.server_ms if offload else 0.0)
        controller.observe_confidence(confidence)
        controller.update(p, RequestCost(nbytes, latency, None, p.accuracy))
        sent[t] = nbytes
        chosen.append(p.id)
    return {"bytes": sent, "chosen": chosen}


def test_operating_point_validation_and_round_trip(points):
    with pytest.raises(ValueError, match="encoding"):
        point("t50", encoding="int3")
    with pytest.raises(ValueError, match="mass"):
        point("t50", mass=0.0)
    with pytest.raises(ValueError, match="exit_rate"):
        point("t50", exit_rate=1.5)
    assert [OperatingPoint.from_dict(p.to_dict()) for p in points] == points
    with pytest.raises(ValueError, match="unknown operating point field"):
        OperatingPoint.from_dict({**points[0].to_dict(), "extra": 1})
    dominated = point("t90", id="worse", accuracy=0.90)
    assert [p.id for p in pareto_front([*points, dominated])] == ["never", "t50", "t70", "t90", "always"]
    assert point("t50", encoding="int4", group_size=32).codec(CodecConfig("int8", "none")).encoding == "int4"


def test_an_accuracy_no_point_reaches_is_refused(points):
    with pytest.raises(ValueError, match="above every operating point"):
        BudgetController(points, Constraints(min_accuracy=0.99))
    assert BudgetController(points, Constraints(min_accuracy=0.965)).choose().id == "always"


def test_no_constraint_uses_the_default(points):
    controller = BudgetController(points, Constraints(), default=points[2])
    assert all(controller.choose() is points[2] for _ in range(5))
    assert BudgetController(points).choose().id == "always"  # no default: the most accurate


@pytest.mark.parametrize("share", [0.3, 0.6, 1.0])
def test_meets_a_bytes_budget_within_two_percent(points, share):
    richest = max(p.mean_bytes_per_request for p in points)
    budget = share * richest
    out = run(BudgetController(points, Constraints(max_bytes=budget)), 10_000, seed=int(share * 10))
    assert out["bytes"].mean() == pytest.approx(budget, rel=0.02)
    if share < 1.0:  # time-sharing between neighbours, not the cheapest point
        assert "never" not in set(out["chosen"][1000:])


def test_table_miscalibration_is_learned(points):
    """The table says the points offload half as often as they do: the budget still holds."""
    optimistic = [point(p.id, exit_rate=1 - (1 - p.exit_rate) / 2,
                        mean_bytes_per_request=p.mean_bytes_per_request / 2) for p in points]
    budget = 500.0
    out = run(BudgetController(optimistic, Constraints(max_bytes=budget)), 10_000, seed=3)
    assert out["bytes"].mean() == pytest.approx(budget, rel=0.02)


def test_starvation_falls_back_to_the_cheapest_point(points):
    offloading = points[1:]  # every point offloads some inputs: none meets a latency bound at ~0 bit/s
    controller = BudgetController(offloading, Constraints(max_latency_ms=5.0))
    before = controller.queues.copy()
    out = run(controller, 300, bandwidth=lambda t: 1.0)
    assert set(out["chosen"]) == {"t50"} and controller.starved == ("max_latency_ms",)
    assert controller.queues[0] <= before[0]  # the starved queue did not grow
    recovered = run(controller, 300, bandwidth=lambda t: 100e6, rtt_ms=1.0)
    assert set(recovered["chosen"]) - {"t50"} and controller.starved == ()


def test_latency_limit_follows_the_bandwidth(points):
    controller = BudgetController(points, Constraints(max_latency_ms=2.0))
    fast = run(controller, 2000, seed=1, bandwidth=lambda t: 50e6, rtt_ms=0.5)
    slow = run(controller, 2000, seed=2, bandwidth=lambda t: 0.5e6, rtt_ms=0.5)
    assert np.mean(fast["bytes"]) > 3 * np.mean(slow["bytes"])


def test_min_accuracy_minimises_bytes(points):
    controller = BudgetController(points, Constraints(min_accuracy=0.95))
    out = run(controller, 3000, seed=4)
    accuracy = np.mean([ACCURACY[pid] for pid in out["chosen"]])
    assert accuracy == pytest.approx(0.95, abs=0.002)
    assert np.mean(out["bytes"]) < points[-1].mean_bytes_per_request


def test_min_accuracy_counts_on_the_lower_bound_not_the_measured_accuracy(points):
    """With bounds in the table, a point whose measured accuracy meets min_accuracy but whose bound
    does not is never chosen; with no point's bound high enough the controller refuses to start."""
    bounded = [point(p.id, accuracy_lower_bound=p.accuracy - 0.01) for p in points]  # t90: 0.96 measured, 0.95 bound
    controller = BudgetController(bounded, Constraints(min_accuracy=0.953))
    out = run(controller, 2000, seed=5)
    assert set(out["chosen"]) == {"always"}  # the only point whose bound reaches 0.953
    assert {p.id for p in BudgetController(points, Constraints(min_accuracy=0.953)).points} == {"t90", "always"}
    with pytest.raises(ValueError, match=r"guaranteed accuracy .* \(the best, always: 0.9550\)"):
        BudgetController(bounded, Constraints(min_accuracy=0.96))
    mixed = BudgetController(bounded, Constraints(min_accuracy=0.94, max_bytes=600.0))
    assert all(p.accuracy_lower_bound >= 0.94 for p in mixed.points)
    assert all(p.accuracy_floor >= 0.94 for p in (mixed.choose() for _ in range(50)))


def test_energy_limit_needs_a_model_and_holds(points):
    with pytest.raises(ValueError, match="energy model"):
        BudgetController(points, Constraints(max_energy_mj=1.0))
    energy = EnergyModel.named("pi4", "wifi")
    controller = BudgetController(points, Constraints(max_energy_mj=2.0), energy=energy)
    assert controller.expected_energy_mj(0) == pytest.approx(energy.device_mj(0.5e-3))
    chosen = controller.choose()
    assert controller.expected_energy_mj(controller.points.index(chosen)) <= 2.0 * 1.5


def test_constraints_validation():
    assert Constraints().active == () and not Constraints()
    assert Constraints(max_bytes=10, min_accuracy=0.9).active == ("max_bytes", "min_accuracy")
    for bad in (dict(max_bytes=0), dict(max_latency_ms=-1), dict(min_accuracy=1.0), dict(max_energy_mj=math.inf)):
        with pytest.raises(ValueError):
            Constraints(**bad)


def test_link_monitor_separates_rtt_and_bandwidth():
    monitor = LinkMonitor(LinkEstimate(1e6, 50.0), alpha=0.1)
    rng = np.random.default_rng(0)
    for _ in range(200):
        nbytes = rng.uniform(200, 4000)
        network_ms = 12.0 + 8e3 * nbytes / 8e6
        monitor.observe(nbytes, network_ms + 3.0, server_ms=3.0)
    assert monitor.estimate.rtt_ms == pytest.approx(12.0, rel=0.01)
    assert monitor.estimate.bandwidth_bps == pytest.approx(8e6, rel=0.01)
    same = LinkMonitor(LinkEstimate(8e6, 50.0))
    for _ in range(20):
        same.observe(1000, 13.0)
    assert same.estimate.bandwidth_bps == 8e6 and same.estimate.rtt_ms == pytest.approx(12.0)


def test_runner_serves_the_controllers_points(device_session, tiny_manifest, images):
    k = len(tiny_manifest.classes)
    device_only = point("never", budget=4)
    offload = point("always", budget=4)
    transport = FakeTransport(num_classes=k)
    runner = EdgeRunner(device_session, transport, tiny_manifest)
    assert runner.classify(images[0], device_only).decided_on == "device"
    result = runner.classify(images[0], offload)
    assert result.decided_on == "server" and result.operating_point == "always"
    assert 2 <= transport.requests[-1].packet.num_tokens <= 5  # the point's budget, not the manifest's

    controller = BudgetController([device_only, offload], Constraints(max_bytes=1e-3))
    runner = EdgeRunner(device_session, transport, tiny_manifest, controller=controller)
    results = runner.classify_many(images)
    assert sum(r.operating_point == "never" for r in results) >= len(images) - 1  # ~0 bytes: stay on the device
    assert controller.requests == len(images)
