"""Load on the real server over loopback: batching on vs off, InferStream vs unary calls, Ray Serve vs
splitinfer-serve, pruned vs all tokens, pad vs bucket, against the compute-only limit of server.onnx.

    python benchmarks/server_load.py                      # 1, 8, 64 clients; about 6 minutes
    python benchmarks/server_load.py --clients 1,64 --rounds 2 --window-s 2 --skip-ray

What it does: runs the device half on cluttered-MNIST test canvases and keeps the packets the edge
sends when it offloads (pruned tokens, the manifest's codec), and the same inputs with all tokens;
starts ``splitinfer-serve`` processes on 127.0.0.1 that differ only in the setting under test
(batching off = the same server with ``--max-batch-size 1``); then N closed-loop clients (each its
own connection, sending the next request when the last is answered, with a deadline) drive one
server at a time. Each round cuts its window into short slices that alternate between the two
settings (ABAB, then BABA next round), so bursts of load from elsewhere on the machine hit both
sides alike; the table shows medians over rounds and the median of the per-round ratios. Clients
run in worker processes with grpc.aio and send pre-serialized requests, so the load generator
costs little of the CPU the server needs. Streaming clients keep one InferStream each, open across
windows, in the same closed loop (write a request, read its answer). Ray Serve runs as
``splitinfer-serve --engine ray`` (one replica), compared with the unary splitinfer-serve last.

The compute-only limit is server.onnx alone in ONNX Runtime on the same packets (decoded and padded
up front), batch ``--max-batch-size``, ``--threads`` intra-op threads, in this process; it is sampled
between comparisons while the servers idle, and the median is reported (``compute_limit_rps``), so
it saw the same machine as the servers. ``modes`` in the JSON gives, per server mode and client
count, ``rps``, ``p50_ms``, ``p99_ms``, the share of the limit and the server's CPU per request
(from /proc; a figure less sensitive to other load on the machine than requests/s).

The load generator shares the server's two cores, so it is as lean as the project can make it:
unary clients are Python worker processes (grpc.aio, pre-serialized requests); InferStream clients
come from benchmarks/loadgen/loadgen.js (Node.js and grpc-js, about half the CPU per message of a
grpc.aio stream client; ``npm ci`` there is run once if its packages are missing) when node is
installed, else from the same Python workers (``--load-generator python`` forces that). Each mode's
generator is in the table and the JSON (``load_generator``).

``--instances N`` (default 2) also measures InferStream on a server computing N batches at once
(``splitinfer-serve --instances N``). Its own compute-only limit is N sessions of server.onnx side
by side (``compute_limit_rps_sessions``): ``of_compute_limit`` is against one session, as for every
mode, and ``of_own_compute_limit`` against the limit with the same parallelism.

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
STREAM_METHOD = "/splitinfer.v1.SplitInference/InferStream"
STREAM_SUFFIX = "_stream"  # a request kind whose bytes are StreamRequests, sent over InferStream
LISTENING = re.compile(r"listening on (\S+)")
METRICS = re.compile(r"metrics on (\S+)")


# --- packets ----------------------------------------------------------------------------------------

def build_requests(model_dir: Path, n: int) -> tuple[list[bytes], list[bytes], dict]:
    """Serialized InferRequests for ``n`` test canvases: (pruned as the edge sends them, all tokens, stats)."""
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
        tokens, importance = session.run(runner.front_end(image))[1:3]  # (1, N, d), (1, P)
        request = runner.build_request(tokens[0], importance[0], request_id=f"load-{i}")
        pruned.append(request.SerializeToString())
        pruned_tokens.append(request.packet.num_tokens)
        everything = pb.InferRequest(model=manifest.name, manifest_sha256=manifest.sha256, request_id=f"load-{i}",
                                     packet=encode_tokens(tokens[0], np.arange(tokens.shape[1]), runner.codec,
                                                          zstd_dictionary=runner.zstd_dictionary))
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
        self.channels: dict[tuple[str, int], object] = {}
        self.streams: dict[tuple[str, int], object] = {}  # InferStream calls, kept open across windows

    async def channel_for(self, target: str, index: int):
        import grpc

        key = (target, index)
        if key not in self.channels:
            channel = grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
            await channel.channel_ready()
            self.channels[key] = channel
        return self.channels[key]

    async def drive(self, target: str, clients: int, offset: int, kind: str, window_s: float, warmup_s: float,
                    timeout_s: float) -> dict:
        """``clients`` closed loops for warmup + window seconds; latencies (s) and codes of the window."""
        import grpc

        requests = self.requests_by_kind[kind]
        channels = [await self.channel_for(target, offset + i) for i in range(clients)]
        if kind.endswith(STREAM_SUFFIX):
            keys = [(target, offset + i) for i in range(clients)]
            return await self._drive_streams(keys, channels, requests, offset, window_s, warmup_s, timeout_s)
        calls = [channel.unary_unary(METHOD) for channel in channels]  # bytes in, bytes out: pre-serialized
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

    async def _drive_streams(self, keys, channels, requests: list[bytes], offset: int, window_s: float,
                             warmup_s: float, timeout_s: float) -> dict:
        """One InferStream per client, closed loop: write a request, read its answer, write the next.

        A client's stream stays open across windows, as a device's would. The deadline of each
        request travels in it (StreamRequest.timeout_ms) and the server enforces it (a late request
        is answered DEADLINE_EXCEEDED); an answer later than the deadline anyway is counted so. No
        timer per read (it would cost the load generator more CPU than the server spends on the
        message): the window as a whole is bounded instead, and a stream still waiting at its end
        is cancelled and reopened next window.
        """
        latencies: list[float] = []
        codes: dict[str, int] = {}
        start = time.perf_counter()
        measure_from, stop_at = start + warmup_s, start + warmup_s + window_s

        async def client(index: int) -> None:
            key = keys[index]
            if key not in self.streams:
                self.streams[key] = channels[index].stream_stream(STREAM_METHOD)()
            call = self.streams[key]
            k = (offset + index) * 7919 + int(start * 1000)
            while True:
                now = time.perf_counter()
                if now >= stop_at:
                    return
                try:
                    await call.write(requests[k % len(requests)])
                    code = _stream_answer_code(await call.read())
                except Exception as exc:  # a broken stream: reopen
                    code = type(exc).__name__
                    call.cancel()
                    call = self.streams[key] = channels[index].stream_stream(STREAM_METHOD)()
                k += 1
                done = time.perf_counter()
                if done - now > timeout_s and code == "OK":
                    code = "DEADLINE_EXCEEDED"
                if now >= measure_from and done <= stop_at:
                    latencies.append(done - now)
                    codes[code] = codes.get(code, 0) + 1

        tasks = {asyncio.ensure_future(client(i)): key for i, key in enumerate(keys)}
        _done, late = await asyncio.wait(tasks, timeout=warmup_s + window_s + timeout_s)
        for task in late:  # a stream the server never answered: cancel it, reopen it next window
            task.cancel()
            self.streams.pop(tasks[task]).cancel()
        if late:
            await asyncio.wait(late)
            codes["DEADLINE_EXCEEDED"] = codes.get("DEADLINE_EXCEEDED", 0) + len(late)
        return {"latencies": latencies, "codes": codes}


def _stream_answer_code(answer: bytes) -> str:
    """"OK" for a StreamResponse holding a response, else the name of its error code.

    Reads only the oneof's tag (field 1 request_id comes first, its length in one byte for short
    ids); an error answer is parsed whole.
    """
    if answer[:1] == b"\x0a" and answer[1] < 0x80 and answer[2 + answer[1]:3 + answer[1]] == b"\x12":
        return "OK"
    import grpc

    from splitinfer.protos import splitinfer_pb2 as pb

    parsed = pb.StreamResponse.FromString(answer)
    if parsed.HasField("response"):
        return "OK"
    return next((c.name for c in grpc.StatusCode if c.value[0] == parsed.error.code), str(parsed.error.code))


def _worker(conn, requests_by_kind: dict[str, list[bytes]]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    loop = asyncio.new_event_loop()
    clients = _Clients(requests_by_kind)
    while True:
        job = conn.recv()
        if job is None:
            return
        conn.send(loop.run_until_complete(clients.drive(*job)))


class NodeLoad:
    """benchmarks/loadgen/loadgen.js in one long-lived Node.js process: InferStream clients at about
    half the CPU per request of Python's grpc.aio (the load generator shares the server's cores)."""

    DIR = ROOT / "benchmarks" / "loadgen"

    @classmethod
    def available(cls) -> bool:
        """node on PATH and the generator's packages installed (``npm ci`` in benchmarks/loadgen, tried once)."""
        if shutil.which("node") is None:
            return False
        if not (cls.DIR / "node_modules" / "@grpc" / "grpc-js").is_dir() and shutil.which("npm"):
            subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--silent"], cwd=cls.DIR, timeout=300,
                           check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return (cls.DIR / "node_modules" / "@grpc" / "grpc-js").is_dir()

    def __init__(self, requests_by_kind: dict[str, list[bytes]]) -> None:
        self._folder = Path(tempfile.mkdtemp(prefix="server_load_requests_"))
        self._files = {}
        for kind, requests in requests_by_kind.items():
            path = self._folder / f"{kind}.bin"
            path.write_bytes(b"".join(len(r).to_bytes(4, "little") + r for r in requests))
            self._files[kind] = str(path)
        self.proc = subprocess.Popen(["node", str(self.DIR / "loadgen.js")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def run(self, target: str, clients: int, kind: str, window_s: float, warmup_s: float, timeout_s: float) -> dict:
        job = {"target": target, "kind": "stream" if kind.endswith(STREAM_SUFFIX) else "unary", "clients": clients,
               "offset": 0, "window_s": window_s, "warmup_s": warmup_s, "timeout_ms": timeout_s * 1e3,
               "requests": self._files[kind]}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        answer = json.loads(self.proc.stdout.readline() or '{"error": "the Node.js load generator exited"}')
        if "error" in answer:
            raise RuntimeError(f"loadgen.js: {answer['error']}")
        return answer

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self._folder, ignore_errors=True)


class LoadGenerator:
    """Persistent client worker processes; ``run`` splits N clients over them for one window.

    Unary calls come from Python worker processes (grpc.aio); InferStream clients from the Node.js
    generator when node is installed (``node=True``), else from the same Python workers.
    """

    def __init__(self, requests_by_kind: dict[str, list[bytes]], processes: int, node: bool = False) -> None:
        ctx = mp.get_context("spawn")
        self._pipes, self._procs = [], []
        for _ in range(processes):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child, requests_by_kind), daemon=True)
            proc.start()
            self._pipes.append(parent)
            self._procs.append(proc)
        streams = {k: v for k, v in requests_by_kind.items() if k.endswith(STREAM_SUFFIX)}
        self.node = NodeLoad(streams) if node and streams else None

    def generator_for(self, kind: str) -> str:
        return "node" if self.node is not None and kind.endswith(STREAM_SUFFIX) else "python"

    def run(self, target: str, clients: int, kind: str, window_s: float, warmup_s: float,
            timeout_s: float) -> tuple[np.ndarray, dict[str, int]]:
        """One window: (latencies in ms, answers by status code)."""
        if not target.startswith(f"{HOST}:"):
            raise ValueError(f"the load generator only targets {HOST}, got {target}")
        if self.generator_for(kind) == "node":
            result = self.node.run(target, clients, kind, window_s, warmup_s, timeout_s)
            return np.asarray(result["latencies"]) * 1e3, result["codes"]
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
        if self.node is not None:
            self.node.close()
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


