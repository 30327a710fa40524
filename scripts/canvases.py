"""Test canvases as PNG files for the device CLI, and scoring of its ``--json`` output.

    python scripts/canvases.py write --n 300 --out DIR           # DIR/00000_7.png ..., DIR/labels.csv
    python scripts/canvases.py score --labels DIR/labels.csv host.jsonl emulated.jsonl

``write`` draws N canvases of the demo's test split (``make_split("test")``, the same seed as the
demo), taking the classes in turn so that every class is there. ``score`` prints, per JSON-lines
file of ``splitinfer-edge classify --json``, the accuracy
against the labels and where inputs were decided, and how many answers two runs share.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np


def write(n: int, out: Path) -> None:
    from PIL import Image

    from splitinfer.export.data import make_split

    images, labels = make_split("test")
    # every class, in turn: the k-th canvas of each class, then the (k+1)-th, ... (not the first n)
    by_class = [np.flatnonzero(labels == c) for c in range(10)]
    order = [idx[k] for k in range(max(map(len, by_class))) for idx in by_class if k < len(idx)][:n]
    images, labels = images[order], labels[order]
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()
    with open(out / "labels.csv", "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["file", "label"])
        for i, (img, label) in enumerate(zip(images, labels)):
            name = f"{i:05d}.png"
            Image.fromarray(img, mode="L").save(out / name)
            rows.writerow([name, int(label)])
    print(f"wrote {len(images)} canvases to {out}")


def read_results(path: Path) -> dict[str, dict]:
    results = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            results[Path(row.get("input") or row["file"]).name] = row  # 0.1 edges wrote "file"
    return results


def score(labels_csv: Path, runs: list[Path]) -> int:
    with open(labels_csv, newline="") as f:
        labels = {row["file"]: row["label"] for row in csv.DictReader(f)}
    by_run = {path: read_results(path) for path in runs}
    for path, results in by_run.items():
        answered = [r for name, r in results.items() if "label" in r]
        correct = sum(r["class_name"] == labels.get(name) for name, r in results.items() if "label" in r)
        decided = {}
        for r in answered:
            decided[r["decided_on"]] = decided.get(r["decided_on"], 0) + 1
        mean_ms = sum(r["latency_ms"] for r in answered) / max(len(answered), 1)
        print(f"{path}: {len(answered)}/{len(labels)} answered, accuracy {correct / max(len(answered), 1):.4f}, "
              f"decided on {json.dumps(decided, sort_keys=True)}, mean latency {mean_ms:.2f} ms per input")
    if len(runs) == 2:
        a, b = (by_run[p] for p in runs)
        same = sum(a[n].get("label") == b.get(n, {}).get("label") for n in a)
        print(f"same answer in both runs: {same}/{len(a)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write")
    w.add_argument("--n", type=int, default=300)
    w.add_argument("--out", type=Path, required=True)
    s = sub.add_parser("score")
    s.add_argument("--labels", type=Path, required=True)
    s.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args(argv)
    if args.command == "write":
        write(args.n, args.out)
        return 0
    return score(args.labels, args.runs)


if __name__ == "__main__":
    sys.exit(main())
