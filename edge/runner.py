"""The edge's decision loop: run the device half, answer locally when confident, else offload.

For one image::

    preprocess -> device half -> softmax(exit_logits)
      max prob >= threshold          -> answer on the device, 0 bytes          [decided_on="device"]
      else select tokens (CLS + the patches covering ``mass`` of the importance, at most ``budget``)
           -> encode (int8 / fp16 / fp32, zstd) -> InferRequest -> transport   [decided_on="server"]
      the transport fails in any way -> the exit head's answer, error recorded [decided_on="degraded"]

The edge always answers. With no transport every input is decided on the device.

An operating point (:class:`~splitinfer.edge.controller.OperatingPoint`: threshold, selection and
codec) can be given per request; with a :class:`~splitinfer.edge.controller.BudgetController` the
runner asks it for the point before each request and reports what the request cost afterwards.
With an :class:`~splitinfer.edge.energy.EnergyModel` every result carries an energy estimate.
"""
from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Protocol

import numpy as np

from splitinfer.protos import splitinfer_pb2 as pb
from splitinfer.protos.codec import CodecConfig, encode_tokens, load_dictionary
from splitinfer.protos.errors import ManifestError, ServerInternalError
from splitinfer.protos.manifest import Manifest

from .energy import DeviceEnergyMeter, EnergyEstimate, EnergyModel
from .preprocess import PreprocessSpec, preprocess
from .selection import select_tokens
from .transport import Transport

if TYPE_CHECKING:
    from .controller import BudgetController, OperatingPoint

__all__ = ["DECIDED_ON", "OffloadPolicy", "EdgeResult", "EdgeRunner", "codec_from_manifest", "softmax"]

logger = logging.getLogger(__name__)

DECIDED_ON = ("device", "server", "degraded")


class DeviceHalf(Protocol):
    """What the runner needs from a session: float32 (B, C, H, W) -> (exit_logits, tokens, importance)."""

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class OffloadPolicy:
    """When to offload and how much to send.

    exit_threshold: answer on the device when the exit head's max softmax probability is >= this
    (0 = always on the device; above 1 = always offload). mass: share of the importance mass the
    selected patches cover, in (0, 1]. budget: most patches sent (CLS comes in addition).
    min_tokens: fewest patches sent.
    """

    exit_threshold: float
    mass: float
    budget: int
    min_tokens: int = 1

    def __post_init__(self) -> None:
        if not self.exit_threshold >= 0.0:  # also rejects NaN
            raise ValueError(f"exit_threshold must be >= 0, got {self.exit_threshold}")
        if not 0.0 < self.mass <= 1.0:
            raise ValueError(f"mass must be in (0, 1], got {self.mass}")
        if isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < 1:
            raise ValueError(f"budget must be an integer >= 1, got {self.budget!r}")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or self.min_tokens < 1:
            raise ValueError(f"min_tokens must be an integer >= 1, got {self.min_tokens!r}")

    @classmethod
    def from_manifest(
        cls,
        manifest: Manifest,
        exit_threshold: float | None = None,
        mass: float | None = None,
        budget: int | None = None,
    ) -> "OffloadPolicy":
        """The manifest's calibrated values, each overridable (None keeps the manifest's)."""
        min_tokens = manifest.data.get("selection", {}).get("min_tokens", 1)
        return cls(
            exit_threshold=manifest.exit_threshold if exit_threshold is None else float(exit_threshold),
            mass=manifest.selection_mass if mass is None else float(mass),
            budget=manifest.selection_budget if budget is None else budget,
            min_tokens=min_tokens,
        )


