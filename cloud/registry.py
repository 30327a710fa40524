"""The models a server holds: one manifest and one ONNX Runtime session for the server half each.

A :class:`ModelRegistry` maps manifest names to :class:`LoadedModel` objects and refuses a request
whose manifest sha256 differs from the served folder's, so the device half and the server half of
a request always come from the same export.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from splitinfer.protos import (
    Manifest,
    ManifestMismatch,
    ModelNotFound,
    PacketLimits,
    load_manifest,
)

from .engine import OrtEngine, RuntimeConfig

__all__ = ["RuntimeConfig", "LoadedModel", "load_model", "ModelRegistry"]

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class LoadedModel:
    """A served model (a :class:`~.engine.ServerHalf`): its manifest, the engine running its server
    half and the packet limits it accepts."""

    manifest: Manifest
    engine: OrtEngine = field(repr=False)
    packet_limits: PacketLimits
    task: str = "classification"  # or "embedding": the answer is the output vector, not a softmax
    output_size: int = 0  # K classes, or D embedding values (0: the manifest's class count)

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def num_classes(self) -> int:
        return len(self.manifest.classes)

    @property
    def output_width(self) -> int:
        """Values per answer: K classes (classification) or D (embedding)."""
        return self.output_size or self.num_classes

    def run(self, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """tokens float32 (B, T, d), CLS at index 0 of each row; mask bool (B, T), True = real token ->
        logits float32 (B, K), or the embedding (B, D) for an embedding model. Thread-safe."""
        return self.engine.run(tokens, mask)


def load_model(folder: str | Path, config: RuntimeConfig = RuntimeConfig()) -> LoadedModel:
    """Load ``folder`` (manifest + server.onnx, sha256 verified) and check the half runs once.

    Raises ManifestError when the folder, its manifest or its server half is unusable.
    """
    manifest = load_manifest(Path(folder), verify_files=True, need=("server",))
    task = manifest.task
    engine = OrtEngine.load(manifest, task, config)  # the provider checked, the signature checked, run once
    model = LoadedModel(manifest=manifest, engine=engine, packet_limits=PacketLimits.for_manifest(manifest),
                        task=task, output_size=engine.output_width)
    logger.info("loaded model %s version %s from %s", manifest.name, manifest.version, manifest.folder)
    return model


class ModelRegistry:
    """Served models keyed by manifest name and manifest sha256: several versions of a name at once.

    ``get(name, sha256)`` picks the version the edge holds, so edges on an older export keep working
    while newer ones roll out. The same export (same name and sha256) served from two folders is an
    error: it would be ambiguous which folder answers.
    """

    def __init__(self, models: Iterable[LoadedModel]) -> None:
        by_name: dict[str, dict[str, LoadedModel]] = {}
        for model in models:
            versions = by_name.setdefault(model.name, {})
            twin = versions.get(model.manifest.sha256)
            if twin is not None:
                raise ValueError(
                    f"model name {model.name!r} is served from two folders with the same manifest: "
                    f"{twin.manifest.folder} and {model.manifest.folder}; serve each export once"
                )
            versions[model.manifest.sha256] = model
        if not by_name:
            raise ValueError("a ModelRegistry needs at least one model")
        self._by_name = dict(sorted(by_name.items()))

    @classmethod
    def from_folders(cls, folders: Iterable[str | Path], config: RuntimeConfig = RuntimeConfig()) -> ModelRegistry:
        """Load every folder with :func:`load_model`; ManifestError or ValueError on a bad set."""
        return cls(load_model(folder, config) for folder in folders)

    @property
    def names(self) -> tuple[str, ...]:
        """Served model names, sorted."""
        return tuple(self._by_name)

    def versions(self, name: str) -> tuple[LoadedModel, ...]:
        """Every served export of ``name`` (empty when the name is not served)."""
        return tuple(self._by_name.get(name, {}).values())

    def __len__(self) -> int:
        return sum(len(versions) for versions in self._by_name.values())

    def __iter__(self) -> Iterator[LoadedModel]:
        return (model for versions in self._by_name.values() for model in versions.values())

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def get(self, name: str, manifest_sha256: str) -> LoadedModel:
        """The export of model ``name`` whose manifest sha256 is the edge's.

        Raises ModelNotFound (unknown name) or ManifestMismatch (no served export of that name has
        the edge's manifest).
        """
        versions = self._by_name.get(name)
        if versions is None:
            raise ModelNotFound(f"model {name!r} is not served here; served models: {', '.join(self.names)}")
        model = versions.get(manifest_sha256.strip().lower())
        if model is None:
            sent = manifest_sha256[:64] or "<empty>"
            served = ", ".join(f"{m.version} (sha256 {m.manifest.sha256})" for m in versions.values())
            raise ManifestMismatch(
                f"the edge's manifest for model {name!r} (sha256 {sent}) differs from the served version(s) "
                f"{served}; deploy the same model folder on the edge and the server"
            )
        return model
