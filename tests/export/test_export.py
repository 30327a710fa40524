import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from splitinfer.export.calibrate import choose_threshold
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


def test_choose_threshold_keeps_accuracy():
    rng = np.random.default_rng(0)
    n = 1000
    labels = rng.integers(0, 10, n)
    confidence = rng.random(n)
    exit_pred = np.where(confidence > 0.6, labels, (labels + 1) % 10)  # wrong below 0.6
    sim = {"labels": labels, "confidence": confidence, "exit_pred": exit_pred,
           "full_pred": labels.copy(), "split_pred": labels.copy(), "patches": np.full(n, 8)}
    result = choose_threshold(sim, max_accuracy_drop=0.0)
    assert 0.59 < result.threshold <= 0.61 and result.accuracy_split == 1.0
    assert abs(result.exit_rate - (confidence >= result.threshold).mean()) < 1e-12
    with pytest.raises(ValueError, match="max_accuracy_drop"):
        choose_threshold(sim, 1.5)
