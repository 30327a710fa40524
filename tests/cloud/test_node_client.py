"""The Node.js client in examples/node (@grpc/grpc-js on protos/splitinfer.proto) against the live server.

Runs when ``node`` and ``npm`` are installed; its packages are installed into a temporary copy
(``npm ci``, the versions pinned in package-lock.json), and the test skips if that is impossible
(no registry).
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from splitinfer.cloud import run_request
from splitinfer.protos import CodecConfig, encode_tokens
from splitinfer.protos import splitinfer_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "node"
PROTO = ROOT / "protos" / "splitinfer.proto"
TOKENS = 5


@pytest.fixture(scope="module")
def node_client(tmp_path_factory) -> Path:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are not installed")
    folder = tmp_path_factory.mktemp("node") / "client"
    shutil.copytree(EXAMPLE, folder, ignore=shutil.ignore_patterns("node_modules"))
    try:
        install = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=folder,
                                 capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.skip("npm ci took over 300 s")
    if install.returncode != 0:
        pytest.skip(f"npm ci failed (no registry?): {install.stderr[-500:]}")
    return folder / "client.js"


def _run(client: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["node", str(client), "--proto", str(PROTO), *args], capture_output=True, text=True,
                          timeout=60)


def _same_packet_in_python(manifest) -> pb.InferRequest:
    """The request client.js builds: token j of row i is ((7i + 3j) mod 17 - 8) / 8 at positions 0, 2, 4, ..."""
    rows, cols = np.meshgrid(np.arange(TOKENS), np.arange(manifest.dim), indexing="ij")
    tokens = (((7 * rows + 3 * cols) % 17 - 8) / 8).astype(np.float32)
    positions = 2 * np.arange(TOKENS)
    return pb.InferRequest(model=manifest.name, manifest_sha256=manifest.sha256, request_id="node-client",
                           packet=encode_tokens(tokens, positions, CodecConfig("fp32", "none")))


def test_node_client_gets_the_answer_python_computes(node_client, live_server, tiny_manifest, tiny_registry) -> None:
    done = _run(node_client, "--target", live_server.address, "--model", tiny_manifest.name,
                "--sha256", tiny_manifest.sha256, "--dim", str(tiny_manifest.dim), "--tokens", str(TOKENS))
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    print(f"\nnode client answer: label {answer['label']}, server total {answer['timings']['total_ms']:.2f} ms")
    expected = run_request(tiny_registry, _same_packet_in_python(tiny_manifest))
    assert answer["request_id"] == "node-client"
    assert answer["label"] == expected.label
    np.testing.assert_allclose(answer["probabilities"], expected.probabilities, atol=1e-5)
    assert answer["model_version"] == tiny_manifest.version


def test_node_client_reports_a_refused_call(node_client, live_server, tiny_manifest) -> None:
    done = _run(node_client, "--target", live_server.address, "--model", tiny_manifest.name,
                "--sha256", "0" * 64, "--dim", str(tiny_manifest.dim))
    assert done.returncode == 1
    assert done.stderr.startswith("FAILED_PRECONDITION: ")
