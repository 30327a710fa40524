"""The server is SIGKILLed under load and restarted on the same port: the edge answers every request
(from the server, or degraded during the outage), none past its deadline, and offloads again soon
after the server is back.

CI uses a 6 s outage; ``benchmarks/reconnect.py`` measures the 30 s case against gRPC's default backoff.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from splitinfer.edge.runner import EdgeRunner
from splitinfer.edge.transport import GrpcTransport

from .edge_side import LoadRun, device_session, edge_manifest, sparse_images
from .serve_process import ServeProcess

DEADLINE_S = 0.5
LATE_MARGIN_MS = 250.0  # an offload call may pass its deadline by scheduling on 2 busy cores, not by another
OUTAGE_S = 6.0
RESUME_WITHIN_S = 1.5


def _first_answer_after(run: LoadRun, moment: float) -> float | None:
    done = [o.done_at for o in run.outcomes if o.decided_on == "server" and o.sent_at >= moment]
    return min(done) - moment if done else None


def test_kill_and_restart_under_load(tiny_model_dir: Path, tmp_path: Path) -> None:
    manifest = edge_manifest(tiny_model_dir)
    server = ServeProcess(tiny_model_dir, tmp_path / "serve.log").start()
    transport = GrpcTransport(server.address, timeout_s=DEADLINE_S)
    runner = EdgeRunner(device_session(manifest), transport, manifest, exit_threshold=1.01)  # always offload
    run = LoadRun(runner, sparse_images(manifest, 16), threads=2)
    try:
        assert runner.classify(run.images[0]).decided_on == "server"
        run.start()
        time.sleep(1.5)
        server.kill()
        killed_at = time.monotonic()
        time.sleep(OUTAGE_S)
        server.start()  # the same port
        restarted_at = server.started_at
        time.sleep(2.5)
        assert run.stop(timeout_s=2 * DEADLINE_S + 5.0), "an edge call hung"
    finally:
        run.stop()
        transport.close()
        server.kill()

    answered, degraded = run.count("server"), run.count("degraded")
    late = run.past_deadline(DEADLINE_S, LATE_MARGIN_MS)
    resumed_s = _first_answer_after(run, restarted_at)
    print(f"\nkill/restart: {run.attempts} requests: answered {answered}, degraded {degraded}, lost {run.lost}, "
          f"past the deadline {len(late)}; outage {restarted_at - killed_at:.1f} s, offloading resumed "
          f"{resumed_s if resumed_s is None else round(resumed_s, 3)} s after the server accepted connections")
    assert run.lost == 0 and not run.raised, run.raised[:3]
    assert not late, [(round(o.server_ms), round(o.latency_ms), o.error) for o in late[:3]]
    from_the_dead = [o for o in run.outcomes
                     if o.decided_on == "server" and killed_at + 0.1 < o.sent_at < restarted_at - 0.2]
    assert not from_the_dead  # nothing answered while no server ran
    assert run.count("degraded", since=killed_at) > 0
    assert {o.decided_on for o in run.outcomes} <= {"server", "degraded"}
    assert resumed_s is not None and resumed_s <= RESUME_WITHIN_S
    assert run.count("server", since=restarted_at) > 10


@pytest.mark.parametrize("backoff_s", [0.001, 301.0])
def test_reconnect_backoff_is_validated(backoff_s: float) -> None:
    with pytest.raises(ValueError, match="max_reconnect_backoff_s"):
        GrpcTransport("127.0.0.1:1", max_reconnect_backoff_s=backoff_s)