def as_stream_requests(requests: list[bytes], timeout_ms: int) -> list[bytes]:
    """Serialized InferRequests -> serialized StreamRequests carrying them, each with ``timeout_ms``."""
    from splitinfer.protos import splitinfer_pb2 as pb

    return [pb.StreamRequest(request=pb.InferRequest.FromString(r), timeout_ms=timeout_ms).SerializeToString()
            for r in requests]


# --- the compute-only limit ---------------------------------------------------------------------------

class ComputeLimit:
    """Requests/s of server.onnx alone on the same packets, ``batch`` at a time, ``threads`` intra-op threads.

    The packets are decoded and padded once, up front; the timed loop is ONNX Runtime's ``run`` on
    the server's session options, nothing else (``decode_and_run`` adds the decoding, padding and
    softmax a batcher worker does, for reference). ``sample`` measures for ``seconds``; the run calls
    it between comparisons (servers idle), so the limit sees the same machine as the servers did,
    and reports the median of the samples.
    """

    def __init__(self, model_dir: Path, requests: list[bytes], threads: int, batch: int, sessions: int = 1) -> None:
        from splitinfer.cloud import load_model
        from splitinfer.cloud.batcher import pad_tokens
        from splitinfer.cloud.engine import RuntimeConfig
        from splitinfer.protos import decode_tokens
        from splitinfer.protos import splitinfer_pb2 as pb

        self.model = load_model(model_dir, RuntimeConfig(intra_op_threads=threads))
        # a server with --instances N runs N batches at once: its limit is N sessions side by side
        self.parallel = [load_model(model_dir, RuntimeConfig(intra_op_threads=threads)) for _ in range(sessions)]
        self.parallel_samples: list[float] = []
        packets = [pb.InferRequest.FromString(r).packet for r in requests]
        rows = [decode_tokens(p, self.model.packet_limits)[0] for p in packets]  # (K_i, d) float32
        self.batches = [pad_tokens(rows[i:i + batch]) for i in range(0, len(rows) - batch + 1, batch)]
        self.packet_batches = [packets[i:i + batch] for i in range(0, len(packets) - batch + 1, batch)]
        self.batch, self.threads = batch, threads
        self.samples: list[float] = []
        self.decode_samples: list[float] = []

    def _rate(self, step, seconds: float) -> float:
        for k in range(5):  # warm-up
            step(k)
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            step(done)
            done += 1
        return done * self.batch / (time.perf_counter() - started)

    def sample(self, seconds: float) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from splitinfer.cloud.batcher import decode_and_run

        self.samples.append(self._rate(lambda k: self.model.run(*self.batches[k % len(self.batches)]), seconds))
        if len(self.parallel) > 1:  # ONNX Runtime releases the GIL: N threads compute side by side
            with ThreadPoolExecutor(len(self.parallel)) as pool:
                rates = pool.map(lambda m: self._rate(lambda k: m.run(*self.batches[k % len(self.batches)]), seconds),
                                 self.parallel)
                self.parallel_samples.append(sum(rates))
        self.decode_samples.append(self._rate(
            lambda k: decode_and_run(self.model, self.packet_batches[k % len(self.packet_batches)]), seconds / 2))

    def report(self) -> dict:
        return {"compute_limit_rps": _median(self.samples), "decode_and_run_rps": _median(self.decode_samples),
                "compute_limit_samples": self.samples, "batch": self.batch, "threads": self.threads,
                "compute_limit_rps_sessions": {"1": _median(self.samples),
                                               **({str(len(self.parallel)): _median(self.parallel_samples)}
                                                  if self.parallel_samples else {})}}


