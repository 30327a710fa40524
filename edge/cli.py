"""``splitinfer-edge``: answer inputs on the device, offloading unconfident ones to a server.

    splitinfer-edge classify --model DIR [--server HOST:PORT[,HOST:PORT...]] [options] PATH...
    splitinfer-edge text     --model DIR [--server HOST:PORT | --local-server] [options] FILE...
    splitinfer-edge bench    --model DIR [--threads N] [--spin] [--n 200] [--refresh-energy]

classify: PATHs are image files (PNG, JPEG, WebP; gray or RGB, any size) or directories (every
.png/.jpg/.jpeg/.webp inside, sorted). text: one input per line of each FILE ("-" reads stdin).
One line per input on stdout (or one JSON object per line with --json), then a summary (on stderr
with --json). Exit codes: 0 every input answered, 1 some input could not be read, 2 bad arguments
or model folder, 3 (with --require-server) an offload failed because of a misconfiguration
(wrong token, another model version on the server, a TLS handshake failure), not an outage.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Callable, Iterable, Sequence, TextIO

import numpy as np

from splitinfer.protos import DEFAULT_MAX_MESSAGE_BYTES
from splitinfer.protos.errors import SplitInferError
from splitinfer.protos.manifest import load_manifest

from .audit import DEFAULT_ALPHA as DEFAULT_AUDIT_ALPHA
from .audit import DEFAULT_RATE as DEFAULT_AUDIT_RATE
from .audit import Audit, audit_for, offload_rate_summary
from .battery import BatteryBudget, BatteryLimit, battery_capacity
from .controller import BudgetController, Constraints
from .energy import DEVICE_PROFILES, LINK_PROFILES, EnergyModel, energy_label, load_energy_file, reference_energy
from .preprocess import IMAGE_SUFFIXES, image_paths
from .runner import DECIDED_ON, FAILURES, EdgeResult, EdgeRunner
from .session import DEVICE_HALVES, DeviceSession, SessionOptions
from .transport import GrpcTransport

__all__ = ["main", "build_parser", "classify_paths", "classify_texts", "expand_paths", "IMAGE_SUFFIXES"]

logger = logging.getLogger(__name__)

PROG = "splitinfer-edge"
EXIT_MISCONFIGURED = 3
AUDIT_COUNTS = ("audits", "disagreements", "alarms", "recoveries", "alarm")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path, help="model folder (manifest.json + device.onnx)")
    p.add_argument("--server", metavar="HOST:PORT", type=_target, action="append",
                   help="offload unconfident inputs to this server; repeat or comma-separate to spread calls over "
                        "several (round robin, UNAVAILABLE retried on another); without it every input is decided "
                        "on the device")
    p.add_argument("--local-server", action="store_true",
                   help="run the server half (server.onnx in the model folder) on this machine instead of a server")
    p.add_argument("--require-server", action="store_true",
                   help="exit 3 when an offload failed because of a misconfiguration (not an outage)")
    p.add_argument("--tls-ca", type=Path, metavar="PEM", help="CA that signs the server certificate; turns on TLS")
    p.add_argument("--tls-cert", type=Path, metavar="PEM", help="client certificate, for mutual TLS (with --tls-key)")
    p.add_argument("--tls-key", type=Path, metavar="PEM", help="client private key, for mutual TLS")
    p.add_argument("--tls-server-name", help="name the server certificate is checked against (default: the host)")
    p.add_argument("--auth-token-file", type=Path, metavar="FILE",
                   help="bearer token sent with every call (first line of FILE; or set $SPLITINFER_AUTH_TOKEN)")
    p.add_argument("--timeout-ms", type=_positive_float, default=1000.0,
                   help="deadline of each offload call (default 1000)")
    p.add_argument("--stream", action="store_true",
                   help="carry offloads over one InferStream call per server (less per-call cost; unary calls "
                        "against a server without it)")
    p.add_argument("--threads", type=_non_negative_int, default=1,
                   help="ONNX Runtime intra-op threads (default 1; 0 = one per core)")
    p.add_argument("--spin", action="store_true",
                   help="let ONNX Runtime threads spin-wait (lower latency, a busy core)")
    p.add_argument("--device-half", choices=DEVICE_HALVES, default="auto",
                   help="float, int8, or auto: the one the manifest measured faster on this CPU, else timed here "
                        "(default auto; float when the folder has no INT8 half)")
    p.add_argument("--threshold", type=_non_negative_float,
                   help="exit threshold (default: the manifest's; 0 = always device, above 1 = always offload)")
    p.add_argument("--budget", type=_positive_int, help="most tokens sent per request (default: the manifest's)")
    p.add_argument("--mass", type=_mass, help="share of importance the sent tokens cover (default: the manifest's)")
    budget = p.add_argument_group("budget (long-run means per request; picks an operating point per request)")
    budget.add_argument("--max-bytes", type=_positive_float, help="mean request bytes")
    budget.add_argument("--max-latency-ms", type=_positive_float, help="mean latency, ms")
    budget.add_argument("--max-energy-mj", type=_positive_float, help="mean energy, mJ (device + radio + server)")
    budget.add_argument("--min-accuracy", type=_mass,
                        help="least accuracy: only operating points whose guaranteed accuracy (the table's "
                             "lower confidence bound) reaches it are used")
    budget.add_argument("--max-battery-percent", type=_percent, metavar="P",
                        help="spend at most P%% of the battery over --horizon-h hours (an energy limit per request "
                             "at the request rate; capacity from /sys/class/power_supply, else the device profile)")
    budget.add_argument("--horizon-h", type=_positive_float, metavar="H", help="hours the battery share must last")
    budget.add_argument("--request-rate", type=_positive_float, metavar="R",
                        help="expected requests per second over the horizon (default: the observed rate)")
    audit = p.add_argument_group("field audit (needs a server)")
    audit.add_argument("--audit-rate", type=_probability, default=DEFAULT_AUDIT_RATE,
                       help=f"share of the inputs answered on the device also offloaded to compare answers: "
                            f"one in each block of 1/RATE, at a random place (default {DEFAULT_AUDIT_RATE}; 0 = off)")
    audit.add_argument("--audit-alpha", type=_open_probability, default=DEFAULT_AUDIT_ALPHA,
                       help=f"bound on the probability of a false drift alarm (default {DEFAULT_AUDIT_ALPHA})")
    audit.add_argument("--audit-disagreement", type=_open_probability, metavar="P0",
                       help="calibrated device/server disagreement rate (default: an upper bound from the manifest)")
    energy = p.add_argument_group("energy estimate")
    energy.add_argument("--device-profile", default="pi4", metavar="|".join(DEVICE_PROFILES) + "|FILE",
                        help="power profile of this device (default pi4)")
    energy.add_argument("--link", default="wifi", choices=LINK_PROFILES, help="network to the server (default wifi)")
    energy.add_argument("--energy-profile", type=Path, metavar="FILE",
                        help="JSON with device / link / server sections overriding the named profiles")
    energy.add_argument("--no-energy-label", action="store_true",
                        help="skip the energy label (it is measured once per model and device, then cached)")
    p.add_argument("--json", action="store_true", help="one JSON object per input on stdout; summary on stderr")
    p.add_argument("-v", "--verbose", action="store_true", help="log each degraded request and other details")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Answer inputs with the device half of a split model.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="command", required=True, metavar="{classify,text,bench}")
    c = sub.add_parser("classify", help="images (PNG, JPEG, WebP; files or directories)")
    _common(c)
    c.add_argument("paths", nargs="+", metavar="PATH", type=Path, help="image files or directories of images")
    t = sub.add_parser("text", help="texts, one per line of each file ('-' reads stdin)")
    _common(t)
    t.add_argument("files", nargs="+", metavar="FILE", help="text files, one input per line; - for stdin")
    from .bench import add_arguments

    b = sub.add_parser("bench", help="device-half latency per setting, and the energy reference")
    add_arguments(b)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        from .bench import run

        return run(args)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.stream and not args.server:
        print(f"{PROG}: error: --stream needs --server", file=sys.stderr)
        return 2
    if args.server and args.local_server:
        print(f"{PROG}: error: --server and --local-server exclude each other", file=sys.stderr)
        return 2
    transport = None
    try:
        try:
            manifest = load_manifest(args.model, need=("device", "server") if args.local_server else ("device",))
            kind = "image" if args.command == "classify" else "text"
            if manifest.input.kind != kind:
                other = "classify" if manifest.input.kind == "image" else "text"
                raise ValueError(f"{manifest.name} reads {manifest.input.kind}: use '{PROG} {other}'")
            if args.server:
                transport = GrpcTransport(args.server, timeout_s=args.timeout_ms / 1e3, streaming=args.stream,
                                          max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES, **_security(args))
            elif args.local_server:
                from .local import LocalTransport

                transport = LocalTransport(manifest)
            options = SessionOptions(intra_op_threads=args.threads, allow_spinning=args.spin)
            session = DeviceSession.from_manifest(manifest, options, device_half=args.device_half)
            logger.info("device half: %s (%s)", session.choice.half, session.choice.reason)
            energy = EnergyModel.named(args.device_profile, args.link)
            if args.energy_profile is not None:
                energy = load_energy_file(args.energy_profile, base=energy)
            battery = _battery(args, energy)
            controller = _controller(args, manifest, energy, battery)
            runner = EdgeRunner(session, transport, manifest, exit_threshold=args.threshold, mass=args.mass,
                                budget=args.budget, energy=energy, controller=controller,
                                audit=_audit(args, manifest, transport))
        except (SplitInferError, ValueError, OSError, ImportError) as exc:
            print(f"{PROG}: error: cannot use the model in {args.model}: {exc}", file=sys.stderr)
            return 2
        stats = _Stats(runner, label=not args.no_energy_label, battery=battery)
        if args.command == "classify":
            status = classify_paths(runner, args.paths, as_json=args.json, stats=stats)
        else:
            status = classify_texts(runner, args.files, as_json=args.json, stats=stats)
        if args.require_server and stats.failures["misconfiguration"]:
            print(f"{PROG}: error: {stats.failures['misconfiguration']} offload(s) failed because of a "
                  f"misconfiguration: {stats.first_error['misconfiguration']}", file=sys.stderr)
            return EXIT_MISCONFIGURED
        return status
    finally:
        if transport is not None:
            transport.close()


def classify_paths(runner: EdgeRunner, paths: Sequence[Path], as_json: bool = False,
                   stats: "_Stats | None" = None) -> int:
    """Classify every image, one line (or JSON object) each, then the summary; 1 if any input failed."""
    inputs = ((str(path), problem, (lambda path=path: runner.front_end.load(path)))
              for path, problem in expand_paths(paths))
    return _answer_all(runner, inputs, as_json, stats or _Stats(runner))


def classify_texts(runner: EdgeRunner, files: Sequence[str], as_json: bool = False,
                   stats: "_Stats | None" = None) -> int:
    """Answer every non-empty line of each file ("-": stdin), then the summary."""
    def inputs():
        for name in files:
            try:
                lines = sys.stdin.read().splitlines() if name == "-" else \
                    Path(name).read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                yield name, f"{name}: cannot read ({exc})", None
                continue
            for number, line in enumerate(lines, 1):
                if line.strip():
                    yield f"{name}:{number}", None, (lambda text=line.strip(): text)
    return _answer_all(runner, inputs(), as_json, stats or _Stats(runner))


def _answer_all(runner: EdgeRunner, inputs: Iterable[tuple[str, str | None, Callable | None]], as_json: bool,
                stats: "_Stats") -> int:
    for where, problem, load in inputs:
        if problem is not None:
            stats.failed += 1
            _emit_error(where, problem, as_json)
            continue
        try:
            raw = load()
            if stats.battery is not None:
                stats.battery.before_request(runner.controller)
            result = runner.run(raw)
            if stats.first_input is None:
                stats.first_input = raw
        except (SplitInferError, ValueError) as exc:
            stats.failed += 1
            _emit_error(where, str(exc), as_json)
            continue
        stats.add(result)
        _emit_result(where, result, as_json, runner.audit)
    stats.write(sys.stderr if as_json else sys.stdout)
    return 1 if stats.failed else 0


def expand_paths(paths: Sequence[Path]) -> list[tuple[Path, str | None]]:
    """Files as given; directories -> their image files (.png, .jpg, .jpeg, .webp), sorted.
    Each entry: (path, problem or None)."""
    return image_paths(paths)


def _emit_result(where: str, result: EdgeResult, as_json: bool, audit: Audit | None = None) -> None:
    if as_json:
        extra = {} if audit is None else {"audit": {k: audit.state()[k] for k in AUDIT_COUNTS}}
        print(json.dumps({"input": where, **result.to_dict(), **extra}), flush=True)
        return
    answer = (f"label={result.class_name}  confidence={result.confidence:.3f}" if result.embedding is None
              else f"embedding[{len(result.embedding)}]")
    line = (f"{where}  {answer}  decided_on={result.decided_on}  bytes={result.bytes_sent}  "
            f"latency_ms={result.latency_ms:.2f}")
    if result.audited:
        line += "  audited"
    if result.error:
        line += f"  failure={result.failure}  error={result.error}"
    print(line, flush=True)


def _emit_error(where: str, message: str, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"input": where, "error": message}), flush=True)
    else:
        print(f"{where}  error={message}", flush=True)


class _Stats:
    """Running totals for the end-of-run summary."""

    def __init__(self, runner: EdgeRunner, label: bool = True, battery: BatteryLimit | None = None) -> None:
        self.runner = runner
        self.label = label
        self.battery = battery
        self.failed = 0
        self.decided = {name: 0 for name in DECIDED_ON}
        self.failures = {name: 0 for name in FAILURES}
        self.first_error: dict[str, str] = {}
        self.request_bytes: list[int] = []
        self.latencies_ms: list[float] = []
        self.energies = []
        self.first_input = None

    def add(self, result: EdgeResult) -> None:
        self.decided[result.decided_on] += 1
        self.latencies_ms.append(result.latency_ms)
        if result.failure is not None:
            self.failures[result.failure] += 1
            self.first_error.setdefault(result.failure, result.error or "")
        if result.energy is not None:
            self.energies.append(result.energy)
        if result.decided_on != "device" or result.audited:
            self.request_bytes.append(result.bytes_sent)

    def write(self, out: TextIO) -> None:
        n = len(self.latencies_ms)
        head = f"summary: {n} answered" + (f", {self.failed} failed" if self.failed else "")
        print(head, file=out)
        if n == 0:
            return
        shares = ", ".join(f"{name} {count} ({100 * count / n:.1f}%)" for name, count in self.decided.items())
        print(f"  decided on: {shares}", file=out)
        if any(self.failures.values()):
            print("  offload failures: " + ", ".join(f"{k} {v}" for k, v in self.failures.items() if v), file=out)
            if self.failures["misconfiguration"]:
                print(f"  misconfiguration (retrying will not help): {self.first_error['misconfiguration']}", file=out)
            if self.failures["outage"]:
                print(f"  outage (answered on the device meanwhile): {self.first_error['outage']}", file=out)
        if self.request_bytes:
            print(f"  bytes: {np.mean(self.request_bytes):.0f} mean per request ({len(self.request_bytes)} requests), "
                  f"{sum(self.request_bytes) / n:.0f} mean per input", file=out)
        else:
            print("  bytes: 0 (no requests)", file=out)
        lat = np.asarray(self.latencies_ms)
        print(f"  latency: p50 {np.percentile(lat, 50):.2f} ms, p90 {np.percentile(lat, 90):.2f} ms, "
              f"max {lat.max():.2f} ms", file=out)
        self._write_audit(out)
        self._write_energy(out)

    def _write_audit(self, out: TextIO) -> None:
        audit = self.runner.audit
        if audit is None:
            return
        st = audit.state()
        state = f"DRIFT ({', '.join(st['drift_tests'])}): offloading every input" if st["alarm"] else "in calibration"
        label_free = offload_rate_summary(st)
        label_free = f", {label_free}" if label_free else ""
        print(f"  audit: {st['audits']} audits, {st['disagreements']} disagreements (calibrated rate "
              f"{st['calibrated_disagreement']:.4f}){label_free}, {st['alarms']} drift alarm(s), {st['recoveries']} "
              f"recovery(ies); now {state} (audit rate {st['rate']:g}, false alarms <= alpha {st['alpha']:g})",
              file=out)

    def _write_energy(self, out: TextIO) -> None:
        """Mean energy per request and its label against the whole model on this device."""
        runner = self.runner
        if not self.energies or runner.energy is None:
            return
        mean = {k: float(np.mean([getattr(e, k) for e in self.energies]))
                for k in ("device_mj", "radio_mj", "server_mj", "total_mj")}
        model = runner.energy
        print(f"  energy: {mean['total_mj']:.3f} mJ mean per request (device {mean['device_mj']:.3f}, "
              f"radio {mean['radio_mj']:.3f}, server {mean['server_mj']:.3f}; {self.energies[0].method}, "
              f"{model.device.name}, {model.link.name})", file=out)
        if self.battery is not None:
            b = self.battery.summary(mean["device_mj"] + mean["radio_mj"])
            print(f"  battery: {b['projected_battery_percent']:.3f}% of {b['battery_wh']:g} Wh projected over "
                  f"{b['horizon_h']:g} h at {b['requests_per_s']:.3g} requests/s (limit {b['max_battery_percent']:g}%, "
                  f"{b['limit_mj_per_request']:.3f} mJ per request; capacity from {b['battery_source']})", file=out)
        if not self.label or self.first_input is None or "server" not in runner.manifest.files:
            return
        try:
            inputs = runner.front_end(self.first_input)
            half = getattr(getattr(runner.session, "choice", None), "half", "float")
            ref, how = reference_energy(runner.manifest, runner.session.run, inputs, runner.meter, half=half)
        except (SplitInferError, ValueError, OSError) as exc:
            print(f"  energy label: not measured ({exc})", file=out)
            return
        n = len(self.energies)
        ratio = ref.ratio(n, sum(e.radio_mj for e in self.energies), sum(e.server_mj for e in self.energies), n)
        print(f"  energy label: {energy_label(ratio)} ({ratio:.2f} x the whole model on this device: "
              f"device half {ref.device_half_mj:.3f} mJ, whole model {ref.whole_model_mj:.3f} mJ, "
              f"median of {ref.repeats}, {how})", file=out)


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


def _controller(args: argparse.Namespace, manifest, energy: EnergyModel,
                battery: BatteryLimit | None = None) -> BudgetController | None:
    """A budget controller over the manifest's operating points when a limit is given, else None."""
    constraints = Constraints(max_bytes=args.max_bytes, max_latency_ms=args.max_latency_ms,
                              max_energy_mj=args.max_energy_mj, min_accuracy=args.min_accuracy,
                              max_device_energy_mj=None if battery is None else battery.limit_mj)
    if not constraints:
        return None
    return BudgetController.from_manifest(manifest, constraints, energy=energy)


