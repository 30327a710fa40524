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

from splitinfer.protos import graphs
from splitinfer.protos.errors import ManifestError
from splitinfer.protos.manifest import Manifest, cpu_signature

__all__ = ["SessionOptions", "DeviceOutputs", "DeviceSession", "DeviceHalfChoice", "require_exit_confidence", "DEVICE_HALVES",
           "choose_device_half", "device_half_path", "available_halves", "time_device_halves", "cpu_signature",
           "zero_input"]

logger = logging.getLogger(__name__)

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
    """What the device half returns for a batch of B inputs.

    exit: float32 (B, K) exit logits, or (B, D) an exit embedding. tokens: float32 (B, N, d), CLS at
    index 0 (d: the bottleneck width when one is deployed). importance: float32 (B, N - 1), each
    row sums to 1 over real tokens. confidence: classifiers' exit confidence (B,), which the exit
    threshold applies to: the graph's ``exit_confidence`` output (the manifest's exit policy), or
    for a device half exported before that output existed the max softmax of the exit logits; None
    for embedding models.
    """

    exit: np.ndarray
    tokens: np.ndarray
    importance: np.ndarray
    confidence: np.ndarray | None


class DeviceSession:
    """One reused ORT session of a device half; ``run`` maps the device inputs to :class:`DeviceOutputs`.

    Image halves take {"image": float32 (B, C, H, W)}; text halves {"input_ids", "attention_mask":
    int64 (B, T)} (names: :mod:`splitinfer.protos.graphs`).
    """

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
        self.has_second_view = inputs.pop(graphs.SECOND_VIEW, None) is not None
        outputs = [o.name for o in self._session.get_outputs()]
        kinds = [k for k in ("image", "text") if set(graphs.device_inputs(k)) == set(inputs)]
        exits = [n for n in (graphs.EXIT_LOGITS, graphs.EXIT_EMBEDDING) if n in outputs]
        if not kinds or not exits or graphs.TOKENS not in outputs or graphs.IMPORTANCE not in outputs:
            raise ManifestError(
                f"{path}: not a device half: needs inputs {graphs.device_inputs('image')} or "
                f"{graphs.device_inputs('text')} and outputs (exit_logits | exit_embedding, tokens, importance), "
                f"has inputs {sorted(inputs)} and outputs {sorted(outputs)}"
            )
        self.input_kind = kinds[0]
        self.input_names = graphs.device_inputs(self.input_kind)
        self.output_names = [exits[0], graphs.TOKENS, graphs.IMPORTANCE]
        self.has_exit_confidence = exits[0] == graphs.EXIT_LOGITS and graphs.EXIT_CONFIDENCE in outputs
        if self.has_exit_confidence:
            self.output_names.append(graphs.EXIT_CONFIDENCE)
        self.input_shapes = {n: tuple(inputs[n].shape) for n in self.input_names}
        self.input_shape = self.input_shapes[self.input_names[0]]  # e.g. ('batch', 1, 64, 64)
        self.choice: DeviceHalfChoice | None = None
        logger.debug("loaded %s (inputs %s, %s)", path, self.input_shapes, options)

    @classmethod
    def from_manifest(cls, manifest: Manifest, options: SessionOptions = SessionOptions(),
                      device_half: str = "float") -> "DeviceSession":
        """The session of the device half named by ``device_half`` ("float", "int8" or "auto").

        The chosen half and the reason are in ``session.choice``.
        """
        choice = choose_device_half(manifest, device_half, options)
        session = choice.session if choice.session is not None else cls(device_half_path(manifest, choice.half), options)
        require_exit_confidence(manifest, session)
        session.choice = choice
        return session

    def run(self, inputs: dict | np.ndarray, second_view: bool = True) -> DeviceOutputs:
        """The device inputs (a dict by graph input name; an image half also takes the float32
        (B, C, H, W) array alone) -> DeviceOutputs. second_view=False runs a view-consistency half
        on one view (a whole-model baseline; its confidence is then max softmax, not the policy's)."""
        if not isinstance(inputs, dict):
            inputs = {self.input_names[0]: inputs}
        if set(inputs) != set(self.input_names):
            raise ValueError(f"device inputs must be {list(self.input_names)}, got {sorted(inputs)}")
        feed = {}
        for name in self.input_names:
            x = np.asarray(inputs[name])
            want_dtype = np.float32 if self.input_kind == "image" else np.int64
            if x.dtype != want_dtype:
                raise ValueError(f"device input {name} must be {np.dtype(want_dtype).name}, got {x.dtype}")
            shape = self.input_shapes[name]
            if x.ndim != len(shape) or any(isinstance(w, int) and w != g for w, g in zip(shape, x.shape)):
                raise ValueError(f"device input {name} shape {x.shape} does not fit the model's {shape}")
            feed[name] = x
        if self.has_second_view:
            feed[graphs.SECOND_VIEW] = np.array(bool(second_view))
        exit_out, tokens, importance, *confidence = self._session.run(self.output_names, feed)
        if confidence:
            return DeviceOutputs(exit_out, tokens, importance, confidence[0])
        if self.output_names[0] == graphs.EXIT_LOGITS:  # exported before exit_confidence: max softmax
            z = np.exp(exit_out - exit_out.max(axis=-1, keepdims=True))
            return DeviceOutputs(exit_out, tokens, importance, (1.0 / z.sum(axis=-1)).astype(np.float32))
        return DeviceOutputs(exit_out, tokens, importance, None)


