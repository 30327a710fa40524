"""The one export pipeline: manifest and files, parity, operating points, bottlenecks, the zstd
dictionary, a deterministic deployment hash, options refused, and the committed test folders."""
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from splitinfer.export.adapters import SplitModel
from splitinfer.export.adapters.vit import BuiltinViT
from splitinfer.export.datasets import load_dataset
from splitinfer.export.halves import ParityError, verify_parity
from splitinfer.export.model import SplitViT, ViTConfig
from splitinfer.export.operating_points import (NEVER_EXIT, Simulation, SweepSpace, certify_configs, default_point,
                                                pareto_rows, points_for)
from splitinfer.export.pipeline import ExportOptions, export_split_model
from splitinfer.protos import ManifestError, load_manifest

ROOT = Path(__file__).resolve().parents[2]


def tiny_vit(seed: int = 0, **cfg) -> SplitModel:
    """The weights of tests/models/tiny-image (scripts/make_test_models.py)."""
    torch.manual_seed(seed)
    vit = SplitViT(ViTConfig(dim=32, depth=3, heads=2, split=1, **cfg)).eval()
    return SplitModel(BuiltinViT(vit), 1)


def test_manifest_and_files(tiny_model_dir):
    m = load_manifest(tiny_model_dir)
    assert m.name == "tiny" and m.dim == 32 and m.num_tokens == 65 and len(m.classes) == 10
    for path in (m.device_path, m.server_path):
        proto = onnx.load(str(path))
        assert proto.ir_version == 8 and proto.opset_import[0].version == 17
    assert m.info["onnx"]["opset"] == 17 and m.version == m.sha256[:12]
    assert set(m.files) == {"device", "server", "device_int8", "zstd_dictionary"}


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
    model = tiny_vit(bottleneck_dims=(8,))
    m = load_manifest(tiny_model_dir)
    worst = verify_parity(model, m.device_path, m.server_path, batch_sizes=(1, 4))
    assert worst["device"] < 1e-4 and worst["server"] < 1e-4
    # the check can fail: other weights must not pass against these files
    with torch.no_grad():
        model.backbone.model.head.bias.add_(0.1)
    with pytest.raises(ParityError, match="server"):
        verify_parity(model, m.device_path, m.server_path, batch_sizes=(1,))


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
    exit_correct = (confidence > 0.6).astype(float)  # wrong below 0.6
    key = (None, "int8", 0.9, 16)
    configs = {key: (np.ones(n), np.full(n, 500), np.full(n, 9))}
    return Simulation(labels, confidence, exit_correct, np.ones(n), configs), key


def test_certified_threshold_keeps_the_loss_and_every_point_has_its_bound():
    """Exit head wrong below 0.6, server and whole model always right: the certified threshold sits
    just below 0.6 (a few losses allowed at epsilon 1%), a larger epsilon certifies a lower one, and
    every measured point carries a Clopper-Pearson accuracy floor."""
    sim, key = _simulation()
    space = SweepSpace(widths=(None,), encodings=("int8",), selections=((0.9, 16),))
    cert = certify_configs(sim, 0.01, 0.1)[key]
    assert cert.certified and 0.59 < cert.threshold <= 0.6 and cert.bound <= 0.01
    assert certify_configs(sim, 0.05, 0.1)[key].threshold < cert.threshold
    points = points_for(sim, space, {key: cert}, 0.1)
    chosen, _ = default_point(points, 0.002)
    assert chosen["certified"] and chosen["threshold"] == cert.threshold
    assert [p["threshold"] for p in points if p["certified"]] == [cert.threshold]
    assert all(0 <= p["accuracy_lower_bound"] <= p["accuracy"] for p in points)
    # nothing certified (the server is wrong on a quarter of what it gets): the most accurate point, uncertified
    bad = Simulation(sim.labels, sim.confidence, sim.exit_correct, sim.full_correct,
                     {key: (np.r_[np.zeros(250), np.ones(750)], *sim.configs[key][1:])})
    none = points_for(bad, space, certify_configs(bad, 0.01, 0.1), 0.1)
    chosen, _ = default_point(none, 0.002)
    assert not any(p["certified"] for p in none)
    assert chosen["accuracy"] == max(p["accuracy"] for p in none) and 0.0 < chosen["exit_rate"] < 1.0


def test_guarantee_options_are_checked(tmp_path):
    for bad in (dict(epsilon=0.0), dict(epsilon=1.0), dict(delta=0.0), dict(delta=1.5), dict(epsilon="0.1")):
        with pytest.raises(ValueError, match="epsilon|delta"):
            ExportOptions(**bad)
    data = load_dataset("cluttered-mnist", "calibration", tiny_vit().backbone, n=20)
    with pytest.raises(ValueError, match=r"20 calibration inputs cannot certify .* needs >= \d+"):
        export_split_model(tiny_vit(), tmp_path / "small", ExportOptions(name="tiny", budget=8, plot=False), data)
    assert not (tmp_path / "small" / "manifest.json").exists()


