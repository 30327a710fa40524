"""``splitinfer-edge``: classify PNG files on the device, offloading unconfident ones to a server.

    splitinfer-edge --model DIR [--server HOST:PORT[,HOST:PORT...]] [--timeout-ms 1000] [--threads 1] [--spin]
                    [--device-half auto|float|int8] [--threshold T] [--json] PATH...
                    [--max-bytes B] [--max-latency-ms MS] [--max-energy-mj MJ] [--min-accuracy A]
                    [--device-profile pi4|pi5|laptop|FILE] [--link wifi|lte|ethernet] [--energy-profile FILE]
    splitinfer-edge bench --model DIR [--threads N] [--spin] [--n 200]     (see splitinfer.edge.bench)

PATHs are image files or directories (every *.png inside, sorted). One line per input on stdout
(or one JSON object per line with --json), then a summary (on stderr with --json). Exit codes:
0 all inputs classified, 1 some input could not be read, 2 bad arguments or model folder.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence, TextIO

import numpy as np

from splitinfer.protos import DEFAULT_MAX_MESSAGE_BYTES
from splitinfer.protos.errors import SplitInferError
from splitinfer.protos.manifest import load_manifest

from .controller import BudgetController, Constraints, OperatingPoint, default_point
from .energy import DEVICE_PROFILES, LINK_PROFILES, EnergyModel, energy_label, full_model_mj
from .energy import load_energy_file
from .preprocess import load_image, preprocess
from .runner import DECIDED_ON, EdgeResult, EdgeRunner
from .session import DEVICE_HALVES, DeviceSession, SessionOptions
from .transport import GrpcTransport

__all__ = ["main", "build_parser", "classify_paths", "expand_paths"]

logger = logging.getLogger(__name__)

PROG = "splitinfer-edge"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Classify images with the device half of a split model.")
    p.add_argument("--model", required=True, type=Path, help="model folder (manifest.json + device.onnx)")
    p.add_argument("--server", metavar="HOST:PORT", type=_target, action="append",
                   help="offload unconfident inputs to this server; repeat or comma-separate to spread calls over "
                        "several (round robin, UNAVAILABLE retried on another); without it every input is decided "
                        "on the device")
    p.add_argument("--tls-ca", type=Path, metavar="PEM", help="CA that signs the server certificate; turns on TLS")
    p.add_argument("--tls-cert", type=Path, metavar="PEM", help="client certificate, for mutual TLS (with --tls-key)")
    p.add_argument("--tls-key", type=Path, metavar="PEM", help="client private key, for mutual TLS")
    p.add_argument("--tls-server-name", help="name the server certificate is checked against (default: the host)")
    p.add_argument("--auth-token-file", type=Path, metavar="FILE",
                   help="bearer token sent with every call (first line of FILE; or set $SPLITINFER_AUTH_TOKEN)")
    p.add_argument("--timeout-ms", type=_positive_float, default=1000.0,
                   help="deadline of each offload call (default 1000)")
    p.add_argument("--threads", type=_non_negative_int, default=1,
                   help="ONNX Runtime intra-op threads (default 1; 0 = one per core)")
    p.add_argument("--spin", action="store_true",
                   help="let ONNX Runtime threads spin-wait (lower latency, a busy core)")
    p.add_argument("--device-half", choices=DEVICE_HALVES, default="auto",
                   help="float, int8, or auto: the one the manifest measured faster on this CPU, else timed here "
                        "(default auto; float when the folder has no INT8 half)")
    p.add_argument("--threshold", type=_non_negative_float,
                   help="exit threshold (default: the manifest's; 0 = always device, above 1 = always offload)")
    p.add_argument("--budget", type=_positive_int, help="most patches sent per request (default: the manifest's)")
    p.add_argument("--mass", type=_mass, help="share of importance the sent patches cover (default: the manifest's)")
    budget = p.add_argument_group("budget (long-run means per request; picks an operating point per request)")
    budget.add_argument("--max-bytes", type=_positive_float, help="mean request bytes")
    budget.add_argument("--max-latency-ms", type=_positive_float, help="mean latency, ms")
    budget.add_argument("--max-energy-mj", type=_positive_float, help="mean energy, mJ (device + radio + server)")
    budget.add_argument("--min-accuracy", type=_mass, help="least expected accuracy (from the operating-point table)")
    energy = p.add_argument_group("energy estimate")
    energy.add_argument("--device-profile", default="pi4", metavar="|".join(DEVICE_PROFILES) + "|FILE",
                        help="power profile of this device (default pi4)")
    energy.add_argument("--link", default="wifi", choices=LINK_PROFILES, help="network to the server (default wifi)")
    energy.add_argument("--energy-profile", type=Path, metavar="FILE",
                        help="JSON with device / link / server sections overriding the named profiles")
    p.add_argument("--json", action="store_true", help="one JSON object per input on stdout; summary on stderr")
    p.add_argument("-v", "--verbose", action="store_true", help="log each degraded request and other details")
    p.add_argument("paths", nargs="+", metavar="PATH", type=Path, help="PNG files or directories of PNG files")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # a file named "bench" is still reachable as ./bench
        from .bench import main as bench_main

        return bench_main(argv[1:])
    if argv[:1] == ["text"]:  # text models: one input per line of each file
        from .text import main as text_main

        return text_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    transport = None
    if args.server:
        try:
            transport = GrpcTransport(args.server, timeout_s=args.timeout_ms / 1e3,
                                      max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES, **_security(args))
        except (ValueError, OSError) as exc:
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            return 2
    try:
        try:
            manifest = load_manifest(args.model, need=("device",))
            options = SessionOptions(intra_op_threads=args.threads, allow_spinning=args.spin)
            session = DeviceSession.from_manifest(manifest, options, device_half=args.device_half)
            logger.info("device half: %s (%s)", session.choice.half, session.choice.reason)
            energy = EnergyModel.named(args.device_profile, args.link)
            if args.energy_profile is not None:
                energy = load_energy_file(args.energy_profile, base=energy)
            controller = _controller(args, manifest, energy)
            runner = EdgeRunner(session, transport, manifest, exit_threshold=args.threshold, mass=args.mass,
                                budget=args.budget, energy=energy, controller=controller)
        except (SplitInferError, ValueError, OSError) as exc:
            print(f"{PROG}: error: cannot load model from {args.model}: {exc}", file=sys.stderr)
            return 2
        return classify_paths(runner, args.paths, as_json=args.json)
    finally:
        if transport is not None:
            transport.close()


def classify_paths(runner: EdgeRunner, paths: Sequence[Path], as_json: bool = False) -> int:
    """Classify every input, one line (or JSON object) each, then the summary; 1 if any input failed."""
    stats = _Stats()
    stats.runner = runner
    for path, problem in expand_paths(paths):
        if problem is not None:
            stats.failed += 1
            _emit_error(path, problem, as_json)
            continue
        try:
            image = load_image(path)
            result = runner.classify(image)
            if stats.first_image is None:
                stats.first_image = image
        except (SplitInferError, ValueError) as exc:
            stats.failed += 1
            _emit_error(path, str(exc), as_json)
            continue
        stats.add(result)
        _emit_result(path, result, as_json)
    stats.write(sys.stderr if as_json else sys.stdout)
    return 1 if stats.failed else 0


def expand_paths(paths: Sequence[Path]) -> list[tuple[Path, str | None]]:
    """Files as given; directories -> their *.png files, sorted. Each entry: (path, problem or None)."""
    out: list[tuple[Path, str | None]] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() == ".png" and p.is_file())
            if not found:
                out.append((path, f"{path}: no .png files in this directory"))
            out.extend((p, None) for p in found)
        elif path.exists():
            out.append((path, None))
        else:
            out.append((path, f"{path}: no such file or directory"))
    return out


def _emit_result(path: Path, result: EdgeResult, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"file": str(path), **result.to_dict()}), flush=True)
        return
    line = (f"{path}  label={result.class_name}  confidence={result.confidence:.3f}  "
            f"decided_on={result.decided_on}  bytes={result.bytes_sent}  latency_ms={result.latency_ms:.2f}")
    if result.error:
        line += f"  error={result.error}"
    print(line, flush=True)


def _emit_error(path: Path, message: str, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"file": str(path), "error": message}), flush=True)
    else:
        print(f"{path}  error={message}", flush=True)


class _Stats:
    """Running totals for the end-of-run summary."""

    def __init__(self) -> None:
        self.failed = 0
        self.decided = {name: 0 for name in DECIDED_ON}
        self.request_bytes: list[int] = []
        self.latencies_ms: list[float] = []
        self.energies = []
        self.runner: EdgeRunner | None = None
        self.first_image = None

    def add(self, result: EdgeResult) -> None:
        self.decided[result.decided_on] += 1
        self.latencies_ms.append(result.latency_ms)
        if result.energy is not None:
            self.energies.append(result.energy)
        if result.decided_on != "device":
            self.request_bytes.append(result.bytes_sent)

    def write(self, out: TextIO) -> None:
        n = len(self.latencies_ms)
        head = f"summary: {n} classified" + (f", {self.failed} failed" if self.failed else "")
        print(head, file=out)
        if n == 0:
            return
        shares = ", ".join(f"{name} {count} ({100 * count / n:.1f}%)" for name, count in self.decided.items())
        print(f"  decided on: {shares}", file=out)
        if self.request_bytes:
            print(f"  bytes: {np.mean(self.request_bytes):.0f} mean per request ({len(self.request_bytes)} requests), "
                  f"{sum(self.request_bytes) / n:.0f} mean per input", file=out)
        else:
            print("  bytes: 0 (no requests)", file=out)
        lat = np.asarray(self.latencies_ms)
        print(f"  latency: p50 {np.percentile(lat, 50):.2f} ms, p90 {np.percentile(lat, 90):.2f} ms, "
              f"max {lat.max():.2f} ms", file=out)
        self._write_energy(out)

    def _write_energy(self, out: TextIO) -> None:
        """Mean energy per request and its label against the whole model on this device."""
        if not self.energies or self.runner is None or self.runner.energy is None:
            return
        mean = {k: float(np.mean([getattr(e, k) for e in self.energies]))
                for k in ("device_mj", "radio_mj", "server_mj", "total_mj")}
        model = self.runner.energy
        line = (f"  energy: {mean['total_mj']:.3f} mJ mean per request (device {mean['device_mj']:.3f}, "
                f"radio {mean['radio_mj']:.3f}, server {mean['server_mj']:.3f}; {self.energies[0].method}, "
                f"{model.device.name}, {model.link.name})")
        if self.first_image is not None:
            x = preprocess(self.first_image, self.runner.manifest.preprocessing)
            reference, how = full_model_mj(self.runner.manifest, self.runner.session.run, x, self.runner.meter)
            if reference > 0:
                ratio = mean["total_mj"] / reference
                line += (f"\n  energy label: {energy_label(ratio)} ({ratio:.2f} x the whole model on this device, "
                         f"{reference:.3f} mJ, {how})")
        print(line, file=out)


def _security(args: argparse.Namespace) -> dict:
    """GrpcTransport keyword arguments for TLS and the bearer token; ValueError / OSError if unusable."""
    import os

    import grpc

    out: dict = {"tls_server_name": args.tls_server_name}
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    if args.tls_ca is not None or args.tls_cert is not None:
        read = lambda path: path.read_bytes() if path is not None else None  # noqa: E731
        out["credentials"] = grpc.ssl_channel_credentials(read(args.tls_ca), read(args.tls_key), read(args.tls_cert))
    token = os.environ.get("SPLITINFER_AUTH_TOKEN", "").strip()
    if args.auth_token_file is not None:
        lines = [line.strip() for line in args.auth_token_file.read_text().splitlines() if line.strip()]
        if not lines:
            raise ValueError(f"the token file {args.auth_token_file} is empty")
        token = lines[0]
    out["auth_token"] = token or None
    return out


def _controller(args: argparse.Namespace, manifest, energy: EnergyModel) -> BudgetController | None:
    """A budget controller over the manifest's operating points when a limit is given, else None."""
    constraints = Constraints(max_bytes=args.max_bytes, max_latency_ms=args.max_latency_ms,
                              max_energy_mj=args.max_energy_mj, min_accuracy=args.min_accuracy)
    if not constraints:
        return None
    points = OperatingPoint.from_manifest(manifest)
    return BudgetController(points, constraints, default=default_point(manifest, points), energy=energy)


def _target(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must be HOST:PORT, got an empty string")
    return text.strip()


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _mass(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


if __name__ == "__main__":
    sys.exit(main())
