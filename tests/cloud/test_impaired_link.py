"""The edge talking to the real server through an impaired link (delay, jitter, loss, a rate limit,
stalls, resets): every call ends by its deadline, and the budget controller holds a mean-latency limit.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

from splitinfer.edge.controller import BudgetController, Constraints, OperatingPoint
from splitinfer.edge.runner import EdgeRunner
from splitinfer.edge.transport import GrpcTransport

from .edge_side import LoadRun, device_session, edge_manifest, sparse_images
from .link_proxy import Impairment, LinkProxy

DEADLINE_S = 0.25
LATE_MARGIN_MS = 150.0  # scheduling on two busy cores; never a second deadline


@pytest.fixture(scope="module")
def edge(tiny_model_dir):
    manifest = edge_manifest(tiny_model_dir)
    return manifest, device_session(manifest), sparse_images(manifest, 32)


def test_deadlines_hold_on_a_bad_link(live_server, edge) -> None:
    manifest, session, images = edge
    bad = Impairment(delay_ms=15, jitter_ms=10, rate_bps=2e6, loss=0.05, retransmit_ms=200, reset=0.002)
    with LinkProxy(live_server.port, bad) as link, GrpcTransport(link.address, timeout_s=DEADLINE_S) as transport:
        runner = EdgeRunner(session, transport, manifest, exit_threshold=1.01)  # always offload
        run = LoadRun(runner, images, threads=2).start()
        time.sleep(1.5)
        link.impair(stalled=True)  # the link goes dark for a second
        time.sleep(1.0)
        link.impair(stalled=False)
        time.sleep(0.5)
        link.reset_all()  # and every connection is reset
        time.sleep(1.0)
        link.impair(delay_ms=0, jitter_ms=0, rate_bps=None, loss=0, reset=0)
        cleared_at = time.monotonic()
        time.sleep(1.0)
        assert run.stop(timeout_s=DEADLINE_S + 5.0), "an edge call hung"
        connections, resets = link.connections, link.resets

    late = run.past_deadline(DEADLINE_S, LATE_MARGIN_MS)
    answered, degraded = run.count("server"), run.count("degraded")
    latencies = np.array([o.latency_ms for o in run.outcomes])
    print(f"\nimpaired link: {run.attempts} requests: answered {answered}, degraded {degraded}, lost {run.lost}; "
          f"latency p50 {np.median(latencies):.1f} ms, max {latencies.max():.1f} ms, offload call max "
          f"{max(o.server_ms or 0.0 for o in run.outcomes):.1f} ms (deadline {DEADLINE_S * 1e3:.0f} ms); "
          f"{connections} connections, {resets} resets")
    assert run.lost == 0 and not run.raised, run.raised[:3]
    assert not late, [(round(o.server_ms), round(o.latency_ms), o.error) for o in late[:3]]
    assert answered > 20 and degraded > 0
    assert {o.decided_on for o in run.outcomes} <= {"server", "degraded"}
    assert run.count("server", since=cleared_at) > 20  # a clear link offloads again


def _point(pid: str, threshold: float, exit_rate: float, offload_bytes: float, accuracy: float) -> OperatingPoint:
    return OperatingPoint(id=pid, threshold=threshold, mass=0.8, budget=8, encoding="int8", accuracy=accuracy,
                          exit_rate=exit_rate, mean_bytes_per_request=(1 - exit_rate) * offload_bytes,
                          mean_bytes_per_offload=offload_bytes, device_ms=0.5, server_ms=0.5)


def test_budget_controller_holds_a_latency_limit_on_a_slow_link(live_server, edge) -> None:
    """One-way delay 5 ms (+ jitter, loss): an offload costs about 12 ms, an exit about 1 ms; with
    --max-latency-ms 4 the controller mixes points so that the long-run mean stays at the limit."""
    manifest, session, images = edge
    limit_ms, requests = 4.0, 2500
    # the tiny model's exit confidences decide which points exit; thresholds around their median
    probe = EdgeRunner(session, None, manifest)
    confidences = np.array([probe.classify(img).confidence for img in images])
    median = float(np.median(confidences))
    points = [_point("device", 0.0, 1.0, 0.0, 0.90), _point("half", median, 0.5, 400.0, 0.95),
              _point("server", 1.5, 0.0, 400.0, 0.97)]
    slow = Impairment(delay_ms=5, jitter_ms=2, loss=0.01, retransmit_ms=50)
    with LinkProxy(live_server.port, slow) as link, GrpcTransport(link.address, timeout_s=1.0) as transport:
        controller = BudgetController(points, Constraints(max_latency_ms=limit_ms))
        runner = EdgeRunner(session, transport, manifest, controller=controller)
        for img in images[:4]:  # connect before measuring
            runner.classify(img, points[-1])
        results = [runner.classify(images[i % len(images)]) for i in range(requests)]
    latencies = np.array([r.latency_ms for r in results])
    offloaded = np.array([r.decided_on != "device" for r in results])
    mean_ms = float(latencies.mean())
    chosen = {p.id: sum(r.operating_point == p.id for r in results) for p in points}
    offload_ms = float(np.median(latencies[offloaded])) if offloaded.any() else float("nan")
    print(f"\nlatency limit {limit_ms} ms over a 5 ms one-way link: mean {mean_ms:.2f} ms over {requests} requests "
          f"({mean_ms / limit_ms - 1:+.1%}); offload p50 {offload_ms:.1f} ms, exit p50 "
          f"{np.median(latencies[~offloaded]):.2f} ms; points {chosen}; degraded "
          f"{sum(r.decided_on == 'degraded' for r in results)}")
    assert offload_ms > 2 * limit_ms  # the limit binds: always offloading would break it
    assert abs(mean_ms / limit_ms - 1) <= 0.05