def test_pareto_front_keeps_only_undominated_points():
    points = [
        {"mean_bytes_per_request": 0.0, "accuracy": 0.90},
        {"mean_bytes_per_request": 10.0, "accuracy": 0.95},
        {"mean_bytes_per_request": 12.0, "accuracy": 0.94},  # dominated
        {"mean_bytes_per_request": 30.0, "accuracy": 0.97},
        {"mean_bytes_per_request": 40.0, "accuracy": 0.97},  # dominated (same accuracy, more bytes)
    ]
    assert [p["mean_bytes_per_request"] for p in pareto_rows(points)] == [0.0, 10.0, 30.0]


def test_bottleneck_export_parity_and_manifest(tmp_path):
    model = tiny_vit(bottleneck_dims=(8,))
    data = load_dataset("cluttered-mnist", "calibration", model.backbone, n=20)
    manifest = export_split_model(model, tmp_path, ExportOptions(name="tiny-bn", budget=4, bottleneck=8,
                                                                 encoding="int4", epsilon=0.3, plot=False), data)
    assert manifest.tokens.dim == 8 and manifest.tokens.model_dim == 32 and manifest.bottleneck == 8
    m = load_manifest(tmp_path)
    worst = verify_parity(model, m.device_path, m.server_path, width=8, batch_sizes=(1, 2))
    assert worst["device"] < 1e-4 and worst["server"] < 1e-4
    points = m.operating_points
    assert points and all(p.encoding == "int4" for p in points) and m.point().id == m.default_operating_point
    assert [p.mean_bytes_per_request for p in points] == sorted(p.mean_bytes_per_request for p in points)
    with pytest.raises(ValueError, match="no learned bottleneck of width 16"):
        ExportOptions(bottleneck=16).space_for(model)


def test_zstd_dictionary_shipped_and_verified(tiny_model_dir, tmp_path):
    m = load_manifest(tiny_model_dir)
    assert m.zstd_dictionary is not None and len(m.zstd_dictionary) == m.info["zstd_dictionary"]["bytes"]
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "zstd.dict").write_bytes(b"\x00" * 1024)
    with pytest.raises(ManifestError, match="zstd.dict"):
        load_manifest(folder)


def test_same_model_same_options_same_hash_other_options_other_version(tmp_path):
    """The deployment hash covers what the halves compute with, not timings: two exports of the
    same weights agree; a different option gives a different version."""
    data = load_dataset("cluttered-mnist", "calibration", tiny_vit().backbone, n=20)
    options = ExportOptions(name="tiny", budget=8, epsilon=0.3, plot=False)
    a = export_split_model(tiny_vit(), tmp_path / "a", options, data)
    b = export_split_model(tiny_vit(), tmp_path / "b", options, data)
    assert a.sha256 == b.sha256 and a.version == b.version
    g = a.calibration.guarantee
    assert (g.epsilon, g.delta, g.n, g.configurations) == (0.3, 0.1, 20, 6) and g == b.calibration.guarantee
    assert g.certified or a.exit.threshold >= NEVER_EXIT  # never a bound that was not certified
    assert a.info["timings"] is not None  # measured, and still outside the hash
    c = export_split_model(tiny_vit(), tmp_path / "c", ExportOptions(name="tiny", budget=4, epsilon=0.3, plot=False), data)
    assert c.version != a.version


def test_an_option_that_cannot_apply_is_refused(tiny_model_dir, tmp_path, capsys):
    from splitinfer.export.cli import main

    ckpt = ROOT / "checkpoints" / "vit-cluttered-mnist.pt"
    out = str(tmp_path / "o")
    cases = [
        (["--checkpoint", str(ckpt), "--max-length", "16"], "--max-length"),
        (["--checkpoint", str(ckpt), "--timm-model", "deit_tiny_patch16_224"], "--timm-model"),
        (["--checkpoint", str(ckpt), "--bottleneck", "12"], "no learned bottleneck of width 12"),
        (["--checkpoint", str(ckpt), "--data", "bbcnews"], "this model reads image"),
        (["--adapter", "timm", "--timm-model", "deit_tiny_patch16_224"], "needs --data"),
        (["--adapter", "hf"], "needs --hf-model"),
    ]
    for args, message in cases:
        assert main(["export", *args, "--out", out]) == 2, args
        assert message in capsys.readouterr().err, args


@pytest.mark.slow
def test_committed_test_model_folders_are_current():
    """tests/models is what scripts/make_test_models.py writes today (else: run it and commit)."""
    pytest.importorskip("transformers")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_test_models.py"), "--check"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
