"""``splitinfer.v1.SplitInference`` on Ray Serve: the same request handling, batched by ``@serve.batch``.

    splitinfer-serve --engine ray --model-repository /models --port 9000 [--instances 2 --max-replicas 8]
    # or, on a running Ray cluster:
    serve run splitinfer.cloud.ray_serve:app_builder model_repository=/models

Ray Serve's gRPC proxy carries the calls (``gRPCOptions(grpc_servicer_functions=[SERVICER_FUNCTION])``:
the RPC name ``Infer`` is the deployment method called). Each replica loads the model repository
with the same :class:`~.repository.ModelSource` and ONNX Runtime engine as ``splitinfer-serve``;
one call::

    Infer(request, grpc_context) -> bearer token from the call's metadata      (Unauthenticated)
                                 -> route_request: validate, find the export by name + sha256
                                 -> @serve.batch: concurrent calls of this replica, grouped by export,
                                    decoded, padded and run by decode_and_run on a worker thread
                                 -> build_response
    any SplitInferError -> its status code on grpc_context; anything else -> logged, INTERNAL

Ray's gRPC ingress has no TLS and listens on every interface: terminate TLS in front of it (see
docs/serving.md). Ray itself is imported only here, so the rest of the server never needs it.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ray import serve
from ray.serve.config import AutoscalingConfig, gRPCOptions

from splitinfer.protos import SplitInferError, Unauthenticated
from splitinfer.protos import splitinfer_pb2 as pb
from splitinfer.protos.errors import status_code_for, status_details

from .batcher import PADDING_MODES, decode_and_run
from .engine import RuntimeConfig
from .registry import LoadedModel
from .repository import ModelSource
from .security import BearerTokenInterceptor
from .service import MAX_REQUEST_ID_CHARS, build_response, route_request

__all__ = ["SERVICER_FUNCTION", "APP_NAME", "RayServeConfig", "SplitInferDeployment", "build_app", "app_builder",
           "grpc_options"]

logger = logging.getLogger(__name__)

SERVICER_FUNCTION = "splitinfer.protos.splitinfer_pb2_grpc.add_SplitInferenceServicer_to_server"
APP_NAME = "splitinfer"


@dataclass(frozen=True)
class RayServeConfig:
    """A Ray Serve application of the server halves.

    folders / repositories: what :class:`ModelSource` loads in every replica. runtime: ONNX Runtime
    threads and execution provider per replica. max_batch_size / batch_wait_timeout_s: the
    ``@serve.batch`` settings (0 s = take what is queued once the replica is free). padding: "pad"
    or "bucket". replicas: fixed replicas, or the autoscaling minimum when ``max_replicas`` is
    larger; target_ongoing_requests steers autoscaling. num_cpus: CPUs Ray reserves per replica.
    auth_tokens: accepted bearer tokens (none = no authentication).
    """

    folders: tuple[Path, ...] = ()
    repositories: tuple[Path, ...] = ()
    runtime: RuntimeConfig = RuntimeConfig()
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.0
    padding: str = "pad"
    max_tokens_per_request: int | None = None
    replicas: int = 1
    max_replicas: int | None = None
    target_ongoing_requests: float = 32.0
    num_cpus: float = 1.0
    auth_tokens: tuple[str, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "folders", tuple(Path(f) for f in self.folders))
        object.__setattr__(self, "repositories", tuple(Path(r) for r in self.repositories))
        object.__setattr__(self, "auth_tokens", tuple(self.auth_tokens))
        if not self.folders and not self.repositories:
            raise ValueError("give at least one model folder or model repository")
        if isinstance(self.max_batch_size, bool) or not isinstance(self.max_batch_size, int) or self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an integer >= 1, got {self.max_batch_size!r}")
        if not 0.0 <= self.batch_wait_timeout_s <= 10.0:
            raise ValueError(f"batch_wait_timeout_s must be in [0, 10], got {self.batch_wait_timeout_s}")
        if self.padding not in PADDING_MODES:
            raise ValueError(f"padding must be one of {PADDING_MODES}, got {self.padding!r}")
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if self.max_replicas is not None and self.max_replicas < self.replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) must be >= replicas ({self.replicas})")
        if not self.num_cpus > 0:
            raise ValueError(f"num_cpus must be > 0, got {self.num_cpus}")

    def source(self) -> ModelSource:
        return ModelSource(self.folders, self.repositories, self.runtime)

    def deployment_options(self) -> dict:
        """``Deployment.options(...)``: fixed replicas or an ``autoscaling_config``, and enough ongoing
        requests per replica for full batches to form."""
        options: dict = {"max_ongoing_requests": max(64, 4 * self.max_batch_size),
                         "ray_actor_options": {"num_cpus": self.num_cpus}}
        if self.max_replicas is not None and self.max_replicas > self.replicas:
            options["autoscaling_config"] = AutoscalingConfig(
                min_replicas=self.replicas, initial_replicas=self.replicas, max_replicas=self.max_replicas,
                target_ongoing_requests=self.target_ongoing_requests)
        else:
            options["num_replicas"] = self.replicas
        return options


def grpc_options(port: int, request_timeout_s: float | None = None) -> gRPCOptions:
    """The gRPC proxy options that serve ``splitinfer.v1.SplitInference`` on ``port``."""
    return gRPCOptions(port=port, grpc_servicer_functions=[SERVICER_FUNCTION], request_timeout_s=request_timeout_s)


@serve.deployment
class SplitInferDeployment:
    """One replica: the model registry, a worker thread for the server halves, ``@serve.batch`` over calls."""

    def __init__(self, config: RayServeConfig) -> None:
        self._config = config
        self._registry = config.source().load()
        self._auth = BearerTokenInterceptor(config.auth_tokens) if config.auth_tokens else None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="splitinfer-ray-batch")
        self._batch_sizes: list[int] = []
        self._run_batch.set_max_batch_size(config.max_batch_size)
        self._run_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        names = ", ".join(f"{m.name}:{m.version}" for m in self._registry)
        logger.info("replica serving %s (batch %d)", names, config.max_batch_size)

    async def Infer(self, request: pb.InferRequest, grpc_context) -> pb.InferResponse:  # noqa: N802 (the RPC name)
        """The ``Infer`` RPC; errors are set on ``grpc_context`` as their status codes."""
        received_at = time.perf_counter()
        try:
            if self._auth is not None and not self._auth.authorized(grpc_context.invocation_metadata()):
                raise Unauthenticated("missing or wrong bearer token: send the metadata 'authorization: Bearer <token>'")
            model = route_request(self._registry, request, self._config.max_tokens_per_request)
            outcome = await self._run_batch((model, request.packet))
            if isinstance(outcome, Exception):
                raise outcome
            probabilities, decode_ms, compute_ms = outcome
            return build_response(request, model, probabilities, decode_ms=decode_ms, compute_ms=compute_ms,
                                  received_at=received_at)
        except SplitInferError as exc:
            code, message = status_code_for(exc), status_details(exc)
        except Exception as exc:
            logger.exception("Infer model=%r request_id=%r: unexpected error", request.model[:64],
                             request.request_id[:MAX_REQUEST_ID_CHARS])
            code, message = status_code_for(exc), status_details(exc)
        grpc_context.set_code(code)
        grpc_context.set_details(message)
        return pb.InferResponse()

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def _run_batch(self, items: Sequence[tuple[LoadedModel, pb.TokenPacket]]) -> list:
        """B concurrent calls -> B outcomes: (probabilities (C,), decode ms, compute ms) or the error."""
        self._batch_sizes.append(len(items))
        groups: dict[tuple[str, str], list[int]] = {}
        for index, (model, _packet) in enumerate(items):
            groups.setdefault((model.name, model.manifest.sha256), []).append(index)
        loop = asyncio.get_running_loop()
        out: list = [None] * len(items)
        for indices in groups.values():
            model = items[indices[0]][0]
            try:
                outcomes, decode_ms, compute_ms = await loop.run_in_executor(
                    self._executor, decode_and_run, model, [items[i][1] for i in indices], self._config.padding)
            except SplitInferError as exc:
                outcomes, decode_ms, compute_ms = [exc] * len(indices), 0.0, 0.0
            share_ms = decode_ms / len(indices)
            for i, outcome in zip(indices, outcomes):
                out[i] = outcome if isinstance(outcome, Exception) else (outcome, share_ms, compute_ms)
        return out

    def batch_sizes(self) -> list[int]:
        """Sizes of the batches this replica ran, oldest first (for operators and tests)."""
        return list(self._batch_sizes)


def build_app(config: RayServeConfig):
    """The Ray Serve application (bind it with ``serve.run(build_app(config), name=APP_NAME)``)."""
    return SplitInferDeployment.options(**config.deployment_options()).bind(config)


def app_builder(args: dict):
    """For ``serve run splitinfer.cloud.ray_serve:app_builder key=value ...``.

    Keys: model (comma-separated folders), model_repository (comma-separated), threads, provider,
    max_batch_size, batch_wait_timeout_s, padding, replicas, max_replicas, auth_token_file.
    The gRPC proxy options go in the Serve config (``grpc_options``) or ``serve start --grpc-port``.
    """
    from .security import read_tokens

    def paths(key: str) -> tuple[Path, ...]:
        return tuple(Path(p) for p in str(args.get(key, "")).split(",") if p)

    config = RayServeConfig(
        folders=paths("model"), repositories=paths("model_repository"),
        runtime=RuntimeConfig(intra_op_threads=int(args.get("threads", 1)), provider=str(args.get("provider", "cpu"))),
        max_batch_size=int(args.get("max_batch_size", 16)),
        batch_wait_timeout_s=float(args.get("batch_wait_timeout_s", 0.0)),
        padding=str(args.get("padding", "pad")), replicas=int(args.get("replicas", 1)),
        max_replicas=int(args["max_replicas"]) if "max_replicas" in args else None,
        auth_tokens=read_tokens(args["auth_token_file"]) if "auth_token_file" in args else (),
    )
    return build_app(config)


# --- splitinfer-serve --engine ray ------------------------------------------------------------------

# splitinfer-serve options the Ray engine cannot honour; given anything but their default, they are refused
_GRPC_ENGINE_ONLY = {"tls_cert": "Ray's gRPC ingress has no TLS: terminate TLS in front of it (docs/serving.md)",
                     "tls_key": "Ray's gRPC ingress has no TLS: terminate TLS in front of it (docs/serving.md)",
                     "tls_client_ca": "Ray's gRPC ingress has no TLS: terminate TLS in front of it (docs/serving.md)",
                     "max_concurrent_rpcs": "use --max-replicas and Ray's own limits",
                     "health_port": "Ray's proxy serves its own health RPCs (/ray.serve.RayServeAPIService/Healthz)",
                     "metrics_port": "Ray exports its own metrics", "metrics_host": "Ray exports its own metrics",
                     "max_queue": "Ray Serve queues in its proxy", "workers": "each replica runs one batch at a time",
                     "no_reflection": "Ray's proxy decides reflection",
                     "event_loop": "Ray Serve runs its own event loops"}


def config_from_args(args, tokens: tuple[str, ...]) -> RayServeConfig:
    """The ``splitinfer-serve`` options -> RayServeConfig; ValueError on an option Ray cannot honour."""
    from .cli import build_parser

    defaults = build_parser().parse_args(["--model", "x"])
    for name, why in _GRPC_ENGINE_ONLY.items():
        if getattr(args, name) != getattr(defaults, name):
            raise ValueError(f"--{name.replace('_', '-')} is not available with --engine ray: {why}")
    if args.host not in ("127.0.0.1", "0.0.0.0", "::", "[::]"):
        raise ValueError("--engine ray: Ray's gRPC proxy listens on every interface; give --host 0.0.0.0 "
                         "(or leave the default) and restrict access in front of it")
    return RayServeConfig(
        folders=tuple(args.models), repositories=tuple(args.repositories),
        runtime=RuntimeConfig(intra_op_threads=args.threads, provider=args.provider),
        max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.max_queue_delay_ms / 1e3,
        padding=args.padding, max_tokens_per_request=args.max_tokens_per_request,
        replicas=args.instances, max_replicas=args.max_replicas, auth_tokens=tokens)


def serve_forever(config: RayServeConfig, port: int, on_listening=None) -> None:
    """Start (or join, with ``RAY_ADDRESS``) Ray, serve the application on ``port`` until SIGTERM/SIGINT, shut down."""
    import signal
    import socket
    import threading

    import ray

    if port == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        http_port = s.getsockname()[1]
    stop = threading.Event()
    ray.init(include_dashboard=False, log_to_driver=False)
    # after ray.init, which installs its own fatal-signal handlers: SIGTERM/SIGINT stop the app cleanly
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port}, grpc_options=grpc_options(port))
        serve.run(build_app(config), name=APP_NAME, blocking=False)
        if on_listening is not None:
            on_listening(port)
        while not stop.wait(0.5):
            pass
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
