"""``splitinfer-serve``: serve one or more model folders over gRPC until SIGTERM / SIGINT.

Once the server accepts calls it prints one line per model and then exactly one line
``splitinfer-serve: listening on HOST:PORT`` to stdout (flushed), which scripts parse to learn the
port when ``--port 0`` is given. A bad model folder or setting exits 2 with a message on stderr.
"""
from __future__ import annotations

import argparse
import logging
import sys

from splitinfer.protos import DEFAULT_MAX_MESSAGE_BYTES, ManifestError

from .registry import ModelRegistry, RuntimeConfig
from .server import ServerConfig, serve

__all__ = ["PROG", "build_parser", "main"]

PROG = "splitinfer-serve"
EXIT_OK, EXIT_CANNOT_LISTEN, EXIT_BAD_INPUT = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Serve split-inference model folders over gRPC.")
    parser.add_argument("--model", dest="models", action="append", required=True, metavar="DIR",
                        help="exported model folder (manifest.json + server.onnx); repeat to serve several")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=50051, help="port; 0 picks a free one (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="ONNX Runtime intra-op threads per model, 0 = ORT default (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=4, help="gRPC worker threads (default: %(default)s)")
    parser.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES,
                        help="limit on received and sent messages, in bytes (default: %(default)s)")
    parser.add_argument("--max-concurrent-rpcs", type=int, default=None,
                        help="answer RESOURCE_EXHAUSTED beyond this many calls in flight (default: unbounded)")
    parser.add_argument("--grace-s", type=float, default=5.0,
                        help="seconds in-flight calls may finish after SIGTERM/SIGINT (default: %(default)s)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="log level for stderr (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help (0) and on usage errors (2)
        return int(exc.code or 0)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = ServerConfig(host=args.host, port=args.port, max_workers=args.workers,
                              max_message_bytes=args.max_message_bytes,
                              max_concurrent_rpcs=args.max_concurrent_rpcs, grace_s=args.grace_s)
        registry = ModelRegistry.from_folders(args.models, RuntimeConfig(intra_op_threads=args.threads))
    except (ManifestError, ValueError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT

    def announce(address: str) -> None:
        for model in registry:
            m = model.manifest
            print(f"{PROG}: model {m.name} version {m.version} ({len(m.classes)} classes, dim {m.dim}, "
                  f"sha256 {m.sha256[:12]}) from {m.folder}")
        print(f"{PROG}: listening on {address}", flush=True)

    try:
        serve(registry, config, on_listening=announce)
    except OSError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_CANNOT_LISTEN
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
