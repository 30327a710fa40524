"""One inference request, without gRPC: validate, look up the model, decode, run, softmax.

The gRPC servicer calls :func:`route_request`, hands the packet to the model's batcher (which
decodes it and runs the server half and :func:`probabilities_from_logits` on a whole batch, off
the event loop) and answers with
:func:`build_response`; :func:`run_request` is the same path for a batch of one. Everything here
is testable with plain protobuf messages. Every failure is a
:class:`~splitinfer.protos.errors.SplitInferError`.
"""
from __future__ import annotations

import math
import time
from typing import Protocol

import numpy as np

from splitinfer.protos import InvalidPacket, ServerInternalError, decode_tokens
from splitinfer.protos import splitinfer_pb2 as pb

from .engine import ServerHalf
from .registry import LoadedModel

__all__ = ["MAX_REQUEST_ID_CHARS", "ModelLookup", "validate_request", "softmax", "route_request", "decode_request",
           "probabilities_from_logits", "build_response", "run_request"]

MAX_REQUEST_ID_CHARS = 128


class ModelLookup(Protocol):
    """What :func:`run_request` needs from a registry (``ModelRegistry`` is one)."""

    def get(self, name: str, manifest_sha256: str) -> LoadedModel: ...


def validate_request(request: pb.InferRequest) -> None:
    """Check the request's own fields (the packet is checked by the codec); InvalidPacket if bad."""
    if not request.model:
        raise InvalidPacket("request.model is empty: name the model to run")
    if len(request.request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidPacket(
            f"request_id is {len(request.request_id)} characters, at most {MAX_REQUEST_ID_CHARS} allowed"
        )
    if not request.HasField("packet"):
        raise InvalidPacket("request.packet is missing")


def softmax(logits: np.ndarray) -> np.ndarray:
    """logits (..., K) -> probabilities float64 (..., K), summing to 1 along the last axis.

    Numerically stable: the row maximum is subtracted first, so large finite logits do not overflow.
    """
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def _elapsed_ms(since: float) -> float:
    return (time.perf_counter() - since) * 1000.0


def route_request(registry: ModelLookup, request: pb.InferRequest, max_tokens: int | None = None) -> LoadedModel:
    """Validate ``request``'s own fields and find the export it names (the packet is not decoded yet).

    ``max_tokens`` (None = the model's sequence length) caps the tokens one request may carry.
    Raises InvalidPacket, ModelNotFound or ManifestMismatch.
    """
    validate_request(request)
    model = registry.get(request.model, request.manifest_sha256)
    if max_tokens is not None and request.packet.num_tokens > max_tokens:
        raise InvalidPacket(f"num_tokens {request.packet.num_tokens} exceeds this server's limit of {max_tokens} "
                            "tokens per request")
    return model


def decode_request(
    registry: ModelLookup, request: pb.InferRequest, max_tokens: int | None = None
) -> tuple[LoadedModel, np.ndarray]:
    """:func:`route_request`, then decode the packet: (model, tokens float32 (K, d)); InvalidPacket if bad."""
    model = route_request(registry, request, max_tokens)
    tokens, _positions = decode_tokens(request.packet, model.packet_limits)  # (K, d) float32, (K,) int64
    return model, tokens


def probabilities_from_logits(model: ServerHalf, logits: np.ndarray, rows: int) -> np.ndarray:
    """The server half's output (rows, C) -> the answers float32 (rows, C): softmax probabilities,
    or for an embedding model the embedding itself (rows, D).

    A row with a non-finite value becomes a row of NaN (its request is answered INTERNAL by
    :func:`build_response`); an output of the wrong shape raises ServerInternalError.
    """
    if logits.shape != (rows, model.output_width):
        raise ServerInternalError(
            f"model {model.name!r}: server half returned an output of shape {logits.shape}, "
            f"expected ({rows}, {model.output_width})"
        )
    answers = logits.astype(np.float32) if model.task == "embedding" else softmax(logits).astype(np.float32)
    finite = np.isfinite(logits).all(axis=-1)
    if not finite.all():
        answers[~finite] = np.nan
    return answers


def build_response(
    request: pb.InferRequest, model: LoadedModel, probabilities: np.ndarray, *,
    decode_ms: float, compute_ms: float, received_at: float, into: pb.InferResponse | None = None,
) -> pb.InferResponse:
    """One request's answer (C,) -> InferResponse (probabilities and label, or the embedding with
    label -1); ServerInternalError if not finite.

    ``into``: an empty InferResponse to fill, such as a StreamResponse's own ``response`` field
    (assigning a finished message to another copies it). This runs on the event loop once per
    request: ndarray methods, not the np.* wrappers.
    """
    if not math.isfinite(probabilities.sum(dtype=np.float64)):  # NaN or inf anywhere
        what = "embedding" if model.task == "embedding" else "logits"
        raise ServerInternalError(f"model {model.name!r}: server half returned non-finite {what}")
    response = pb.InferResponse() if into is None else into
    response.request_id, response.model_version = request.request_id, model.version
    if model.task == "embedding":
        response.embedding.extend(probabilities.tolist())
        response.label = -1
    else:
        response.probabilities.extend(probabilities.tolist())
        response.label = int(probabilities.argmax())
    timings = response.timings
    timings.decode_ms = decode_ms
    timings.compute_ms = compute_ms
    timings.total_ms = _elapsed_ms(received_at)
    return response


def run_request(
    registry: ModelLookup, request: pb.InferRequest, *, received_at: float | None = None
) -> pb.InferResponse:
    """Finish one request on the server half, alone (a batch of one), without gRPC.

    ``received_at`` is the ``time.perf_counter()`` value when the request arrived (default: now);
    ``timings.total_ms`` counts from it. Raises InvalidPacket (bad request or packet), ModelNotFound,
    ManifestMismatch, or ServerInternalError (the server half gave unusable logits).
    """
    start = time.perf_counter() if received_at is None else received_at
    decode_start = time.perf_counter()
    model, tokens = decode_request(registry, request)
    decode_ms = _elapsed_ms(decode_start)

    compute_start = time.perf_counter()
    batch = tokens[None]  # (1, K, d)
    mask = np.ones(batch.shape[:2], dtype=np.bool_)  # (1, K), every token real
    logits = model.run(batch, mask)  # (1, C)
    probabilities = probabilities_from_logits(model, logits, rows=1)  # (1, C)
    compute_ms = _elapsed_ms(compute_start)
    return build_response(request, model, probabilities[0], decode_ms=decode_ms, compute_ms=compute_ms,
                          received_at=start)
