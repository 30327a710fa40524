import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from splitinfer.export.datasets import Dataset
from splitinfer.export.pipeline import ExportOptions
from splitinfer.export.quantize import QUANT_FORMATS, QuantizeOptions, quantize_device_half
from splitinfer.protos import graphs, load_manifest
from splitinfer.protos.manifest import sha256_file


def _run(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, graphs.device_feed(sess, {"image": x}))))


def test_int8_half_beside_the_float_one(tiny_int8_model_dir):
    data = json.loads((tiny_int8_model_dir / "manifest.json").read_text())
    files = data["files"]
    assert files["device"]["path"] == "device.onnx" and files["device_int8"]["path"] == "device.int8.onnx"
    int8_path = tiny_int8_model_dir / files["device_int8"]["path"]
    assert files["device_int8"]["sha256"] == sha256_file(int8_path)
    assert data["info"]["device_variants"]["quantization"]["format"] in QUANT_FORMATS
    proto = onnx.load(str(int8_path))
    assert proto.ir_version == 8
    assert {o.domain: o.version for o in proto.opset_import}.get("", 17) == 17
    load_manifest(tiny_int8_model_dir)  # the float halves are unchanged and still verify


def test_manifest_reports_both_halves(tiny_int8_model_dir):
    data = json.loads((tiny_int8_model_dir / "manifest.json").read_text())
    variants = data["info"]["device_variants"]
    assert data["device_auto_choice"] == variants["auto_choice"]
    for half in ("float", "int8"):
        row = variants[half]
        assert 0.0 <= row["accuracy_split"] <= 1.0 and 0.0 <= row["exit_rate"] <= 1.0
        assert 0.0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
    assert {c["format"] for c in variants["candidates"]} == set(QUANT_FORMATS)
    assert variants["faster"] in ("float", "int8") and variants["auto_choice"] in ("float", "int8")
    ratio = variants["int8"]["p50_ms"] / variants["float"]["p50_ms"]
    assert variants["latency_ratio_int8_over_float"] == pytest.approx(ratio, rel=1e-3)
    assert variants["measured_on"]["machine"] and variants["evaluated_on"]["split"] == "calibration"
    if variants["auto_choice"] == "int8":
        assert variants["int8"]["eligible"] and ratio <= variants["min_speedup_for_auto"]


@pytest.mark.parametrize("fmt", QUANT_FORMATS)
def test_quantized_outputs_follow_the_float_half(tiny_model_dir, tmp_path, fmt):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 1, 64, 64)).astype(np.float32)
    out = quantize_device_half(tiny_model_dir / "device.onnx", tmp_path / "q.onnx", Dataset("x", {"image": x}),
                               quant_format=fmt)
    ref, got = _run(tiny_model_dir / "device.onnx", x), _run(out, x)
    # int8 weights in the main graph (a view-consistency half's second view, an If branch, stays float)
    assert any(i.data_type == onnx.TensorProto.INT8 for i in onnx.load(str(out)).graph.initializer)
    assert set(got) == set(ref) == set(graphs.device_outputs("classification"))
    # the random weights' confidences all sit near 1/K: compare them in absolute terms
    np.testing.assert_allclose(got["exit_confidence"], ref["exit_confidence"], atol=0.02)
    for name in ("tokens", "exit_logits"):
        assert got[name].shape == ref[name].shape and np.isfinite(got[name]).all()
        corr = np.corrcoef(ref[name].ravel(), got[name].ravel())[0, 1]
        assert corr > 0.98, f"{fmt} {name}: correlation with the float half {corr:.3f}"
    np.testing.assert_allclose(got["importance"].sum(axis=1), 1.0, atol=2e-2)


def test_bad_quantize_options():
    with pytest.raises(ValueError, match="formats"):
        QuantizeOptions(formats=("QInt4",))
    with pytest.raises(ValueError, match="latency_runs"):
        QuantizeOptions(latency_runs=1)
    with pytest.raises(ValueError, match="quantize"):
        ExportOptions(quantize="int4")
    with pytest.raises(ValueError, match="quant_format"):
        quantize_device_half("a.onnx", "b.onnx", Dataset("x", {"image": np.zeros((1, 1, 64, 64), np.float32)}),
                             quant_format="int4")
