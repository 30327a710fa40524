"""``splitinfer-edge bench``: device-half latency and CPU time on this machine, setting by setting.

    splitinfer-edge bench --model DIR [--threads N] [--spin] [--device-half auto|float|int8] [--n 200] [--json]

Times the device half at batch 1 for the chosen settings and, side by side, for the neighbours a
device owner weighs: spinning on and off, one thread and two (or N), the float and the INT8 half
when the model folder has both. Each setting gets its own session; the settings run in blocks,
round-robin over a few rounds, so drift on a busy machine hits them all alike. CPU time per
inference (all threads of this process) is the energy proxy: a spinning thread pool shows up there
while wall-clock latency barely moves.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort

from splitinfer.protos.errors import SplitInferError
from splitinfer.protos.manifest import Manifest, load_manifest

from .session import DEVICE_HALVES, DeviceSession, SessionOptions, available_halves, choose_device_half, \
    cpu_signature, device_half_path, zero_input

__all__ = ["BenchSetting", "BenchRow", "bench_settings", "run_bench", "main", "run", "add_arguments"]

PROG = "splitinfer-edge bench"


@dataclass(frozen=True)
class BenchSetting:
    half: str  # "float" or "int8"
    threads: int  # intra-op threads
    spin: bool

    def label(self) -> str:
        return f"{self.half:<5}  threads {self.threads}  spin {'on ' if self.spin else 'off'}"


@dataclass(frozen=True)
class BenchRow:
    """Batch-1 figures for one setting: latency percentiles in ms, mean process CPU ms per inference."""

    setting: BenchSetting
    p50_ms: float
    p90_ms: float
    p99_ms: float
    cpu_ms_per_inference: float
    chosen: bool


def bench_settings(chosen: BenchSetting, halves: Sequence[str], cores: int) -> list[BenchSetting]:
    """The chosen setting first, then spin on/off x threads {1, 2 or the chosen} x each half."""
    thread_counts = sorted({chosen.threads, 1, min(2, max(cores, 1))})
    grid = [BenchSetting(h, t, s) for h in halves for t in thread_counts for s in (False, True)]
    return [chosen] + [g for g in grid if g != chosen]


def run_bench(manifest: Manifest, settings: Sequence[BenchSetting], n: int = 200, rounds: int = 4,
              warmup: int = 10, settle_s: float = 0.05) -> list[BenchRow]:
    """Time each setting: ``n`` runs split over ``rounds`` blocks, after ``warmup`` runs per block."""
    if n < rounds:
        raise ValueError(f"n must be >= rounds ({rounds}), got {n}")
    sessions = [DeviceSession(device_half_path(manifest, s.half),
                              SessionOptions(intra_op_threads=s.threads, allow_spinning=s.spin)) for s in settings]
    x = zero_input(sessions[0])
    wall: list[list[float]] = [[] for _ in settings]
    cpu: list[float] = [0.0 for _ in settings]
    per_round = [n // rounds + (1 if r < n % rounds else 0) for r in range(rounds)]
    for count in per_round:
        for i, sess in enumerate(sessions):
            time.sleep(settle_s)  # let the previous setting's spinning threads go idle before the CPU clock starts
            for _ in range(warmup):
                sess.run(x)
            c0 = time.process_time()
            for _ in range(count):
                t0 = time.perf_counter()
                sess.run(x)
                wall[i].append((time.perf_counter() - t0) * 1e3)
            cpu[i] += (time.process_time() - c0) * 1e3
    return [BenchRow(s, *(round(float(np.percentile(w, q)), 4) for q in (50, 90, 99)),
                     cpu_ms_per_inference=round(c / len(w), 4), chosen=(i == 0))
            for i, (s, w, c) in enumerate(zip(settings, wall, cpu))]


def format_table(rows: Sequence[BenchRow]) -> str:
    base = rows[0]
    lines = [f"{'setting':<30} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'cpu ms/inf':>10} {'p50/chosen':>10}"]
    for r in rows:
        lines.append(f"{r.setting.label():<30} {r.p50_ms:8.3f} {r.p90_ms:8.3f} {r.p99_ms:8.3f} "
                     f"{r.cpu_ms_per_inference:10.3f} {r.p50_ms / base.p50_ms:10.2f}" + ("  <- chosen" if r.chosen else ""))
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path, help="model folder (manifest.json + device.onnx)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of the chosen setting (default 1)")
    p.add_argument("--spin", action="store_true", help="spinning on in the chosen setting")
    p.add_argument("--device-half", choices=DEVICE_HALVES, default="auto",
                   help="half of the chosen setting (default auto, as splitinfer-edge would pick)")
    p.add_argument("--n", type=int, default=200, help="timed runs per setting (default 200)")
    p.add_argument("--only-chosen", action="store_true", help="time the chosen setting alone")
    p.add_argument("--refresh-energy", action="store_true",
                   help="measure the energy reference (device half and whole model, the same way) and cache it")
    p.add_argument("--device-profile", default="pi4", help="power profile for the energy reference (default pi4)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Device-half latency percentiles for the settings on this machine.")
    add_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    if args.threads < 0 or args.n < 4:
        print(f"{PROG}: error: --threads must be >= 0 and --n >= 4", file=sys.stderr)
        return 2
    try:
        manifest = load_manifest(args.model, need=("device",))
        options = SessionOptions(intra_op_threads=args.threads, allow_spinning=args.spin)
        choice = choose_device_half(manifest, args.device_half, options)
        chosen = BenchSetting(choice.half, args.threads, args.spin)
        settings = [chosen] if args.only_chosen else bench_settings(chosen, available_halves(manifest), os.cpu_count() or 1)
        rows = run_bench(manifest, settings, n=args.n)
        energy = None
        if args.refresh_energy:
            from .energy import DeviceEnergyMeter, device_profile, reference_energy

            session = DeviceSession(device_half_path(manifest, choice.half), options)
            ref, _ = reference_energy(manifest, session.run, zero_input(session),
                                      DeviceEnergyMeter(device_profile(args.device_profile)), half=choice.half,
                                      refresh=True, repeats=max(50, args.n // 2))
            energy = asdict(ref) | {"whole_model_mj": ref.whole_model_mj}
    except (SplitInferError, ValueError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    context = {"model": manifest.name, "device_half_choice": choice.half, "reason": choice.reason,
               "cpu": cpu_signature(), "cores": os.cpu_count(), "onnxruntime": ort.__version__, "runs": args.n}
    if energy is not None:
        context["energy_reference"] = energy
    if args.json:
        print(json.dumps({**context, "rows": [asdict(r) for r in rows]}, indent=2))
        return 0
    print(f"{manifest.name}: device half at batch 1, {args.n} runs per setting, onnxruntime {ort.__version__}, "
          f"{context['cpu']['machine']} {context['cpu']['model']} ({context['cores']} cores)")
    print(f"chosen half: {choice.half} ({choice.reason})")
    print(format_table(rows))
    if energy is not None:
        print(f"energy reference (cached): device half {energy['device_half_mj']:.3f} mJ, whole model "
              f"{energy['whole_model_mj']:.3f} mJ per input, median of {energy['repeats']} ({energy['method']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
