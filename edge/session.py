"""The device half in ONNX Runtime: one InferenceSession, created once and reused for every input.

Threading defaults suit a small device that does one request at a time: one intra-op thread, one
inter-op thread, and no spin-waiting (ORT's worker threads otherwise busy-wait after each op,
burning a core between requests). Turn spinning on for the lowest latency on a machine with cores
to spare.

A model folder may hold two device halves: ``device.onnx`` (float) and ``device.int8.onnx``
(``splitinfer-export export --quantize int8``). ``choose_device_half`` picks one: the user's choice,
or with "auto" the manifest's ``device_variants.auto_choice`` when it was measured on this CPU;
when it was measured on another CPU, both halves are timed here side by side (a few dozen batch-1
runs). Either way INT8 is chosen only when it is at least 5 % faster (it changes the numerics), and
never when it lost more accuracy than export allowed.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnxruntime as ort

from splitinfer.protos.errors import ManifestError
from splitinfer.protos.manifest import Manifest, cpu_signature, sha256_file

__all__ = ["SessionOptions", "DeviceOutputs", "DeviceSession", "DeviceHalfChoice", "DEVICE_HALVES",
           "choose_device_half", "device_half_path", "available_halves", "time_device_halves", "cpu_signature",
           "zero_input"]

logger = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAMES = ("exit_logits", "tokens", "importance")
DEVICE_HALVES = ("auto", "float", "int8")
_FILE_KEY = {"float": "device", "int8": "device_int8"}
MIN_SPEEDUP = 0.95  # INT8 must run in at most 95 % of the float half's time to be chosen by "auto"


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
        self.choice: DeviceHalfChoice | None = None
        logger.debug("loaded %s (input %s, %s)", path, self.input_shape, options)

    @classmethod
    def from_manifest(cls, manifest: Manifest, options: SessionOptions = SessionOptions(),
                      device_half: str = "float") -> "DeviceSession":
        """The session of the device half named by ``device_half`` ("float", "int8" or "auto").

        The chosen half and the reason are in ``session.choice``.
        """
        choice = choose_device_half(manifest, device_half, options)
        session = choice.session if choice.session is not None else cls(device_half_path(manifest, choice.half), options)
        session.choice = choice
        return session

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


@dataclass(frozen=True)
class DeviceHalfChoice:
    """Which device half runs and why. half: "float" or "int8"; timings_ms: p50 per half when
    measured here; session: the already-loaded session of the chosen half, when timing loaded it."""

    half: str
    reason: str
    timings_ms: dict | None = None
    session: DeviceSession | None = None


def available_halves(manifest: Manifest) -> tuple[str, ...]:
    return tuple(h for h, key in _FILE_KEY.items() if key in manifest.data.get("files", {}))


def device_half_path(manifest: Manifest, half: str) -> Path:
    """Path of the "float" or "int8" device half; the INT8 file's sha256 is checked against the manifest."""
    if half not in _FILE_KEY:
        raise ValueError(f"device half must be 'float' or 'int8', got {half!r}")
    if half == "float":
        return manifest.device_path
    entry = manifest.data.get("files", {}).get(_FILE_KEY[half])
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
        raise ManifestError(f"{manifest.folder}: no INT8 device half in manifest.json "
                            "(export with `splitinfer-export export --quantize int8`)")
    path = manifest.folder / entry["path"]
    if not path.is_file():
        raise ManifestError(f"{manifest.folder}: INT8 device half {entry['path']} not found")
    if sha256_file(path) != entry.get("sha256"):
        raise ManifestError(f"{manifest.folder}: {entry['path']} does not match the sha256 in manifest.json")
    return path


def choose_device_half(manifest: Manifest, requested: str = "auto",
                       options: SessionOptions = SessionOptions(), runs: int = 20) -> DeviceHalfChoice:
    """Resolve "float", "int8" or "auto" to one device half (see the module docstring for "auto")."""
    if requested not in DEVICE_HALVES:
        raise ValueError(f"device half must be one of {DEVICE_HALVES}, got {requested!r}")
    if requested != "auto":
        if requested not in available_halves(manifest):
            device_half_path(manifest, requested)  # raises the explanatory ManifestError
        return DeviceHalfChoice(requested, "requested")
    if "int8" not in available_halves(manifest):
        return DeviceHalfChoice("float", "auto: the model folder has no INT8 device half")
    variants = manifest.data.get("device_variants", {})
    if not variants.get("int8", {}).get("eligible", False):
        return DeviceHalfChoice("float", "auto: the INT8 half lost more accuracy than export allowed")
    measured = variants.get("measured_on", {})
    here = cpu_signature()
    if (measured.get("machine"), measured.get("model")) == (here["machine"], here["model"]) \
            and variants.get("auto_choice") in _FILE_KEY:
        return DeviceHalfChoice(variants["auto_choice"], f"auto: the manifest's choice, measured on this CPU "
                                f"({here['model']}; int8/float latency {variants.get('latency_ratio_int8_over_float')})")
    sessions = {half: DeviceSession(device_half_path(manifest, half), options) for half in ("float", "int8")}
    timings = time_device_halves(sessions, runs=runs)
    half = "int8" if timings["int8"] <= MIN_SPEEDUP * timings["float"] else "float"
    logger.info("device half timings here (p50 ms): %s -> %s", timings, half)
    return DeviceHalfChoice(half, f"auto: timed here side by side ({runs} runs each, p50 ms {timings})", timings,
                            sessions[half])


def time_device_halves(sessions: dict[str, DeviceSession], runs: int = 30, warmup: int = 3) -> dict[str, float]:
    """Median batch-1 latency in ms of each session, interleaved run by run, on a zero input."""
    times: dict[str, list[float]] = {name: [] for name in sessions}
    inputs = {name: zero_input(s) for name, s in sessions.items()}
    for i in range(warmup + runs):
        for name, sess in sessions.items():
            t0 = time.perf_counter()
            sess.run(inputs[name])
            if i >= warmup:
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: round(float(np.median(t)), 4) for name, t in times.items()}


def zero_input(session: DeviceSession) -> np.ndarray:
    """float32 zeros of the session's input shape with symbolic dimensions set to 1."""
    return np.zeros([d if isinstance(d, int) else 1 for d in session.input_shape], dtype=np.float32)
