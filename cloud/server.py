"""The gRPC server (grpc.aio): a thin batching servicer, health, reflection, metrics, TLS, auth, drain, reload.

One call::

    Infer(request) -> route_request (validate, find the export by name + sha256)   [event loop]
                   -> the model's ModelBatcher: queue; on a worker thread decode the packets, pad the
                      ragged token sets into one batch, run, softmax                 [worker thread]
                   -> build_response                                                 [event loop]
    any SplitInferError -> its status code; anything else -> logged with its traceback, INTERNAL
    bytes that are not an InferRequest -> INVALID_ARGUMENT (the deserializer never raises)
    status details are at most protos.errors.MAX_DETAILS_CHARS characters

:class:`AsyncSplitInferServer` is the server inside an event loop; :func:`serve` runs it in the
main thread until SIGTERM/SIGINT (graceful drain) and reloads models and tokens on SIGHUP.
:func:`create_server` returns :class:`SplitInferServer`, the same server on a background event
loop thread with a blocking API, for tests and embedding.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from splitinfer.protos import (DEFAULT_MAX_MESSAGE_BYTES, InvalidPacket, ManifestError, SplitInferError,
                               splitinfer_pb2_grpc)
from splitinfer.protos import splitinfer_pb2 as pb
from splitinfer.protos.errors import bounded, status_code_for, status_details

from .batcher import BatchConfig, ModelBatcher
from .metrics import UNKNOWN_MODEL, MetricsHttpServer, ServerMetrics
from .registry import LoadedModel, ModelRegistry
from .repository import ModelSource
from .security import BearerTokenInterceptor, TlsConfig, read_tokens
from .service import MAX_REQUEST_ID_CHARS, ModelLookup, build_response, route_request
from .stream import DEFAULT_STREAM_WINDOW, parse_stream_request, serve_stream

__all__ = ["SERVICE_NAME", "ServerConfig", "SplitInferenceServicer", "UndecodableRequest", "parse_infer_request",
           "add_servicer", "ModelRouter", "AsyncSplitInferServer", "SplitInferServer", "create_server", "serve"]

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SplitInference"].full_name  # "splitinfer.v1.SplitInference"
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True)
class ServerConfig:
    """Where and how the server listens, batches, limits and secures calls.

    ``port`` 0 picks a free port. ``max_workers``: threads running server-half batches (all models).
    ``max_message_bytes`` caps received and sent messages alike. ``max_concurrent_rpcs`` (None =
    unbounded) answers RESOURCE_EXHAUSTED beyond that many calls in flight; ``batching.max_queue``
    bounds each model's queue the same way. ``max_tokens_per_request`` (None = the model's sequence
    length). ``grace_s``: how long in-flight calls may finish after a stop. ``tls``: None for
    plaintext. ``auth_tokens`` / ``auth_token_file`` (re-read on reload): bearer tokens; none = no
    authentication. ``metrics_port``: None = no HTTP endpoint, 0 = a free port.
    """

    host: str = "127.0.0.1"
    port: int = 50051
    max_workers: int = 2
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_concurrent_rpcs: int | None = None
    grace_s: float = 5.0
    batching: BatchConfig = field(default_factory=BatchConfig)
    max_tokens_per_request: int | None = None
    tls: TlsConfig | None = None
    auth_tokens: tuple[str, ...] = ()
    auth_token_file: Path | None = None
    metrics_host: str | None = None
    metrics_port: int | None = None
    reflection: bool = True
    health_port: int | None = None  # a second, plaintext listener with only the health service (probes)
    event_loop: str = "auto"  # EVENT_LOOPS: auto = uvloop when installed, else asyncio's own

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
        if self.max_tokens_per_request is not None and self.max_tokens_per_request < 1:
            raise ValueError(f"max_tokens_per_request must be >= 1 or None, got {self.max_tokens_per_request}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be in [0, 65535], got {self.metrics_port}")
        if self.health_port is not None and not 0 <= self.health_port <= 65535:
            raise ValueError(f"health_port must be in [0, 65535], got {self.health_port}")
        loop_factory(self.event_loop)  # an unknown name, or uvloop asked for and not installed
        object.__setattr__(self, "auth_tokens", tuple(self.auth_tokens))
        if self.auth_token_file is not None:
            object.__setattr__(self, "auth_token_file", Path(self.auth_token_file))

    def address(self, port: int | None = None) -> str:
        """``host:port`` as gRPC spells it (IPv6 hosts in brackets)."""
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port if port is None else port}"

    def tokens(self) -> tuple[str, ...]:
        """The accepted bearer tokens (the file read now); empty = no authentication."""
        tokens = self.auth_tokens
        if self.auth_token_file is not None:
            tokens = tokens + read_tokens(self.auth_token_file)
        return tokens


EVENT_LOOPS = ("auto", "asyncio", "uvloop")


def loop_factory(kind: str = "auto") -> Callable[[], asyncio.AbstractEventLoop]:
    """What makes the server's event loop. uvloop (libuv; the cloud extra installs it on Linux and
    macOS) runs grpc.aio's callbacks and the request handling with less CPU per request than
    asyncio's own loop (benchmarks/server_load.py measures both); "auto" takes it when installed.
    ValueError for an unknown kind, or "uvloop" without uvloop installed."""
    if kind not in EVENT_LOOPS:
        raise ValueError(f"event_loop must be one of {', '.join(EVENT_LOOPS)}, got {kind!r}")
    if kind == "asyncio":
        return asyncio.new_event_loop
    try:
        import uvloop
    except ImportError:
        if kind == "uvloop":
            raise ValueError("event loop 'uvloop' asked for, but uvloop is not installed "
                             "(pip install 'splitinfer[cloud]' or pip install uvloop)") from None
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def _loop_name(loop: asyncio.AbstractEventLoop) -> str:
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def _model_key(model: LoadedModel) -> tuple[str, str, str]:
    return model.name, model.manifest.sha256, str(model.manifest.folder)


class ModelRouter:
    """The models being served and one batcher per served export; ``swap`` replaces the models.

    A batcher is created on the first request for its export. After a swap, batchers of exports
    no longer served finish their queued requests and stop, so a reload drops nothing in flight.
    """

    def __init__(self, lookup: ModelLookup, batching: BatchConfig, executor: ThreadPoolExecutor,
                 metrics: ServerMetrics) -> None:
        self.lookup = lookup
        self._batching = batching
        self._executor = executor
        self._metrics = metrics
        self._batchers: dict[tuple[str, str, str], ModelBatcher] = {}
        self._retiring: set[asyncio.Task] = set()

    def batcher_for(self, model: LoadedModel) -> ModelBatcher:
        key = _model_key(model)
        batcher = self._batchers.get(key)
        if batcher is None:
            batcher = ModelBatcher(model, self._batching, self._executor, on_batch=self._on_batch)
            batcher.start()
            self._batchers[key] = batcher
        return batcher

    def _on_batch(self, model: LoadedModel, size: int, compute_s: float) -> None:
        self._metrics.batch_done(model.name, size, compute_s)

    def label(self, name: str) -> str:
        """``name`` if it is served, else ``<unknown>`` (bounded metric labels)."""
        try:
            return name if name in self.lookup else UNKNOWN_MODEL  # type: ignore[operator]
        except TypeError:
            return UNKNOWN_MODEL

    def swap(self, lookup: ModelLookup) -> None:
        """Serve ``lookup`` from now on; retire the batchers of exports it does not hold."""
        keep = {_model_key(m) for m in lookup} if isinstance(lookup, ModelRegistry) else set()
        self.lookup = lookup
        for key in [k for k in self._batchers if k not in keep]:
            task = asyncio.ensure_future(self._batchers.pop(key).close())
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    def stats(self) -> list[tuple[str, str, int, int]]:
        """(model, version, queue depth, in flight) per batcher; safe to call from any thread."""
        return [(b.model.name, b.model.version, b.queue_depth, b.in_flight) for b in list(self._batchers.values())]

    @property
    def in_flight(self) -> int:
        return sum(b.in_flight for b in list(self._batchers.values()))

    async def close(self) -> None:
        batchers = list(self._batchers.values())
        self._batchers.clear()
        await asyncio.gather(*(b.close() for b in batchers), *self._retiring, return_exceptions=True)


class SplitInferenceServicer(splitinfer_pb2_grpc.SplitInferenceServicer):
    """``splitinfer.v1.SplitInference`` on grpc.aio: decode, batch, answer; errors become status codes."""

    def __init__(self, router: ModelRouter, metrics: ServerMetrics, max_tokens: int | None = None,
                 stream_window: int = DEFAULT_STREAM_WINDOW) -> None:
        self._router = router
        self._metrics = metrics
        self._max_tokens = max_tokens
        self._stream_window = stream_window

    async def Infer(self, request: "pb.InferRequest | UndecodableRequest",
                    context: grpc.aio.ServicerContext) -> pb.InferResponse:
        received_at = time.perf_counter()
        model = None
        if isinstance(request, UndecodableRequest):
            await self._refuse_undecodable(request, context, received_at)  # aborts the call
        try:
            model = route_request(self._router.lookup, request, self._max_tokens)
            self._metrics.request_received(model.name, request.packet.num_tokens, request.ByteSize(),
                                           audit=request.purpose == pb.PURPOSE_AUDIT, drift_alarm=request.drift_alarm)
            remaining = context.time_remaining()
            deadline = None if remaining is None else received_at + remaining
            submitted_at = time.perf_counter()
            probabilities, decode_ms, compute_ms = await self._router.batcher_for(model).submit(request.packet,
                                                                                                deadline)
            waited_s = time.perf_counter() - submitted_at - (decode_ms + compute_ms) / 1e3
            self._metrics.queue_waited(model.name, max(0.0, waited_s))
            response = build_response(request, model, probabilities, decode_ms=decode_ms, compute_ms=compute_ms,
                                      received_at=received_at)
        except SplitInferError as exc:
            code, message = status_code_for(exc), status_details(exc)
            log_level = logging.INFO
        except asyncio.CancelledError:  # the client cancelled or its deadline passed
            label = model.name if model is not None else self._router.label(request.model)
            self._metrics.request_done(label, "CANCELLED", time.perf_counter() - received_at)
            raise
        except Exception as exc:
            logger.exception("Infer model=%r request_id=%r: unexpected error", request.model[:64],
                             request.request_id[:MAX_REQUEST_ID_CHARS])
            code, message = status_code_for(exc), status_details(exc)
            log_level = logging.ERROR
        else:
            self._metrics.request_done(model.name, "OK", time.perf_counter() - received_at)
            return response
        label = model.name if model is not None else self._router.label(request.model)
        self._metrics.request_done(label, code.name, time.perf_counter() - received_at)
        logger.log(log_level, "Infer refused: %s %s", code.name, message, extra={
            "model": bounded(request.model, 64), "request_id": request.request_id[:MAX_REQUEST_ID_CHARS],
            "code": code.name})
        await context.abort(code, message)

    async def InferStream(self, messages, context: grpc.aio.ServicerContext):
        """Many requests over one call, each answered like ``Infer`` (see cloud/stream.py)."""
        async for answer in serve_stream(self._router, self._metrics, self._max_tokens, messages, context,
                                         self._stream_window):
            yield answer

    async def _refuse_undecodable(self, request: "UndecodableRequest", context: grpc.aio.ServicerContext,
                                  received_at: float) -> None:
        """Bytes that are not an InferRequest: counted, logged in one line, answered INVALID_ARGUMENT."""
        code, message = grpc.StatusCode.INVALID_ARGUMENT, status_details(InvalidPacket(request.reason))
        self._metrics.request_done(UNKNOWN_MODEL, code.name, time.perf_counter() - received_at)
        logger.info("Infer refused: %s %s", code.name, message, extra={"code": code.name,
                                                                       "request_bytes": request.size})
        await context.abort(code, message)


class UndecodableRequest:
    """What :func:`parse_infer_request` hands the servicer for bytes that do not parse as an InferRequest."""

    __slots__ = ("reason", "size")

    def __init__(self, reason: str, size: int) -> None:
        self.reason = reason
        self.size = size


def parse_infer_request(data: bytes) -> "pb.InferRequest | UndecodableRequest":
    """The Infer method's request deserializer: never raises.

    grpc.aio answers an exception raised by a deserializer as UNKNOWN and logs its traceback, and
    the servicer never sees the call; an :class:`UndecodableRequest` instead reaches the servicer,
    which answers INVALID_ARGUMENT and counts it like every other call.
    """
    try:
        return pb.InferRequest.FromString(data)
    except Exception as exc:  # DecodeError for malformed protobuf or invalid UTF-8; anything else alike
        return UndecodableRequest(f"the request is not a valid splitinfer.v1.InferRequest "
                                  f"({len(data)} bytes): {type(exc).__name__}: {exc}", len(data))


def add_servicer(servicer: SplitInferenceServicer, server: grpc.aio.Server) -> None:
    """Register ``servicer`` like the generated ``add_SplitInferenceServicer_to_server``, but with
    :func:`parse_infer_request` (and :func:`~.stream.parse_stream_request`) as the request deserializers."""
    handlers = {
        "Infer": grpc.unary_unary_rpc_method_handler(
            servicer.Infer, request_deserializer=parse_infer_request,
            response_serializer=pb.InferResponse.SerializeToString),
        "InferStream": grpc.stream_stream_rpc_method_handler(
            servicer.InferStream, request_deserializer=parse_stream_request,
            response_serializer=pb.StreamResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


class AsyncSplitInferServer:
    """The whole server inside one asyncio event loop.

    ``lookup``: a :class:`ModelRegistry` (or any ``get(name, sha)`` lookup). ``source``: where
    ``reload`` re-reads models from (None: reload only re-reads the token file).
    Use: ``await bind()`` (returns the port), ``await start()``, ``await stop(grace)``.
    """

    def __init__(self, lookup: ModelLookup, config: ServerConfig = ServerConfig(),
                 source: ModelSource | None = None) -> None:
        self.config = config
        self._source = source
        self._executor = ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="splitinfer-batch")
        self.metrics = ServerMetrics(batcher_stats=lambda: self.router.stats(), model_info=self._model_info)
        self.router = ModelRouter(lookup, config.batching, self._executor, self.metrics)
        tokens = config.tokens()
        self._auth = (BearerTokenInterceptor(tokens, on_refused=self.metrics.unauthenticated.inc)
                      if tokens else None)
        self.health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self.health_port: int | None = None
        self._metrics_http: MetricsHttpServer | None = None
        self._stopped = asyncio.Event()
        self.refusing = threading.Event()  # set once a stop has begun: new calls are refused from then on
        self._stop_task: asyncio.Future | None = None
        self._reload_lock = asyncio.Lock()
        self.port = 0
        self.address = ""
        self.metrics_url: str | None = None

    def _model_info(self) -> list[tuple[str, str, str]]:
        lookup = self.router.lookup
        if not isinstance(lookup, ModelRegistry):
            return []
        return [(m.name, m.version, m.manifest.sha256) for m in lookup]

    def _health_names(self) -> tuple[str, ...]:
        return tuple(getattr(self.router.lookup, "names", ()))

    async def bind(self) -> int:
        """Build the gRPC server and bind its port (OSError if it cannot, TlsFileError for a bad TLS
        file); returns the bound port."""
        c = self.config
        options = [
            ("grpc.max_receive_message_length", c.max_message_bytes),
            ("grpc.max_send_message_length", c.max_message_bytes),
            ("grpc.so_reuseport", 0),  # a port already in use is an error, not a silent share
        ]
        server = grpc.aio.server(options=options, maximum_concurrent_rpcs=c.max_concurrent_rpcs,
                                 interceptors=[self._auth] if self._auth is not None else None)
        add_servicer(SplitInferenceServicer(self.router, self.metrics, c.max_tokens_per_request), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if c.reflection:
            reflection.enable_server_reflection(
                (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                 reflection.SERVICE_NAME), server)
        credentials = c.tls.server_credentials() if c.tls is not None else None  # TlsFileError if unusable
        try:
            if credentials is None:
                bound = server.add_insecure_port(c.address())
            else:
                bound = server.add_secure_port(c.address(), credentials)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {c.address()}: {exc}") from exc
        if bound == 0:
            raise OSError(f"cannot listen on {c.address()}")
        if c.health_port is not None:  # plaintext health only: orchestrator probes cannot speak TLS
            health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, health_server)
            try:
                self.health_port = health_server.add_insecure_port(c.address(c.health_port))
            except RuntimeError as exc:
                raise OSError(f"cannot listen on {c.address(c.health_port)}: {exc}") from exc
            if self.health_port == 0:
                raise OSError(f"cannot listen on {c.address(c.health_port)}")
            self._health_server = health_server
        for service in ("", SERVICE_NAME, *self._health_names()):
            await self.health.set(service, _SERVING)
        self._server, self.port, self.address = server, bound, c.address(bound)
        return bound

    async def start(self) -> None:
        if self._server is None:
            await self.bind()
        if self.config.metrics_port is not None and self._metrics_http is None:
            self._metrics_http = MetricsHttpServer(self.metrics, self.config.metrics_host or self.config.host,
                                                   self.config.metrics_port)
            self.metrics_url = self._metrics_http.url
        await self._server.start()
        if self._health_server is not None:
            await self._health_server.start()
        logger.info("listening on %s", self.address, extra={
            "tls": "mutual" if self.config.tls and self.config.tls.mutual else bool(self.config.tls),
            "auth": self._auth is not None, "metrics": self.metrics_url or "off",
            "event_loop": _loop_name(asyncio.get_running_loop())})

    async def reload(self) -> bool:
        """Re-read the model source and the token file; keep serving the old set if anything fails.

        In-flight requests finish on the models they started on. Returns True when applied.
        """
        async with self._reload_lock:
            loop = asyncio.get_running_loop()
            try:
                lookup = self.router.lookup
                if self._source is not None:
                    previous = lookup if isinstance(lookup, ModelRegistry) else None
                    lookup = await loop.run_in_executor(None, self._source.load, previous)
                tokens = self.config.tokens() if self._auth is not None else ()
            except (ManifestError, ValueError, OSError) as exc:
                self.metrics.reloaded(ok=False)
                logger.error("reload failed, still serving the previous models: %s", exc)
                return False
            old_names = set(self._health_names())
            self.router.swap(lookup)
            if self._auth is not None:
                self._auth.set_tokens(tokens)
            new_names = set(self._health_names())
            for name in sorted(new_names):
                await self.health.set(name, _SERVING)
            for name in sorted(old_names - new_names):
                await self.health.set(name, _NOT_SERVING)
            self.metrics.reloaded(ok=True)
            served = ", ".join(f"{m.name}:{m.version}" for m in lookup) if isinstance(lookup, ModelRegistry) else "?"
            logger.info("reloaded: serving %s", served)
            return True

    async def stop(self, grace: float | None = None) -> None:
        """Graceful drain: health NOT_SERVING, refuse new calls, let in-flight ones finish within ``grace`` s.

        A second call while draining cuts the grace to ``grace`` (0 cancels what is left).
        """
        if self._stop_task is None:
            self._stop_task = asyncio.ensure_future(self._drain(grace))
        elif self._server is not None and not self._stop_task.done():
            await self._server.stop(grace or 0.0)
        await asyncio.shield(self._stop_task)

    async def _drain(self, grace: float | None) -> None:
        grace = self.config.grace_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        in_flight = self.router.in_flight
        if self._server is not None:
            grpc_stop = asyncio.ensure_future(self._server.stop(grace))
            await asyncio.sleep(0)  # its first step shuts the listener and refuses new calls
            self.refusing.set()
            await grpc_stop
        self.refusing.set()
        if self._health_server is not None:
            await self._health_server.stop(0)
        await self.router.close()
        self._executor.shutdown(wait=False)
        if self._metrics_http is not None:
            self._metrics_http.close()
        self._stopped.set()
        logger.info("stopped (drained %d in-flight requests, grace %.1f s)", in_flight, grace)

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


class SplitInferServer:
    """An :class:`AsyncSplitInferServer` on its own event loop thread, with a blocking API.

    ``start()``; ``stop(grace)`` returns a ``threading.Event`` set once stopped; ``reload()``.
    """

    def __init__(self, inner: AsyncSplitInferServer, loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
        self._inner = inner
        self._loop = loop
        self._thread = thread
        self._stopped = threading.Event()
        self._stopping = False
        self.port = inner.port
        self.address = inner.address

    @property
    def health(self) -> health.aio.HealthServicer:
        return self._inner.health

    @property
    def metrics(self) -> ServerMetrics:
        return self._inner.metrics

    @property
    def metrics_url(self) -> str | None:
        return self._inner.metrics_url

    @property
    def health_port(self) -> int | None:
        """The plaintext health-only port (``ServerConfig.health_port``), None without one."""
        return self._inner.health_port

    def _call(self, coro, timeout: float | None = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> None:
        self._call(self._inner.start())

    def reload(self) -> bool:
        return self._call(self._inner.reload(), timeout=None)

    def stop(self, grace: float | None = None) -> threading.Event:
        """Drain and stop (``grace`` s for in-flight calls); the returned event is set once stopped.

        Returns once new calls are refused. Called again while draining, it cuts the grace to the
        new ``grace``.
        """
        if not self._thread.is_alive():
            self._stopped.set()
            return self._stopped
        if self._stopping:
            asyncio.run_coroutine_threadsafe(self._inner.stop(grace), self._loop)
            return self._stopped
        self._stopping = True

        async def stop_then_exit() -> None:
            try:
                await self._inner.stop(grace)
            finally:
                self._loop.call_soon(self._loop.stop)

        asyncio.run_coroutine_threadsafe(stop_then_exit(), self._loop)
        threading.Thread(target=self._join_then_set, daemon=True).start()
        self._inner.refusing.wait(10.0)
        return self._stopped

    def _join_then_set(self) -> None:
        self._thread.join()
        self._stopped.set()

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Block until the server stops (True) or ``timeout`` seconds pass (False)."""
        return self._stopped.wait(timeout)


