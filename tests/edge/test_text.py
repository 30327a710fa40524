"""The edge's text front end through the one EdgeRunner: tokenizer, device half, selection,
offload, degraded answers, the CLI; the classifier runs from the committed tiny-text folder with
no torch, the embedding model is exported here (torch) and served by the real server."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tokenizers")

TEXT = "Open the named file for reading."


def _runner(folder: Path, transport=None, **kwargs):
    from splitinfer.edge.runner import EdgeRunner
    from splitinfer.edge.session import DeviceSession
    from splitinfer.protos import load_manifest

    manifest = load_manifest(folder, need=("device",))
    return EdgeRunner(DeviceSession.from_manifest(manifest), transport, manifest, **kwargs)


@pytest.fixture(scope="module")
def embedding_model_dir(tmp_path_factory) -> Path:
    """A tiny random BERT embedding model exported through the one pipeline."""
    pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from splitinfer.export.adapters import SplitModel
    from splitinfer.export.adapters.hf_bert import load_hf_encoder
    from splitinfer.export.datasets import load_dataset
    from splitinfer.export.pipeline import ExportOptions, export_split_model
    from tests.export.test_adapters import make_tiny_hf_folder

    root = tmp_path_factory.mktemp("text_models")
    folder = make_tiny_hf_folder(root / "hf_embedding", "bert", 0)
    torch.manual_seed(0)
    backbone = load_hf_encoder(folder, max_length=32)
    data = load_dataset("docstrings", "calibration", backbone, n=40)
    export_split_model(SplitModel(backbone, split=1), root / "embedding",
                       ExportOptions(name="tiny-embedding", encoding="fp32", plot=False, zstd_dictionary_bytes=0), data)
    return root / "embedding"


EDGE_ONLY = """
import json, sys
from splitinfer.edge.local import LocalTransport
from splitinfer.edge.runner import EdgeRunner
from splitinfer.edge.session import DeviceSession
from splitinfer.protos import load_manifest
m = load_manifest(sys.argv[1])
runner = EdgeRunner(DeviceSession.from_manifest(m), LocalTransport(m), m, exit_threshold=2.0)
result = runner.classify_text("Return the number of items in the container.")
heavy = sorted(x for x in sys.modules if x.split(".")[0] in ("torch", "transformers", "timm")
               or x.startswith("splitinfer.export"))
print(json.dumps({"heavy": heavy, "decided_on": result.decided_on, "label": result.label,
                  "tokens": result.tokens_total, "sent": result.tokens_sent}))
