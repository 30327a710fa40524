"""The exit policy export deploys: what calibration simulates is what device.onnx computes, the
second view can be skipped, older device halves still load, and policies a model cannot take are
refused before any data is read."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from splitinfer.edge.session import DeviceSession
from splitinfer.export.adapters import SplitModel
from splitinfer.export.adapters.vit import BuiltinViT
from splitinfer.export.datasets import Dataset
from splitinfer.export.exit_score import device_pass, exit_spec_for
from splitinfer.export.halves import export_halves
from splitinfer.export.model import SplitViT, ViTConfig
from splitinfer.export.operating_points import SweepSpace, simulate_configs
from splitinfer.protos import ManifestError, graphs, load_manifest

ROOT = Path(__file__).resolve().parents[2]


def _model() -> SplitModel:
    torch.manual_seed(3)
    return SplitModel(BuiltinViT(SplitViT(ViTConfig(dim=32, depth=3, heads=2, split=1)).eval()), 1).eval()


def test_calibration_simulates_the_confidence_device_onnx_computes(tmp_path):
    model = _model()
    spec = exit_spec_for(model, "view_consistency", (1, -2))
    device_path, _ = export_halves(model, tmp_path, width=None, exit=spec)
    x = np.random.default_rng(0).normal(size=(12, 1, 64, 64)).astype(np.float32)
    data = Dataset("x", {"image": x}, np.zeros(12, np.int64), class_names=tuple("0123456789"))
    sim = simulate_configs(model, data, SweepSpace(widths=(None,), encodings=("int8",), selections=((0.8, 8),)),
                           {"model": "m", "manifest_sha256": "0" * 64, "request_id": "0" * 32}, spec)
    graph = DeviceSession(device_path).run(x)
    np.testing.assert_allclose(sim.confidence, graph.confidence, atol=1e-5)
    # max softmax is a different score on the same inputs (the check can fail)
    with torch.no_grad():
        max_softmax = device_pass(model, {"image": torch.from_numpy(x)}, exit_spec_for(model, "max_softmax"))[4]
    assert np.abs(max_softmax.numpy() - graph.confidence).max() > 1e-4  # 10x the tolerance above


def test_a_device_half_without_exit_confidence_falls_back_to_max_softmax(tiny_model_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    proto = onnx.load(str(folder / "device.onnx"))
    kept = [o for o in proto.graph.output if o.name != graphs.EXIT_CONFIDENCE]
    del proto.graph.output[:]
    proto.graph.output.extend(kept)
    old = folder / "old-device.onnx"
    onnx.save(proto, str(old))
    session = DeviceSession(old)
    assert not session.has_exit_confidence
    x = np.random.default_rng(1).normal(size=(3, 1, 64, 64)).astype(np.float32)
    out = session.run(x)
    z = np.exp(out.exit - out.exit.max(1, keepdims=True))
    np.testing.assert_allclose(out.confidence, (z / z.sum(1, keepdims=True)).max(1), atol=1e-6)
    # the folder's manifest says view consistency: an edge must not silently decide on max softmax
    from splitinfer.edge.runner import EdgeRunner

    with pytest.raises(ManifestError, match="exit_confidence"):
        EdgeRunner(session, None, load_manifest(folder))


def test_policies_a_model_cannot_take_are_refused(tmp_path, capsys):
    from splitinfer.export.cli import main

    from .test_adapters import make_tiny_hf_folder

    folder = make_tiny_hf_folder(tmp_path / "hf", "bert", 3)
    assert main(["export", "--adapter", "hf", "--hf-model", str(folder), "--split", "1",
                 "--exit-policy", "view_consistency", "--out", str(tmp_path / "bad")]) == 2
    assert "needs an image model" in capsys.readouterr().err
    ckpt = ROOT / "checkpoints" / "vit-cluttered-mnist.pt"
    base = ["export", "--checkpoint", str(ckpt), "--calibration-size", "20", "--epsilon", "0.5", "--no-plot"]
    assert main([*base, "--view-shift", "2", "--out", str(tmp_path / "bad")]) == 2
    assert "ROWS,COLS" in capsys.readouterr().err
    assert main([*base, "--exit-policy", "max_softmax", "--view-shift", "1,1", "--out", str(tmp_path / "bad")]) == 2
    assert "--view-shift applies" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert main([*base, "--exit-policy", "max_softmax", "--out", str(tmp_path / "ms")]) == 0
    m = load_manifest(tmp_path / "ms")
    assert m.exit.score == "max_softmax" and not DeviceSession.from_manifest(m).has_second_view
    assert main([*base, "--view-shift", "0,3", "--out", str(tmp_path / "vc")]) == 0
    m = load_manifest(tmp_path / "vc")
    assert m.exit.score == "view_consistency" and m.exit.view_shift == (0, 3)
    assert m.sha256 != load_manifest(tmp_path / "ms").sha256


def test_cls_block_is_the_whole_blocks_cls_row():
    """The second view runs the last device block for CLS only: the same numbers as the whole block."""
    model = _model()
    x, w = model.backbone.embed({"image": torch.randn(3, 1, 64, 64)})
    with torch.no_grad():
        full = model.backbone.block(0, x, w)[0][:, :1]
        np.testing.assert_allclose(model.backbone.cls_block(0, x, w).numpy(), full.numpy(), atol=1e-5)
        exit_full = model.device_forward({"image": torch.ones(2, 1, 64, 64)})[0]
        np.testing.assert_allclose(model.exit_only({"image": torch.ones(2, 1, 64, 64)}).numpy(), exit_full.numpy(),
                                   atol=1e-5)
    timm = pytest.importorskip("timm")
    from splitinfer.export.adapters.timm_vit import TimmViT

    torch.manual_seed(0)
    backbone = TimmViT(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=64).eval())
    x, w = backbone.embed({"image": torch.randn(2, 3, 64, 64)})
    with torch.no_grad():
        np.testing.assert_allclose(backbone.cls_block(0, x, w).numpy(), backbone.block(0, x, w)[0][:, :1].numpy(),
                                   atol=1e-5)
