"""The splitinfer.v1 service on Ray Serve (local Ray on loopback): the edge's answers, refusals, batching."""
from __future__ import annotations

import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from splitinfer.cloud import ModelRegistry, create_server  # noqa: E402
from splitinfer.cloud.ray_serve import APP_NAME, RayServeConfig, build_app, grpc_options  # noqa: E402
from splitinfer.edge.runner import EdgeRunner  # noqa: E402
from splitinfer.edge.session import DeviceSession  # noqa: E402
from splitinfer.edge.transport import GrpcTransport  # noqa: E402
from splitinfer.protos import ManifestMismatch, ServerUnavailable, Unauthenticated, load_manifest  # noqa: E402

pytestmark = pytest.mark.slow  # one local Ray instance for the whole module: about 20-40 s here

TOKEN = "ray-test-token"
START_TIMEOUT_S = 90.0


def _free_port() -> int:
    with socket.socket() as s:  # the OS picks a free loopback port; Ray binds it right after
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_app(tiny_model_dir: Path):
    """A local Ray (2 CPUs, no dashboard) serving the tiny model through Serve's gRPC proxy; shut down after."""
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=temp_dir)
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": _free_port()}, grpc_options=grpc_options(port))
        config = RayServeConfig(folders=(tiny_model_dir,), max_batch_size=16, batch_wait_timeout_s=0.005,
                                auth_tokens=(TOKEN,))
        serve.run(build_app(config), name=APP_NAME, blocking=False)
        address = f"127.0.0.1:{port}"
        _wait_until_answering(address, tiny_model_dir)
        yield address
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def _wait_until_answering(address: str, model_dir: Path) -> None:
    manifest = load_manifest(model_dir)
    probe = GrpcTransport(address, timeout_s=5.0, auth_token="not-the-token")
    from splitinfer.protos import splitinfer_pb2 as pb

    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while True:
            try:
                probe.infer(pb.InferRequest(model=manifest.name, manifest_sha256=manifest.sha256))
            except Unauthenticated:
                return  # the replica answered (and refused the probe's token)
            except ServerUnavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.25)
    finally:
        probe.close()


@pytest.fixture(scope="module")
def canvases():
    from splitinfer.export.data import make_split

    images, _labels = make_split("test", n=12)
    return images


def test_the_edge_gets_the_same_answers_from_ray_serve_as_from_splitinfer_serve(ray_app, tiny_model_dir, canvases):
    manifest = load_manifest(tiny_model_dir)
    session = DeviceSession.from_manifest(manifest)
    server, port = create_server(ModelRegistry.from_folders([tiny_model_dir]), port=0)
    server.start()
    try:
        with GrpcTransport(ray_app, timeout_s=10.0, auth_token=TOKEN) as to_ray, \
                GrpcTransport(f"127.0.0.1:{port}", timeout_s=10.0) as to_grpc:
            on_ray = [EdgeRunner(session, to_ray, manifest, exit_threshold=1.01).classify(img) for img in canvases]
            on_grpc = [EdgeRunner(session, to_grpc, manifest, exit_threshold=1.01).classify(img) for img in canvases]
    finally:
        server.stop(0).wait(5)
    assert [r.decided_on for r in on_ray] == ["server"] * len(canvases), [r.error for r in on_ray]
    assert [r.decided_on for r in on_grpc] == ["server"] * len(canvases)
    for a, b in zip(on_ray, on_grpc):
        assert a.label == b.label
        np.testing.assert_allclose(a.probabilities, b.probabilities, rtol=1e-5, atol=1e-6)


def test_a_manifest_mismatch_is_failed_precondition(ray_app, make_request):
    with GrpcTransport(ray_app, timeout_s=10.0, auth_token=TOKEN) as transport:
        with pytest.raises(ManifestMismatch) as info:
            transport.infer(make_request(manifest_sha256="0" * 64))
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION and "differs from the served" in str(info.value)


@pytest.mark.parametrize("token", ["wrong-token", None])
def test_a_wrong_or_missing_token_is_unauthenticated(ray_app, make_request, token):
    with GrpcTransport(ray_app, timeout_s=10.0, auth_token=token) as transport:
        with pytest.raises(Unauthenticated) as info:
            transport.infer(make_request())
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_concurrent_calls_are_batched(ray_app, make_request):
    requests = [make_request(count=2 + i % 6, seed=i) for i in range(48)]
    with GrpcTransport(ray_app, timeout_s=20.0, auth_token=TOKEN) as transport, ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(transport.infer, requests))
        alone = [transport.infer(r) for r in requests[:4]]
    assert [a.request_id for a in answers] == [r.request_id for r in requests]
    for batched, single in zip(answers, alone):  # a padded batch answers as a batch of one does
        np.testing.assert_allclose(batched.probabilities, single.probabilities, rtol=1e-5, atol=1e-6)
    handle = serve.get_deployment_handle("SplitInferDeployment", app_name=APP_NAME)
    sizes = handle.batch_sizes.remote().result(timeout_s=30)
    assert sum(sizes) >= len(requests) + 4 and max(sizes) > 1, sizes


def test_splitinfer_serve_engine_ray_serves_until_sigterm(tiny_model_dir, make_request, tmp_path):
    import signal
    import subprocess
    import sys

    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    env = {**__import__("os").environ, "RAY_ADDRESS": ""}
    proc = subprocess.Popen([sys.executable, "-m", "splitinfer.cloud.cli", "--engine", "ray", "--model",
                             str(tiny_model_dir), "--port", "0", "--auth-token-file", str(tokens),
                             "--max-queue-delay-ms", "2"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=env)
    try:
        address = None
        deadline = time.monotonic() + START_TIMEOUT_S
        while address is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if "listening on" in line:
                address = "127.0.0.1:" + line.rsplit(":", 1)[1].strip()
        assert address is not None, "splitinfer-serve --engine ray did not start"
        _wait_until_answering(address, tiny_model_dir)
        with GrpcTransport(address, timeout_s=10.0, auth_token=TOKEN) as transport:
            answer = transport.infer(make_request(seed=5))
        assert answer.request_id == "req-5" and answer.label >= 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("option", [["--tls-cert", "c.pem", "--tls-key", "k.pem"], ["--metrics-port", "0"],
                                    ["--health-port", "0"], ["--event-loop", "asyncio"]])
def test_engine_ray_refuses_options_it_cannot_honour(tiny_model_dir, option, capsys):
    from splitinfer.cloud.cli import main

    assert main(["--engine", "ray", "--model", str(tiny_model_dir), *option]) == 2
    assert "is not available with --engine ray" in capsys.readouterr().err


def test_max_replicas_is_refused_by_the_grpc_engine(tiny_model_dir, capsys):
    from splitinfer.cloud.cli import main

    assert main(["--model", str(tiny_model_dir), "--max-replicas", "4"]) == 2
    assert "--max-replicas is for --engine ray" in capsys.readouterr().err


def test_autoscaling_config_when_max_replicas_exceeds_replicas(tiny_model_dir):
    options = RayServeConfig(folders=(tiny_model_dir,), replicas=2, max_replicas=6).deployment_options()
    scaling = options["autoscaling_config"]
    assert (scaling.min_replicas, scaling.max_replicas, scaling.initial_replicas) == (2, 6, 2)
    assert "num_replicas" not in options and options["max_ongoing_requests"] >= 64
    assert RayServeConfig(folders=(tiny_model_dir,), replicas=3).deployment_options()["num_replicas"] == 3
    with pytest.raises(ValueError, match="max_replicas"):
        RayServeConfig(folders=(tiny_model_dir,), replicas=3, max_replicas=2)
