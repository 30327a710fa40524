"""Load on the real server over loopback: dynamic batching on vs off, pruned vs all tokens, pad vs bucket.

    python benchmarks/server_load.py                      # 1, 8, 64 clients; about 2-3 minutes
    python benchmarks/server_load.py --clients 1,64 --rounds 2 --window-s 2

What it does: runs the device half on cluttered-MNIST test canvases and keeps the packets the edge
sends when it offloads (pruned tokens, the manifest's codec), and the same inputs with all tokens;
starts ``splitinfer-serve`` processes on 127.0.0.1 that differ only in the setting under test
(batching off = the same server with ``--max-batch-size 1``); then N closed-loop clients (each its
own connection, sending the next request when the last is answered, with a deadline) drive one
server at a time. Each round cuts its window into short slices that alternate between the two
settings (ABAB, then BABA next round), so bursts of load from elsewhere on the machine hit both
sides alike; the table shows medians over rounds and the median of the per-round ratios. Clients run in worker processes with grpc.aio and send
pre-serialized requests, so the load generator costs little of the CPU the server needs.

The batch-size histogram comes from the server's own Prometheus endpoint (scraped before and after
each window). Results go to ``benchmarks/results/server_load.json`` (``--out``). Only 127.0.0.1 is
ever targeted; the run's length is bounded by rounds x windows (``--max-total-s`` caps it).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
METHOD = "/splitinfer.v1.SplitInference/Infer"
LISTENING = re.compile(r"listening on (\S+)")
METRICS = re.compile(r"metrics on (\S+)")


# --- packets ----------------------------------------------------------------------------------------

def build_requests(model_dir: Path, n: int) -> tuple[list[bytes], list[bytes], dict]:
    """Serialized InferRequests for ``n`` test canvases: (pruned as the edge sends them, all tokens, stats)."""
    from splitinfer.edge.preprocess import preprocess
    from splitinfer.edge.runner import EdgeRunner
    from splitinfer.edge.session import DeviceSession
    from splitinfer.export.data import make_split
    from splitinfer.protos import encode_tokens, load_manifest
    from splitinfer.protos import splitinfer_pb2 as pb

    manifest = load_manifest(model_dir)
    session = DeviceSession.from_manifest(manifest)
    runner = EdgeRunner(session, None, manifest)
    images, _labels = make_split("test", n=n)
    pruned, full, pruned_tokens = [], [], []
    for i, image in enumerate(images):
        _exit, tokens, importance = session.run(preprocess(image, runner.spec))  # (1, N, d), (1, P)
        request = runner.build_request(tokens[0], importance[0], request_id=f"load-{i}")
        pruned.append(request.SerializeToString())
        pruned_tokens.append(request.packet.num_tokens)
        everything = pb.InferRequest(model=manifest.name, manifest_sha256=manifest.sha256, request_id=f"load-{i}",
                                     packet=encode_tokens(tokens[0], np.arange(tokens.shape[1]), runner.codec))
        full.append(everything.SerializeToString())
    stats = {
        "n_packets": n,
        "pruned_tokens_mean": float(np.mean(pruned_tokens)),
        "pruned_tokens_min": int(np.min(pruned_tokens)),
        "pruned_tokens_max": int(np.max(pruned_tokens)),
        "all_tokens": manifest.num_tokens,
        "pruned_bytes_mean": float(np.mean([len(r) for r in pruned])),
        "all_tokens_bytes_mean": float(np.mean([len(r) for r in full])),
        "codec": f"{runner.codec.encoding}+{runner.codec.compression}",
        "model": manifest.name,
    }
    return pruned, full, stats


# --- client worker processes ------------------------------------------------------------------------

class _Clients:
    """One worker process's clients: a channel (own connection) per (server, client index), kept open."""

    def __init__(self, requests_by_kind: dict[str, list[bytes]]) -> None:
        self.requests_by_kind = requests_by_kind
        self.calls: dict[tuple[str, int], object] = {}

    async def call_for(self, target: str, index: int):
        import grpc

        key = (target, index)
        if key not in self.calls:
            channel = grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
            await channel.channel_ready()
            self.calls[key] = channel.unary_unary(METHOD)  # bytes in, bytes out: pre-serialized requests
        return self.calls[key]

    async def drive(self, target: str, clients: int, offset: int, kind: str, window_s: float, warmup_s: float,
                    timeout_s: float) -> dict:
        """``clients`` closed loops for warmup + window seconds; latencies (s) and codes of the window."""
        import grpc

        requests = self.requests_by_kind[kind]
        calls = [await self.call_for(target, offset + i) for i in range(clients)]
        latencies: list[float] = []
        codes: dict[str, int] = {}
        start = time.perf_counter()
        measure_from, stop_at = start + warmup_s, start + warmup_s + window_s

        async def client(index: int) -> None:
            call, k = calls[index], (offset + index) * 7919 + int(start * 1000)
            while True:
                now = time.perf_counter()
                if now >= stop_at:
                    return
                request = requests[k % len(requests)]
                k += 1
                try:
                    await call(request, timeout=timeout_s)
                    code = "OK"
                except grpc.aio.AioRpcError as exc:
                    code = exc.code().name
                done = time.perf_counter()
                if now >= measure_from and done <= stop_at:
                    latencies.append(done - now)
                    codes[code] = codes.get(code, 0) + 1

        await asyncio.gather(*(client(i) for i in range(clients)))
        return {"latencies": latencies, "codes": codes}