@dataclass(frozen=True)
class EdgeResult:
    """The edge's answer for one input.

    label: class index; class_name: its name from the manifest; confidence: probability of
    ``label``; probabilities: one per class (softmax). decided_on: "device" (exit head, nothing
    sent), "server" (the server half's answer) or "degraded" (the exit head's answer after the
    offload failed; ``error`` says why). bytes_sent: serialized size of the InferRequest sent or
    tried (0 when none). tokens_sent: tokens in it, CLS included. latency_ms: whole classify call;
    device_ms: preprocessing + device half; server_ms: round trip of the offload call, failed ones
    included (None when none). request_id: the InferRequest's id (None when nothing was sent).
    operating_point: id of the operating point that served the request (None: the runner's own
    settings). bytes_received: serialized size of the response. energy: the request's energy
    estimate (None without an energy model).
    """

    label: int
    class_name: str
    confidence: float
    probabilities: tuple[float, ...]
    decided_on: str
    bytes_sent: int = 0
    tokens_sent: int = 0
    latency_ms: float = 0.0
    device_ms: float = 0.0
    server_ms: float | None = None
    error: str | None = None
    request_id: str | None = None
    operating_point: str | None = None
    bytes_received: int = 0
    energy: EnergyEstimate | None = None

    def __post_init__(self) -> None:
        if self.decided_on not in DECIDED_ON:
            raise ValueError(f"decided_on must be one of {DECIDED_ON}, got {self.decided_on!r}")
        if not 0 <= self.label < len(self.probabilities):
            raise ValueError(f"label {self.label} out of range for {len(self.probabilities)} classes")
        if self.bytes_sent < 0 or self.tokens_sent < 0:
            raise ValueError(f"bytes_sent and tokens_sent must be >= 0, got {self.bytes_sent}, {self.tokens_sent}")

    def to_dict(self) -> dict:
        """JSON-ready dict (probabilities as a list)."""
        out = asdict(self)
        out["probabilities"] = list(self.probabilities)
        return out

    def with_energy(self, energy: EnergyEstimate) -> "EdgeResult":
        return dataclasses.replace(self, energy=energy)


def codec_from_manifest(manifest: Manifest) -> CodecConfig:
    """The manifest's ``codec`` section (encoding, compression, and group size and scale storage
    where the export recorded them) as a CodecConfig."""
    section = manifest.data.get("codec", {})
    known = {f.name for f in dataclasses.fields(CodecConfig)}
    values = {k: v for k, v in section.items() if k in known}
    values.update(encoding=manifest.encoding, compression=manifest.compression)
    return CodecConfig(**values)


def softmax(logits: np.ndarray) -> np.ndarray:
    """float (K,) -> float64 (K,), numerically stable."""
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max())
    return z / z.sum()


