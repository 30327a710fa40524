"""The device half in ONNX Runtime: one InferenceSession, created once and reused for every input.

Threading defaults suit a small device that does one request at a time: one intra-op thread, one
inter-op thread, and no spin-waiting (ORT's worker threads otherwise busy-wait after each op,
burning a core between requests). Turn spinning on for the lowest latency on a machine with cores
to spare.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from os import PathLike
from typing import NamedTuple

import numpy as np
import onnxruntime as ort

from splitinfer.protos.errors import ManifestError
from splitinfer.protos.manifest import Manifest

__all__ = ["SessionOptions", "DeviceOutputs", "DeviceSession"]

logger = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAMES = ("exit_logits", "tokens", "importance")


@dataclass(frozen=True)
class SessionOptions:
    """ONNX Runtime settings for the device half.

    intra_op_threads: threads inside one op (1 = the calling thread only; 0 = ORT picks, one per
    core). inter_op_threads: threads across independent ops. allow_spinning: let idle worker
    threads busy-wait for the next op (lower latency, a core kept busy).
    """

    intra_op_threads: int = 1
    inter_op_threads: int = 1
    allow_spinning: bool = False
    providers: tuple[str, ...] = ("CPUExecutionProvider",)

    def __post_init__(self) -> None:
        for name in ("intra_op_threads", "inter_op_threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if not self.providers:
            raise ValueError("providers must name at least one execution provider")

    def to_ort(self) -> ort.SessionOptions:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.intra_op_threads
        opts.inter_op_num_threads = self.inter_op_threads
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        spin = "1" if self.allow_spinning else "0"
        opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
        opts.add_session_config_entry("session.inter_op.allow_spinning", spin)
        return opts


class DeviceOutputs(NamedTuple):
    """What the device half returns for a batch of B images.

    exit_logits: float32 (B, K) over the K classes. tokens: float32 (B, 1 + P, d), CLS at index 0.
    importance: float32 (B, P), the CLS attention per patch, each row sums to 1.
    """

    exit_logits: np.ndarray
    tokens: np.ndarray
    importance: np.ndarray


class DeviceSession:
    """One reused ORT session of ``device.onnx``; ``run`` maps images to :class:`DeviceOutputs`."""

    def __init__(self, path: str | PathLike, options: SessionOptions = SessionOptions()) -> None:
        self.path = path
        self.options = options
        try:
            self._session = ort.InferenceSession(
                str(path), sess_options=options.to_ort(), providers=list(options.providers)
            )
        except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, NoSuchFile...)
            raise ManifestError(f"{path}: ONNX Runtime cannot load the device half: {exc}") from exc
        inputs = {i.name: i for i in self._session.get_inputs()}
        outputs = {o.name for o in self._session.get_outputs()}
        missing = [n for n in OUTPUT_NAMES if n not in outputs]
        if INPUT_NAME not in inputs or missing:
            raise ManifestError(
                f"{path}: not a device half: needs input {INPUT_NAME!r} and outputs {list(OUTPUT_NAMES)}, "
                f"has inputs {sorted(inputs)} and outputs {sorted(outputs)}"
            )
        self.input_shape = tuple(inputs[INPUT_NAME].shape)  # e.g. ('batch', 1, 64, 64)
        logger.debug("loaded %s (input %s, %s)", path, self.input_shape, options)

    @classmethod
    def from_manifest(cls, manifest: Manifest, options: SessionOptions = SessionOptions()) -> "DeviceSession":
        return cls(manifest.device_path, options)

    def run(self, x: np.ndarray) -> DeviceOutputs:
        """x float32 (B, C, H, W), normalized as the manifest says -> DeviceOutputs."""
        x = np.asarray(x)
        if x.dtype != np.float32:
            raise ValueError(f"device input must be float32, got {x.dtype}")
        if x.ndim != len(self.input_shape) or any(
            isinstance(want, int) and want != got for want, got in zip(self.input_shape, x.shape)
        ):
            raise ValueError(f"device input shape {x.shape} does not fit the model's {self.input_shape}")
        exit_logits, tokens, importance = self._session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
        return DeviceOutputs(exit_logits, tokens, importance)