"""


def test_text_path_runs_without_torch(tiny_text_model_dir):
    proc = subprocess.run([sys.executable, "-c", EDGE_ONLY, str(tiny_text_model_dir)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["heavy"] == [], f"heavy modules loaded: {out['heavy']}"
    assert out["decided_on"] == "server" and out["label"] in (0, 1, 2) and 1 < out["sent"] <= out["tokens"]


class _FakeTransport:
    def __init__(self, fail: Exception | None = None):
        self.fail, self.requests = fail, []

    def infer(self, request):
        from splitinfer.protos import splitinfer_pb2 as pb

        self.requests.append(request)
        if self.fail is not None:
            raise self.fail
        return pb.InferResponse(request_id=request.request_id, probabilities=[0.1, 0.7, 0.2], label=1)


def test_text_classifier_offloads_and_degrades(tiny_text_model_dir):
    from splitinfer.protos.errors import Unauthenticated

    transport = _FakeTransport()
    result = _runner(tiny_text_model_dir, transport, exit_threshold=2.0).classify_text(TEXT)
    assert result.decided_on == "server" and result.label == 1 and result.class_name == "LABEL_1"
    packet = transport.requests[0].packet
    assert list(packet.positions)[0] == 0 and packet.num_tokens == result.tokens_sent > 1 and result.bytes_sent > 0
    assert result.tokens_sent <= 1 + _runner(tiny_text_model_dir).policy.budget
    down = _runner(tiny_text_model_dir, _FakeTransport(ConnectionError("server down")), exit_threshold=2.0)
    degraded = down.classify_text(TEXT)
    assert degraded.decided_on == "degraded" and "server down" in degraded.error and degraded.failure == "outage"
    denied = _runner(tiny_text_model_dir, _FakeTransport(Unauthenticated("UNAUTHENTICATED: bad token")),
                     exit_threshold=2.0).classify_text(TEXT)
    assert denied.decided_on == "degraded" and denied.failure == "misconfiguration"
    local = _runner(tiny_text_model_dir, None).classify_text(TEXT)
    assert local.decided_on == "device" and local.tokens_sent == 0
    with pytest.raises(ValueError, match="not images"):
        _runner(tiny_text_model_dir).classify(np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="empty text"):
        _runner(tiny_text_model_dir).classify_text("   ")


def test_text_through_the_real_server_equals_the_local_server_half(tiny_text_model_dir):
    from splitinfer.cloud import ModelRegistry, create_server
    from splitinfer.edge.local import LocalTransport
    from splitinfer.edge.transport import GrpcTransport
    from splitinfer.protos import load_manifest

    server, port = create_server(ModelRegistry.from_folders([tiny_text_model_dir]), port=0)
    server.start()
    try:
        with GrpcTransport(f"127.0.0.1:{port}", timeout_s=5.0) as transport:
            remote = _runner(tiny_text_model_dir, transport, exit_threshold=2.0).classify_text(TEXT)
    finally:
        server.stop(0).wait(5)
    local = _runner(tiny_text_model_dir, LocalTransport(load_manifest(tiny_text_model_dir)),
                    exit_threshold=2.0).classify_text(TEXT)
    assert remote.decided_on == local.decided_on == "server" and remote.label == local.label
    np.testing.assert_allclose(remote.probabilities, local.probabilities, atol=1e-5)


def test_embedding_runner_equals_torch_and_the_real_server(embedding_model_dir):
    import torch

    from splitinfer.cloud import ModelRegistry, create_server
    from splitinfer.edge.local import LocalTransport
    from splitinfer.edge.transport import GrpcTransport
    from splitinfer.export.adapters.hf_bert import load_hf_encoder, tokenize
    from splitinfer.protos import load_manifest

    folder = embedding_model_dir
    manifest = load_manifest(folder)
    text = "Close the file and release its resources."
    everything = _runner(folder, LocalTransport(manifest), mass=1.0, budget=64).classify_text(text)
    backbone = load_hf_encoder(folder.parent / "hf_embedding", max_length=32)
    with torch.no_grad():
        ref = backbone(tokenize(folder / "tokenizer.json", [text], 32))[0].numpy()
    assert everything.tokens_sent == everything.tokens_total
    np.testing.assert_allclose(np.asarray(everything.embedding), ref, atol=1e-4)
    server, port = create_server(ModelRegistry.from_folders([folder]), port=0)
    server.start()
    try:
        with GrpcTransport(f"127.0.0.1:{port}", timeout_s=5.0) as transport:
            remote = _runner(folder, transport).classify_text(text)
    finally:
        server.stop(0).wait(5)
    local = _runner(folder, LocalTransport(manifest)).classify_text(text)
    assert remote.decided_on == "server" and remote.bytes_sent > 0 and remote.label is None
    np.testing.assert_allclose(remote.embedding, local.embedding, atol=1e-5)
    down = _runner(folder, _FakeTransport(ConnectionError("down"))).classify_text(text)
    assert down.decided_on == "degraded" and down.embedding is not None


def test_edge_cli_text_subcommand(tiny_text_model_dir, tmp_path, capsys):
    from splitinfer.edge.cli import main

    texts = tmp_path / "in.txt"
    texts.write_text("Return the number of items.\n\nClose the file and release its resources.\n")
    assert main(["text", "--model", str(tiny_text_model_dir), "--local-server", "--threshold", "2",
                 "--json", str(texts)]) == 0
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["decided_on"] for r in lines] == ["server", "server"] and [r["input"][-2:] for r in lines] == [":1", ":3"]
    assert "summary: 2 answered" in captured.err
    assert main(["text", "--model", str(tmp_path), str(texts)]) == 2
    assert main(["classify", "--model", str(tiny_text_model_dir), str(texts)]) == 2
    assert "use 'splitinfer-edge text'" in capsys.readouterr().err
