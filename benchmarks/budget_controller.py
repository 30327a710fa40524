"""The budget controller on the real test inputs under a changing bandwidth, no network needed.

    .venv/bin/python benchmarks/budget_controller.py [--model artifacts/model] [--requests 10000]

1. Every test canvas (``make_split("test")``, 2,000) goes through the real edge pipeline once per
   operating point in the model folder's manifest: the device half in ONNX Runtime, the exit
   decision, token selection, the codec (encode, serialise the InferRequest, decode) and the server
   half in ONNX Runtime on the decoded tokens. Per (point, input): correct?, request bytes, tokens.
2. 10,000 requests draw inputs from the test set (seeded); the available bandwidth follows a
   generated Markov trace between 0.2 and 20 Mbit/s with an RTT that rises as it falls. Latency of
   an offload = device ms + RTT + bytes / bandwidth + server ms; energy from the pi4 + Wi-Fi profiles.
3. Runs: unconstrained (no constraint: the manifest's default point), bytes budgets at 25%, 50% and 100% of its mean
   bytes per request, and a mean-latency limit that the controller meets by reacting to the trace.
   Each budget run is reported next to the best static point whose mean bytes on the same requests
   stay within the budget.
4. Battery: the same requests at a fixed rate (``--battery-rate``, one every 2 s) over the horizon
   they fill, on the laptop profile's battery, under ``--max-battery-percent`` set halfway between
   never offloading and the unconstrained run (edge/battery.py BatteryLimit re-prices the
   controller's device-energy limit at the observed rate before each request, as the edge CLI does);
   the battery share spent (device half + radio) against that share.

Prints a table, writes ``benchmarks/results/budget_controller.json`` and ``.png``.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("budget_controller")

RESPONSE_BYTES = 64  # an InferResponse with 10 probabilities, a request id and timings


@dataclass
class Outcomes:
    """Per operating point p and test input i: correct[p, i], bytes[p, i] (0 = exited), tokens[p, i]."""

    correct: np.ndarray  # bool (P, n)
    bytes: np.ndarray  # int64 (P, n)
    tokens: np.ndarray  # int64 (P, n)
    device_ms: np.ndarray  # float64 (n,), device half + preprocessing, batch 1
    confidence: np.ndarray  # float64 (n,), the exit confidence (the manifest's exit policy)
    server_ms: float  # median server half time on one request


def load_sessions(manifest, threads: int = 1):
    import onnxruntime as ort

    from splitinfer.edge.session import DeviceSession, SessionOptions

    device = DeviceSession.from_manifest(manifest, SessionOptions(intra_op_threads=threads))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    server = ort.InferenceSession(str(manifest.server_path), opts, providers=["CPUExecutionProvider"])
    return device, server


def device_pass(manifest, device, images: np.ndarray, timed: int = 500):
    """Device half on every image: exit confidence (n,) (the manifest's exit policy, as the runner
    reads it), exit-head answers (n,), tokens (n, N, d), importance (n, P), and per-input device ms
    (the first ``timed`` inputs measured at batch 1, the rest resampled)."""
    from splitinfer.edge.preprocess import preprocess

    x = preprocess(images, manifest.preprocessing)
    outs = [device.run(x[start:start + 250]) for start in range(0, len(x), 250)]
    confidence = np.concatenate([o.confidence for o in outs]).astype(np.float64)
    exit_pred = np.concatenate([o.exit.argmax(1) for o in outs])
    ms = []
    for img in images[:timed]:
        t0 = time.perf_counter()
        device.run(preprocess(img, manifest.preprocessing))
        ms.append((time.perf_counter() - t0) * 1e3)
    device_ms = np.resize(np.asarray(ms), len(images))
    return (confidence, exit_pred, np.concatenate([o.tokens for o in outs]),
            np.concatenate([o.importance for o in outs]), device_ms)


def offload_outcomes(runner, server, tokens, importance, point):
    """Server predictions, request bytes and token counts if every input were offloaded at ``point``:
    the runner's own selection and codec build the InferRequest, which is decoded as the server would."""
    from splitinfer.protos.codec import PacketLimits, decode_tokens

    manifest = runner.manifest
    limits = PacketLimits.for_manifest(manifest)
    n = len(tokens)
    preds = np.zeros(n, dtype=np.int64)
    nbytes = np.zeros(n, dtype=np.int64)
    ntokens = np.zeros(n, dtype=np.int64)
    groups: dict[int, list] = {}
    for i in range(n):
        request = runner.build_request(tokens[i], importance[i], "0" * 32, point)
        nbytes[i], ntokens[i] = request.ByteSize(), request.packet.num_tokens
        values, positions = decode_tokens(request.packet, limits)
        groups.setdefault(len(positions), []).append((i, values))
    for group in groups.values():  # one batch per token count: no padding
        batch = np.stack([values for _, values in group]).astype(np.float32)
        logits = server.run(None, {"tokens": batch, "mask": np.ones(batch.shape[:2], dtype=bool)})[0]
        for (i, _), row in zip(group, logits):
            preds[i] = int(np.argmax(row))
    return preds, nbytes, ntokens