def _battery(args: argparse.Namespace, energy: EnergyModel) -> BatteryLimit | None:
    """The battery budget of --max-battery-percent / --horizon-h, or None; ValueError when incomplete."""
    if args.max_battery_percent is None:
        if args.horizon_h is not None or args.request_rate is not None:
            raise ValueError("--horizon-h and --request-rate go with --max-battery-percent")
        return None
    if args.horizon_h is None:
        raise ValueError("--max-battery-percent needs --horizon-h (the hours that share must last)")
    budget = BatteryBudget(battery_capacity(energy.device), args.max_battery_percent, args.horizon_h)
    return BatteryLimit(budget, fixed_rate=args.request_rate)


def _audit(args: argparse.Namespace, manifest, transport) -> Audit | None:
    """The field audit, or None (no server, or :func:`~splitinfer.edge.audit.audit_for` says why not: logged)."""
    if transport is None:
        return None
    audit, why_not = audit_for(manifest, args.audit_rate, args.audit_alpha, args.audit_disagreement)
    if audit is None and args.audit_rate != 0:
        logger.warning("field audit off: %s", why_not)
    return audit


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


def _probability(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def _open_probability(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


def _percent(text: str) -> float:
    value = float(text)
    if not 0 < value <= 100:
        raise argparse.ArgumentTypeError(f"must be in (0, 100], got {text}")
    return value


def _mass(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


if __name__ == "__main__":
    sys.exit(main())