def create_server(registry: ModelLookup, config: ServerConfig | None = None, *, source: ModelSource | None = None,
                  **settings) -> tuple[SplitInferServer, int]:
    """Build (not start) a server for ``registry``, bound to its port; returns (server, bound port).

    ``settings`` override fields of ``config`` (default ``ServerConfig(port=0)``), e.g.
    ``create_server(registry, port=0, max_message_bytes=...)``. Health reports SERVING for "",
    for ``splitinfer.v1.SplitInference`` and for each model name. Raises ValueError on bad
    settings, OSError when the address cannot be bound.
    """
    config = replace(config or ServerConfig(port=0), **settings)
    loop = loop_factory(config.event_loop)()
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        loop.run_forever()
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()

    thread = threading.Thread(target=run, name="splitinfer-server-loop", daemon=True)
    thread.start()
    ready.wait()

    async def build() -> AsyncSplitInferServer:
        inner = AsyncSplitInferServer(registry, config, source)
        await inner.bind()
        return inner

    try:
        inner = asyncio.run_coroutine_threadsafe(build(), loop).result(30)
    except BaseException:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        raise
    return SplitInferServer(inner, loop, thread), inner.port


def serve(
    registry: ModelLookup,
    config: ServerConfig = ServerConfig(),
    on_listening: Callable[[AsyncSplitInferServer], None] | None = None,
    source: ModelSource | None = None,
) -> None:
    """Serve ``registry`` in this thread until SIGTERM or SIGINT, then drain (``config.grace_s``).

    SIGHUP reloads the models from ``source`` (and the token file) without dropping in-flight
    calls. A second stop signal stops at once. ``on_listening(server)`` is called once the server
    accepts calls. Signal handlers are installed only in the main thread.
    """
    loop = loop_factory(config.event_loop)()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(_serve(registry, config, on_listening, source))
    finally:
        try:
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


