from __future__ import annotations

import numpy as np
import pytest

from splitinfer.edge.preprocess import preprocess
from splitinfer.edge.session import DeviceSession, SessionOptions
from splitinfer.protos.errors import ManifestError


def test_run_shapes_match_manifest(device_session, tiny_manifest, images):
    x = preprocess(images, tiny_manifest.preprocessing)
    exit_logits, tokens, importance = device_session.run(x)
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