def precompute(manifest, points, images, labels, threads: int = 1) -> Outcomes:
    from splitinfer.edge.runner import EdgeRunner

    device, server = load_sessions(manifest, threads)
    runner = EdgeRunner(device, None, manifest)
    confidence, exit_pred, tokens, importance, device_ms = device_pass(manifest, device, images)
    cache: dict[tuple, tuple] = {}
    correct = np.zeros((len(points), len(images)), dtype=bool)
    nbytes = np.zeros((len(points), len(images)), dtype=np.int64)
    ntokens = np.zeros_like(nbytes)
    for p, point in enumerate(points):
        key = (point.mass, point.budget, point.encoding, point.group_size)
        if key not in cache:
            cache[key] = offload_outcomes(runner, server, tokens, importance, point)
        preds, b, t = cache[key]
        offloaded = confidence < point.threshold
        correct[p] = np.where(offloaded, preds, exit_pred) == labels
        nbytes[p] = np.where(offloaded, b, 0)
        ntokens[p] = np.where(offloaded, t, 0)
    log.info("%d operating points x %d inputs (%d distinct selection/codec settings)",
             len(points), len(images), len(cache))
    server_ms = []
    for i in range(min(200, len(images))):
        t0 = time.perf_counter()
        server.run(None, {"tokens": tokens[i:i + 1, :17], "mask": np.ones((1, 17), dtype=bool)})
        server_ms.append((time.perf_counter() - t0) * 1e3)
    return Outcomes(correct, nbytes, ntokens, device_ms, confidence, float(np.median(server_ms)))