class EdgeRunner:
    """Classifies images with the device half, offloading unconfident ones through ``transport``.

    session: the device half (a :class:`~splitinfer.edge.session.DeviceSession`). transport: a
    :class:`~splitinfer.edge.transport.Transport`, or None to decide everything on the device; the
    runner does not close it. manifest: the model folder's manifest (preprocessing, dims, classes,
    name and sha256 sent with each request). codec: how tokens are encoded (None: the manifest's).
    exit_threshold, mass, budget: override the manifest's values (see :class:`OffloadPolicy`).
    energy: an :class:`~splitinfer.edge.energy.EnergyModel` to estimate each request's energy
    (device energy from ``meter``, default RAPL when readable, else CPU time x the profile).
    controller: a :class:`~splitinfer.edge.controller.BudgetController` that picks the operating
    point of every request given no point, and learns the link from each offload.
    """

    def __init__(
        self,
        session: DeviceHalf,
        transport: Transport | None,
        manifest: Manifest,
        codec: CodecConfig | None = None,
        exit_threshold: float | None = None,
        mass: float | None = None,
        budget: int | None = None,
        clock: Callable[[], float] = time.perf_counter,
        energy: EnergyModel | None = None,
        meter: DeviceEnergyMeter | None = None,
        controller: "BudgetController | None" = None,
    ) -> None:
        self.session = session
        self.transport = transport
        self.manifest = manifest
        self.codec = codec if codec is not None else codec_from_manifest(manifest)
        self.zstd_dictionary = load_dictionary(manifest.zstd_dictionary)  # the model's, when it ships one
        self.policy = OffloadPolicy.from_manifest(manifest, exit_threshold, mass, budget)
        self.spec = PreprocessSpec.from_dict(manifest.preprocessing)
        self._clock = clock
        self.energy = energy
        self.meter = meter if meter is not None or energy is None else DeviceEnergyMeter(energy.device)
        self.controller = controller
        self._point_settings: dict["OperatingPoint", tuple[OffloadPolicy, CodecConfig]] = {}

    def classify(self, image: np.ndarray, point: "OperatingPoint | None" = None) -> EdgeResult:
        """image uint8 (H, W) grayscale (resized to the manifest's size if it differs) -> EdgeResult.

        point: the operating point for this request (None: the controller's choice if there is a
        controller, else the runner's own settings).
        """
        image = np.asarray(image)
        if image.ndim != 2:
            raise ValueError(f"classify takes one uint8 (H, W) image, got shape {image.shape}; use classify_many")
        chosen = point if point is not None or self.controller is None else self.controller.choose()
        policy, _ = self._settings(chosen)
        energy_before = self.meter.read() if self.meter is not None else None
        start = self._clock()
        x = preprocess(image, self.spec)  # (1, 1, H, W)
        exit_logits, tokens, importance = self.session.run(x)
        self._check_device_outputs(exit_logits, tokens, importance)
        probs = softmax(exit_logits[0])
        device_done = self._clock()
        device_mj = self.meter.mj_between(energy_before, self.meter.read()) if self.meter is not None else 0.0
        device_ms = (device_done - start) * 1e3
        label = int(np.argmax(probs))
        confidence = float(probs[label])
        point_id = None if chosen is None else chosen.id
        if self.controller is not None:
            self.controller.observe_confidence(confidence, device_ms)

        if confidence >= policy.exit_threshold or self.transport is None:
            result = self._result(label, probs, "device", latency_ms=(self._clock() - start) * 1e3,
                                  device_ms=device_ms, operating_point=point_id)
            return self._finish(result, chosen, device_mj)

        request_id = uuid.uuid4().hex
        bytes_sent = tokens_sent = 0
        sent_at: float | None = None
        try:
            request = self.build_request(tokens[0], importance[0], request_id, chosen)
            bytes_sent, tokens_sent = request.ByteSize(), request.packet.num_tokens
            sent_at = self._clock()
            response = self.transport.infer(request)
            server_ms = (self._clock() - sent_at) * 1e3
            server_probs, server_label = self._check_response(response, request_id)
        except Exception as exc:  # the edge always answers: any failure falls back to the exit head
            server_ms = None if sent_at is None else (self._clock() - sent_at) * 1e3
            error = f"{type(exc).__name__}: {exc}"
            logger.info("request %s degraded to the device answer: %s", request_id, error)
            result = self._result(
                label, probs, "degraded", bytes_sent=bytes_sent, tokens_sent=tokens_sent,
                latency_ms=(self._clock() - start) * 1e3, device_ms=device_ms, server_ms=server_ms,
                error=error, request_id=request_id, operating_point=point_id,
            )
            return self._finish(result, chosen, device_mj)
        result = self._result(
            server_label, server_probs, "server", bytes_sent=bytes_sent, tokens_sent=tokens_sent,
            latency_ms=(self._clock() - start) * 1e3, device_ms=device_ms, server_ms=server_ms,
            request_id=request_id, operating_point=point_id, bytes_received=response.ByteSize(),
        )
        server_compute_ms = response.timings.total_ms if response.HasField("timings") else 0.0
        if self.controller is not None:
            self.controller.link.observe(bytes_sent, server_ms, server_compute_ms)
        return self._finish(result, chosen, device_mj, server_compute_ms)

    def classify_many(self, images: Iterable[np.ndarray]) -> list[EdgeResult]:
        """uint8 (B, H, W) or an iterable of (H, W) images -> one EdgeResult each, in order."""
        return [self.classify(image) for image in images]

    def select(self, importance: np.ndarray, point: "OperatingPoint | None" = None) -> np.ndarray:
        """importance float32 (P,) -> token positions int64 (1 + K,): 0 (CLS), then 1 + patch index."""
        policy, _ = self._settings(point)
        patches = select_tokens(importance, policy.mass, policy.budget, policy.min_tokens)
        return np.concatenate([np.zeros(1, dtype=np.int64), 1 + patches.astype(np.int64)])

    def build_request(self, tokens: np.ndarray, importance: np.ndarray, request_id: str,
                      point: "OperatingPoint | None" = None) -> pb.InferRequest:
        """tokens float32 (1 + P, d), importance float32 (P,) -> InferRequest with the selected tokens."""
        _, codec = self._settings(point)
        positions = self.select(importance, point)
        packet = encode_tokens(tokens[positions], positions, codec, zstd_dictionary=self.zstd_dictionary)
        return pb.InferRequest(
            model=self.manifest.name, manifest_sha256=self.manifest.sha256, request_id=request_id, packet=packet,
        )

    def _settings(self, point: "OperatingPoint | None") -> tuple[OffloadPolicy, CodecConfig]:
        """The exit/selection policy and codec of ``point`` (None: the runner's own)."""
        if point is None:
            return self.policy, self.codec
        settings = self._point_settings.get(point)
        if settings is None:
            policy = OffloadPolicy(point.threshold, point.mass, point.budget, self.policy.min_tokens)
            settings = (policy, point.codec(self.codec))
            self._point_settings[point] = settings
        return settings

    def _finish(self, result: EdgeResult, point: "OperatingPoint | None", device_mj: float,
                server_compute_ms: float = 0.0) -> EdgeResult:
        """Attach the energy estimate and report the request's cost to the controller."""
        if self.energy is not None:
            round_trip_s = (result.server_ms or 0.0) / 1e3
            server_s = (server_compute_ms or result.server_ms or 0.0) / 1e3 if result.decided_on == "server" else 0.0
            estimate = self.energy.estimate(device_mj, result.bytes_sent, result.bytes_received, round_trip_s,
                                            server_s, method=self.meter.method)
            result = result.with_energy(estimate)
        if self.controller is not None and point is not None:
            from .controller import RequestCost

            self.controller.update(point, RequestCost.from_result(result, point))
        return result

    def _check_device_outputs(self, exit_logits: np.ndarray, tokens: np.ndarray, importance: np.ndarray) -> None:
        m = self.manifest
        expected = {
            "exit_logits": (exit_logits, (1, len(m.classes))),
            "tokens": (tokens, (1, m.num_tokens, m.dim)),
            "importance": (importance, (1, m.num_patches)),
        }
        for name, (value, shape) in expected.items():
            if np.shape(value) != shape:
                raise ManifestError(
                    f"device half output {name} has shape {np.shape(value)}, the manifest implies {shape}"
                )

    def _check_response(self, response: pb.InferResponse, request_id: str) -> tuple[np.ndarray, int]:
        """A server answer -> (probabilities float64 (K,), label), or ServerInternalError if malformed."""
        k = len(self.manifest.classes)
        if response.request_id and response.request_id != request_id:
            raise ServerInternalError(f"response is for request {response.request_id!r}, expected {request_id!r}")
        probs = np.asarray(response.probabilities, dtype=np.float64)
        if probs.shape != (k,):
            raise ServerInternalError(f"response has {probs.size} probabilities, expected {k}")
        if not np.all(np.isfinite(probs)):
            raise ServerInternalError("response probabilities contain NaN or inf")
        if not 0 <= response.label < k:
            raise ServerInternalError(f"response label {response.label} out of range [0, {k})")
        return probs, int(response.label)

    def _result(self, label: int, probs: np.ndarray, decided_on: str, **fields) -> EdgeResult:
        return EdgeResult(
            label=label,
            class_name=self.manifest.classes[label],
            confidence=float(probs[label]),
            probabilities=tuple(float(p) for p in probs),
            decided_on=decided_on,
            **fields,
        )
