from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from splitinfer.edge.preprocess import preprocess
from splitinfer.edge.session import DeviceSession, SessionOptions, choose_device_half, cpu_signature
from splitinfer.protos.errors import ManifestError
from splitinfer.protos.manifest import load_manifest


def test_run_shapes_match_manifest(device_session, tiny_manifest, images):
    x = preprocess(images, tiny_manifest.preprocessing)
    exit_logits, tokens, importance, _ = device_session.run(x)
    b, k = len(images), len(tiny_manifest.classes)
    assert exit_logits.shape == (b, k) and exit_logits.dtype == np.float32
    assert tokens.shape == (b, tiny_manifest.num_tokens, tiny_manifest.dim)
    assert importance.shape == (b, tiny_manifest.num_patches)
    np.testing.assert_allclose(importance.sum(axis=1), 1.0, atol=1e-4)


def test_options_spinning_and_threads(tiny_manifest, images):
    opts = SessionOptions(intra_op_threads=2, allow_spinning=True)
    ort_opts = opts.to_ort()
    assert ort_opts.intra_op_num_threads == 2 and ort_opts.inter_op_num_threads == 1
    assert ort_opts.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    default = SessionOptions().to_ort()
    assert default.intra_op_num_threads == 1
    assert default.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert default.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    x = preprocess(images[:1], tiny_manifest.preprocessing)
    a = DeviceSession.from_manifest(tiny_manifest, opts).run(x)
    b = DeviceSession.from_manifest(tiny_manifest).run(x)
    np.testing.assert_allclose(a.tokens, b.tokens, atol=1e-5)


def test_bad_options_and_inputs(device_session, tmp_path):
    with pytest.raises(ValueError, match="intra_op_threads"):
        SessionOptions(intra_op_threads=-1)
    with pytest.raises(ValueError, match="float32"):
        device_session.run(np.zeros((1, 1, 8, 8), np.float64))
    with pytest.raises(ValueError, match="shape"):
        device_session.run(np.zeros((1, 1, 8, 8), np.float32))
    broken = tmp_path / "device.onnx"
    broken.write_bytes(b"not onnx")
    with pytest.raises(ManifestError, match="device.onnx"):
        DeviceSession(broken)


def _copy_with_variants(src, dst, **changes):
    shutil.copytree(src, dst)
    data = json.loads((dst / "manifest.json").read_text())
    for key, value in changes.items():
        data["info"]["device_variants"][key] = value
        if key == "auto_choice":
            data["device_auto_choice"] = value
    data.pop("version")
    (dst / "manifest.json").write_text(json.dumps(data))
    return load_manifest(dst, need=("device",))


def _float_only(src, dst):
    shutil.copytree(src, dst)
    data = json.loads((dst / "manifest.json").read_text())
    del data["files"]["device_int8"], data["info"]["device_variants"], data["version"]
    data["device_auto_choice"] = "float"
    (dst / "manifest.json").write_text(json.dumps(data))
    return dst


def test_float_only_folder(tiny_model_dir, tmp_path):
    tiny_manifest = load_manifest(_float_only(tiny_model_dir, tmp_path / "float-only"), need=("device",))
    assert choose_device_half(tiny_manifest, "auto").half == "float"
    assert DeviceSession.from_manifest(tiny_manifest, device_half="float").choice.reason == "requested"
    with pytest.raises(ManifestError, match="--quantize int8"):
        DeviceSession.from_manifest(tiny_manifest, device_half="int8")
    with pytest.raises(ValueError, match="device half"):
        choose_device_half(tiny_manifest, "fp16")


def test_int8_half_runs_like_the_float_one(tiny_int8_model_dir, images):
    manifest = load_manifest(tiny_int8_model_dir, need=("device",))
    x = preprocess(images, manifest.preprocessing)
    f = DeviceSession.from_manifest(manifest, device_half="float")
    q = DeviceSession.from_manifest(manifest, device_half="int8")
    assert str(q.path).endswith("device.int8.onnx") and q.choice.half == "int8"
    a, b = f.run(x), q.run(x)
    assert b.tokens.shape == a.tokens.shape and b.exit.dtype == np.float32
    assert np.corrcoef(a.tokens.ravel(), b.tokens.ravel())[0, 1] > 0.98


def test_auto_follows_the_manifest_on_this_cpu(tiny_int8_model_dir, tmp_path):
    here = cpu_signature()
    for choice in ("int8", "float"):
        manifest = _copy_with_variants(tiny_int8_model_dir, tmp_path / choice, auto_choice=choice,
                                       measured_on={**here, "onnxruntime": "x"})
        picked = choose_device_half(manifest, "auto")
        assert picked.half == choice and "manifest" in picked.reason and picked.timings_ms is None


def test_auto_times_both_halves_on_another_cpu(tiny_int8_model_dir, tmp_path):
    manifest = _copy_with_variants(tiny_int8_model_dir, tmp_path / "m", auto_choice="int8",
                                   measured_on={"machine": "aarch64", "model": "Raspberry Pi 4 Model B Rev 1.4"})
    session = DeviceSession.from_manifest(manifest, device_half="auto")
    assert set(session.choice.timings_ms) == {"float", "int8"} and "timed here" in session.choice.reason
    t = session.choice.timings_ms
    assert session.choice.half == ("int8" if t["int8"] <= 0.95 * t["float"] else "float")
    assert session is session.choice.session  # the timed session is reused, not loaded again


def test_auto_never_picks_an_int8_half_that_lost_accuracy(tiny_int8_model_dir, tmp_path):
    data = json.loads((tiny_int8_model_dir / "manifest.json").read_text())
    manifest = _copy_with_variants(tiny_int8_model_dir, tmp_path / "m", auto_choice="int8",
                                   int8={**data["info"]["device_variants"]["int8"], "eligible": False})
    assert choose_device_half(manifest, "auto").half == "float"
    assert choose_device_half(manifest, "int8").half == "int8"  # the user may still ask for it


def test_tampered_int8_half_is_refused(tiny_int8_model_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_int8_model_dir, folder)
    with open(folder / "device.int8.onnx", "ab") as f:
        f.write(b"\x00")
    manifest = load_manifest(folder, need=("device",))
    with pytest.raises(ManifestError, match="sha256"):
        DeviceSession.from_manifest(manifest, device_half="int8")