def bandwidth_trace(n: int, seed: int, low_bps: float = 0.2e6, high_bps: float = 20e6,
                    mean_dwell: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Markov trace: log-bandwidth steps between 12 levels in [low, high], each held for a geometric
    number of requests (mean ``mean_dwell``), with 10% jitter; RTT = 8 ms + 40 ms / sqrt(Mbit/s)."""
    rng = np.random.default_rng(seed)
    levels = np.geomspace(low_bps, high_bps, 12)
    state = int(rng.integers(len(levels)))
    bw = np.empty(n)
    t = 0
    while t < n:
        dwell = int(rng.geometric(1.0 / mean_dwell))
        bw[t:t + dwell] = levels[state]
        t += dwell
        state = int(np.clip(state + rng.choice([-3, -2, -1, 1, 2, 3]), 0, len(levels) - 1))
    bw = bw * np.exp(rng.normal(0.0, 0.1, n))
    bw = np.clip(bw, low_bps, high_bps)
    rtt = 8.0 + 40.0 / np.sqrt(bw / 1e6)
    return bw, rtt


def simulate(points, outcomes: Outcomes, draws: np.ndarray, bw: np.ndarray, rtt: np.ndarray, energy,
             constraints=None, static: int | None = None, v: float = 100.0, battery=None, rate: float = 1.0,
             **options) -> dict:
    """Run ``draws`` through the controller (or always point ``static``); per-request arrays. battery:
    a BatteryLimit told of each request, arriving at ``rate`` per second, before the choice."""
    from splitinfer.edge.controller import BudgetController, Constraints, LinkEstimate, RequestCost

    controller = None
    if static is None:
        controller = BudgetController(points, constraints or Constraints(), energy=energy, v=v, **options)
    index = {p.id: i for i, p in enumerate(points)}
    n = len(draws)
    chosen = np.empty(n, dtype=np.int64)
    sent = np.empty(n)
    correct = np.empty(n, dtype=bool)
    latency = np.empty(n)
    energy_mj = np.empty(n)
    device_energy_mj = np.empty(n)
    for t, i in enumerate(draws):
        if battery is not None:
            battery.before_request(controller, at=t / rate)
        if controller is not None:
            controller.link.set(LinkEstimate(bw[t], rtt[t]))
            p = index[controller.choose().id]
        else:
            p = static
        b = outcomes.bytes[p, i]
        round_trip = (rtt[t] + 8e3 * (b + RESPONSE_BYTES) / bw[t] + outcomes.server_ms) if b else 0.0
        chosen[t], sent[t], correct[t] = p, b, outcomes.correct[p, i]
        latency[t] = outcomes.device_ms[i] + round_trip
        estimate = energy.estimate(energy.device_mj(outcomes.device_ms[i] / 1e3), b, RESPONSE_BYTES if b else 0,
                                   round_trip / 1e3, outcomes.server_ms / 1e3 if b else 0.0)
        energy_mj[t], device_energy_mj[t] = estimate.total_mj, estimate.device_mj + estimate.radio_mj
        if controller is not None:
            controller.observe_confidence(outcomes.confidence[i], outcomes.device_ms[i])
            controller.update(points[p], RequestCost(b, latency[t], energy_mj[t], points[p].accuracy,
                                                     device_energy_mj[t]))
    return {"point": chosen, "bytes": sent, "correct": correct, "latency_ms": latency, "energy_mj": energy_mj,
            "device_energy_mj": device_energy_mj}


def summary(run: dict, points) -> dict:
    counts = np.bincount(run["point"], minlength=len(points))
    return {
        "mean_bytes_per_request": float(run["bytes"].mean()),
        "accuracy": float(run["correct"].mean()),
        "mean_latency_ms": float(run["latency_ms"].mean()),
        "mean_energy_mj": float(run["energy_mj"].mean()),
        "offload_rate": float((run["bytes"] > 0).mean()),
        "point_share": {points[k].id: round(float(c) / len(run["point"]), 4) for k, c in enumerate(counts) if c},
    }


def table_static(statics: list[dict], points, budget: float) -> dict | None:
    """What a user would pick from the table alone: the most accurate point whose table mean bytes
    fit the budget, with what it really spent on these requests."""
    fits = [k for k, p in enumerate(points) if p.mean_bytes_per_request <= budget]
    if not fits:
        return None
    k = max(fits, key=lambda k: (points[k].accuracy, -points[k].mean_bytes_per_request))
    s = statics[k]
    return {"id": points[k].id, "accuracy": s["accuracy"], "mean_bytes_per_request": s["mean_bytes_per_request"],
            "ratio": s["mean_bytes_per_request"] / budget}


def best_static(statics: list[dict], points, budget: float, key: str = "mean_bytes_per_request") -> dict | None:
    """In hindsight: the most accurate single point whose mean on the same requests stays within ``budget``."""
    fits = [(s["accuracy"], -s[key], k) for k, s in enumerate(statics) if s[key] <= budget]
    if not fits:
        return None
    _, _, k = max(fits)
    return {"id": points[k].id, **{f: statics[k][f] for f in ("accuracy", key)}}


def plot(path: Path, runs: dict, budgets: dict, window: int = 500) -> None:
    """Running mean bytes per request of every run with its budget (dotted, same colour, in the
    legend), windowed accuracy, and the bandwidth trace. Runs that send nothing for a while are
    drawn from their first byte (a log axis has no zero)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(10, 11), sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", "-.", (0, (5, 1)), (0, (3, 1, 1, 1))]
    for c, (name, run) in enumerate(runs.items()):
        n = len(run["bytes"])
        t = np.arange(1, n + 1)
        color, style = colors[c % len(colors)], styles[c % len(styles)]
        # a run that coincides with another (the 100% budget equals the unconstrained mean) stays
        # visible as a wide, pale band under it
        width, alpha = (4.0, 0.45) if c == 0 else (1.4, 1.0)
        mean = np.cumsum(run["bytes"]) / t
        shown = mean > 0
        axes[0].plot(t[shown], mean[shown], color=color, linestyle=style, linewidth=width, alpha=alpha, label=name)
        if name in budgets:
            axes[0].axhline(budgets[name], color=color, linestyle=":", linewidth=1.2,
                            label=f"limit of {name}: {budgets[name]:.1f} B")
        kernel = np.ones(window) / window
        axes[1].plot(t[window - 1:], np.convolve(run["correct"], kernel, mode="valid"), color=color, linestyle=style,
                     linewidth=width, alpha=alpha, label=name)
    axes[0].set_ylabel("running mean bytes / request (log)")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7, ncol=2, loc="upper right")
    axes[1].set_ylabel(f"accuracy ({window}-request window)")
    axes[1].legend(fontsize=7, ncol=3, loc="lower right")
    trace = runs[next(iter(runs))]
    axes[2].plot(np.arange(1, len(trace["bw"]) + 1), trace["bw"] / 1e6, color="gray", label="link bandwidth")
    axes[2].set_yscale("log")
    axes[2].set_ylabel("bandwidth (Mbit/s, log)")
    axes[2].set_xlabel("request")
    axes[2].legend(fontsize=7, loc="upper right")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle("Budget controller: every run's running mean against its limit, accuracy, and the link")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "artifacts" / "model")
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--n-test", type=int, default=None, help="test canvases (default: all 2,000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--v", type=float, default=100.0, help="drift-plus-penalty weight V")
    parser.add_argument("--device-profile", default="pi4")
    parser.add_argument("--link", default="wifi")
    parser.add_argument("--battery-rate", type=float, default=0.5, help="requests per second in the battery run")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "budget_controller.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from splitinfer.edge.controller import Constraints
    from splitinfer.edge.energy import EnergyModel
    from splitinfer.export.data import make_split
    from splitinfer.protos import load_manifest

    t_start = time.perf_counter()
    manifest = load_manifest(args.model)
    points = list(manifest.operating_points)
    images, labels = make_split("test", n=args.n_test)
    log.info("%d operating points, %d test canvases", len(points), len(images))
    outcomes = precompute(manifest, points, images, labels)
    t_pre = time.perf_counter() - t_start
    energy = EnergyModel.named(args.device_profile, args.link)

    rng = np.random.default_rng(args.seed)
    draws = rng.integers(0, len(images), args.requests)
    bw, rtt = bandwidth_trace(args.requests, args.seed)

    statics = [summary(simulate(points, outcomes, draws, bw, rtt, energy, static=k), points) for k in range(len(points))]
    runs: dict[str, dict] = {}
    rows = []
    unconstrained = simulate(points, outcomes, draws, bw, rtt, energy, v=args.v, default=manifest.point())
    runs["unconstrained"] = unconstrained
    base = summary(unconstrained, points)
    rows.append({"run": "unconstrained", "limit": None, **base, "ratio": None, "best_static": None})
    budgets = {}
    for share in (0.25, 0.50, 1.00):
        budget = share * base["mean_bytes_per_request"]
        name = f"bytes {share:.0%}"
        budgets[name] = budget
        run = simulate(points, outcomes, draws, bw, rtt, energy, Constraints(max_bytes=budget), v=args.v)
        runs[name] = run
        s = summary(run, points)
        rows.append({"run": name, "limit": budget, **s, "ratio": s["mean_bytes_per_request"] / budget,
                     "best_static": best_static(statics, points, budget),
                     "table_static": table_static(statics, points, budget)})
    device_only = float(outcomes.device_ms[draws].mean())
    latency_limit = device_only + 0.5 * (base["mean_latency_ms"] - device_only)  # halfway to never offloading
    run = simulate(points, outcomes, draws, bw, rtt, energy, Constraints(max_latency_ms=latency_limit), v=args.v)
    runs["latency"] = run
    s = summary(run, points)
    rows.append({"run": "latency", "limit": latency_limit, **s, "ratio": s["mean_latency_ms"] / latency_limit,
                 "best_static": best_static(statics, points, latency_limit, key="mean_latency_ms")})
    battery = battery_run(points, outcomes, draws, bw, rtt, args)
    for run in runs.values():
        run["bw"] = bw

    print_table(rows)
    report = {
        "model": {"name": manifest.name, "version": manifest.version, "manifest_sha256": manifest.sha256},
        "requests": args.requests, "n_test": len(images), "seed": args.seed, "v": args.v,
        "energy_profile": {"device": energy.device.name, "link": energy.link.name, "server": energy.server.name},
        "trace": {"kind": "markov, 12 log-spaced levels", "bandwidth_mbps_min": float(bw.min() / 1e6),
                  "bandwidth_mbps_max": float(bw.max() / 1e6), "bandwidth_mbps_median": float(np.median(bw) / 1e6)},
        "server_ms": outcomes.server_ms, "device_ms_p50": float(np.median(outcomes.device_ms)),
        "operating_points": [{**p.to_dict(), "test": statics[k]} for k, p in enumerate(points)],
        "runs": rows,
        "within_2_percent": {**{r["run"]: abs(r["ratio"] - 1) <= 0.02 for r in rows if r["run"].startswith("bytes")},
                             "battery": bool(abs(battery["ratio"] - 1) <= 0.02)},
        "battery": battery,
        "precompute_seconds": round(t_pre, 1), "wall_seconds": round(time.perf_counter() - t_start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    png = args.out.with_suffix(".png")
    plot(png, runs, budgets)
    print(f"\nwrote {args.out} and {png}")
    return 0


def battery_run(points, outcomes: Outcomes, draws: np.ndarray, bw: np.ndarray, rtt: np.ndarray, args) -> dict:
    """--max-battery-percent on the laptop profile's battery: requests at a fixed rate over the horizon
    they fill, the share halfway between never offloading and the unconstrained run's."""
    from splitinfer.edge.battery import BatteryBudget, BatteryLimit, battery_capacity, projected_percent
    from splitinfer.edge.controller import Constraints
    from splitinfer.edge.energy import EnergyModel

    energy = EnergyModel.named("laptop", args.link)
    capacity = battery_capacity(energy.device, root=Path("/nonexistent"))  # the profile's, not this machine's
    rate, horizon_h = args.battery_rate, len(draws) / args.battery_rate / 3600.0
    cheapest = min(range(len(points)), key=lambda k: points[k].mean_bytes_per_request)
    floor = simulate(points, outcomes, draws, bw, rtt, energy, static=cheapest)["device_energy_mj"].mean()
    top = simulate(points, outcomes, draws, bw, rtt, energy, v=args.v)["device_energy_mj"].mean()
    share = projected_percent(0.5 * (floor + top), rate, horizon_h, capacity.wh)
    limit = BatteryLimit(BatteryBudget(capacity, share, horizon_h))
    run = simulate(points, outcomes, draws, bw, rtt, energy, Constraints(max_device_energy_mj=limit.limit_mj),
                   v=args.v, battery=limit, rate=rate)
    spent = 100.0 * float(run["device_energy_mj"].sum()) / (capacity.wh * 3600.0 * 1000.0)
    out = {"device_profile": energy.device.name, "battery_wh": capacity.wh, "requests": len(draws),
           "requests_per_s": rate, "horizon_h": horizon_h, "max_battery_percent": share,
           "spent_battery_percent": spent, "ratio": spent / share,
           "never_offloading_percent": projected_percent(floor, rate, horizon_h, capacity.wh),
           "unconstrained_percent": projected_percent(top, rate, horizon_h, capacity.wh),
           "limit_mj_per_request": limit.limit_mj, "accuracy": float(run["correct"].mean()),
           "offload_rate": float((run["bytes"] > 0).mean())}
    print(f"battery: {share:.4f}% of {capacity.wh:g} Wh allowed over {horizon_h:.2f} h at {rate:g} requests/s "
          f"({len(draws):,} requests); spent {spent:.4f}% (ratio {out['ratio']:.3f}; never offloading "
          f"{out['never_offloading_percent']:.4f}%, unconstrained {out['unconstrained_percent']:.4f}%), "
          f"accuracy {out['accuracy']:.4f}")
    return out


def print_table(rows: list[dict]) -> None:
    head = (f"{'run':<14} {'limit':>9} {'mean':>9} {'ratio':>7} {'accuracy':>9} {'offload':>8}   "
            f"best static point within the limit, in hindsight | picked from the table (its ratio)")
    print()
    print(head)
    print("-" * len(head))
    for r in rows:
        unit_mean = r["mean_latency_ms"] if r["run"].startswith("latency") else r["mean_bytes_per_request"]
        limit = "-" if r["limit"] is None else f"{r['limit']:.1f}"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
        static = r["best_static"]
        static_text = "-" if static is None else f"{static['id']} (accuracy {static['accuracy']:.4f})"
        table = r.get("table_static")
        if table is not None:
            static_text += f" | {table['id']} (accuracy {table['accuracy']:.4f}, ratio {table['ratio']:.3f})"
        if r["run"] == "unconstrained":
            static_text = "the manifest's default point: " + max(r["point_share"], key=r["point_share"].get)
        print(f"{r['run']:<14} {limit:>9} {unit_mean:>9.1f} {ratio:>7} {r['accuracy']:>9.4f} "
              f"{r['offload_rate']:>7.1%}   {static_text}")
    print("(bytes runs: mean bytes per request; latency run: mean latency in ms)")


if __name__ == "__main__":
    sys.exit(main())
