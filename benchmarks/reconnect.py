"""How soon the edge offloads again after a server outage: gRPC's default reconnect backoff beside splitinfer's.

    .venv/bin/python benchmarks/reconnect.py [--model-dir artifacts/model] [--outage-s 30] [--outages 3]

``splitinfer-serve`` runs on 127.0.0.1; two edge transports send one request every ``--interval-ms``
to it side by side: ``GrpcTransport(max_reconnect_backoff_s=None)`` (gRPC's defaults: 1 s growing
x1.6 to 120 s) and ``GrpcTransport()`` (0.1 s growing to 1 s). Each outage SIGKILLs the server,
waits ``--outage-s`` and starts it again on the same port. Per transport and outage: seconds from
the server printing its listening line (it accepts connections from then on) to that transport's
first answered request. Prints medians and the ratio, writes ``benchmarks/results/reconnect.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LISTENING = re.compile(r"^splitinfer-serve: listening on (\S+):(\d+)$")


class Server:
    """``splitinfer-serve`` in a subprocess; ``start`` returns the moment it prints its listening line."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self.port = 0
        self.proc: subprocess.Popen | None = None

    def start(self) -> float:
        cmd = [sys.executable, "-m", "splitinfer.cloud.cli", "--model", str(self.model_dir), "--host", "127.0.0.1",
               "--port", str(self.port), "--log-level", "WARNING"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        for line in self.proc.stdout:
            if match := LISTENING.match(line.rstrip("\n")):
                self.port = int(match.group(2))
                return time.monotonic()
        raise RuntimeError("splitinfer-serve did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Sender(threading.Thread):
    """Sends ``request`` through ``transport`` every ``interval_s``; keeps the times of answered calls."""

    def __init__(self, transport, request, interval_s: float) -> None:
        super().__init__(daemon=True)
        self.transport, self.request, self.interval_s = transport, request, interval_s
        self.answered_at: list[float] = []
        self.failed = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.transport.infer(self.request)
                self.answered_at.append(time.monotonic())
            except Exception:  # the edge would answer degraded here
                self.failed += 1
            time.sleep(self.interval_s)

    def first_answer_after(self, moment: float) -> float | None:
        later = [t for t in self.answered_at if t > moment]
        return later[0] - moment if later else None


def build_request(model_dir: Path):
    from splitinfer.protos import CodecConfig, encode_tokens, load_manifest
    from splitinfer.protos import splitinfer_pb2 as pb

    manifest = load_manifest(model_dir, need=("server",))
    rng = np.random.default_rng(0)
    positions = np.arange(9, dtype=np.int64)  # CLS + 8 patches
    tokens = rng.standard_normal((len(positions), manifest.dim)).astype(np.float32)
    return pb.InferRequest(model=manifest.name, manifest_sha256=manifest.sha256, request_id="reconnect",
                           packet=encode_tokens(tokens, positions, CodecConfig("int8", "zstd")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=ROOT / "artifacts" / "model",
                        help="exported model folder (made from the shipped checkpoint if missing)")
    parser.add_argument("--outage-s", type=float, default=30.0,
                        help="seconds the server stays down (default: %(default)s)")
    parser.add_argument("--outages", type=int, default=3, help="outages measured (default: %(default)s)")
    parser.add_argument("--interval-ms", type=float, default=20.0, help="time between two requests of a transport")
    parser.add_argument("--timeout-s", type=float, default=0.5, help="deadline of each call")
    parser.add_argument("--give-up-s", type=float, default=180.0, help="longest wait for a transport to recover")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "reconnect.json")
    args = parser.parse_args(argv)

    from splitinfer.edge.transport import DEFAULT_MAX_RECONNECT_BACKOFF_S, GrpcTransport

    if not (args.model_dir / "manifest.json").is_file():
        from splitinfer.export.pipeline import export_checkpoint

        export_checkpoint(ROOT / "checkpoints" / "vit-cluttered-mnist.pt", args.model_dir)
    snapshot = Path(tempfile.mkdtemp(prefix="reconnect_"))
    model_dir = Path(shutil.copytree(args.model_dir, snapshot / "model"))
    request = build_request(model_dir)
    server = Server(model_dir)
    backoffs = {"grpc_default": None, "splitinfer": DEFAULT_MAX_RECONNECT_BACKOFF_S}
    resumed: dict[str, list[float | None]] = {name: [] for name in backoffs}
    senders: dict[str, Sender] = {}
    try:
        server.start()
        for name, backoff in backoffs.items():
            transport = GrpcTransport(f"127.0.0.1:{server.port}", timeout_s=args.timeout_s,
                                      max_reconnect_backoff_s=backoff)
            transport.infer(request)  # connected before the first outage
            senders[name] = Sender(transport, request, args.interval_ms / 1e3)
            senders[name].start()
        for outage in range(args.outages):
            time.sleep(2.0)
            server.kill()
            time.sleep(args.outage_s)
            back_at = server.start()
            give_up = back_at + args.give_up_s
            while time.monotonic() < give_up and any(s.first_answer_after(back_at) is None for s in senders.values()):
                time.sleep(0.05)
            for name, sender in senders.items():
                resumed[name].append(sender.first_answer_after(back_at))
            print(f"outage {outage + 1}/{args.outages} ({args.outage_s:.0f} s): resumed after "
                  + ", ".join(f"{n} {v[-1] if v[-1] is None else round(v[-1], 2)} s" for n, v in resumed.items()),
                  flush=True)
    finally:
        for sender in senders.values():
            sender.stopping.set()
        for sender in senders.values():
            sender.join(5)
            sender.transport.close()
        server.kill()
        shutil.rmtree(snapshot, ignore_errors=True)

    summary = {}
    for name, values in resumed.items():
        got = [v for v in values if v is not None]
        summary[name] = {"max_reconnect_backoff_s": backoffs[name], "resumed_s": values,
                         "median_s": statistics.median(got) if got else None, "max_s": max(got) if got else None,
                         "not_resumed": len(values) - len(got)}
    a, b = summary["grpc_default"]["median_s"], summary["splitinfer"]["median_s"]
    report = {"outage_s": args.outage_s, "outages": args.outages, "interval_ms": args.interval_ms,
              "timeout_s": args.timeout_s, "transports": summary,
              "median_ratio_default_over_splitinfer": a / b if a and b else None}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nresumed after a {args.outage_s:.0f} s outage, seconds from the server accepting connections "
          f"({args.outages} outages):")
    print(f"{'transport':<14} {'backoff max':>11} {'median':>8} {'max':>8}")
    for name, row in summary.items():
        backoff = "120 s" if row["max_reconnect_backoff_s"] is None else f"{row['max_reconnect_backoff_s']:g} s"
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        print(f"{name:<14} {backoff:>11} {fmt(row['median_s']):>8} {fmt(row['max_s']):>8}")
    if report["median_ratio_default_over_splitinfer"]:
        print(f"gRPC default / splitinfer (median): {report['median_ratio_default_over_splitinfer']:.1f}x")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
