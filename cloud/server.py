"""The gRPC server: a thin ``SplitInference`` servicer, the standard health service, graceful stop.

The servicer only maps: request -> :func:`~splitinfer.cloud.service.run_request` -> response, and
a :class:`~splitinfer.protos.errors.SplitInferError` -> its status code. Anything unexpected is
logged with its traceback and answered INTERNAL; a client never sees UNKNOWN.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from splitinfer.protos import DEFAULT_MAX_MESSAGE_BYTES, SplitInferError, splitinfer_pb2_grpc
from splitinfer.protos import splitinfer_pb2 as pb

from .registry import ModelRegistry
from .service import MAX_REQUEST_ID_CHARS, ModelLookup, run_request

__all__ = ["SERVICE_NAME", "ServerConfig", "SplitInferenceServicer", "SplitInferServer", "create_server", "serve"]

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SplitInference"].full_name  # "splitinfer.v1.SplitInference"


@dataclass(frozen=True)
class ServerConfig:
    """Where and how the server listens.

    ``port`` 0 picks a free port. ``max_message_bytes`` caps received and sent messages alike.
    ``max_concurrent_rpcs`` (None = unbounded) answers RESOURCE_EXHAUSTED beyond that many calls in
    flight. ``grace_s`` is how long in-flight calls may finish after a stop signal.
    """

    host: str = "127.0.0.1"
    port: int = 50051
    max_workers: int = 4
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_concurrent_rpcs: int | None = None
    grace_s: float = 5.0

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("host must not be empty")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {self.max_workers}")
        if self.max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be >= 1024, got {self.max_message_bytes}")
        if self.max_concurrent_rpcs is not None and self.max_concurrent_rpcs < 1:
            raise ValueError(f"max_concurrent_rpcs must be >= 1 or None, got {self.max_concurrent_rpcs}")
        if not self.grace_s >= 0:
            raise ValueError(f"grace_s must be >= 0, got {self.grace_s}")

    def address(self, port: int | None = None) -> str:
        """``host:port`` as gRPC spells it (IPv6 hosts in brackets)."""
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port if port is None else port}"


class SplitInferenceServicer(splitinfer_pb2_grpc.SplitInferenceServicer):
    """``splitinfer.v1.SplitInference``: every call goes through :func:`run_request`."""

    def __init__(self, registry: ModelLookup) -> None:
        self._registry = registry

    def Infer(self, request: pb.InferRequest, context: grpc.ServicerContext) -> pb.InferResponse:
        received_at = time.perf_counter()
        try:
            return run_request(self._registry, request, received_at=received_at)
        except SplitInferError as exc:
            logger.info("Infer model=%r request_id=%r: %s %s", request.model[:64],
                        request.request_id[:MAX_REQUEST_ID_CHARS], exc.code.name, exc)
            context.abort(exc.code, str(exc))
        except Exception:
            logger.exception("Infer model=%r request_id=%r: unexpected error", request.model[:64],
                             request.request_id[:MAX_REQUEST_ID_CHARS])
            context.abort(grpc.StatusCode.INTERNAL, "internal server error; the server log has the details")


class SplitInferServer:
    """A built gRPC server with its health servicer; ``stop`` turns health NOT_SERVING first."""

    def __init__(self, server: grpc.Server, health_servicer: health.HealthServicer, port: int, address: str) -> None:
        self._server = server
        self.health = health_servicer
        self.port = port
        self.address = address  # host:port actually bound

    def start(self) -> None:
        self._server.start()
        logger.info("listening on %s", self.address)

    def stop(self, grace: float | None = None) -> threading.Event:
        """Mark every health status NOT_SERVING, refuse new calls, give in-flight calls ``grace`` s.

        Returns an event set once the server has stopped.
        """
        self.health.enter_graceful_shutdown()
        return self._server.stop(grace)

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Block until the server stops (True) or ``timeout`` seconds pass (False)."""
        return self._server.wait_for_termination(timeout)


def create_server(
    registry: ModelRegistry,
    host: str = "127.0.0.1",
    port: int = 0,
    max_workers: int = 4,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_concurrent_rpcs: int | None = None,
) -> tuple[SplitInferServer, int]:
    """Build (not start) a server for ``registry`` bound to ``host:port``; returns (server, bound port).

    ``port`` 0 binds a free port. Health reports SERVING for "", for ``splitinfer.v1.SplitInference``
    and for each model name. Raises ValueError on bad settings, OSError when the address cannot be bound.
    """
    config = ServerConfig(host=host, port=port, max_workers=max_workers, max_message_bytes=max_message_bytes,
                          max_concurrent_rpcs=max_concurrent_rpcs)
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.so_reuseport", 0),  # a port already in use is an error, not a silent share
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="splitinfer-rpc"),
        options=options,
        maximum_concurrent_rpcs=config.max_concurrent_rpcs,
    )
    splitinfer_pb2_grpc.add_SplitInferenceServicer_to_server(SplitInferenceServicer(registry), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        bound = server.add_insecure_port(config.address())
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {config.address()}: {exc}") from exc
    if bound == 0:
        raise OSError(f"cannot listen on {config.address()}")
    for service in ("", SERVICE_NAME, *registry.names):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    return SplitInferServer(server, health_servicer, bound, config.address(bound)), bound


def serve(
    registry: ModelRegistry,
    config: ServerConfig = ServerConfig(),
    on_listening: Callable[[str], None] | None = None,
) -> None:
    """Serve ``registry`` until SIGTERM or SIGINT, then stop gracefully (``config.grace_s``).

    ``on_listening(address)`` is called once the server accepts calls. A second signal stops at
    once. Signal handlers are installed only when called from the main thread, and restored after.
    """
    server, _port = create_server(registry, host=config.host, port=config.port, max_workers=config.max_workers,
                                  max_message_bytes=config.max_message_bytes,
                                  max_concurrent_rpcs=config.max_concurrent_rpcs)
    signals_seen: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        signals_seen.append(signum)
        grace = config.grace_s if len(signals_seen) == 1 else 0.0
        logger.info("%s received: stopping (grace %.1f s)", signal.Signals(signum).name, grace)
        server.stop(grace)

    previous: dict[int, object] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, on_signal)
    else:
        logger.warning("serve() is not running in the main thread: no signal handlers installed")
    try:
        server.start()
        if on_listening is not None:
            on_listening(server.address)
        server.wait_for_termination()
    finally:
        server.stop(0).wait()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    logger.info("stopped")
