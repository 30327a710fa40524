"""The edge's decision loop, one for every model: run the device half, answer locally when
confident, else offload.

For one input (an image or a text, through the model's front end)::

    front end -> device half -> exit head
      classifier and max prob >= threshold -> answer on the device, 0 bytes      [decided_on="device"]
      else select tokens (CLS + the tokens covering ``mass`` of the importance, at most ``budget``)
           -> encode (int4 / int8 / fp16 / fp32, zstd with the model's dictionary) -> InferRequest
           -> transport                                                            [decided_on="server"]
      the transport fails in any way -> the exit head's answer, error recorded     [decided_on="degraded"]

With an :class:`~splitinfer.edge.audit.Audit` (the field audit) a random share of the inputs
answered on the device is offloaded too and the server's answer compared with the device's (the user
still gets the device's); when the audit flags drift every input is offloaded until audits agree
again. :func:`~splitinfer.edge.audit.route` makes that decision for one input.

The edge always answers; ``EdgeResult.failure`` tells an outage (the server cannot be reached or
is too slow) from a misconfiguration (wrong token, another model version, a TLS handshake that
fails: retrying will not help). With no transport every input is decided on the device.

An operating point (:class:`~splitinfer.protos.points.OperatingPoint`: threshold, selection and
codec) can be given per request; with a :class:`~splitinfer.edge.controller.BudgetController` the
runner asks it for the point before each request and reports what the request cost afterwards.
With an :class:`~splitinfer.edge.energy.EnergyModel` every result carries an energy estimate.
"""
from __future__ import annotations

import dataclasses
import logging
import time
import itertools
import uuid
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Protocol

import numpy as np

from splitinfer.protos import splitinfer_pb2 as pb
from splitinfer.protos.codec import CodecConfig, TokenEncoder, load_dictionary
from splitinfer.protos.errors import (DeadlineExceeded, ManifestError, ManifestMismatch, ModelNotFound, Overloaded,
                                      ServerInternalError, ServerUnavailable, Unauthenticated)
from splitinfer.protos.manifest import Manifest

from .audit import Audit, route, settle
from .energy import DeviceEnergyMeter, EnergyEstimate, EnergyModel
from .frontends import FrontEnd, front_end_for
from .selection import select_positions
from .session import require_exit_confidence
from .transport import Transport

if TYPE_CHECKING:
    from splitinfer.protos.points import OperatingPoint

    from .controller import BudgetController
    from .session import DeviceOutputs

__all__ = ["DECIDED_ON", "FAILURES", "OffloadPolicy", "EdgeResult", "EdgeRunner", "classify_failure", "softmax"]

logger = logging.getLogger(__name__)

DECIDED_ON = ("device", "server", "degraded")
FAILURES = ("outage", "misconfiguration", "server_error")
_TLS_WORDS = ("handshake", "ssl", "certificate", "tls")


def classify_failure(exc: BaseException) -> str:
    """What an offload failure means for the user: "outage" (the server cannot be reached in time
    or is overloaded: it may come back), "misconfiguration" (wrong token, a model or manifest the
    server does not serve, a failing TLS handshake: retrying will not help), or "server_error"."""
    if isinstance(exc, (Unauthenticated, ManifestMismatch, ModelNotFound)):
        return "misconfiguration"
    if isinstance(exc, ServerUnavailable) and any(w in str(exc).lower() for w in _TLS_WORDS):
        return "misconfiguration"
    if isinstance(exc, (ServerUnavailable, DeadlineExceeded, Overloaded, ConnectionError, TimeoutError)):
        return "outage"
    return "server_error"


class DeviceHalf(Protocol):
    """What the runner needs from a session: device inputs -> (exit output, tokens, importance,
    exit confidence (B,) or None) as :class:`~splitinfer.edge.session.DeviceOutputs`."""

    def run(self, inputs: dict) -> "DeviceOutputs": ...


