"""Field audits against a real ``splitinfer-serve`` on 127.0.0.1: the edge marks audit requests and
requests sent under a drift alarm, and the server counts both in its metrics."""
from __future__ import annotations

import urllib.request
from pathlib import Path

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from splitinfer.edge.audit import Audit
from splitinfer.edge.runner import EdgeRunner
from splitinfer.edge.session import DeviceSession
from splitinfer.edge.transport import GrpcTransport
from splitinfer.protos import load_manifest

from .serve_process import ServeProcess


def _counter(url: str, name: str, model: str) -> float:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and s.labels.get("model") == model)


def test_server_counts_audits_and_drift_alarm_requests(tiny_model_dir: Path, tmp_path: Path) -> None:
    manifest = load_manifest(tiny_model_dir)
    server = ServeProcess(tiny_model_dir, tmp_path / "serve.log", args=("--metrics-port", "0")).start()
    try:
        url = next(line.split(" metrics on ", 1)[1].strip() for line in server.stdout_lines if " metrics on " in line)
        # exit threshold 0: the device answers everything, and audit rate 1 audits every answer
        audit = Audit(rate=1.0, calibrated_disagreement=0.01, alpha=0.05, rng=0)
        transport = GrpcTransport([server.address], timeout_s=10.0)
        try:
            runner = EdgeRunner(DeviceSession.from_manifest(manifest), transport, manifest, exit_threshold=0.0,
                                audit=audit)
            rng = np.random.default_rng(0)
            size = manifest.preprocessing.height
            results = [runner.classify(rng.integers(0, 256, (size, size), dtype=np.uint8)) for _ in range(40)]
        finally:
            transport.close()
        audits = [r for r in results if r.audited]
        assert audits and all(r.decided_on == "device" and r.bytes_sent > 0 and r.error is None for r in audits)
        # the tiny model's exit head and server half disagree on noise: the audit flags it
        assert audit.alarms >= 1, audit.state()
        after_alarm = [r for r in results if not r.audited]
        assert after_alarm and all(r.decided_on == "server" for r in after_alarm)
        assert _counter(url, "splitinfer_audit_requests_total", manifest.name) == len(audits)
        assert _counter(url, "splitinfer_drift_alarm_requests_total", manifest.name) >= len(after_alarm)
        assert _counter(url, "splitinfer_requests_total", manifest.name) == len(results)
    finally:
        assert server.stop() == 0
