"""One inference request, without gRPC: validate, look up the model, decode, run, softmax.

The gRPC servicer is a thin wrapper around :func:`run_request`; everything here is testable with
plain protobuf messages. Every failure is a :class:`~splitinfer.protos.errors.SplitInferError`.
"""
from __future__ import annotations

import time
from typing import Protocol

import numpy as np

from splitinfer.protos import InvalidPacket, ServerInternalError, decode_tokens
from splitinfer.protos import splitinfer_pb2 as pb

from .registry import LoadedModel

__all__ = ["MAX_REQUEST_ID_CHARS", "ModelLookup", "validate_request", "softmax", "run_request"]

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


def run_request(
    registry: ModelLookup, request: pb.InferRequest, *, received_at: float | None = None
) -> pb.InferResponse:
    """Finish one request on the server half.

    ``received_at`` is the ``time.perf_counter()`` value when the request arrived (default: now);
    ``timings.total_ms`` counts from it. Raises InvalidPacket (bad request or packet), ModelNotFound,
    ManifestMismatch, or ServerInternalError (the server half gave unusable logits).
    """
    start = time.perf_counter() if received_at is None else received_at
    validate_request(request)
    model = registry.get(request.model, request.manifest_sha256)

    decode_start = time.perf_counter()
    tokens, _positions = decode_tokens(request.packet, model.packet_limits)  # (K, d) float32, (K,) int64
    decode_ms = _elapsed_ms(decode_start)

    compute_start = time.perf_counter()
    batch = tokens[None]  # (1, K, d)
    mask = np.ones(batch.shape[:2], dtype=np.bool_)  # (1, K), every token real
    logits = model.run(batch, mask)  # (1, C)
    compute_ms = _elapsed_ms(compute_start)

    if logits.shape != (1, model.num_classes):
        raise ServerInternalError(
            f"model {model.name!r}: server half returned logits of shape {logits.shape}, "
            f"expected (1, {model.num_classes})"
        )
    if not np.all(np.isfinite(logits)):
        raise ServerInternalError(f"model {model.name!r}: server half returned non-finite logits")
    probabilities = softmax(logits[0]).astype(np.float32)  # (C,)

    response = pb.InferResponse(
        request_id=request.request_id,
        probabilities=probabilities.tolist(),
        label=int(np.argmax(probabilities)),
        model_version=model.version,
    )
    response.timings.decode_ms = decode_ms
    response.timings.compute_ms = compute_ms
    response.timings.total_ms = _elapsed_ms(start)
    return response