@dataclass(frozen=True)
class OffloadPolicy:
    """When to offload and how much to send.

    exit_threshold: answer on the device when the exit confidence (the manifest's exit policy) is >= this
    (0 = always on the device; above 1 = always offload). mass: share of the importance mass the
    selected tokens cover, in (0, 1]. budget: most tokens sent (CLS comes in addition).
    min_tokens: fewest tokens sent.
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
    def from_manifest(cls, manifest: Manifest, exit_threshold: float | None = None, mass: float | None = None,
                      budget: int | None = None) -> "OffloadPolicy":
        """The manifest's calibrated values, each overridable (None keeps the manifest's)."""
        sel = manifest.selection
        return cls(
            exit_threshold=manifest.exit.threshold if exit_threshold is None else float(exit_threshold),
            mass=sel.mass if mass is None else float(mass),
            budget=sel.budget if budget is None else budget,
            min_tokens=sel.min_tokens,
        )


@dataclass(frozen=True)
class EdgeResult:
    """The edge's answer for one input.

    Classifiers: label (class index), class_name, confidence (answered on the device: the exit
    policy's confidence, which the exit threshold applies to; by the server: the probability of
    ``label``), probabilities (softmax, one per class). Embedding models: embedding (D,), label None.
    decided_on: "device" (exit head, nothing sent), "server" (the server half's answer) or
    "degraded" (the exit head's answer after the offload failed; ``error`` says why and
    ``failure`` is "outage", "misconfiguration" or "server_error"). bytes_sent: serialized size of
    the InferRequest sent or tried (0 when none). tokens_sent: tokens in it, CLS included.
    tokens_total: tokens the device half produced. latency_ms: the whole call; device_ms: front end
    + device half; server_ms: round trip of the offload call, failed ones included (None when
    none). request_id: the InferRequest's id (None when nothing was sent). operating_point: id of
    the operating point that served the request (None: the runner's own settings).
    bytes_received: serialized size of the response. energy: the request's energy estimate.
    audited: the input was also offloaded for the field audit (the answer is the device's; its bytes
    and energy are counted here; ``error`` / ``failure`` say when that offload failed).
    """

    label: int | None
    class_name: str | None
    confidence: float | None
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
    embedding: tuple[float, ...] | None = None
    failure: str | None = None
    tokens_total: int = 0
    audited: bool = False

    def __post_init__(self) -> None:
        if self.decided_on not in DECIDED_ON:
            raise ValueError(f"decided_on must be one of {DECIDED_ON}, got {self.decided_on!r}")
        if self.embedding is None and (self.label is None or not 0 <= self.label < len(self.probabilities)):
            raise ValueError(f"label {self.label} out of range for {len(self.probabilities)} classes")
        if self.bytes_sent < 0 or self.tokens_sent < 0:
            raise ValueError(f"bytes_sent and tokens_sent must be >= 0, got {self.bytes_sent}, {self.tokens_sent}")
        if self.failure is not None and self.failure not in FAILURES:
            raise ValueError(f"failure must be one of {FAILURES}, got {self.failure!r}")

    def to_dict(self) -> dict:
        """JSON-ready dict (tuples as lists)."""
        out = asdict(self)
        out["probabilities"] = list(self.probabilities)
        if self.embedding is not None:
            out["embedding"] = list(self.embedding)
        return out

    def with_energy(self, energy: EnergyEstimate) -> "EdgeResult":
        return dataclasses.replace(self, energy=energy)


def softmax(logits: np.ndarray) -> np.ndarray:
    """float (K,) -> float64 (K,), numerically stable."""
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max())
    return z / z.sum()


class EdgeRunner:
    """Answers inputs with the device half, offloading unconfident ones through ``transport``.

    session: the device half (a :class:`~splitinfer.edge.session.DeviceSession`). transport: a
    :class:`~splitinfer.edge.transport.Transport`, or None to decide everything on the device; the
    runner does not close it. manifest: the model folder's manifest (front end, dims, classes,
    name and sha256 sent with each request). front_end: turns raw inputs into device inputs
    (default: the manifest's, :func:`~splitinfer.edge.frontends.front_end_for`). codec: how tokens
    are encoded (None: the manifest's). exit_threshold, mass, budget: override the manifest's
    values (see :class:`OffloadPolicy`). energy: an :class:`~splitinfer.edge.energy.EnergyModel` to
    estimate each request's energy (device energy from ``meter``, default RAPL when readable, else
    CPU time x the profile). controller: a :class:`~splitinfer.edge.controller.BudgetController`
    that picks the operating point of every request given no point, and learns the link. audit: an
    :class:`~splitinfer.edge.audit.Audit` that audits answers given on the device (None: no audit;
    it needs a transport).
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
        front_end: FrontEnd | None = None,
        audit: Audit | None = None,
    ) -> None:
        require_exit_confidence(manifest, session)
        self.session = session
        self.transport = transport
        self.manifest = manifest
        self.front_end = front_end if front_end is not None else front_end_for(manifest)
        self.zstd_dictionary = load_dictionary(manifest.zstd_dictionary)  # the model's, when it ships one
        self.policy = OffloadPolicy.from_manifest(manifest, exit_threshold, mass, budget)
        self._clock = clock
        self.energy = energy
        self.meter = meter if meter is not None or energy is None else DeviceEnergyMeter(energy.device)
        self.controller = controller
        self.audit = audit if transport is not None else None
        self.task = manifest.task
        self._encoder = TokenEncoder(codec if codec is not None else manifest.codec.config(), self.zstd_dictionary)
        self._point_settings: dict["OperatingPoint", tuple[OffloadPolicy, TokenEncoder]] = {}
        self._template = pb.InferRequest(model=manifest.name, manifest_sha256=manifest.sha256)
        self._id_prefix, self._ids = uuid.uuid4().hex[:16], itertools.count()  # request ids: 32 hex digits

    @property
    def codec(self) -> CodecConfig:
        """The runner's own codec (an operating point may carry another)."""
        return self._encoder.config

    # -- public entry points
    def classify(self, image, point: "OperatingPoint | None" = None) -> EdgeResult:
        """One image (uint8 (H, W) gray or (H, W, 3) RGB, any size) -> EdgeResult."""
        if self.front_end.kind != "image":
            raise ValueError(f"{self.manifest.name} reads {self.front_end.kind}, not images: use classify_text")
        return self.run(image, point)

    def classify_text(self, text: str, point: "OperatingPoint | None" = None) -> EdgeResult:
        """One text -> EdgeResult (label or embedding)."""
        if self.front_end.kind != "text":
            raise ValueError(f"{self.manifest.name} reads {self.front_end.kind}, not text: use classify")
        return self.run(text, point)

    def classify_many(self, inputs: Iterable) -> list[EdgeResult]:
        """An iterable of images (or a uint8 (B, H, W) batch) or texts -> one EdgeResult each, in order."""
        return [self.run(x) for x in inputs]

    def run(self, raw, point: "OperatingPoint | None" = None) -> EdgeResult:
        """One raw input through the front end and the decision loop.

        point: the operating point for this request (None: the controller's choice if there is a
        controller, else the runner's own settings).
        """
        chosen = point if point is not None or self.controller is None else self.controller.choose()
        energy_before = self.meter.read() if self.meter is not None else None
        start = self._clock()
        inputs = self.front_end(raw)
        return self.decide(inputs, chosen, start, energy_before)

    # -- the decision loop
    def decide(self, inputs: dict, chosen: "OperatingPoint | None" = None, start: float | None = None,
               energy_before: float | None = None) -> EdgeResult:
        """Device inputs (graph names -> arrays, batch 1) -> EdgeResult."""
        start = self._clock() if start is None else start
        policy, _ = self._settings(chosen)
        exit_out, tokens, importance, confidence = self.session.run(inputs)
        self._check_device_outputs(exit_out, tokens, importance, confidence)
        device_done = self._clock()
        device_mj = self.meter.mj_between(energy_before, self.meter.read()) if self.meter is not None else 0.0
        device_ms = (device_done - start) * 1e3
        local = self._answer(exit_out[0], None if confidence is None else float(confidence[0]))
        point_id = None if chosen is None else chosen.id
        n_tokens = int(tokens.shape[1])
        if self.controller is not None:
            self.controller.observe_confidence(local["confidence"] or 0.0, device_ms)
        decision = route(local["confidence"], policy.exit_threshold, self.audit)  # self.audit is None without a transport
        if not decision.offload or self.transport is None:
            result = EdgeResult(**local, decided_on="device", latency_ms=(self._clock() - start) * 1e3,
                                device_ms=device_ms, operating_point=point_id, tokens_total=n_tokens)
            return self._finish(result, chosen, device_mj)

        request_id = f"{self._id_prefix}{next(self._ids):016x}"  # unique, and cheaper than a uuid4 each
        bytes_sent = tokens_sent = 0
        sent_at: float | None = None
        try:
            request = self.build_request(tokens[0], importance[0], request_id, chosen)
            self._mark(request, decision.audit)
            bytes_sent, tokens_sent = request.ByteSize(), request.packet.num_tokens
            sent_at = self._clock()
            response = self.transport.infer(request)
            server_ms = (self._clock() - sent_at) * 1e3
            answer = self._check_response(response, request_id, exit_out.shape[-1])
        except Exception as exc:  # the edge always answers: any failure falls back to the exit head
            server_ms = None if sent_at is None else (self._clock() - sent_at) * 1e3
            error = f"{type(exc).__name__}: {exc}"
            failure = classify_failure(exc)
            logger.info("request %s %s (%s): %s", request_id, "audit failed" if decision.audit else
                        "degraded to the device answer", failure, error)
            result = EdgeResult(
                **local, decided_on="device" if decision.audit else "degraded", bytes_sent=bytes_sent,
                tokens_sent=tokens_sent, latency_ms=(self._clock() - start) * 1e3, device_ms=device_ms,
                server_ms=server_ms, error=error, request_id=request_id, operating_point=point_id, failure=failure,
                tokens_total=n_tokens, audited=decision.audit,
            )
            return self._finish(result, chosen, device_mj)
        if self.task == "classification":
            settle(decision, self.audit, local["label"], answer["label"])
        result = EdgeResult(
            **(local if decision.answer == "device" else answer), decided_on=decision.answer, bytes_sent=bytes_sent,
            tokens_sent=tokens_sent, latency_ms=(self._clock() - start) * 1e3, device_ms=device_ms,
            server_ms=server_ms, request_id=request_id, operating_point=point_id, bytes_received=response.ByteSize(),
            tokens_total=n_tokens, audited=decision.audit,
        )
        server_compute_ms = response.timings.total_ms if response.HasField("timings") else 0.0
        if self.controller is not None:
            self.controller.link.observe(bytes_sent, server_ms, server_compute_ms)
        return self._finish(result, chosen, device_mj, server_compute_ms)

    def select(self, importance: np.ndarray, point: "OperatingPoint | None" = None) -> np.ndarray:
        """importance float32 (N - 1,) -> token positions int64 (1 + K,): 0 (CLS), then 1 + token index."""
        policy, _ = self._settings(point)
        return select_positions(importance, policy.mass, policy.budget, policy.min_tokens)

    def build_request(self, tokens: np.ndarray, importance: np.ndarray, request_id: str,
                      point: "OperatingPoint | None" = None) -> pb.InferRequest:
        """tokens float32 (N, d), importance float32 (N - 1,) -> InferRequest with the selected tokens."""
        positions = self.select(importance, point)
        _, encoder = self._settings(point)
        request = pb.InferRequest()
        request.CopyFrom(self._template)  # model and manifest hash, set once
        request.request_id = request_id
        encoder.encode_into(request.packet, tokens.take(positions, axis=0), positions)
        return request

    def _settings(self, point: "OperatingPoint | None") -> tuple[OffloadPolicy, TokenEncoder]:
        """The exit/selection policy and token encoder of ``point`` (None: the runner's own)."""
        if point is None:
            return self.policy, self._encoder
        settings = self._point_settings.get(point)
        if settings is None:
            policy = OffloadPolicy(point.threshold, point.mass, point.budget, self.policy.min_tokens)
            settings = (policy, TokenEncoder(point.codec(self.codec), self.zstd_dictionary))
            self._point_settings[point] = settings
        return settings

    def _mark(self, request: pb.InferRequest, audit: bool) -> None:
        """Tell the server why the request comes: a field audit, and whether the audit flags drift."""
        if audit:
            request.purpose = pb.PURPOSE_AUDIT
        if self.audit is not None and self.audit.alarm:
            request.drift_alarm = True

    def _finish(self, result: EdgeResult, point: "OperatingPoint | None", device_mj: float,
                server_compute_ms: float = 0.0) -> EdgeResult:
        """Attach the energy estimate and report the request's cost to the controller."""
        if self.energy is not None:
            round_trip_s = (result.server_ms or 0.0) / 1e3
            answered = result.decided_on == "server" or (result.audited and result.error is None)
            server_s = (server_compute_ms or result.server_ms or 0.0) / 1e3 if answered else 0.0
            estimate = self.energy.estimate(device_mj, result.bytes_sent, result.bytes_received, round_trip_s,
                                            server_s, method=self.meter.method)
            result = result.with_energy(estimate)
        if self.controller is not None and point is not None:
            from .controller import RequestCost

            self.controller.update(point, RequestCost.from_result(result, point))
        return result

    def _check_device_outputs(self, exit_out: np.ndarray, tokens: np.ndarray, importance: np.ndarray,
                              confidence: np.ndarray | None) -> None:
        m = self.manifest
        n = tokens.shape[1] if tokens.ndim == 3 else -1
        if m.input.kind == "image" and n != m.num_tokens or not 1 <= n <= m.num_tokens:
            raise ManifestError(f"device half output tokens has shape {np.shape(tokens)}, the manifest implies "
                                f"(1, {m.num_tokens}, {m.dim})")
        expected = {"tokens": (tokens, (1, n, m.dim)), "importance": (importance, (1, n - 1))}
        if m.task == "classification":
            expected["exit_logits"] = (exit_out, (1, len(m.classes)))
            expected["exit_confidence"] = (confidence, (1,))
        elif exit_out.ndim != 2 or exit_out.shape[0] != 1:
            raise ManifestError(f"device half exit embedding has shape {exit_out.shape}, expected (1, D)")
        for name, (value, shape) in expected.items():
            if np.shape(value) != shape:
                raise ManifestError(f"device half output {name} has shape {np.shape(value)}, the manifest implies {shape}")

    def _answer(self, out: np.ndarray, confidence: float | None) -> dict:
        """The device's own answer as EdgeResult fields (confidence: the exit policy's)."""
        if self.task == "embedding":
            return {"label": None, "class_name": None, "confidence": None, "probabilities": (),
                    "embedding": tuple(float(v) for v in np.asarray(out, dtype=np.float32))}
        probs = softmax(out)
        label = int(np.argmax(probs))
        if not (confidence is not None and 0.0 <= confidence <= 1.0 + 1e-6):
            raise ManifestError(f"device half exit confidence is {confidence!r}, expected a number in [0, 1]")
        return {"label": label, "class_name": self.manifest.classes[label], "confidence": confidence,
                "probabilities": tuple(float(p) for p in probs)}

    def _check_response(self, response: pb.InferResponse, request_id: str, width: int) -> dict:
        """A server answer -> EdgeResult fields, or ServerInternalError if malformed."""
        if response.request_id and response.request_id != request_id:
            raise ServerInternalError(f"response is for request {response.request_id[:40]!r}, expected {request_id!r}")
        if self.task == "embedding":
            emb = np.asarray(response.embedding, dtype=np.float32)
            if emb.shape != (width,) or not np.all(np.isfinite(emb)):
                raise ServerInternalError(f"response has an embedding of {emb.size} values, expected {width} finite")
            return {"label": None, "class_name": None, "confidence": None, "probabilities": (),
                    "embedding": tuple(float(v) for v in emb)}
        k = len(self.manifest.classes)
        probs = np.asarray(response.probabilities, dtype=np.float64)
        if probs.shape != (k,):
            raise ServerInternalError(f"response has {probs.size} probabilities, expected {k}")
        if not np.all(np.isfinite(probs)):
            raise ServerInternalError("response probabilities contain NaN or inf")
        if not 0 <= response.label < k:
            raise ServerInternalError(f"response label {response.label} out of range [0, {k})")
        label = int(response.label)
        return {"label": label, "class_name": self.manifest.classes[label], "confidence": float(probs[label]),
                "probabilities": tuple(float(p) for p in probs)}
