"""ModelRegistry: loading folders, lookup by name, manifest sha256 checks."""
from __future__ import annotations

from pathlib import Path

import pytest

from splitinfer.cloud import ModelRegistry, RuntimeConfig, load_model
from splitinfer.protos import ManifestError, ManifestMismatch, ModelNotFound

from .conftest import copy_model


def test_get_returns_the_loaded_model(tiny_registry: ModelRegistry, tiny_manifest) -> None:
    model = tiny_registry.get(tiny_manifest.name, tiny_manifest.sha256)
    assert tiny_registry.names == (tiny_manifest.name,)
    assert tiny_manifest.name in tiny_registry and len(tiny_registry) == 1
    assert model.manifest.sha256 == tiny_manifest.sha256
    assert model.packet_limits.dim == tiny_manifest.dim
    assert model.packet_limits.max_position == tiny_manifest.num_tokens
    assert tiny_registry.get(tiny_manifest.name, tiny_manifest.sha256.upper()) is model


def test_unknown_name_lists_served_models(tiny_registry: ModelRegistry, tiny_manifest) -> None:
    with pytest.raises(ModelNotFound, match=rf"'nope'.*served models: {tiny_manifest.name}"):
        tiny_registry.get("nope", tiny_manifest.sha256)


@pytest.mark.parametrize("sha", ["0" * 64, "", "not-a-sha"])
def test_other_manifest_is_refused(tiny_registry: ModelRegistry, tiny_manifest, sha: str) -> None:
    with pytest.raises(ManifestMismatch, match="edge's manifest .* differs from the served version"):
        tiny_registry.get(tiny_manifest.name, sha)


def test_two_versions_of_a_name_are_served_and_picked_by_sha(tiny_model_dir: Path, tmp_path: Path) -> None:
    newer = copy_model(tiny_model_dir, tmp_path / "newer", variant="2")
    registry = ModelRegistry.from_folders([tiny_model_dir, newer])
    by_folder = {m.manifest.folder: m for m in registry.versions("tiny")}
    assert registry.names == ("tiny",) and len(registry) == 2 and set(by_folder) == {tiny_model_dir, newer}
    assert registry.get("tiny", by_folder[tiny_model_dir].manifest.sha256) is by_folder[tiny_model_dir]
    newer_version = by_folder[newer].manifest.version
    assert newer_version != by_folder[tiny_model_dir].manifest.version
    assert registry.get("tiny", by_folder[newer].manifest.sha256).version == newer_version
    with pytest.raises(ManifestMismatch, match="differs from the served version"):
        registry.get("tiny", "0" * 64)


def test_the_same_export_twice_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    twin = copy_model(tiny_model_dir, tmp_path / "twin")
    with pytest.raises(ValueError, match=r"model name 'tiny' is served from two folders"):
        ModelRegistry.from_folders([tiny_model_dir, twin])


def test_empty_registry_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one model"):
        ModelRegistry([])


def test_missing_folder_is_a_manifest_error(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="not a model folder"):
        load_model(tmp_path)


def test_tampered_server_half_is_a_manifest_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = copy_model(tiny_model_dir, tmp_path / "tampered")
    (folder / "server.onnx").write_bytes(b"not an onnx graph")
    with pytest.raises(ManifestError, match="does not match the sha256"):
        load_model(folder)


def test_thread_setting_reaches_the_session(tiny_model_dir: Path) -> None:
    model = load_model(tiny_model_dir, RuntimeConfig(intra_op_threads=2))
    assert model.session.get_session_options().intra_op_num_threads == 2
    assert model.session.get_providers() == ["CPUExecutionProvider"]


@pytest.mark.parametrize("threads", [-1, 1.5, True])
def test_runtime_config_validates(threads: object) -> None:
    with pytest.raises(ValueError, match="intra_op_threads"):
        RuntimeConfig(intra_op_threads=threads)  # type: ignore[arg-type]
