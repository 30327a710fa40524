"""The engine seam: what request handling needs from a server half, and the ONNX Runtime engine behind it.

Request handling (validate, route by name + sha256, decode, batch, answer, map errors) is written
once against :class:`ServerHalf`; every host (the grpc.aio server, a Ray Serve replica) reuses it.
:class:`OrtEngine` runs ``server.onnx`` in an ONNX Runtime session on an explicit execution
provider and refuses, with :class:`ProviderUnavailable`, a provider ONNX Runtime does not have or
silently replaced::

    config = RuntimeConfig(intra_op_threads=1, provider="cuda")
    engine = OrtEngine.load(manifest, "classification", config)   # ProviderUnavailable on a CPU-only host
    logits = engine.run(tokens, mask)                              # (B, T, d) float32, (B, T) bool -> (B, K)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import onnxruntime as ort

from splitinfer.protos import Manifest, ManifestError, PacketLimits, graphs

__all__ = ["TOKENS_INPUT", "MASK_INPUT", "OUTPUT_FOR_TASK", "PROVIDER_ALIASES", "ServerHalf", "ProviderUnavailable",
           "RuntimeConfig", "resolve_provider", "create_session", "OrtEngine"]

logger = logging.getLogger(__name__)

TOKENS_INPUT, MASK_INPUT = graphs.server_inputs()
OUTPUT_FOR_TASK = {task: graphs.server_output(task) for task in ("classification", "embedding")}
CPU_PROVIDER = "CPUExecutionProvider"
PROVIDER_ALIASES = {"cpu": CPU_PROVIDER, "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider",
                    "rocm": "ROCMExecutionProvider", "openvino": "OpenVINOExecutionProvider"}


@runtime_checkable
class ServerHalf(Protocol):
    """What the batcher and request handling use of a served model's server half.

    ``run`` takes tokens float32 (B, T, d), CLS at index 0 of each row, and mask bool (B, T)
    (True = real token) and returns float32 (B, output_width): logits for ``task``
    "classification", the embedding for "embedding". It may be called from several threads.
    """

    @property
    def name(self) -> str: ...

    @property
    def task(self) -> str: ...

    @property
    def output_width(self) -> int: ...

    @property
    def packet_limits(self) -> PacketLimits: ...

    def run(self, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray: ...


class ProviderUnavailable(ValueError):
    """The execution provider asked for is not in this ONNX Runtime, or ONNX Runtime fell back from it."""


def _available() -> str:
    return ", ".join(ort.get_available_providers())


def resolve_provider(name: str) -> str:
    """``cpu`` / ``cuda`` / ``tensorrt`` / an ONNX Runtime provider name (case-insensitive, the
    ``ExecutionProvider`` suffix optional) -> the ONNX Runtime name. ProviderUnavailable if unknown."""
    if not isinstance(name, str) or not name.strip():
        raise ProviderUnavailable(f"provider must be a non-empty name, got {name!r}")
    key = name.strip().lower()
    if key in PROVIDER_ALIASES:
        return PROVIDER_ALIASES[key]
    for known in ort.get_all_providers():
        if key in (known.lower(), known.lower().removesuffix("executionprovider")):
            return known
    raise ProviderUnavailable(f"unknown execution provider {name!r}; this ONNX Runtime {ort.__version__} "
                              f"has {_available()} (aliases: {', '.join(PROVIDER_ALIASES)})")


@dataclass(frozen=True)
class RuntimeConfig:
    """How each server-half session runs: ``intra_op_threads`` (0 lets ONNX Runtime choose) and the
    execution ``provider`` (``cpu``, ``cuda``, ``tensorrt`` or an ONNX Runtime provider name)."""

    intra_op_threads: int = 1
    provider: str = "cpu"

    def __post_init__(self) -> None:
        if isinstance(self.intra_op_threads, bool) or not isinstance(self.intra_op_threads, int):
            raise ValueError(f"intra_op_threads must be an int, got {self.intra_op_threads!r}")
        if self.intra_op_threads < 0:
            raise ValueError(f"intra_op_threads must be >= 0, got {self.intra_op_threads}")
        if not isinstance(self.provider, str) or not self.provider.strip():
            raise ValueError(f"provider must be a non-empty name, got {self.provider!r}")

    @property
    def ort_provider(self) -> str:
        """The ONNX Runtime name of ``provider``; ProviderUnavailable if ONNX Runtime knows no such provider."""
        return resolve_provider(self.provider)

    @property
    def providers(self) -> tuple[str, ...]:
        """The session's provider list: the chosen one, then CPU for nodes it cannot run."""
        chosen = self.ort_provider
        return (chosen,) if chosen == CPU_PROVIDER else (chosen, CPU_PROVIDER)

    @property
    def gpu(self) -> bool:
        """Whether the provider runs on a GPU (Triton's KIND_GPU)."""
        return self.ort_provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider", "ROCMExecutionProvider")

    def session_options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 2  # warnings stay visible: a provider that cannot load says why
        return options


