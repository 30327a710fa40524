"""The server half as a Triton model repository: layout, config matching the graph, the CLI option."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from splitinfer.protos import load_manifest

pytest.importorskip("onnx")
from splitinfer.export.triton import TritonOptions, triton_config, write_triton_repository  # noqa: E402


def _tensors(config: str, kind: str) -> dict[str, tuple[str, list[int]]]:
    block = re.search(rf"^{kind} \[\n(.*?)\n\]", config, re.S | re.M).group(1)
    return {name: (dtype, [int(d) for d in dims.split(",")])
            for name, dtype, dims in re.findall(r'name: "(\w+)"\s+data_type: (\w+)\s+dims: \[ ([-\d, ]+) \]', block)}


def test_repository_layout_and_config_match_the_server_half(tiny_model_dir: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    manifest = load_manifest(tiny_model_dir)
    folder = write_triton_repository(tiny_model_dir, tmp_path / "triton", TritonOptions(max_batch_size=8))
    assert folder == tmp_path / "triton" / manifest.name
    model = folder / "1" / "model.onnx"
    assert model.read_bytes() == manifest.server_path.read_bytes()
    assert (folder / "manifest.json").read_bytes() == (tiny_model_dir / "manifest.json").read_bytes()
    config = (folder / "config.pbtxt").read_text()
    assert config.count("{") == config.count("}") and config.count("[") == config.count("]")
    assert f'name: "{manifest.name}"' in config and 'backend: "onnxruntime"' in config
    assert "max_batch_size: 8" in config
    assert re.search(r"dynamic_batching \{\n  preferred_batch_size: \[ 4, 8 \]\n  max_queue_delay_microseconds: 500", config)
    assert manifest.sha256 in config
    inputs, outputs = _tensors(config, "input"), _tensors(config, "output")
    assert inputs == {"tokens": ("TYPE_FP32", [-1, manifest.dim]), "mask": ("TYPE_BOOL", [-1])}
    assert outputs == {"logits": ("TYPE_FP32", [len(manifest.classes)])}

    # what Triton would feed: a batch (B, *dims) of padded requests
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    tokens = np.random.default_rng(0).standard_normal((3, 5, manifest.dim)).astype(np.float32)
    mask = np.ones((3, 5), bool)
    mask[1, 3:] = False
    (logits,) = session.run(["logits"], {"tokens": tokens, "mask": mask})
    assert logits.shape == (3, len(manifest.classes))


def test_options_and_names_are_checked(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        TritonOptions(max_batch_size=0)
    config = triton_config(load_manifest(tiny_model_dir).server_path, "m", "0" * 64, TritonOptions(max_batch_size=2))
    assert "preferred_batch_size: [ 2 ]" in config


def test_export_cli_writes_the_repository_after_a_successful_export(tmp_path: Path, capsys) -> None:
    from splitinfer.export.cli import main

    ckpt = Path(__file__).resolve().parents[2] / "checkpoints" / "vit-cluttered-mnist.pt"
    base = ["export", "--checkpoint", str(ckpt), "--calibration-size", "20", "--epsilon", "0.5", "--no-plot", "--triton", str(tmp_path / "triton")]
    assert main([*base, "--bottleneck", "12", "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "triton").exists()  # a failed export writes nothing
    assert main([*base, "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "triton" / "vit-cluttered-mnist" / "config.pbtxt").is_file()
    assert "triton_model" in capsys.readouterr().out