def require_exit_confidence(manifest: Manifest, session) -> None:
    """ManifestError when the manifest's exit policy needs the graph's exit_confidence output and
    ``session``'s device half lacks it (max softmax, the fallback, would be the wrong decision)."""
    if manifest.exit.score not in ("max_softmax", "none") and getattr(session, "has_exit_confidence", True) is False:
        raise ManifestError(f"{getattr(session, 'path', 'the device half')}: the manifest's exit policy "
                            f"{manifest.exit.score!r} needs the device half's {graphs.EXIT_CONFIDENCE!r} output, "
                            "which this graph lacks")


@dataclass(frozen=True)
class DeviceHalfChoice:
    """Which device half runs and why. half: "float" or "int8"; timings_ms: p50 per half when
    measured here; session: the already-loaded session of the chosen half, when timing loaded it."""

    half: str
    reason: str
    timings_ms: dict | None = None
    session: DeviceSession | None = None


def available_halves(manifest: Manifest) -> tuple[str, ...]:
    return tuple(h for h, key in _FILE_KEY.items() if key in manifest.files)


def device_half_path(manifest: Manifest, half: str) -> Path:
    """Path of the "float" or "int8" device half; the INT8 file's sha256 is checked against the manifest."""
    if half not in _FILE_KEY:
        raise ValueError(f"device half must be 'float' or 'int8', got {half!r}")
    if half == "float":
        return manifest.device_path
    if _FILE_KEY[half] not in manifest.files:
        raise ManifestError(f"{manifest.folder}: no INT8 device half in manifest.json "
                            "(export with `splitinfer-export export --quantize int8`)")
    manifest.verify((_FILE_KEY[half],))
    return manifest.path(_FILE_KEY[half])


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
    if not manifest.int8_eligible:
        return DeviceHalfChoice("float", "auto: the INT8 half lost more accuracy than export allowed")
    here = cpu_signature()
    if manifest.int8_measured_on == (here["machine"], here["model"]):
        return DeviceHalfChoice(manifest.device_auto_choice, f"auto: the manifest's choice, measured on this CPU "
                                f"({here['model']}; int8/float latency {manifest.int8_latency_ratio})")
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


def zero_input(session: DeviceSession) -> dict:
    """A batch-1 input of the session's shapes: float32 zeros for an image, two tokens for text."""
    if session.input_kind == "text":
        return {graphs.INPUT_IDS: np.array([[101, 102]], np.int64), graphs.ATTENTION_MASK: np.ones((1, 2), np.int64)}
    return {graphs.IMAGE: np.zeros([d if isinstance(d, int) else 1 for d in session.input_shape], dtype=np.float32)}