async def _serve(registry: ModelLookup, config: ServerConfig, on_listening, source: ModelSource | None) -> None:
    server = AsyncSplitInferServer(registry, config, source)
    await server.bind()
    loop = asyncio.get_running_loop()
    stop_signals: list[int] = []
    tasks: set[asyncio.Task] = set()

    def spawn(coro) -> None:
        task = loop.create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def on_stop(signum: int) -> None:
        stop_signals.append(signum)
        grace = config.grace_s if len(stop_signals) == 1 else 0.0
        logger.info("%s received: draining (grace %.1f s)", signal.Signals(signum).name, grace)
        spawn(server.stop(grace))

    def on_reload() -> None:
        logger.info("SIGHUP received: reloading models")
        spawn(server.reload())

    installed: list[int] = []
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_stop, signum)
            installed.append(signum)
        if hasattr(signal, "SIGHUP"):
            loop.add_signal_handler(signal.SIGHUP, on_reload)
            installed.append(signal.SIGHUP)
    else:
        logger.warning("serve() is not running in the main thread: no signal handlers installed")
    try:
        await server.start()
        if on_listening is not None:
            on_listening(server)
        await server.wait_stopped()
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
        await server.stop(0)
        for task in list(tasks):
            task.cancel()
    logger.info("exited")

