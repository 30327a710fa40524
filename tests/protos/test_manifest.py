"""The manifest schema, without torch: strict fields, the deployment hash, 0.1 folders."""
import hashlib
import json
import shutil

import pytest

from splitinfer.protos import ManifestError, load_manifest
from splitinfer.protos.manifest import write_manifest


def test_the_hash_covers_what_the_halves_compute_with_not_timings(tiny_model_dir, tmp_path):
    m = load_manifest(tiny_model_dir)
    import dataclasses

    retimed = dataclasses.replace(m, operating_points=tuple(dataclasses.replace(p, device_ms=p.device_ms + 1)
                                                            for p in m.operating_points),
                                  info={**m.info, "timings": {"device_ms": 99.0}})
    assert retimed.sha256 == m.sha256
    assert dataclasses.replace(m, exit=dataclasses.replace(m.exit, threshold=0.5)).sha256 != m.sha256
    folder = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, folder)
    again = write_manifest(folder, retimed)
    assert again.sha256 == m.sha256 and again.operating_points != m.operating_points


def test_a_v1_model_folder_still_loads(tiny_model_dir, tmp_path):
    """A folder written by 0.1 (splitinfer-model/1) loads, with its file sha256 as the deployment hash."""
    m = load_manifest(tiny_model_dir)
    folder = tmp_path / "v1"
    shutil.copytree(tiny_model_dir, folder)
    p = m.point()
    v1 = {"format": "splitinfer-model/1", "name": "tiny", "version": "abc", "split": 1,
          "files": {k: {"path": v.path, "sha256": v.sha256} for k, v in m.files.items() if k != "zstd_dictionary"},
          "preprocessing": {"color": "grayscale", "height": 64, "width": 64, "scale": 1 / 255, "mean": 0.1307,
                            "std": 0.3081, "layout": "NCHW"},
          "tokens": {"dim": 32, "model_dim": 32, "grid": 8, "num_patches": 64, "num_tokens": 65, "cls_position": 0},
          "bottleneck": None, "classes": list(m.classes), "exit": {"score": "max_softmax", "threshold": 0.8},
          "selection": {"method": "importance_mass", "mass": 0.9, "budget": 16, "min_tokens": 1},
          "codec": {"encoding": "int8", "compression": "auto", "group_size": 0, "scale_dtype": "fp16",
                    "zstd_dictionary": {"path": "zstd.dict", "sha256": m.files["zstd_dictionary"].sha256}},
          "calibration": {"canvases": 40, "accuracy_full": 0.1, "accuracy_split": 0.1, "exit_rate": 0.5,
                          "mean_bytes_per_request": 10.0, "mean_bytes_per_offload": 20.0},
          "operating_points": [p.to_dict()], "default_operating_point": p.id}
    (folder / "manifest.json").write_text(json.dumps(v1))
    old = load_manifest(folder)
    assert old.sha256 == hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest()
    assert old.version == "abc" and old.exit.threshold == 0.8 and old.zstd_dictionary == m.zstd_dictionary
    del v1["tokens"]
    (folder / "manifest.json").write_text(json.dumps(v1))
    with pytest.raises(ManifestError, match="missing field 'tokens'"):
        load_manifest(folder)


def assert_refused(model_dir, folder, cases) -> None:
    """Each (change, message): the model's manifest, changed so, fails to load with that message."""
    shutil.copytree(model_dir, folder)
    data = json.loads((folder / "manifest.json").read_text())
    for change, message in cases:
        broken = json.loads(json.dumps(data))
        change(broken)
        (folder / "manifest.json").write_text(json.dumps(broken))
        with pytest.raises(ManifestError, match=message):
            load_manifest(folder)


def test_manifest_refuses_unknown_and_missing_fields(tiny_model_dir, tmp_path):
    assert_refused(tiny_model_dir, tmp_path / "m", (
        (lambda d: d.update(extra=1), "unknown field"),
        (lambda d: d["selection"].update(masss=0.5), "selection.masss"),
        (lambda d: d.pop("codec"), "missing field 'codec'"),
        (lambda d: d["exit"].update(threshold="high"), "threshold"),
        (lambda d: d.update(version="000000000000"), "edited after export")))


def test_the_guarantee_is_recorded_and_validated(tiny_model_dir, tmp_path):
    m = load_manifest(tiny_model_dir)
    g = m.calibration.guarantee
    assert g is not None and g.n == m.calibration.n and 0 < g.epsilon < 1 and 0 < g.delta < 1
    assert g.certified == (g.reason == "") and (not g.certified or g.bound is not None)
    assert all(p.accuracy_lower_bound is not None and p.accuracy_floor == p.accuracy_lower_bound <= p.accuracy
               for p in m.operating_points)
    assert_refused(tiny_model_dir, tmp_path / "m", (
        (lambda d: d["calibration"]["guarantee"].update(epsilon=0.0), "epsilon"),
        (lambda d: d["calibration"]["guarantee"].update(delta=1.0), "delta"),
        (lambda d: d["calibration"]["guarantee"].update(extra=1), "calibration.guarantee.extra"),
        (lambda d: d["calibration"]["guarantee"].pop("bound"), "calibration.guarantee.bound"),
        (lambda d: d["calibration"]["guarantee"].update(certified=True, reason="x"), "reason"),
        (lambda d: d["calibration"]["guarantee"].update(certified=False, reason=""), "say why"),
        (lambda d: d["calibration"]["guarantee"].update(n=1), "guarantee.n")))


def test_a_folder_exported_before_the_guarantee_still_loads(tiny_model_dir, tmp_path):
    """No calibration.guarantee, no accuracy_lower_bound on the points: it loads, the controller falls
    back to the measured accuracy, and a point without a bound hashes as before bounds existed."""
    folder = tmp_path / "old"
    shutil.copytree(tiny_model_dir, folder)
    data = json.loads((folder / "manifest.json").read_text())
    del data["calibration"]["guarantee"], data["version"]
    for p in data["operating_points"]:
        del p["accuracy_lower_bound"]
    (folder / "manifest.json").write_text(json.dumps(data))
    old = load_manifest(folder)
    assert old.calibration.guarantee is None
    assert all(p.accuracy_lower_bound is None and p.accuracy_floor == p.accuracy for p in old.operating_points)
    assert all("accuracy_lower_bound" not in p.to_dict() for p in old.operating_points)
