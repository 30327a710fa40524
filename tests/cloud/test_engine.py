"""The engine seam: ServerHalf, the ONNX Runtime engine, explicit execution providers and their refusal."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from splitinfer.cloud import OrtEngine, ProviderUnavailable, RuntimeConfig, ServerHalf, load_model
from splitinfer.cloud import engine as engine_module
from splitinfer.cloud.cli import main as serve_main
from splitinfer.cloud.engine import create_session, resolve_provider


def test_loaded_model_and_engine_are_server_halves(tiny_registry, tiny_manifest) -> None:
    (model,) = list(tiny_registry)
    assert isinstance(model, ServerHalf)
    assert isinstance(model.engine, OrtEngine)
    assert model.engine.providers == ("CPUExecutionProvider",)
    assert model.output_width == model.engine.output_width == len(tiny_manifest.classes)
    tokens = np.random.default_rng(0).standard_normal((3, 5, tiny_manifest.dim)).astype(np.float32)  # (B, T, d)
    mask = np.ones((3, 5), np.bool_)
    mask[1, 3:] = False
    out = model.run(tokens, mask)  # (B, K)
    assert out.shape == (3, model.output_width) and out.dtype == np.float32
    np.testing.assert_allclose(out[1:2], model.run(tokens[1:2, :3], mask[1:2, :3]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, expected", [("cpu", "CPUExecutionProvider"), ("CUDA", "CUDAExecutionProvider"),
                                            ("tensorrt", "TensorrtExecutionProvider"),
                                            ("CPUExecutionProvider", "CPUExecutionProvider"),
                                            ("openvinoexecutionprovider", "OpenVINOExecutionProvider")])
def test_provider_names_resolve(name: str, expected: str) -> None:
    assert resolve_provider(name) == expected


@pytest.mark.parametrize("name", ["", "quantum", "cuda13"])
def test_unknown_provider_names_are_refused(name: str) -> None:
    with pytest.raises((ProviderUnavailable, ValueError)):
        RuntimeConfig(provider=name).ort_provider


def _missing_gpu_provider() -> str:
    for name in ("cuda", "tensorrt"):
        if resolve_provider(name) not in ort.get_available_providers():
            return name
    pytest.skip("this ONNX Runtime has CUDA and TensorRT: no unavailable GPU provider to ask for")


def test_an_unavailable_provider_is_refused_with_the_available_ones(tiny_model_dir: Path) -> None:
    name = _missing_gpu_provider()
    with pytest.raises(ProviderUnavailable) as info:
        load_model(tiny_model_dir, RuntimeConfig(provider=name))
    message = str(info.value)
    assert resolve_provider(name) in message and "not available" in message
    for available in ort.get_available_providers():
        assert available in message


class _FallingBackSession:
    """What ONNX Runtime does when a GPU provider cannot initialise: a session on CPU alone."""

    def __init__(self, path, sess_options=None, providers=None) -> None:
        self.asked = providers

    def get_providers(self) -> list[str]:
        return ["CPUExecutionProvider"]


def test_a_silent_fallback_to_cpu_is_refused(tiny_manifest, monkeypatch) -> None:
    available = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(engine_module.ort, "get_available_providers", lambda: available)
    monkeypatch.setattr(engine_module.ort, "InferenceSession", _FallingBackSession)
    with pytest.raises(ProviderUnavailable, match=r"fell back from CUDAExecutionProvider to CPUExecutionProvider"):
        create_session(tiny_manifest.server_path, RuntimeConfig(provider="cuda"))


def test_the_gpu_session_keeps_cpu_for_nodes_the_gpu_cannot_run() -> None:
    assert RuntimeConfig(provider="cuda").providers == ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert RuntimeConfig(provider="cpu").providers == ("CPUExecutionProvider",)
    assert RuntimeConfig(provider="tensorrt").gpu and not RuntimeConfig().gpu


def test_serve_refuses_an_unavailable_provider_with_exit_2(tiny_model_dir: Path, capsys) -> None:
    name = _missing_gpu_provider()
    assert serve_main(["--model", str(tiny_model_dir), "--port", "0", "--provider", name]) == 2
    err = capsys.readouterr().err
    assert "splitinfer-serve: error:" in err and resolve_provider(name) in err
    assert all(p in err for p in ort.get_available_providers())


def test_serve_refuses_an_unknown_provider_name(tiny_model_dir: Path, capsys) -> None:
    assert serve_main(["--model", str(tiny_model_dir), "--port", "0", "--provider", "warp-drive"]) == 2
    assert "unknown execution provider 'warp-drive'" in capsys.readouterr().err
