"""``splitinfer-export``: train the built-in ViT, fine-tune exits and scorers, export any model.

    splitinfer-export train  --out checkpoints/vit-cluttered-mnist.pt [--epochs 40 --device cuda]
    splitinfer-export export --checkpoint checkpoints/vit-cluttered-mnist.pt --out artifacts/model
    splitinfer-export export --adapter timm --timm-model deit_tiny_patch16_224 --data imagefolder:photos --out ...
    splitinfer-export export --adapter hf --hf-model DIR --data bbcnews --heads heads.pt --out ...
    splitinfer-export finetune --adapter hf --hf-model DIR --split 3 --out heads.pt

Every export goes through one pipeline (calibration, operating points, both halves verified,
INT8 half, zstd dictionary, Triton). An option that cannot apply to a model is an error (exit 2).
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import sys
from pathlib import Path

__all__ = ["main", "build_split_model"]

HEADS_FORMAT = "splitinfer-heads/1"


def _add_model_arguments(p: argparse.ArgumentParser, finetune: bool = False) -> None:
    from .adapters import ADAPTERS

    g = p.add_argument_group("model")
    g.add_argument("--adapter", choices=tuple(ADAPTERS), default="builtin",
                   help="; ".join(f"{a.name}: {a.help}" for a in ADAPTERS.values()))
    g.add_argument("--checkpoint", type=Path, default=None, help="builtin: the ViT checkpoint; timm: its weights")
    g.add_argument("--timm-model", default=None, help="timm: model name, e.g. deit_tiny_patch16_224")
    g.add_argument("--num-classes", type=int, default=None, help="timm: classifier width of the checkpoint")
    g.add_argument("--hf-model", type=Path, default=None, help="hf: local folder (config, weights, tokenizer.json)")
    g.add_argument("--max-length", type=int, default=None, help="hf: longest input in tokens (default: the folder's)")
    g.add_argument("--split", type=int, default=None, help="blocks on the device (default: the adapter's)")
    if not finetune:
        g.add_argument("--heads", type=Path, default=None,
                       help="exit head, scorer and bottlenecks from 'splitinfer-export finetune'")
    g.add_argument("--data", default=None,
                   help="calibration data: cluttered-mnist (builtin default), imagefolder:DIR, bbcnews, docstrings")


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
    p = sub.add_parser("export", help="measure operating points, export device.onnx, server.onnx and manifest.json")
    p.add_argument("--out", type=Path, required=True, help="model folder to write")
    p.add_argument("--name", default=None, help="model name in requests (default: from the model)")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--mass", default="auto", help="share of the importance mass the edge keeps (default: auto)")
    p.add_argument("--budget", default="auto", help="most tokens the edge sends besides CLS (default: auto)")
    p.add_argument("--bottleneck", default="auto",
                   help="learned bottleneck width to deploy: auto (fewest bytes within the accuracy target), none, "
                        "or a trained width")
    p.add_argument("--encoding", default="auto", choices=("auto", "fp32", "fp16", "int8", "int4"),
                   help="token encoding of the default operating point")
    p.add_argument("--no-plot", action="store_true", help="skip pareto.png")
    p.add_argument("--max-accuracy-drop", type=float, default=0.002,
                   help="the default operating point is the cheapest certified point within this of the most accurate one")
    p.add_argument("--epsilon", type=float, default=0.02,
                   help="tolerated accuracy loss against the whole model, certified by Learn-then-Test (default 0.02)")
    p.add_argument("--delta", type=float, default=0.1,
                   help="the certificate holds with probability >= 1 - delta over the calibration draw (default 0.1)")
    p.add_argument("--exit-policy", choices=("auto", "max_softmax", "view_consistency"), default="auto",
                   help="the device's exit confidence: view_consistency (the exit head also sees the image rolled "
                        "by --view-shift; image classifiers), max_softmax; auto: view_consistency for images, "
                        "max_softmax for text")
    p.add_argument("--view-shift", default=None, metavar="ROWS,COLS",
                   help="with view_consistency: pixels the second view is rolled by (default -2,-2)")
    p.add_argument("--calibration-size", type=int, default=None, help="calibration inputs (default: the whole split)")
    p.add_argument("--quantize", choices=("int8",), default=None,
                   help="also write an INT8 device half (static, calibrated; QDQ and QOperator tried) beside the float one")
    p.add_argument("--triton", type=Path, default=None, metavar="DIR",
                   help="also write the server half into this Triton model repository (config.pbtxt + model.onnx)")
    p.add_argument("--triton-provider", default=None,
                   help="with --triton: where Triton runs the server half (cpu, cuda, tensorrt, openvino; default cpu)")
    _add_model_arguments(p)


def _add_finetune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="distil an exit head and a learned token scorer into an existing model")
    _add_model_arguments(p, finetune=True)
    p.add_argument("--texts", type=Path, default=None,
                   help="hf: training text, one per line (default: the offline docstring corpus)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--backbone", choices=("frozen", "light"), default="frozen")
    p.add_argument("--straight-through-weight", type=float, default=0.0,
                   help="weight of the straight-through top-k distillation term (default 0: rollout target only)")
    p.add_argument("--bottleneck-dims", default="",
                   help="also train learned split bottlenecks of these widths, e.g. 32,16 (any adapter)")
    p.add_argument("--bottleneck-steps", type=int, default=400)
    p.add_argument("--no-exit-scorer", action="store_true", help="train only the bottlenecks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="file to write (exit head + scorer + bottlenecks, .pt)")
    p.add_argument("--no-progress", action="store_true")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="splitinfer-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_export(sub)
    _add_finetune(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return {"train": _train, "export": _export, "finetune": _finetune}[args.command](args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"splitinfer-export: error: {exc}", file=sys.stderr)
        return 2


def build_split_model(args: argparse.Namespace):
    """The adapter the flags name, cut at --split, with --heads loaded when given."""
    import torch

    from .adapters import UnsupportedModelError, load_backbone
    from .adapters.split import SplitModel

    options = {k: getattr(args, k, None) for k in ("checkpoint", "timm_model", "num_classes", "hf_model", "max_length")}
    heads = getattr(args, "heads", None)
    if args.adapter == "hf" and heads is not None and Path(heads).is_file():
        from .text_finetune import build_text_classifier, is_text_heads

        blob = torch.load(heads, map_location="cpu", weights_only=True)
        if is_text_heads(blob):  # a bare encoder made a classifier: classes, heads and bottlenecks from the file
            if args.split and args.split != blob["split"]:
                raise ValueError(f"{heads} was trained for split {blob['split']}, exporting split {args.split}")
            return build_text_classifier(args.hf_model, heads=blob)[0]
    try:
        backbone, entry = load_backbone(args.adapter, options)
    except UnsupportedModelError as exc:
        raise ValueError(str(exc)) from exc
    split = args.split or entry.default_split(backbone)
    model = SplitModel(backbone, split)
    heads = getattr(args, "heads", None)
    if heads is not None:
        if not Path(heads).is_file():
            raise FileNotFoundError(f"heads file not found: {heads}")
        blob = torch.load(heads, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or blob.get("format") != HEADS_FORMAT:
            raise ValueError(f"{heads} is not a file written by 'splitinfer-export finetune'")
        if blob["split"] != split:
            raise ValueError(f"{heads} was trained for split {blob['split']}, exporting split {split}")
        load_heads(model, blob)
    return model


def load_heads(model, blob: dict) -> None:
    """Load a heads file (exit head, scorer, bottlenecks, optionally a tuned backbone) into ``model``."""
    from .adapters.split import TokenScorer

    state = blob["state"]
    if any(k.startswith("scorer.") for k in state):
        model.scorer = TokenScorer(model.backbone.dim, hidden=state["scorer.local.weight"].shape[0])
        model.importance = "learned"
    model.exit_head.load_state_dict({k[10:]: v for k, v in state.items() if k.startswith("exit_head.")})
    widths = sorted({int(k.split(".")[1]) for k in state if k.startswith("bottlenecks.")})
    for w in widths:
        model.add_bottleneck(w).load_state_dict(
            {k.split(".", 2)[2]: v for k, v in state.items() if k.startswith(f"bottlenecks.{w}.")})
    if model.scorer is not None:
        model.scorer.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("scorer.")})
    if blob.get("backbone_state"):
        model.backbone.load_state_dict(blob["backbone_state"])
    model.eval()


def _view_shift(args: argparse.Namespace) -> dict:
    if args.view_shift is None:
        return {}
    if args.exit_policy not in ("auto", "view_consistency"):
        raise ValueError(f"--view-shift applies to --exit-policy view_consistency, not {args.exit_policy}")
    try:
        rows, cols = (int(v) for v in args.view_shift.split(","))
    except ValueError:
        raise ValueError(f"--view-shift must be ROWS,COLS (two integers), got {args.view_shift!r}") from None
    return {"view_shift": (rows, cols)}


def _export(args: argparse.Namespace) -> int:
    from .datasets import default_data, load_dataset
    from .exit_score import exit_spec_for
    from .pipeline import ExportOptions, export_split_model

    model = build_split_model(args)
    backbone = model.backbone
    if model.importance == "learned" and backbone.input_kind == "image" and args.budget != "auto":
        model.keep_ratio = min(1.0, int(args.budget) / (backbone.manifest_fields()["tokens"]["num_tokens"] - 1))
    auto = lambda value, kind: value if value in ("auto", "none") else kind(value)  # noqa: E731
    name = args.name or {"builtin": "vit-cluttered-mnist", "timm": args.timm_model,
                         "hf": Path(str(args.hf_model)).name}[args.adapter]
    options = ExportOptions(name=str(name).replace(" ", "-"), opset=args.opset, mass=auto(args.mass, float),
                            budget=auto(args.budget, int), bottleneck=auto(args.bottleneck, int),
                            encoding=args.encoding, max_accuracy_drop=args.max_accuracy_drop,
                            epsilon=args.epsilon, delta=args.delta,
                            calibration_size=args.calibration_size, quantize=args.quantize, plot=not args.no_plot,
                            exit_policy=args.exit_policy, **_view_shift(args))
    options.space_for(model)  # an option the model cannot take fails before any data is read
    exit_spec_for(model, options.exit_policy, options.view_shift)
    if args.triton_provider is not None and args.triton is None:
        raise ValueError("--triton-provider applies with --triton DIR")
    if args.triton_provider is not None:
        from .triton import TritonOptions

        TritonOptions(provider=args.triton_provider)
    spec = args.data or default_data(args.adapter, backbone.task)
    if spec is None:
        raise ValueError(f"--adapter {args.adapter} ({backbone.task}) needs --data: calibration inputs"
                         " (imagefolder:DIR for images, bbcnews for text)")
    calibration = load_dataset(spec, "calibration", backbone, n=args.calibration_size)
    manifest = export_split_model(model, args.out, options, calibration)
    c = manifest.calibration
    report = {"model_dir": str(args.out), "name": manifest.name, "version": manifest.version, "task": manifest.task,
              "split": manifest.split, "bottleneck": manifest.bottleneck, "exit_policy": manifest.exit.score,
              "exit_threshold": manifest.exit.threshold,
              "data": c.data, "n": c.n, "accuracy_full": c.accuracy_full, "accuracy_split": c.accuracy_split,
              "exit_rate": c.exit_rate, "mean_bytes_per_request": c.mean_bytes_per_request,
              "guarantee": c.guarantee.to_json(), "files": sorted(manifest.files),
              "device_auto_choice": manifest.device_auto_choice}
    print(json.dumps(report, indent=2))
    if args.triton is not None:
        from .triton import TritonOptions, write_triton_repository

        folder = write_triton_repository(args.out, args.triton, TritonOptions(provider=args.triton_provider or "cpu"))
        print(json.dumps({"triton_model": str(folder)}))
    return 0


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


def _finetune(args: argparse.Namespace) -> int:
    import torch

    from .datasets import default_data, load_dataset
    from .finetune import FinetuneConfig, finetune

    model = build_split_model(args)
    backbone = model.backbone
    widths = tuple(int(w) for w in args.bottleneck_dims.split(",") if w.strip())
    spec = args.data or default_data(args.adapter, backbone.task)
    if args.adapter == "hf" and args.texts is not None:
        if args.data is not None:
            raise ValueError("--texts and --data exclude each other")
        spec = None
    elif args.texts is not None:
        raise ValueError("--texts applies to --adapter hf")
    summary: dict = {}
    train = load_dataset(spec, "train", backbone) if spec is not None else None
    if not args.no_exit_scorer:
        cfg = FinetuneConfig(steps=args.steps, lr=args.lr, backbone=args.backbone, seed=args.seed,
                             straight_through_weight=args.straight_through_weight,
                             train_exit=args.adapter != "builtin",
                             cache_batches=0 if args.backbone == "light" else min(args.steps, 64))
        summary = finetune(model, _batches(args, model, train), cfg, progress=not args.no_progress)
    if widths:
        if train is None:
            raise ValueError("--bottleneck-dims needs --data (the inputs to fit the bottlenecks on)")
        from .bottleneck import train_bottlenecks

        summary["bottlenecks"] = train_bottlenecks(model, train, widths, steps=args.bottleneck_steps, seed=args.seed)
    if not summary:
        raise ValueError("nothing to train: --no-exit-scorer without --bottleneck-dims")
    blob = {"format": HEADS_FORMAT, "adapter": args.adapter, "split": model.split, "state": model.trainable_state(),
            "backbone_state": model.backbone.state_dict() if args.backbone == "light" else None, "summary": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(blob, args.out)
    print(json.dumps({"heads": str(args.out), **summary}, indent=2))
    return 0


def _batches(args: argparse.Namespace, model, train):
    """batches(seed) for finetune(): the training split of --data (labels when it has them), or the
    lines of --texts / the docstring corpus for a text model."""
    import numpy as np
    import torch

    from .datasets import Dataset

    if train is not None:
        def batches(seed):
            epoch = 0
            while True:
                order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + epoch)).numpy()
                for i in range(0, len(order) - args.batch_size + 1, args.batch_size):
                    rows = np.sort(order[i:i + args.batch_size])
                    part = Dataset(train.name, {k: v[rows] for k, v in train.inputs.items()},
                                   None if train.labels is None else train.labels[rows])
                    inputs, _ = next(part.batches(len(rows)))
                    yield inputs, None if part.labels is None else torch.from_numpy(part.labels)
                epoch += 1
        return batches
    from .adapters.hf_bert import tokenize
    from .text_data import load_corpus

    texts = ([t.strip() for t in args.texts.read_text().splitlines() if t.strip()] if args.texts
             else load_corpus("train"))
    tokenizer_file = Path(args.hf_model) / "tokenizer.json"

    def text_batches(seed):
        rng = random.Random(seed)
        while True:
            chunk = sorted(rng.sample(texts, min(len(texts), args.batch_size * 8)), key=len)
            for i in range(0, len(chunk), args.batch_size):
                yield tokenize(tokenizer_file, chunk[i:i + args.batch_size], model.backbone.max_length), None
    return text_batches


if __name__ == "__main__":
    sys.exit(main())