def _worker(conn, requests_by_kind: dict[str, list[bytes]]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    loop = asyncio.new_event_loop()
    clients = _Clients(requests_by_kind)
    while True:
        job = conn.recv()
        if job is None:
            return
        conn.send(loop.run_until_complete(clients.drive(*job)))


class LoadGenerator:
    """Persistent client worker processes; ``run`` splits N clients over them for one window."""

    def __init__(self, requests_by_kind: dict[str, list[bytes]], processes: int) -> None:
        ctx = mp.get_context("spawn")
        self._pipes, self._procs = [], []
        for _ in range(processes):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child, requests_by_kind), daemon=True)
            proc.start()
            self._pipes.append(parent)
            self._procs.append(proc)

    def run(self, target: str, clients: int, kind: str, window_s: float, warmup_s: float,
            timeout_s: float) -> tuple[np.ndarray, dict[str, int]]:
        """One window: (latencies in ms, answers by status code)."""
        if not target.startswith(f"{HOST}:"):
            raise ValueError(f"the load generator only targets {HOST}, got {target}")
        used = min(clients, len(self._pipes))
        shares = [clients // used + (1 if i < clients % used else 0) for i in range(used)]
        offset = 0
        for pipe, share in zip(self._pipes, shares):
            pipe.send((target, share, offset, kind, window_s, warmup_s, timeout_s))
            offset += share
        results = [pipe.recv() for pipe in self._pipes[:used]]
        latencies = np.concatenate([np.asarray(r["latencies"]) for r in results]) * 1e3
        codes: dict[str, int] = {}
        for r in results:
            for code, count in r["codes"].items():
                codes[code] = codes.get(code, 0) + count
        return latencies, codes

    def close(self) -> None:
        for pipe in self._pipes:
            pipe.send(None)
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()


def _stats(latencies_ms: np.ndarray, codes: dict[str, int], seconds: float) -> dict:
    pct = lambda q: float(np.percentile(latencies_ms, q)) if len(latencies_ms) else float("nan")  # noqa: E731
    return {"requests_per_s": codes.get("OK", 0) / seconds, "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99),
            "codes": codes}


# --- servers ----------------------------------------------------------------------------------------

class ServerProcess:
    """``splitinfer-serve`` on 127.0.0.1 port 0 with a metrics endpoint."""

    def __init__(self, model_dir: Path, *extra: str) -> None:
        cmd = [sys.executable, "-m", "splitinfer.cloud.cli", "--model", str(model_dir), "--host", HOST,
               "--port", "0", "--metrics-port", "0", "--log-level", "WARNING", *extra]
        self.args = list(extra)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        self.metrics_url = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            if match := METRICS.search(line):
                self.metrics_url = match.group(1)
            if match := LISTENING.search(line):
                self.target = match.group(1)
                return
        self.proc.kill()
        raise RuntimeError(f"splitinfer-serve {' '.join(extra)} did not start")

    def batch_histogram(self) -> dict[str, float]:
        """Cumulative ``splitinfer_batch_size`` bucket counts {le: count} from /metrics."""
        text = urllib.request.urlopen(self.metrics_url, timeout=5).read().decode()
        out = {}
        for line in text.splitlines():
            if line.startswith("splitinfer_batch_size_bucket"):
                le = re.search(r'le="([^"]+)"', line).group(1)
                out[le] = out.get(le, 0.0) + float(line.rsplit(" ", 1)[1])
        return out

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _histogram_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    """Batches per size bucket (non-cumulative) between two scrapes."""
    les = sorted((k for k in after if k != "+Inf"), key=float) + ["+Inf"]
    out, previous = {}, 0.0
    for le in les:
        cumulative = after.get(le, 0.0) - before.get(le, 0.0)
        if cumulative - previous > 0:
            out[f"<={le}" if le != "+Inf" else ">max"] = int(round(cumulative - previous))
        previous = cumulative
    return out


# --- the run ----------------------------------------------------------------------------------------

def _median(values) -> float:
    return float(np.median(values)) if len(values) else float("nan")


def compare(gen: LoadGenerator, servers: dict[str, ServerProcess], kinds: dict[str, str], clients: int,
            rounds: int, args: argparse.Namespace, deadline: float) -> dict:
    """Two settings (name -> server, name -> request kind) at ``clients`` clients, side by side.

    Each round interleaves ``args.slices`` short windows per setting (ABAB..., then BABA... in the
    next round), so a burst of load from elsewhere on the machine hits both settings alike.
    """
    names = list(servers)
    per_round: dict[str, list[dict]] = {name: [] for name in names}
    slice_s = args.window_s / args.slices
    for r in range(rounds):
        if time.monotonic() > deadline:
            break
        before = {name: servers[name].batch_histogram() for name in names}
        latencies: dict[str, list[np.ndarray]] = {name: [] for name in names}
        codes: dict[str, dict[str, int]] = {name: {} for name in names}
        for k in range(args.slices):
            for name in (names if (r + k) % 2 == 0 else names[::-1]):
                lat, got = gen.run(servers[name].target, clients, kinds[name], slice_s, args.warmup_s,
                                   args.timeout_ms / 1e3)
                latencies[name].append(lat)
                for code, count in got.items():
                    codes[name][code] = codes[name].get(code, 0) + count
        for name in names:
            result = _stats(np.concatenate(latencies[name]), codes[name], args.window_s)
            result["batch_sizes"] = _histogram_delta(before[name], servers[name].batch_histogram())
            per_round[name].append(result)
    summary = {}
    for name in names:
        runs = per_round[name]
        total_codes: dict[str, int] = {}
        batches: dict[str, int] = {}
        for run in runs:
            for c, k in run["codes"].items():
                total_codes[c] = total_codes.get(c, 0) + k
            for b, k in run["batch_sizes"].items():
                batches[b] = batches.get(b, 0) + k
        summary[name] = {
            "requests_per_s": _median([x["requests_per_s"] for x in runs]),
            "p50_ms": _median([x["p50_ms"] for x in runs]),
            "p95_ms": _median([x["p95_ms"] for x in runs]),
            "p99_ms": _median([x["p99_ms"] for x in runs]),
            "codes": total_codes, "batch_sizes": batches, "rounds": runs,
        }
    a, b = names
    pairs = list(zip(per_round[a], per_round[b]))
    summary["ratio"] = {
        "requests_per_s": _median([x["requests_per_s"] / y["requests_per_s"] for x, y in pairs if y["requests_per_s"]]),
        "p50_ms": _median([x["p50_ms"] / y["p50_ms"] for x, y in pairs]),
        "p99_ms": _median([x["p99_ms"] / y["p99_ms"] for x, y in pairs]),
    }
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=ROOT / "artifacts" / "model",
                        help="exported model folder (made from the shipped checkpoint if missing)")
    parser.add_argument("--clients", default="1,8,64", help="comma-separated client counts (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="alternations per comparison (default: %(default)s)")
    parser.add_argument("--window-s", type=float, default=3.0,
                        help="measured seconds per setting per round (default: %(default)s)")
    parser.add_argument("--slices", type=int, default=6,
                        help="short alternating windows each round is cut into (default: %(default)s)")
    parser.add_argument("--warmup-s", type=float, default=0.1, help="unmeasured seconds before each slice")
    parser.add_argument("--timeout-ms", type=float, default=1000.0, help="deadline of each call")
    parser.add_argument("--max-batch-size", type=int, default=16, help="batching on: --max-batch-size of the server")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads of each server")
    parser.add_argument("--processes", type=int, default=2, help="client worker processes")
    parser.add_argument("--n-packets", type=int, default=400, help="test canvases turned into requests")
    parser.add_argument("--skip-padding", action="store_true", help="skip the pad-vs-bucket comparison")
    parser.add_argument("--max-total-s", type=float, default=300.0, help="stop starting new windows after this")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "server_load.json")
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.clients.split(",")]
    started = time.monotonic()
    deadline = started + args.max_total_s

    if not (args.model_dir / "manifest.json").is_file():
        from splitinfer.export.pipeline import export_checkpoint

        export_checkpoint(ROOT / "checkpoints" / "vit-cluttered-mnist.pt", args.model_dir)
    snapshot = Path(tempfile.mkdtemp(prefix="server_load_"))  # the folder cannot change under a running server
    model_dir = Path(shutil.copytree(args.model_dir, snapshot / "model"))
    pruned, full, packet_stats = build_requests(model_dir, args.n_packets)
    common = ("--threads", str(args.threads), "--max-queue", "4096")
    servers = {
        "batching_on": ServerProcess(model_dir, "--max-batch-size", str(args.max_batch_size), *common),
        "batching_off": ServerProcess(model_dir, "--max-batch-size", "1", *common),
    }
    if not args.skip_padding:
        servers["bucket"] = ServerProcess(model_dir, "--max-batch-size", str(args.max_batch_size),
                                          "--padding", "bucket", *common)
    gen = LoadGenerator({"pruned": pruned, "all_tokens": full}, args.processes)
    report: dict = {"packets": packet_stats, "settings": vars(args) | {"model_dir": str(args.model_dir),
                                                                        "out": str(args.out)},
                    "cpu_count": os.cpu_count(), "batching": {}, "tokens": None, "padding": None}
    try:
        for clients in levels:
            report["batching"][str(clients)] = compare(
                gen, {k: servers[k] for k in ("batching_on", "batching_off")},
                {"batching_on": "pruned", "batching_off": "pruned"}, clients, args.rounds, args, deadline)
        top = max(levels)
        on = servers["batching_on"]
        report["tokens"] = compare(gen, {"pruned": on, "all_tokens": on}, {"pruned": "pruned", "all_tokens": "all_tokens"},
                                   top, args.rounds, args, deadline)
        report["tokens"]["clients"] = top
        if not args.skip_padding:
            report["padding"] = compare(gen, {"pad": on, "bucket": servers["bucket"]},
                                        {"pad": "pruned", "bucket": "pruned"}, top, args.rounds, args, deadline)
            report["padding"]["clients"] = top
    finally:
        gen.close()
        for server in servers.values():
            server.stop()
        shutil.rmtree(snapshot, ignore_errors=True)
    report["total_s"] = time.monotonic() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_tables(report)
    print(f"\nwrote {args.out}")
    return 0