# --- servers ----------------------------------------------------------------------------------------

class ServerProcess:
    """``splitinfer-serve`` on 127.0.0.1 port 0, with a metrics endpoint unless ``metrics`` is False."""

    def __init__(self, model_dir: Path, *extra: str, metrics: bool = True) -> None:
        cmd = [sys.executable, "-m", "splitinfer.cloud.cli", "--model", str(model_dir), "--host", HOST,
               "--port", "0", "--log-level", "WARNING", *(("--metrics-port", "0") if metrics else ()), *extra]
        self.args = list(extra)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        self.metrics_url = None
        deadline = time.monotonic() + 120
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

    def cpu_seconds(self) -> float:
        """CPU seconds the server process has used (user + system, from /proc; NaN where there is none).

        Ray Serve's work happens in other processes (its proxy and replicas): NaN there.
        """
        if "--engine" in self.args:
            return float("nan")
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def batch_histogram(self) -> dict[str, float]:
        """Cumulative ``splitinfer_batch_size`` bucket counts {le: count} from /metrics ({} without one)."""
        if self.metrics_url is None:
            return {}
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
            self.proc.wait(timeout=60)  # Ray Serve takes a few seconds to shut its processes down
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
        cpu: dict[str, float] = {name: 0.0 for name in names}
        for k in range(args.slices):
            for name in (names if (r + k) % 2 == 0 else names[::-1]):
                cpu_before = servers[name].cpu_seconds()
                lat, got = gen.run(servers[name].target, clients, kinds[name], slice_s, args.warmup_s,
                                   args.timeout_ms / 1e3)
                # the server's CPU over warm-up + window, scaled to the measured window
                cpu[name] += (servers[name].cpu_seconds() - cpu_before) * slice_s / (slice_s + args.warmup_s)
                latencies[name].append(lat)
                for code, count in got.items():
                    codes[name][code] = codes[name].get(code, 0) + count
        for name in names:
            result = _stats(np.concatenate(latencies[name]), codes[name], args.window_s)
            result["batch_sizes"] = _histogram_delta(before[name], servers[name].batch_histogram())
            ok = codes[name].get("OK", 0)
            result["server_cpu_us_per_request"] = 1e6 * cpu[name] / ok if ok and cpu[name] > 0 else float("nan")
            result["load_generator"] = gen.generator_for(kinds[name])
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
            "server_cpu_us_per_request": _median([x["server_cpu_us_per_request"] for x in runs]),
            "codes": total_codes, "batch_sizes": batches, "rounds": runs,
            "load_generator": gen.generator_for(kinds[name]),
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
    parser.add_argument("--skip-ray", action="store_true", help="skip Ray Serve (needs splitinfer[ray])")
    parser.add_argument("--instances", type=int, default=2,
                        help="--instances of the server InferStream is also measured on (default: %(default)s; "
                             "1 skips that comparison)")
    parser.add_argument("--load-generator", choices=("auto", "python"), default="auto",
                        help="auto: InferStream clients from benchmarks/loadgen (Node.js) when node is installed, "
                             "unary clients from Python; python: every client from Python (default: %(default)s)")
    parser.add_argument("--limit-s", type=float, default=1.0,
                        help="seconds of each compute-only sample (taken between comparisons)")
    parser.add_argument("--max-total-s", type=float, default=900.0, help="stop starting new windows after this")
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
    streamed = as_stream_requests(pruned, round(args.timeout_ms))
    limit = ComputeLimit(model_dir, pruned, args.threads, args.max_batch_size, sessions=args.instances)
    limit.sample(args.limit_s)
    common = ("--threads", str(args.threads), "--max-queue", "4096")
    servers = {
        "batching_on": ServerProcess(model_dir, "--max-batch-size", str(args.max_batch_size), *common),
        "batching_off": ServerProcess(model_dir, "--max-batch-size", "1", *common),
    }
    if not args.skip_padding:
        servers["bucket"] = ServerProcess(model_dir, "--max-batch-size", str(args.max_batch_size),
                                          "--padding", "bucket", *common)
    if args.instances > 1:
        servers["instances"] = ServerProcess(model_dir, "--max-batch-size", str(args.max_batch_size),
                                             "--instances", str(args.instances), *common)
    gen = LoadGenerator({"pruned": pruned, "all_tokens": full, "pruned" + STREAM_SUFFIX: streamed}, args.processes,
                        node=args.load_generator == "auto" and NodeLoad.available())
    report: dict = {"packets": packet_stats, "settings": vars(args) | {"model_dir": str(args.model_dir),
                                                                        "out": str(args.out)},
                    "cpu_count": os.cpu_count(), "load_average_at_start": os.getloadavg(), "batching": {}, "streaming": {}, "ray": {},
                    "instances": {}, "tokens": None, "padding": None}
    on = servers["batching_on"]
    ray_server = None
    try:
        for clients in levels:
            report["batching"][str(clients)] = compare(
                gen, {k: servers[k] for k in ("batching_on", "batching_off")},
                {"batching_on": "pruned", "batching_off": "pruned"}, clients, args.rounds, args, deadline)
            limit.sample(args.limit_s)
            report["streaming"][str(clients)] = compare(
                gen, {"stream": on, "unary": on}, {"stream": "pruned" + STREAM_SUFFIX, "unary": "pruned"},
                clients, args.rounds, args, deadline)
            limit.sample(args.limit_s)
            if "instances" in servers:
                report["instances"][str(clients)] = compare(
                    gen, {"stream_instances": servers["instances"], "stream": on},
                    {"stream_instances": "pruned" + STREAM_SUFFIX, "stream": "pruned" + STREAM_SUFFIX},
                    clients, args.rounds, args, deadline)
                limit.sample(args.limit_s)
        top = max(levels)
        report["tokens"] = compare(gen, {"pruned": on, "all_tokens": on}, {"pruned": "pruned", "all_tokens": "all_tokens"},
                                   top, args.rounds, args, deadline)
        report["tokens"]["clients"] = top
        if not args.skip_padding:
            report["padding"] = compare(gen, {"pad": on, "bucket": servers["bucket"]},
                                        {"pad": "pruned", "bucket": "pruned"}, top, args.rounds, args, deadline)
            report["padding"]["clients"] = top
        if not args.skip_ray:  # last: Ray's own processes keep a little CPU busy while they run
            ray_server = ServerProcess(model_dir, "--engine", "ray", "--max-batch-size", str(args.max_batch_size),
                                       "--threads", str(args.threads), metrics=False)
            for clients in levels:
                report["ray"][str(clients)] = compare(gen, {"ray_serve": ray_server, "unary": on},
                                                      {"ray_serve": "pruned", "unary": "pruned"}, clients,
                                                      args.rounds, args, deadline)
    finally:
        gen.close()
        for server in [*servers.values(), *([ray_server] if ray_server else [])]:
            server.stop()
        shutil.rmtree(snapshot, ignore_errors=True)
    report.update(limit.report())
    report["load_average_at_end"] = os.getloadavg()  # other work on the machine during the run
    report["modes"] = _modes(report)
    report["total_s"] = time.monotonic() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_tables(report)
    print(f"\nwrote {args.out}")
    return 0


