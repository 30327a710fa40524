import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from splitinfer.export.operating_points import Simulation, pareto_front, robust_threshold
from splitinfer.export.model import SplitViT, ViTConfig
from splitinfer.export.onnx_export import ParityError, verify_parity
from splitinfer.protos import ManifestError, load_manifest


def test_manifest_and_files(tiny_model_dir):
    m = load_manifest(tiny_model_dir)
    assert m.name == "tiny" and m.dim == 32 and m.num_tokens == 65 and len(m.classes) == 10
    for path in (m.device_path, m.server_path):
        proto = onnx.load(str(path))
        assert proto.ir_version == 8 and proto.opset_import[0].version == 17
    data = json.loads((tiny_model_dir / "manifest.json").read_text())
    assert data["onnx"] == {**data["onnx"], "opset": 17, "ir_version": 8}


def test_tampered_half_is_refused(tiny_model_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    with open(folder / "server.onnx", "ab") as f:
        f.write(b"\x00")
    with pytest.raises(ManifestError, match="sha256"):
        load_manifest(folder)
    with pytest.raises(ManifestError, match="not a model folder"):
        load_manifest(tmp_path)


def test_onnx_parity_at_several_token_counts(tiny_model_dir):
    torch.manual_seed(0)  # the same weights the fixture exported
    model = SplitViT(ViTConfig(dim=32, depth=3, heads=2, split=1)).eval()
    m = load_manifest(tiny_model_dir)
    worst = verify_parity(model, m.device_path, m.server_path, token_counts=(1, 2, 9, 33, 65), batch_sizes=(1, 4))
    assert worst["device"] < 1e-4 and worst["server"] < 1e-4
    # the check can fail: other weights must not pass against these files
    with torch.no_grad():
        model.head.bias.add_(0.1)
    with pytest.raises(ParityError, match="server half"):
        verify_parity(model, m.device_path, m.server_path, token_counts=(9,), batch_sizes=(1,))


def test_padding_mask_equals_unpadded_rows():
    torch.manual_seed(1)
    model = SplitViT(ViTConfig(dim=32, depth=3, heads=2, split=1)).eval()
    tokens = torch.randn(2, 10, 32)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False
    with torch.no_grad():
        batched = model.server_forward(tokens, mask)
        alone = model.server_forward(tokens[1:, :6])
    torch.testing.assert_close(batched[1:], alone, atol=1e-5, rtol=1e-5)


def _simulation(n=1000, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    confidence = rng.random(n)
    exit_pred = np.where(confidence > 0.6, labels, (labels + 1) % 10)  # wrong below 0.6
    key = (None, "int8", 0.9, 16)
    configs = {key: (labels.copy(), np.full(n, 500), np.full(n, 9))}
    return Simulation(labels, confidence, exit_pred, labels.copy(), configs), key


def test_robust_threshold_keeps_accuracy():
    sim, key = _simulation()
    t = robust_threshold(sim, key, max_accuracy_drop=0.0)
    assert 0.59 < t <= 0.61
    # a looser target allows a lower threshold, never a higher one
    assert robust_threshold(sim, key, max_accuracy_drop=0.05) <= t


def test_pareto_front_keeps_only_undominated_points():
    points = [
        {"mean_bytes_per_request": 0.0, "accuracy": 0.90},
        {"mean_bytes_per_request": 10.0, "accuracy": 0.95},
        {"mean_bytes_per_request": 12.0, "accuracy": 0.94},  # dominated
        {"mean_bytes_per_request": 30.0, "accuracy": 0.97},
        {"mean_bytes_per_request": 40.0, "accuracy": 0.97},  # dominated (same accuracy, more bytes)
    ]
    front = pareto_front(points)
    assert [p["mean_bytes_per_request"] for p in front] == [0.0, 10.0, 30.0]


def test_bottleneck_export_parity_and_manifest(tmp_path):
    from splitinfer.export.pipeline import ExportOptions, export_split_model

    torch.manual_seed(0)
    model = SplitViT(ViTConfig(dim=32, depth=3, heads=2, split=1, bottleneck_dims=(8,))).eval()
    manifest = export_split_model(model, tmp_path, ExportOptions(name="tiny-bn", calibration_size=20, budget=4,
                                                                 bottleneck=8, encoding="int4", plot=False))
    assert manifest["tokens"]["dim"] == 8 and manifest["tokens"]["model_dim"] == 32
    assert manifest["bottleneck"] == {"width": 8, "ratio": 0.25}
    m = load_manifest(tmp_path)
    worst = verify_parity(model, m.device_path, m.server_path, token_counts=(1, 3, 17, 65), batch_sizes=(1, 2),
                          bottleneck=8)
    assert worst["device"] < 1e-4 and worst["server"] < 1e-4
    points = manifest["operating_points"]
    assert points and all(p["encoding"] == "int4" for p in points)
    assert manifest["default_operating_point"] in {p["id"] for p in points}
    assert [p["mean_bytes_per_request"] for p in points] == sorted(p["mean_bytes_per_request"] for p in points)
    with pytest.raises(ValueError, match="no bottleneck of width 16"):
        ExportOptions(bottleneck=16).space_for(model)


def test_zstd_dictionary_shipped_and_verified(tiny_model_dir, tmp_path):
    m = load_manifest(tiny_model_dir)
    entry = m.data["codec"]["zstd_dictionary"]
    assert m.zstd_dictionary is not None and len(m.zstd_dictionary) == entry["bytes"]
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    (folder / entry["path"]).write_bytes(b"\x00" * entry["bytes"])
    with pytest.raises(ManifestError, match="zstd.dict"):
        load_manifest(folder).zstd_dictionary