def print_tables(report: dict) -> None:
    p = report["packets"]
    print(f"\nserver load on {HOST}, {report['cpu_count']} cores; model {p['model']}; {p['n_packets']} test packets "
          f"({p['codec']}): pruned {p['pruned_tokens_mean']:.1f} tokens ({p['pruned_bytes_mean']:.0f} B) mean, "
          f"all {p['all_tokens']} tokens ({p['all_tokens_bytes_mean']:.0f} B)")
    print("medians over rounds; ratio = median of per-round on/off ratios\n")
    print(f"{'clients':>7} | {'on req/s':>9} {'off req/s':>9} {'ratio':>6} | {'on p50':>7} {'off p50':>7} | "
          f"{'on p99':>7} {'off p99':>7} {'p99 ratio':>9} | on batch sizes")
    for clients, s in report["batching"].items():
        on, off, ratio = s["batching_on"], s["batching_off"], s["ratio"]
        batches = " ".join(f"{k}:{v}" for k, v in on["batch_sizes"].items())
        print(f"{clients:>7} | {on['requests_per_s']:9.0f} {off['requests_per_s']:9.0f} {ratio['requests_per_s']:6.2f} | "
              f"{on['p50_ms']:7.2f} {off['p50_ms']:7.2f} | {on['p99_ms']:7.2f} {off['p99_ms']:7.2f} "
              f"{ratio['p99_ms']:9.2f} | {batches}")
    errors = {f"{c}/{side}": s[side]["codes"] for c, s in report["batching"].items() for side in ("batching_on", "batching_off")}
    print("codes: " + "; ".join(f"{k} {v}" for k, v in errors.items()))
    for section, (a, b) in (("tokens", ("pruned", "all_tokens")), ("padding", ("pad", "bucket"))):
        s = report.get(section)
        if not s:
            continue
        print(f"\n{section} at {s['clients']} clients (batching on) | req/s | p50 ms | p99 ms | codes")
        for name in (a, b):
            x = s[name]
            print(f"  {name:>10} | {x['requests_per_s']:7.0f} | {x['p50_ms']:6.2f} | {x['p99_ms']:6.2f} | {x['codes']}")
        print(f"  {a}/{b} ratio: req/s {s['ratio']['requests_per_s']:.2f}, p50 {s['ratio']['p50_ms']:.2f}, "
              f"p99 {s['ratio']['p99_ms']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
