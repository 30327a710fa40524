"""``splitinfer-export``: train the built-in ViT, and export both halves with a manifest.

    splitinfer-export train  --out checkpoints/vit-cluttered-mnist.pt [--epochs 40 --device cuda]
    splitinfer-export export --checkpoint checkpoints/vit-cluttered-mnist.pt --out artifacts/model
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

__all__ = ["main"]


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the built-in ViT on cluttered MNIST and write a checkpoint")
    p.add_argument("--out", type=Path, required=True, help="checkpoint file to write (.pt)")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--canvases-per-epoch", type=int, default=10_500)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--split", type=int, default=2, help="blocks on the device")
    p.add_argument("--stem", choices=("conv", "patch"), default="conv")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when available)")
    p.add_argument("--no-progress", action="store_true")


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export device.onnx, server.onnx and manifest.json from a checkpoint")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="model folder to write")
    p.add_argument("--name", default="vit-cluttered-mnist")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--mass", type=float, default=0.9, help="share of the importance mass the edge keeps")
    p.add_argument("--budget", type=int, default=16, help="most patches the edge sends")
    p.add_argument("--max-accuracy-drop", type=float, default=0.005,
                   help="calibration: largest drop of split accuracy below the full model's")
    p.add_argument("--calibration-size", type=int, default=None, help="canvases (default: 2 per calibration digit)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="splitinfer-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_export(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "train":
            return _train(args)
        return _export(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"splitinfer-export: error: {exc}", file=sys.stderr)
        return 2


def _train(args: argparse.Namespace) -> int:
    import torch

    from .model import ViTConfig
    from .train import TrainConfig, save_checkpoint, train

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    vit = ViTConfig(dim=args.dim, depth=args.depth, heads=args.heads, split=args.split, stem=args.stem)
    cfg = TrainConfig(epochs=args.epochs, canvases_per_epoch=args.canvases_per_epoch,
                      batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    model, summary = train(vit, cfg, device=device, progress=not args.no_progress)
    save_checkpoint(model, args.out, summary)
    print(json.dumps({"checkpoint": str(args.out), **summary["test_metrics_during_training"],
                      "train_seconds": summary["train_seconds"]}, indent=2))
    return 0


def _export(args: argparse.Namespace) -> int:
    from .pipeline import ExportOptions, export_model

    options = ExportOptions(name=args.name, opset=args.opset, mass=args.mass, budget=args.budget,
                            max_accuracy_drop=args.max_accuracy_drop, calibration_size=args.calibration_size)
    manifest = export_model(args.checkpoint, args.out, options)
    print(json.dumps({"model_dir": str(args.out), "exit_threshold": manifest["exit"]["threshold"],
                      **manifest["calibration"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
