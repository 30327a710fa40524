"""The edge text path: tokenizer, device half, selection and offload, with no torch imported."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def text_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny random BERTs exported by the real adapter pipeline: an embedding and a 3-class model."""
    pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from splitinfer.export.adapters import SplitModel
    from splitinfer.export.adapters.hf_bert import load_hf_encoder
    from splitinfer.export.adapters.split_export import AdapterExportOptions, export_adapter_model
    from tests.export.test_adapters import make_tiny_hf_folder

    root = tmp_path_factory.mktemp("text_models")
    out = {}
    for name, classes in (("embedding", 0), ("classifier", 3)):
        folder = make_tiny_hf_folder(root / f"hf_{name}", "bert", classes)
        torch.manual_seed(0)
        model = SplitModel(load_hf_encoder(folder, max_length=32), split=1)
        export_adapter_model(model, root / name, AdapterExportOptions(name=f"tiny-{name}", keep_ratio=0.5,
                                                                     exit_threshold=0.99, encoding="fp32",
                                                                     compression="none"))
        out[name] = root / name
    return out


EDGE_ONLY = """
import json, sys
from splitinfer.edge.text import TextRunner
runner = TextRunner.from_folder(sys.argv[1], server=True, keep_ratio=1.0)
result = runner.run("Return the number of items in the container.")
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "timm")
               or m.startswith("splitinfer.export"))
print(json.dumps({"heavy": heavy, "decided_on": result.decided_on, "embedding": result.embedding,
                  "tokens": result.tokens_total}))
"""


def test_text_path_runs_without_torch(text_model_dirs):
    proc = subprocess.run([sys.executable, "-c", EDGE_ONLY, str(text_model_dirs["embedding"])],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["heavy"] == [], f"heavy modules loaded: {out['heavy']}"
    assert out["decided_on"] == "server" and len(out["embedding"]) == 32 and out["tokens"] > 5


def test_text_runner_equals_torch_on_all_tokens(text_model_dirs):
    import torch

    from splitinfer.edge.text import TextRunner
    from splitinfer.export.adapters.hf_bert import load_hf_encoder, tokenize

    folder = text_model_dirs["embedding"]
    runner = TextRunner.from_folder(folder, server=True, keep_ratio=1.0)
    text = "Close the file and release its resources."
    result = runner.run(text)
    backbone = load_hf_encoder(folder.parent / "hf_embedding", max_length=32)
    with torch.no_grad():
        ref = backbone(tokenize(folder / "tokenizer.json", [text], 32))[0].numpy()
    np.testing.assert_allclose(np.asarray(result.embedding), ref, atol=1e-4)
    pruned = TextRunner.from_folder(folder, server=True, keep_ratio=0.25).run(text)
    assert pruned.tokens_sent == 1 + round(0.25 * (result.tokens_total - 1))


class _FakeTransport:
    def __init__(self, fail: bool = False):
        self.fail, self.requests = fail, []

    def infer(self, request):
        from splitinfer.protos import splitinfer_pb2 as pb

        self.requests.append(request)
        if self.fail:
            raise ConnectionError("server down")
        return pb.InferResponse(request_id=request.request_id, probabilities=[0.1, 0.7, 0.2], label=1)


def test_text_classifier_offloads_and_degrades(text_model_dirs):
    from splitinfer.edge.text import TextDeviceSession, TextRunner, TextTokenizer
    from splitinfer.protos import load_manifest

    manifest = load_manifest(text_model_dirs["classifier"], need=("device",))
    parts = (TextDeviceSession(manifest.device_path), TextTokenizer.from_manifest(manifest), manifest)
    transport = _FakeTransport()
    result = TextRunner(*parts, transport=transport).run("Open the named file for reading.")
    assert result.decided_on == "server" and result.label == 1 and result.class_name == "LABEL_1"
    packet = transport.requests[0].packet
    assert list(packet.positions)[0] == 0 and packet.num_tokens == result.tokens_sent > 1 and result.bytes_sent > 0
    down = TextRunner(*parts, transport=_FakeTransport(fail=True)).run("Open the named file for reading.")
    assert down.decided_on == "degraded" and "server down" in down.error and down.label is not None
    local = TextRunner(*parts, transport=None).run("Open the named file for reading.")
    assert local.decided_on == "device" and local.tokens_sent == 0


def test_embedding_model_offloads_through_the_real_server(text_model_dirs):
    from splitinfer.cloud import ModelRegistry, create_server
    from splitinfer.edge.text import LocalServerHalf, TextDeviceSession, TextRunner, TextTokenizer
    from splitinfer.edge.transport import GrpcTransport
    from splitinfer.protos import load_manifest

    folder = text_model_dirs["embedding"]
    manifest = load_manifest(folder)
    parts = (TextDeviceSession(manifest.device_path), TextTokenizer.from_manifest(manifest), manifest)
    server, port = create_server(ModelRegistry.from_folders([folder]), port=0)
    server.start()
    try:
        with GrpcTransport(f"127.0.0.1:{port}", timeout_s=5.0) as transport:
            remote = TextRunner(*parts, transport=transport).run("Return a copy of the string with its case swapped.")
        server.stop(0).wait(5)
    finally:
        server.stop(0)
    local = TextRunner(*parts, server=LocalServerHalf(manifest)).run("Return a copy of the string with its case swapped.")
    assert remote.decided_on == "server" and remote.bytes_sent > 0 and remote.label is None
    assert len(remote.embedding) == len(local.embedding) > 0
    np.testing.assert_allclose(remote.embedding, local.embedding, atol=1e-5)
    down = TextRunner(*parts, transport=_FakeTransport(fail=True)).run("Open the named file for reading.")
    assert down.decided_on == "degraded" and down.embedding is not None


def test_edge_cli_text_subcommand(text_model_dirs, tmp_path, capsys):
    from splitinfer.edge.cli import main

    texts = tmp_path / "in.txt"
    texts.write_text("Return the number of items.\n\nClose the file and release its resources.\n")
    assert main(["text", "--model", str(text_model_dirs["embedding"]), "--local-server", str(texts)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["decided_on"] for r in lines] == ["server", "server"] and len(lines[0]["embedding"]) == 32
    assert main(["text", "--model", str(tmp_path), str(texts)]) == 2
