"""A timm DeiT-tiny on real photos, end to end: export with ``--data imagefolder:DIR``, the real
server, ``splitinfer-edge classify`` on JPEG files; each answer is the class timm's own forward
(``create_transform`` + ``model(x)``) gives on the same file.

No pretrained weights ship here, so the model is DeiT-tiny with timm's random initialisation and a
4-class head set to the centred features of the four photos (a nearest-centroid classifier): timm
itself then tells the photos apart, and the test can tell a wrong pipeline from a right one.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
skimage_data = pytest.importorskip("skimage.data")

from PIL import Image  # noqa: E402
from timm.data import create_transform, resolve_data_config  # noqa: E402

from ..cloud.serve_process import ServeProcess  # noqa: E402

PHOTOS = {"astronaut": "astronaut", "cat": "chelsea", "coffee": "coffee", "rocket": "rocket"}  # class: photo
CLASSES = sorted(PHOTOS)  # the imagefolder's class order


def timm_inputs(model, paths: list[Path]) -> torch.Tensor:
    """float32 (B, 3, 224, 224): timm's eval transform of each file, as a timm user reads it."""
    transform = create_transform(**resolve_data_config(model=model), is_training=False)
    images = []
    for path in paths:
        with Image.open(path) as img:
            images.append(transform(img.convert("RGB")))
    return torch.stack(images)


@pytest.fixture(scope="module")
def photos_and_model(tmp_path_factory):
    """(jpeg paths, imagefolder root, checkpoint path, timm model)."""
    root = tmp_path_factory.mktemp("timm_photos")
    jpegs, folder = root / "jpegs", root / "imagefolder"
    jpegs.mkdir()
    rng = np.random.default_rng(0)
    for name, photo in PHOTOS.items():
        pixels = getattr(skimage_data, photo)()
        Image.fromarray(pixels).save(jpegs / f"{name}.jpg", quality=90)
        (folder / name).mkdir(parents=True)
        h, w = pixels.shape[:2]
        for i in range(5):  # calibration pictures: crops of the photo, some mirrored
            y, x = rng.integers(0, h // 4), rng.integers(0, w // 4)
            crop = pixels[y:y + 3 * h // 4, x:x + 3 * w // 4]
            Image.fromarray(np.ascontiguousarray(crop[:, ::-1] if i % 2 else crop)).save(folder / name / f"{i}.jpg")
    paths = [jpegs / f"{name}.jpg" for name in CLASSES]

    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=len(CLASSES)).eval()
    with torch.no_grad():
        features = model.forward_head(model.forward_features(timm_inputs(model, paths)), pre_logits=True)
        centred = features - features.mean(0, keepdim=True)
        model.head.weight.copy_(centred / centred.norm(dim=1, keepdim=True))
        model.head.bias.zero_()
    checkpoint = root / "deit_tiny.pth"
    torch.save(model.state_dict(), checkpoint)
    return paths, folder, checkpoint, model


@pytest.fixture(scope="module")
def deit_folder(photos_and_model, tmp_path_factory) -> Path:
    from splitinfer.export.cli import main as export_main

    _, folder, checkpoint, _ = photos_and_model
    out = tmp_path_factory.mktemp("deit_model")
    status = export_main(["export", "--adapter", "timm", "--timm-model", "deit_tiny_patch16_224",
                          "--checkpoint", str(checkpoint), "--num-classes", str(len(CLASSES)),
                          "--data", f"imagefolder:{folder}", "--encoding", "fp32", "--epsilon", "0.7", "--no-plot",
                          "--out", str(out)])
    assert status == 0
    return out


@pytest.mark.slow
def test_edge_classify_on_jpeg_photos_through_real_server_gives_timms_class(photos_and_model, deit_folder, tmp_path):
    paths, _, _, model = photos_and_model
    with torch.no_grad():
        logits = model(timm_inputs(model, paths)).numpy()  # timm's own forward, float32 (4, 4)
    expected = logits.argmax(1)
    assert sorted(expected.tolist()) == [0, 1, 2, 3], "timm should tell the four photos apart"
    manifest = json.loads((deit_folder / "manifest.json").read_text())
    assert manifest["classes"] == CLASSES
    assert manifest["input"]["preprocessing"]["resize"] == "shorter_side"  # timm's eval transform, recorded

    server = ServeProcess(deit_folder, tmp_path / "serve.log").start()
    address = server.address
    try:
        # --threshold 2: never exit early; every token sent: the server half computes timm's forward
        edge = subprocess.run([sys.executable, "-m", "splitinfer.edge.cli", "classify", "--model", str(deit_folder),
                               "--server", address, "--require-server", "--threshold", "2", "--budget", "196",
                               "--mass", "1", "--no-energy-label", "--json", str(paths[0].parent)],
                              capture_output=True, text=True, timeout=120)
        assert edge.returncode == 0, edge.stderr
    finally:
        assert server.stop(timeout=30) == 0
    records = [json.loads(line) for line in edge.stdout.splitlines() if line.strip()]
    assert [Path(r["input"]).name for r in records] == [p.name for p in paths]
    for record, label, row in zip(records, expected, logits):
        assert record["decided_on"] == "server" and record["error"] is None
        assert record["tokens_sent"] == 197  # CLS + all 196 patches
        assert record["label"] == int(label) and record["class_name"] == CLASSES[label]
        probabilities = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
        np.testing.assert_allclose(record["probabilities"], probabilities, atol=1e-4)


@pytest.mark.slow
def test_timm_model_with_int8_and_a_trained_bottleneck(photos_and_model, tmp_path, capsys):
    """A timm model gets the whole system: a bottleneck trained on its imagefolder by finetune, then
    export with --quantize int8 --bottleneck W writes the INT8 half, the zstd dictionary and the table."""
    from splitinfer.export.cli import main as export_main
    from splitinfer.protos import load_manifest

    _, folder, checkpoint, _ = photos_and_model
    model = ["--adapter", "timm", "--timm-model", "deit_tiny_patch16_224", "--checkpoint", str(checkpoint),
             "--num-classes", str(len(CLASSES)), "--split", "6", "--data", f"imagefolder:{folder}"]
    heads = tmp_path / "heads.pt"
    assert export_main(["finetune", *model, "--bottleneck-dims", "48", "--bottleneck-steps", "10", "--no-exit-scorer",
                        "--batch-size", "4", "--out", str(heads), "--no-progress"]) == 0
    out = tmp_path / "deit-int8"
    assert export_main(["export", *model, "--heads", str(heads), "--quantize", "int8", "--bottleneck", "48",
                        "--encoding", "int8", "--epsilon", "0.7", "--no-plot", "--out", str(out)]) == 0
    for name in ("device.int8.onnx", "zstd.dict", "operating_points.json"):
        assert (out / name).is_file(), name
    m = load_manifest(out)
    assert m.bottleneck == 48 and m.dim == 48 and m.tokens.model_dim == 192 and "device_int8" in m.files
    capsys.readouterr()
    assert export_main(["export", *model, "--bottleneck", "48", "--out", str(tmp_path / "bad")]) == 2
    assert "no learned bottleneck of width 48" in capsys.readouterr().err
