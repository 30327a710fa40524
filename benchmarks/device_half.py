"""Float vs INT8 device half on this machine: latency ratio, split accuracy and exit rate, side by side.

    python benchmarks/device_half.py                       # exports the committed checkpoint with --quantize int8
    python benchmarks/device_half.py --model DIR --runs 1000 --out results/device_half.json

Both halves run in one process: latency interleaved run by run (batch 1, one intra-op thread,
spinning off, the edge's defaults), accuracy and exit rate over the demo's test split through the
deployed path (exit at the manifest's threshold, importance selection, int8 tokens, float server
half). Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "checkpoints" / "vit-cluttered-mnist.pt"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a model folder exported with --quantize int8 (default: export one)")
    parser.add_argument("--runs", type=int, default=1000, help="timed batch-1 runs per half")
    parser.add_argument("--n-test", type=int, default=None, help="test canvases (default: the whole split, 2,000)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "device_half.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from splitinfer.export.adapters.vit import BuiltinViT
    from splitinfer.export.datasets import load_dataset
    from splitinfer.export.pipeline import ExportOptions, export_checkpoint
    from splitinfer.export.quantize import cpu_signature, evaluate_device_half, measure_latency
    from splitinfer.export.train import load_checkpoint
    from splitinfer.protos import load_manifest

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model
        if folder is None:
            folder = Path(tmp) / "model"
            export_checkpoint(CHECKPOINT, folder, ExportOptions(name="vit-cluttered-mnist", quantize="int8"))
        manifest = load_manifest(folder)
        if "device_int8" not in manifest.files:
            print(f"{folder}: no INT8 device half; export with --quantize int8", file=sys.stderr)
            return 2
        halves = {"float": manifest.device_path, "int8": manifest.path("device_int8")}
        test = load_dataset("cluttered-mnist", "test", BuiltinViT(load_checkpoint(CHECKPOINT)[0]), n=args.n_test)
        point = manifest.point().to_dict()
        quality = {half: evaluate_device_half(path, manifest.server_path, test, manifest.task, point)
                   for half, path in halves.items()}
        latency = measure_latency(halves, test.numpy_rows(slice(0, 1)), runs=args.runs)
        fmt = manifest.info["device_variants"]["quantization"]["format"]
        images = test.inputs["image"]

    f, q = quality["float"], quality["int8"]
    report = {
        "cpu": cpu_signature(), "test_canvases": len(images), "runs": args.runs, "int8_format": fmt,
        "threshold": manifest.exit_threshold, "float": {**f, **latency["float"]}, "int8": {**q, **latency["int8"]},
        "latency_ratio_int8_over_float_p50": latency["int8"]["p50_ms"] / latency["float"]["p50_ms"],
        "accuracy_split_change": q["accuracy_split"] - f["accuracy_split"],
        "exit_rate_change": q["exit_rate"] - f["exit_rate"],
    }
    print(f"device half, {len(images)} test canvases, {args.runs} interleaved batch-1 runs each "
          f"({report['cpu']['machine']} {report['cpu']['model']}, one thread, no spinning); INT8 format {fmt}")
    print(f"{'half':<6} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'split acc':>10} {'exit rate':>10} {'exit-head acc':>14}")
    for half in ("float", "int8"):
        r = report[half]
        print(f"{half:<6} {r['p50_ms']:8.3f} {r['p90_ms']:8.3f} {r['p99_ms']:8.3f} {r['accuracy_split']:10.4f} "
              f"{r['exit_rate']:10.4f} {r['accuracy_exit_head']:14.4f}")
    print(f"int8/float p50 latency {report['latency_ratio_int8_over_float_p50']:.3f}, split accuracy "
          f"{100 * report['accuracy_split_change']:+.2f} points, exit rate {100 * report['exit_rate_change']:+.2f} points")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
