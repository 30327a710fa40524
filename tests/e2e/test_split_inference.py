"""The whole path: edge runner -> real gRPC server on loopback -> answer, and what happens when the server goes."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from splitinfer.cloud import ModelRegistry, create_server
from splitinfer.edge.preprocess import preprocess
from splitinfer.edge.runner import EdgeRunner
from splitinfer.edge.session import DeviceSession
from splitinfer.edge.transport import GrpcTransport
from splitinfer.export.data import make_split
from splitinfer.protos import PacketLimits, decode_tokens, load_manifest

from ..cloud.serve_process import ServeProcess

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def canvases():
    images, labels = make_split("test", n=24)
    return images, labels


@pytest.fixture()
def live_server(tiny_model_dir):
    server, port = create_server(ModelRegistry.from_folders([tiny_model_dir]), port=0)
    server.start()
    yield server, f"127.0.0.1:{port}"
    server.stop(0).wait(5)


class RecordingTransport:
    """Passes requests to a real GrpcTransport and keeps them, to recompute the answer locally."""

    def __init__(self, inner):
        self.inner, self.requests = inner, []

    def infer(self, request):
        self.requests.append(request)
        return self.inner.infer(request)


def test_edge_through_real_server_matches_local_computation(tiny_model_dir, live_server, canvases):
    import onnxruntime as ort

    manifest = load_manifest(tiny_model_dir)
    _, address = live_server
    with GrpcTransport(address, timeout_s=5.0) as grpc_transport:
        transport = RecordingTransport(grpc_transport)
        runner = EdgeRunner(DeviceSession.from_manifest(manifest), transport, manifest, exit_threshold=1.01)
        results = [runner.classify(img) for img in canvases[0]]
    assert [r.decided_on for r in results] == ["server"] * len(results)
    server_half = ort.InferenceSession(str(manifest.server_path), providers=["CPUExecutionProvider"])
    limits = PacketLimits.for_manifest(manifest)
    for result, request in zip(results, transport.requests):
        assert result.bytes_sent == request.ByteSize() > 0
        assert 2 <= result.tokens_sent <= manifest.selection.budget + 1
        tokens, _ = decode_tokens(request.packet, limits)
        logits = server_half.run(None, {"tokens": tokens[None], "mask": np.ones((1, len(tokens)), bool)})[0][0]
        expected = np.exp(logits - logits.max())
        np.testing.assert_allclose(result.probabilities, expected / expected.sum(), atol=1e-5)
        assert result.label == int(np.argmax(logits))


def test_server_stopped_edge_still_answers_degraded(tiny_model_dir, live_server, canvases):
    manifest = load_manifest(tiny_model_dir)
    server, address = live_server
    session = DeviceSession.from_manifest(manifest)
    with GrpcTransport(address, timeout_s=2.0) as transport:
        runner = EdgeRunner(session, transport, manifest, exit_threshold=1.01)
        assert runner.classify(canvases[0][0]).decided_on == "server"
        server.stop(0).wait(5)
        results = [runner.classify(img) for img in canvases[0][:5]]
    for img, r in zip(canvases[0][:5], results):
        exit_logits = session.run(preprocess(img, manifest.preprocessing))[0][0]
        assert r.decided_on == "degraded" and r.error
        assert r.label == int(np.argmax(exit_logits))  # the device's own answer
        assert r.latency_ms < 2500


def test_cli_edge_against_cli_server(tiny_model_dir, canvases, tmp_path):
    from PIL import Image

    for i, img in enumerate(canvases[0][:4]):
        Image.fromarray(img, mode="L").save(tmp_path / f"digit_{i}.png")
    server = ServeProcess(tiny_model_dir, tmp_path / "serve.log").start()
    address = server.address
    try:
        edge = subprocess.run([sys.executable, "-m", "splitinfer.edge.cli", "classify", "--model", str(tiny_model_dir),
                               "--server", address, "--threshold", "2", "--json", str(tmp_path)],
                              capture_output=True, text=True, timeout=60)
        assert edge.returncode == 0, edge.stderr
        records = [json.loads(line) for line in edge.stdout.splitlines() if line.strip()]
        assert len(records) == 4 and {r["decided_on"] for r in records} == {"server"}
        assert all(r["bytes_sent"] > 0 for r in records)
    finally:
        assert server.stop(timeout=20) == 0


@pytest.mark.slow
def test_demo_on_the_shipped_checkpoint(tmp_path):
    """A smaller run of `make demo`: the trained model through the real server process."""
    out = tmp_path / "demo.json"
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py"), "--n-test", "400",
                           "--model-dir", str(tmp_path / "model"), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["n_test"] == 400
    assert r["accuracy_full_model"] >= 0.9
    assert r["accuracy_split"] >= r["accuracy_full_model"] - 0.02
    assert r["exit_rate"] >= 0.4 and r["degraded_rate"] == 0
    assert 0 < r["mean_bytes_per_offload"] <= r["bytes_fp32_all_tokens"] / 8
    assert r["after_server_stop"]["answered"] == r["after_server_stop"]["n"]


@pytest.mark.slow
def test_two_exports_of_the_shipped_checkpoint_serve_each_other(trained_model_dir, tmp_path):
    """Exported twice into two folders: a server loaded from the first answers an edge holding the
    second (the deployment hash ignores export timings), every offload decided on the server."""
    from splitinfer.export.pipeline import ExportOptions, export_checkpoint

    second = export_checkpoint(ROOT / "checkpoints" / "vit-cluttered-mnist.pt", tmp_path / "again",
                               ExportOptions(name="vit-cluttered-mnist", calibration_size=200, epsilon=0.05))
    first = load_manifest(trained_model_dir)
    assert second.sha256 == first.sha256 and second.version == first.version
    server, port = create_server(ModelRegistry.from_folders([trained_model_dir]), port=0)
    server.start()
    try:
        images, _ = make_split("test", n=60)
        with GrpcTransport(f"127.0.0.1:{port}", timeout_s=5.0) as transport:
            runner = EdgeRunner(DeviceSession.from_manifest(second), transport, second, exit_threshold=2.0)
            results = runner.classify_many(images)
    finally:
        server.stop(0).wait(5)
    assert [r.decided_on for r in results] == ["server"] * len(images)


def test_classify_without_a_server_is_never_labelled_worse_than_the_whole_model(trained_model_dir, tmp_path):
    """200 test PNGs, no server: every input exits on the device, the energy ratio is <= 1."""
    from PIL import Image

    images, _ = make_split("test", n=200)
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    proc = subprocess.run([sys.executable, "-m", "splitinfer.edge.cli", "classify", "--model", str(trained_model_dir),
                           "--device-profile", "laptop", str(folder)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    match = re.search(r"energy label: ([A-G]) \(([0-9.]+) x the whole model", proc.stdout)
    assert match, proc.stdout[-2000:]
    assert float(match.group(2)) <= 1.0 and match.group(1) != "G"
    assert "summary: 200 answered" in proc.stdout and "device 200 (100.0%)" in proc.stdout