def _modes(report: dict) -> dict:
    """{mode: {clients: {rps, p50_ms, p99_ms}}}: each server mode at each client count, and its share of
    the compute-only limit. batching_off comes from its comparison with batching on, unary_batching and
    stream from theirs (side by side), Ray Serve from its own side-by-side comparison with unary."""
    instances = report["settings"]["instances"]
    sources = {"batching_off": ("batching", "batching_off", 1), "unary_batching": ("streaming", "unary", 1),
               "stream": ("streaming", "stream", 1), f"stream_{instances}_instances": ("instances", "stream_instances", instances),
               "ray_serve": ("ray", "ray_serve", 1)}
    limits = report["compute_limit_rps_sessions"]
    modes: dict = {}
    for mode, (section, name, sessions) in sources.items():
        for clients, s in (report.get(section) or {}).items():
            if name not in s:
                continue
            x = s[name]
            modes.setdefault(mode, {})[clients] = {
                "rps": x["requests_per_s"], "p50_ms": x["p50_ms"], "p99_ms": x["p99_ms"],
                "server_cpu_us_per_request": x["server_cpu_us_per_request"],
                "load_generator": x.get("load_generator", "python"),
                # against one session (the figure the other modes use) and against as many sessions
                # side by side as the server computes batches at once (its own limit)
                "of_compute_limit": x["requests_per_s"] / report["compute_limit_rps"],
                "of_own_compute_limit": x["requests_per_s"] / limits.get(str(sessions), float("nan"))}
    return modes


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
    sessions = ", ".join(f"{n} session(s) side by side {v:.0f}" for n, v in report["compute_limit_rps_sessions"].items())
    print(f"\ncompute-only limit of server.onnx: {report['compute_limit_rps']:.0f} req/s (batch {report['batch']}, "
          f"{report['threads']} thread(s), the same packets; with decode+pad+softmax {report['decode_and_run_rps']:.0f}); "
          f"{sessions}")
    print("x limit: against one session; x own: against as many sessions as the mode computes batches at once")
    print(f"{'mode':>18} | " + " | ".join(f"{c:>6} clients: req/s   p50   p99 x limit  x own" for c in report["batching"]))
    for mode, by_clients in report["modes"].items():
        cells = []
        for clients in report["batching"]:
            x = by_clients.get(clients)
            cells.append(f"{x['rps']:20.0f} {x['p50_ms']:5.1f} {x['p99_ms']:5.1f} {x['of_compute_limit']:7.2f} "
                         f"{x['of_own_compute_limit']:6.2f}" if x else f"{'-':>20} {'':5} {'':5} {'':7} {'':6}")
        generators = sorted({x["load_generator"] for x in by_clients.values()})
        print(f"{mode:>18} | " + " | ".join(cells) + f"   (clients: {', '.join(generators)})")
    for section, (a, b) in (("streaming", ("stream", "unary")), ("instances", ("stream_instances", "stream")),
                            ("ray", ("ray_serve", "unary"))):
        for clients, s in (report.get(section) or {}).items():
            r = s["ratio"]
            print(f"  {section} {clients:>3} clients: {a}/{b} req/s {r['requests_per_s']:.2f}, p50 {r['p50_ms']:.2f}, "
                  f"p99 {r['p99_ms']:.2f}; server CPU per request {s[a]['server_cpu_us_per_request']:.0f} vs "
                  f"{s[b]['server_cpu_us_per_request']:.0f} us; codes {a} {s[a]['codes']} {b} {s[b]['codes']}")
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
