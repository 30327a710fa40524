"""``splitinfer-serve``: serve model folders and model repositories over gRPC until SIGTERM / SIGINT.

Once the server accepts calls it prints one line per served export, a metrics line when
``--metrics-port`` is given, and then exactly one line ``splitinfer-serve: listening on HOST:PORT``
to stdout (flushed), which scripts parse to learn the port when ``--port 0`` is given. SIGHUP
reloads the models (and the token file) without dropping in-flight calls. A bad model folder,
setting or TLS file exits 2 with a message on stderr; an address that cannot be bound exits 1.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from splitinfer.protos import DEFAULT_MAX_MESSAGE_BYTES, ManifestError

from .batcher import PADDING_MODES, BatchConfig
from .logs import LOG_FORMATS, configure_logging
from .registry import RuntimeConfig
from .repository import ModelSource
from .security import TlsConfig, TlsFileError, read_tokens
from .server import EVENT_LOOPS, AsyncSplitInferServer, ServerConfig, serve

__all__ = ["PROG", "TOKEN_ENV", "build_parser", "main"]

PROG = "splitinfer-serve"
TOKEN_ENV = "SPLITINFER_AUTH_TOKEN"
EXIT_OK, EXIT_CANNOT_LISTEN, EXIT_BAD_INPUT = 0, 1, 2
ENGINES = ("grpc", "ray")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Serve split-inference model folders over gRPC.")
    models = parser.add_argument_group("models")
    models.add_argument("--model", dest="models", action="append", default=[], type=Path, metavar="DIR",
                        help="exported model folder (manifest.json + server.onnx); repeat to serve several")
    models.add_argument("--model-repository", dest="repositories", action="append", default=[], type=Path,
                        metavar="DIR", help="folder of model folders (or of NAME/VERSION/ folders), "
                                            "re-scanned on SIGHUP; repeatable")
    models.add_argument("--threads", type=int, default=1,
                        help="ONNX Runtime intra-op threads per model, 0 = ORT default (default: %(default)s)")
    models.add_argument("--engine", choices=ENGINES, default="grpc",
                        help="grpc: this process's grpc.aio server; ray: a Ray Serve application behind Ray's "
                             "gRPC proxy (pip install 'splitinfer[ray]'; no TLS there) (default: %(default)s)")
    models.add_argument("--max-replicas", type=int, default=None,
                        help="--engine ray: autoscale between --instances and this many replicas")
    models.add_argument("--provider", default="cpu", metavar="cpu|cuda|tensorrt|NAME",
                        help="ONNX Runtime execution provider of the server halves; the server refuses to start "
                             "when ONNX Runtime does not have it or falls back from it (default: %(default)s)")
    listen = parser.add_argument_group("listening")
    listen.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    listen.add_argument("--port", type=int, default=50051, help="port; 0 picks a free one (default: %(default)s)")
    listen.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES,
                        help="limit on received and sent messages, in bytes (default: %(default)s)")
    listen.add_argument("--grace-s", type=float, default=5.0,
                        help="seconds in-flight calls may finish after SIGTERM/SIGINT (default: %(default)s)")
    listen.add_argument("--health-port", type=int, default=None,
                        help="also serve the gRPC health service alone, in plaintext, on this port (for "
                             "Kubernetes gRPC probes, which cannot speak TLS); 0 picks a free one")
    listen.add_argument("--no-reflection", action="store_true", help="do not offer gRPC server reflection")
    batching = parser.add_argument_group("batching and limits")
    batching.add_argument("--max-batch-size", type=int, default=16,
                          help="most requests per server-half run; 1 turns batching off (default: %(default)s)")
    batching.add_argument("--max-queue-delay-ms", type=float, default=0.0,
                          help="longest a request waits for its batch to fill once the model is free; "
                               "0 = run what is queued at once (default: %(default)s)")
    batching.add_argument("--max-queue", type=int, default=512,
                          help="requests waiting per model before RESOURCE_EXHAUSTED (default: %(default)s)")
    batching.add_argument("--instances", type=int, default=1,
                          help="batches of one model computed at the same time (default: %(default)s)")
    batching.add_argument("--workers", type=int, default=2,
                          help="threads running batches, shared by all models (default: %(default)s)")
    batching.add_argument("--event-loop", choices=EVENT_LOOPS, default="auto",
                          help="the server's event loop: uvloop takes less CPU per request; auto = uvloop when "
                               "installed, else asyncio's (default: %(default)s)")
    batching.add_argument("--padding", choices=PADDING_MODES, default="pad",
                          help="ragged requests: 'pad' into one batch, or 'bucket' by length (default: %(default)s)")
    batching.add_argument("--max-tokens-per-request", type=int, default=None,
                          help="most tokens one request may carry (default: the model's sequence length)")
    batching.add_argument("--max-concurrent-rpcs", type=int, default=None,
                          help="answer RESOURCE_EXHAUSTED beyond this many calls in flight (default: unbounded)")
    security = parser.add_argument_group("security")
    security.add_argument("--tls-cert", type=Path, metavar="PEM", help="server certificate chain; turns on TLS")
    security.add_argument("--tls-key", type=Path, metavar="PEM", help="server private key")
    security.add_argument("--tls-client-ca", type=Path, metavar="PEM",
                          help="CA that signs client certificates; turns on mutual TLS")
    security.add_argument("--auth-token-file", type=Path, metavar="FILE",
                          help=f"bearer tokens, one per line, re-read on SIGHUP (or set ${TOKEN_ENV})")
    ops = parser.add_argument_group("operations")
    ops.add_argument("--metrics-port", type=int, default=None,
                     help="serve Prometheus metrics at http://HOST:PORT/metrics; 0 picks a free port")
    ops.add_argument("--metrics-host", default=None, help="address of the metrics endpoint (default: --host)")
    ops.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                     help="log level for stderr (default: %(default)s)")
    ops.add_argument("--log-format", default="text", choices=LOG_FORMATS,
                     help="stderr log lines as text or one JSON object each (default: %(default)s)")
    return parser


def _config(args: argparse.Namespace) -> tuple[ServerConfig, ModelSource]:
    """ValueError on a bad combination or value."""
    if not args.models and not args.repositories:
        raise ValueError("give at least one --model DIR or --model-repository DIR")
    if args.max_replicas is not None:
        raise ValueError("--max-replicas is for --engine ray; the grpc engine scales with --instances and --workers")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    if args.tls_client_ca is not None and args.tls_cert is None:
        raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
    tls = TlsConfig(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert is not None else None
    env_token = os.environ.get(TOKEN_ENV, "").strip()
    batching = BatchConfig(max_batch_size=args.max_batch_size, max_queue_delay_ms=args.max_queue_delay_ms,
                           max_queue=args.max_queue, instances=args.instances, padding=args.padding)
    config = ServerConfig(
        host=args.host, port=args.port, max_workers=args.workers, max_message_bytes=args.max_message_bytes,
        max_concurrent_rpcs=args.max_concurrent_rpcs, grace_s=args.grace_s, batching=batching,
        max_tokens_per_request=args.max_tokens_per_request, tls=tls,
        auth_tokens=(env_token,) if env_token else (), auth_token_file=args.auth_token_file,
        metrics_host=args.metrics_host, metrics_port=args.metrics_port, reflection=not args.no_reflection,
        health_port=args.health_port, event_loop=args.event_loop,
    )
    config.tokens()  # a missing or empty token file is a usage error now, not at the first call
    runtime = RuntimeConfig(intra_op_threads=args.threads, provider=args.provider)
    runtime.ort_provider  # an unknown provider name is a usage error before any model loads
    source = ModelSource(args.models, args.repositories, runtime)
    return config, source


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help (0) and on usage errors (2)
        return int(exc.code or 0)
    configure_logging(args.log_level, args.log_format)
    if args.engine == "ray":
        return _main_ray(args)
    try:
        config, source = _config(args)
        registry = source.load()
    except (ManifestError, ValueError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT

    def announce(server: AsyncSplitInferServer) -> None:
        for model in registry:
            m = model.manifest
            print(f"{PROG}: model {m.name} version {m.version} ({len(m.classes)} classes, dim {m.dim}, "
                  f"sha256 {m.sha256[:12]}) from {m.folder}")
        if server.metrics_url:
            print(f"{PROG}: metrics on {server.metrics_url}")
        print(f"{PROG}: listening on {server.address}", flush=True)

    try:
        serve(registry, config, on_listening=announce, source=source)
    except TlsFileError as exc:  # a TLS file changed after it was checked
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_CANNOT_LISTEN
    return EXIT_OK


def _main_ray(args: argparse.Namespace) -> int:
    """``--engine ray``: the same options, served by a Ray Serve application (see cloud/ray_serve.py)."""
    try:
        from . import ray_serve
    except ImportError as exc:
        print(f"{PROG}: error: --engine ray needs Ray Serve: pip install 'splitinfer[ray]' ({exc})", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        if not args.models and not args.repositories:
            raise ValueError("give at least one --model DIR or --model-repository DIR")
        env_token = os.environ.get(TOKEN_ENV, "").strip()
        tokens = ((env_token,) if env_token else ()) + (read_tokens(args.auth_token_file) if args.auth_token_file else ())
        config = ray_serve.config_from_args(args, tokens)
        config.source().load()  # a bad model folder or provider is a usage error here, before Ray starts
    except (ManifestError, ValueError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT

    def announce(port: int) -> None:
        print(f"{PROG}: Ray Serve application {ray_serve.APP_NAME!r}, gRPC proxy on all interfaces", flush=True)
        print(f"{PROG}: listening on {args.host}:{port}", flush=True)

    try:
        ray_serve.serve_forever(config, args.port, on_listening=announce)
    except OSError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_CANNOT_LISTEN
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
