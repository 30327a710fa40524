"""The models a server holds: one manifest and one ONNX Runtime session for the server half each.

A :class:`ModelRegistry` maps manifest names to :class:`LoadedModel` objects and refuses a request
whose manifest sha256 differs from the served folder's, so the device half and the server half of
a request always come from the same export.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnxruntime as ort

from splitinfer.protos import (
    Manifest,
    ManifestError,
    ManifestMismatch,
    ModelNotFound,
    PacketLimits,
    load_manifest,
)

from splitinfer.protos import graphs

__all__ = ["RuntimeConfig", "LoadedModel", "load_model", "ModelRegistry"]

logger = logging.getLogger(__name__)

_TOKENS_INPUT, _MASK_INPUT = graphs.server_inputs()
_OUTPUT_FOR_TASK = {task: graphs.server_output(task) for task in ("classification", "embedding")}


@dataclass(frozen=True)
class RuntimeConfig:
    """How each server-half session runs. ``intra_op_threads`` 0 lets ONNX Runtime choose."""

    intra_op_threads: int = 1
    providers: tuple[str, ...] = ("CPUExecutionProvider",)

    def __post_init__(self) -> None:
        if isinstance(self.intra_op_threads, bool) or not isinstance(self.intra_op_threads, int):
            raise ValueError(f"intra_op_threads must be an int, got {self.intra_op_threads!r}")
        if self.intra_op_threads < 0:
            raise ValueError(f"intra_op_threads must be >= 0, got {self.intra_op_threads}")
        if not self.providers:
            raise ValueError("providers must name at least one execution provider")

    def session_options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3  # errors only
        return options


@dataclass(frozen=True)
class LoadedModel:
    """A served model: its manifest, the server-half session and the packet limits it accepts."""

    manifest: Manifest
    session: ort.InferenceSession = field(repr=False)
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
        """Run the server half.

        tokens: float32 (B, T, d), CLS at index 0 of each row. mask: bool (B, T), True = real token.
        Returns logits float32 (B, K), or the embedding (B, D) for an embedding model. Thread-safe:
        ONNX Runtime sessions allow concurrent ``run``.
        """
        (out,) = self.session.run([_OUTPUT_FOR_TASK[self.task]], {_TOKENS_INPUT: tokens, _MASK_INPUT: mask})
        return out


def _check_signature(session: ort.InferenceSession, manifest: Manifest, task: str) -> None:
    """Raise ManifestError when server.onnx does not take (tokens, mask) and give the task's output
    (logits of the manifest's class count, or an embedding)."""
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    where = manifest.server_path
    output = _OUTPUT_FOR_TASK[task]
    if set(inputs) != {_TOKENS_INPUT, _MASK_INPUT}:
        raise ManifestError(f"{where}: inputs must be {_TOKENS_INPUT!r} and {_MASK_INPUT!r}, got {sorted(inputs)}")
    if output not in outputs:
        raise ManifestError(f"{where}: no {output!r} output for a {task} model (outputs: {sorted(outputs)})")
    dim = inputs[_TOKENS_INPUT].shape[-1]
    if isinstance(dim, int) and dim != manifest.dim:
        raise ManifestError(f"{where}: tokens have dim {dim}, the manifest says {manifest.dim}")
    classes = outputs[output].shape[-1]
    if task == "classification" and isinstance(classes, int) and classes != len(manifest.classes):
        raise ManifestError(f"{where}: logits have {classes} classes, the manifest lists {len(manifest.classes)}")


def load_model(folder: str | Path, config: RuntimeConfig = RuntimeConfig()) -> LoadedModel:
    """Load ``folder`` (manifest + server.onnx, sha256 verified) and check the half runs once.

    Raises ManifestError when the folder, its manifest or its server half is unusable.
    """
    manifest = load_manifest(Path(folder), verify_files=True, need=("server",))
    try:
        session = ort.InferenceSession(
            str(manifest.server_path), sess_options=config.session_options(), providers=list(config.providers)
        )
    except Exception as exc:  # ORT raises its own exception types for unreadable or invalid graphs
        raise ManifestError(f"{manifest.server_path}: ONNX Runtime cannot load it: {exc}") from exc
    task = manifest.task
    _check_signature(session, manifest, task)
    model = LoadedModel(
        manifest=manifest,
        session=session,
        packet_limits=PacketLimits.for_manifest(manifest),
        task=task,
    )
    # A CLS-only warm-up: catches graphs that load but do not run, and takes first-call costs now.
    try:
        logits = model.run(np.zeros((1, 1, manifest.dim), np.float32), np.ones((1, 1), np.bool_))
    except Exception as exc:
        raise ManifestError(f"{manifest.server_path}: the server half fails on a CLS-only input: {exc}") from exc
    if task == "embedding":
        if logits.ndim != 2 or logits.shape[0] != 1 or logits.shape[1] < 1:
            raise ManifestError(f"{manifest.server_path}: embedding has shape {logits.shape}, expected (1, D)")
        model = replace(model, output_size=int(logits.shape[1]))
    elif logits.shape != (1, model.num_classes):
        raise ManifestError(
            f"{manifest.server_path}: logits have shape {logits.shape}, expected (1, {model.num_classes})"
        )
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
