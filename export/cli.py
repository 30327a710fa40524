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
    p.add_argument("--bottleneck-dims", default="",
                   help="comma-separated widths of learned split bottlenecks to train, e.g. 64,32,16,8")
    p.add_argument("--init-from", type=Path, default=None,
                   help="start from this checkpoint (its architecture is kept; new bottlenecks start fresh)")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when available)")
    p.add_argument("--no-progress", action="store_true")


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export device.onnx, server.onnx and manifest.json from a checkpoint")
    p.add_argument("--checkpoint", type=Path, default=None, help="built-in ViT checkpoint, or timm weights with --adapter timm")
    p.add_argument("--out", type=Path, required=True, help="model folder to write")
    p.add_argument("--name", default="vit-cluttered-mnist")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--mass", default="auto", help="share of the importance mass the edge keeps (default: auto)")
    p.add_argument("--budget", default="auto", help="most patches the edge sends (default: auto)")
    p.add_argument("--bottleneck", default="auto",
                   help="learned bottleneck width to deploy: auto (fewest bytes within the accuracy target), none, or a trained width")
    p.add_argument("--encoding", default="auto", choices=("auto", "fp32", "fp16", "int8", "int4"),
                   help="token encoding of the default operating point")
    p.add_argument("--no-plot", action="store_true", help="skip pareto.png")
    p.add_argument("--max-accuracy-drop", type=float, default=0.002,
                   help="the default operating point is the cheapest within this of the most accurate measured point")
    p.add_argument("--calibration-size", type=int, default=None, help="canvases (default: 2 per calibration digit)")
    p.add_argument("--quantize", choices=("int8",), default=None,
                   help="also write an INT8 device half (static, calibrated; QDQ and QOperator tried) beside the float one")
    p.add_argument("--triton", type=Path, default=None, metavar="DIR",
                   help="also write the server half into this Triton model repository (config.pbtxt + model.onnx)")
    from .adapters.cli import add_adapter_arguments

    add_adapter_arguments(p)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="splitinfer-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_export(sub)
    from .adapters.cli import add_finetune_parser

    add_finetune_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "finetune":
            from .adapters.cli import run_finetune

            return run_finetune(args)
        if args.adapter != "builtin":
            from .adapters.cli import run_adapter_export

            return _write_triton(args, run_adapter_export(args))
        if args.checkpoint is None:
            raise ValueError("export needs --checkpoint")
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
    widths = tuple(int(w) for w in args.bottleneck_dims.split(",") if w.strip())
    if args.init_from is not None:
        from dataclasses import replace

        from .train import load_checkpoint

        start, _ = load_checkpoint(args.init_from)
        vit = replace(start.cfg, bottleneck_dims=widths or start.cfg.bottleneck_dims)
    else:
        vit = ViTConfig(dim=args.dim, depth=args.depth, heads=args.heads, split=args.split, stem=args.stem,
                        bottleneck_dims=widths)
    cfg = TrainConfig(epochs=args.epochs, canvases_per_epoch=args.canvases_per_epoch, batch_size=args.batch_size,
                      lr=args.lr, seed=args.seed, init_from=str(args.init_from) if args.init_from else None)
    model, summary = train(vit, cfg, device=device, progress=not args.no_progress)
    save_checkpoint(model, args.out, summary)
    print(json.dumps({"checkpoint": str(args.out), **summary["test_metrics_during_training"],
                      "train_seconds": summary["train_seconds"]}, indent=2))
    return 0


def _export(args: argparse.Namespace) -> int:
    from .pipeline import ExportOptions, export_model

    auto = lambda value, kind: value if value in ("auto", "none") else kind(value)  # noqa: E731
    options = ExportOptions(name=args.name, opset=args.opset, mass=auto(args.mass, float), budget=auto(args.budget, int),
                            bottleneck=auto(args.bottleneck, int), encoding=args.encoding,
                            max_accuracy_drop=args.max_accuracy_drop, calibration_size=args.calibration_size,
                            quantize=args.quantize, plot=not args.no_plot)
    manifest = export_model(args.checkpoint, args.out, options)
    report = {"model_dir": str(args.out), "exit_threshold": manifest["exit"]["threshold"], **manifest["calibration"]}
    if "device_variants" in manifest:
        report["device_variants"] = {k: manifest["device_variants"][k] for k in
                                     ("float", "int8", "latency_ratio_int8_over_float", "faster", "auto_choice")}
    print(json.dumps(report, indent=2))
    return _write_triton(args, 0)


def _write_triton(args: argparse.Namespace, status: int) -> int:
    """After a successful export, add its server half to the Triton repository given with --triton."""
    if status != 0 or args.triton is None:
        return status
    from .triton import write_triton_repository

    folder = write_triton_repository(args.out, args.triton)
    print(json.dumps({"triton_model": str(folder)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