def create_session(path: str | Path, config: RuntimeConfig = RuntimeConfig()) -> ort.InferenceSession:
    """An InferenceSession for ``path`` on ``config``'s provider.

    Raises ProviderUnavailable when ONNX Runtime does not have the provider or the session came up
    on another one (ONNX Runtime logs why and falls back to CPU), ManifestError when the file
    cannot be loaded.
    """
    chosen = config.ort_provider
    if chosen not in ort.get_available_providers():
        raise ProviderUnavailable(f"execution provider {chosen} is not available in this ONNX Runtime "
                                  f"{ort.__version__} (available: {_available()}); install the onnxruntime "
                                  "build that has it (onnxruntime-gpu for CUDA and TensorRT) or pick another")
    try:
        session = ort.InferenceSession(str(path), sess_options=config.session_options(),
                                       providers=list(config.providers))
    except Exception as exc:  # ORT raises its own exception types for unreadable or invalid graphs
        raise ManifestError(f"{path}: ONNX Runtime cannot load it: {exc}") from exc
    active = session.get_providers()
    if not active or active[0] != chosen:
        raise ProviderUnavailable(f"{path}: ONNX Runtime fell back from {chosen} to {', '.join(active) or 'nothing'} "
                                  f"(see its warnings above; available: {_available()}); refusing to serve on a "
                                  "provider that was not asked for")
    return session


def _check_signature(session: ort.InferenceSession, manifest: Manifest, task: str) -> None:
    """ManifestError unless server.onnx takes (tokens, mask) and gives the task's output (logits of
    the manifest's class count, or an embedding)."""
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    where = manifest.server_path
    output = OUTPUT_FOR_TASK[task]
    if set(inputs) != {TOKENS_INPUT, MASK_INPUT}:
        raise ManifestError(f"{where}: inputs must be {TOKENS_INPUT!r} and {MASK_INPUT!r}, got {sorted(inputs)}")
    if output not in outputs:
        raise ManifestError(f"{where}: no {output!r} output for a {task} model (outputs: {sorted(outputs)})")
    dim = inputs[TOKENS_INPUT].shape[-1]
    if isinstance(dim, int) and dim != manifest.dim:
        raise ManifestError(f"{where}: tokens have dim {dim}, the manifest says {manifest.dim}")
    classes = outputs[output].shape[-1]
    if task == "classification" and isinstance(classes, int) and classes != len(manifest.classes):
        raise ManifestError(f"{where}: logits have {classes} classes, the manifest lists {len(manifest.classes)}")


@dataclass(frozen=True)
class OrtEngine:
    """``server.onnx`` in one ONNX Runtime session: ``run(tokens, mask) -> (B, output_width)``.

    ``session`` is anything with ONNX Runtime's ``run(output_names, feeds)``; ``output`` names the
    graph output the task answers with. Thread-safe: ONNX Runtime sessions allow concurrent runs.
    """

    session: ort.InferenceSession = field(repr=False)
    output: str = OUTPUT_FOR_TASK["classification"]
    output_width: int = 0

    @property
    def providers(self) -> tuple[str, ...]:
        return tuple(self.session.get_providers())

    def run(self, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """tokens float32 (B, T, d), mask bool (B, T) -> float32 (B, output_width)."""
        (out,) = self.session.run([self.output], {TOKENS_INPUT: tokens, MASK_INPUT: mask})
        return out

    @classmethod
    def load(cls, manifest: Manifest, task: str, config: RuntimeConfig = RuntimeConfig()) -> OrtEngine:
        """Create the session for ``manifest``'s server half, check its signature and run it once.

        Raises ProviderUnavailable (see :func:`create_session`) or ManifestError (unusable graph).
        """
        if task not in OUTPUT_FOR_TASK:
            raise ManifestError(f"{manifest.folder}: task must be one of {sorted(OUTPUT_FOR_TASK)}, got {task!r}")
        session = create_session(manifest.server_path, config)
        _check_signature(session, manifest, task)
        engine = cls(session, OUTPUT_FOR_TASK[task])
        # A CLS-only warm-up: catches graphs that load but do not run, and takes first-call costs now.
        try:
            out = engine.run(np.zeros((1, 1, manifest.dim), np.float32), np.ones((1, 1), np.bool_))
        except Exception as exc:
            raise ManifestError(f"{manifest.server_path}: the server half fails on a CLS-only input: {exc}") from exc
        expected = len(manifest.classes) if task == "classification" else None
        if out.ndim != 2 or out.shape[0] != 1 or out.shape[1] < 1 or (expected and out.shape[1] != expected):
            raise ManifestError(f"{manifest.server_path}: {engine.output} has shape {out.shape}, "
                                f"expected (1, {expected or 'D'})")
        logger.info("server half of %s on %s", manifest.name, ", ".join(session.get_providers()))
        return cls(session, engine.output, int(out.shape[1]))
