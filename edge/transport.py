"""How the edge reaches the server half: a ``Transport`` protocol and its gRPC implementation.

``EdgeRunner`` takes any object with ``infer(request) -> response``, so tests and other carriers
(a queue, a batching proxy) plug in without the network. ``GrpcTransport`` puts a deadline on every
call, sets message size limits explicitly (the same ones the server uses), optionally retries
``UNAVAILABLE`` only, and raises the project's exceptions, never a raw ``grpc.RpcError``.
"""
from __future__ import annotations

import json
import logging
from typing import Protocol, runtime_checkable

import grpc

from splitinfer.protos import DEFAULT_MAX_MESSAGE_BYTES
from splitinfer.protos import splitinfer_pb2 as pb
from splitinfer.protos import splitinfer_pb2_grpc
from splitinfer.protos.errors import ServerUnavailable, from_rpc_error

__all__ = ["Transport", "GrpcTransport"]

logger = logging.getLogger(__name__)

SERVICE_NAME = "splitinfer.v1.SplitInference"


@runtime_checkable
class Transport(Protocol):
    """Carries one InferRequest to the server half and returns its InferResponse.

    Raises a :class:`~splitinfer.protos.errors.SplitInferError` on failure (the runner answers
    locally, marked degraded, on any exception).
    """

    def infer(self, request: pb.InferRequest) -> pb.InferResponse: ...


class GrpcTransport:
    """A gRPC channel to ``splitinfer.v1.SplitInference``.

    target: "host:port" (or any gRPC target URI). timeout_s: deadline of each call, seconds.
    max_message_bytes: send and receive limit, bytes. credentials: TLS channel credentials
    (``grpc.ssl_channel_credentials(...)``); None for a plaintext channel. max_attempts: 1 = no
    retry; 2..5 = retry calls that fail with UNAVAILABLE, within the same deadline.
    wait_for_ready: queue calls while the channel connects instead of failing fast (the deadline
    still bounds them).
    """

    def __init__(
        self,
        target: str,
        timeout_s: float = 1.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        credentials: grpc.ChannelCredentials | None = None,
        max_attempts: int = 1,
        wait_for_ready: bool = False,
    ) -> None:
        if not isinstance(target, str) or not target.strip():
            raise ValueError(f"target must be a non-empty 'host:port', got {target!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if isinstance(max_message_bytes, bool) or not isinstance(max_message_bytes, int) or max_message_bytes < 1:
            raise ValueError(f"max_message_bytes must be a positive integer, got {max_message_bytes!r}")
        if not 1 <= max_attempts <= 5:
            raise ValueError(f"max_attempts must be in [1, 5], got {max_attempts}")
        self.target = target
        self.timeout_s = float(timeout_s)
        self.max_message_bytes = max_message_bytes
        self.max_attempts = max_attempts
        self.wait_for_ready = wait_for_ready
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        if max_attempts > 1:
            options.append(("grpc.service_config", _retry_config(max_attempts)))
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=options)
        self._stub = splitinfer_pb2_grpc.SplitInferenceStub(self._channel)
        self._closed = False

    def infer(self, request: pb.InferRequest) -> pb.InferResponse:
        """One call with a deadline of ``timeout_s``; raises the matching SplitInferError on failure."""
        if self._closed:
            raise ServerUnavailable(f"transport to {self.target} is closed")
        try:
            return self._stub.Infer(request, timeout=self.timeout_s, wait_for_ready=self.wait_for_ready)
        except grpc.RpcError as exc:
            error = from_rpc_error(exc)
            logger.debug("Infer %s to %s failed: %s", request.request_id, self.target, error)
            raise error from exc

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._channel.close()

    def __enter__(self) -> "GrpcTransport":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GrpcTransport({self.target!r}, timeout_s={self.timeout_s}, max_attempts={self.max_attempts})"


def _retry_config(max_attempts: int) -> str:
    """gRPC service config that retries UNAVAILABLE only (nothing else is safe to assume transient)."""
    return json.dumps({
        "methodConfig": [{
            "name": [{"service": SERVICE_NAME}],
            "retryPolicy": {
                "maxAttempts": max_attempts,
                "initialBackoff": "0.05s",
                "maxBackoff": "0.5s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }]
    })
