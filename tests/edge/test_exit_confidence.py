"""The exit confidence device.onnx computes (graphs.EXIT_CONFIDENCE), read by the edge as exported:
view consistency on the committed image model, max softmax on the text one, one view on request."""
from __future__ import annotations

import numpy as np
import pytest

from splitinfer.edge.preprocess import preprocess
from splitinfer.edge.runner import EdgeRunner, softmax
from splitinfer.edge.session import DeviceSession
from splitinfer.protos.manifest import ExitSpec, load_manifest


def test_view_consistency_is_the_geometric_mean_over_the_two_views(tiny_manifest, device_session, images):
    assert tiny_manifest.exit.score == "view_consistency" and device_session.has_second_view
    x = preprocess(images, tiny_manifest.preprocessing)
    both = device_session.run(x)
    one = device_session.run(x, second_view=False)
    rolled = device_session.run(np.ascontiguousarray(np.roll(x, tiny_manifest.exit.view_shift, axis=(2, 3))),
                                second_view=False)
    np.testing.assert_array_equal(both.tokens, one.tokens)
    np.testing.assert_array_equal(both.exit, one.exit)
    p = np.stack([softmax(row) for row in one.exit.astype(np.float64)])
    p_view = np.stack([softmax(row) for row in rolled.exit.astype(np.float64)])
    c = p.argmax(1)
    rows = np.arange(len(c))
    np.testing.assert_allclose(both.confidence, np.sqrt(p[rows, c] * p_view[rows, c]), atol=1e-5)
    np.testing.assert_allclose(one.confidence, p.max(1), atol=1e-6)  # one view: max softmax
    assert np.abs(both.confidence - one.confidence).max() > 1e-4  # the second view changes the decision input


def test_the_runner_decides_on_the_graphs_confidence(tiny_model_dir, device_session, images):
    from splitinfer.edge.local import LocalTransport

    manifest = load_manifest(tiny_model_dir)
    x = preprocess(images, manifest.preprocessing)
    confidence = device_session.run(x).confidence
    threshold = float(np.median(confidence))
    runner = EdgeRunner(device_session, LocalTransport(manifest), manifest, exit_threshold=threshold)
    decided = [runner.run(img) for img in images]
    for result, conf in zip(decided, confidence):
        assert result.decided_on == ("device" if conf >= threshold else "server")
        if result.decided_on == "device":
            assert result.confidence == pytest.approx(float(conf), abs=1e-6)
    assert {r.decided_on for r in decided} == {"device", "server"}


def test_text_model_exits_on_max_softmax(tiny_text_model_dir):
    m = load_manifest(tiny_text_model_dir)
    session = DeviceSession.from_manifest(m)
    assert m.exit.score == "max_softmax" and m.exit.view_shift is None and not session.has_second_view
    ids = np.array([[101, 7592, 2088, 102]], np.int64)
    out = session.run({"input_ids": ids, "attention_mask": np.ones_like(ids)})
    np.testing.assert_allclose(out.confidence, softmax(out.exit[0].astype(np.float64)).max(), atol=1e-6)


def test_exit_spec_is_checked():
    with pytest.raises(ValueError, match="view_shift"):
        ExitSpec("view_consistency", 0.5)
    with pytest.raises(ValueError, match="view_shift"):
        ExitSpec("view_consistency", 0.5, (0, 0))
    with pytest.raises(ValueError, match="only to score"):
        ExitSpec("max_softmax", 0.5, (1, 1))
    assert "view_shift" not in ExitSpec("max_softmax", 0.5).to_json()  # older folders hash as before
    assert ExitSpec("view_consistency", 0.5, (-2, -2)).to_json()["view_shift"] == [-2, -2]


def test_a_text_manifest_cannot_claim_view_consistency(tiny_text_model_dir, tmp_path):
    import json
    import shutil

    from splitinfer.protos.errors import ManifestError

    folder = tmp_path / "m"
    shutil.copytree(tiny_text_model_dir, folder)
    data = json.loads((folder / "manifest.json").read_text())
    data["exit"].update(score="view_consistency", view_shift=[2, 2])
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="needs an image classifier"):
        load_manifest(folder)
