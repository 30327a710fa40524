"""Command-line glue for the adapters: ``splitinfer-export export --adapter ...`` and ``finetune``.

    splitinfer-export export --adapter hf --hf-model DIR --split 3 --out artifacts/minilm
    splitinfer-export export --adapter timm --timm-model deit_tiny_patch16_224 --checkpoint w.pth \\
        --split 6 --out artifacts/deit
    splitinfer-export finetune --adapter hf --hf-model DIR --split 3 --out heads.pt [--steps 300]
    splitinfer-export export --adapter hf --hf-model DIR --split 3 --heads heads.pt --out ...
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

__all__ = ["add_adapter_arguments", "add_finetune_parser", "run_adapter_export", "run_finetune", "build_split_model"]

HEADS_FORMAT = "splitinfer-heads/1"


def add_adapter_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("bring your own model")
    g.add_argument("--adapter", choices=("builtin", "timm", "hf"), default="builtin",
                   help="builtin: the built-in ViT checkpoint; timm: a timm VisionTransformer; hf: a BERT-family folder")
    g.add_argument("--timm-model", default=None, help="timm model name, e.g. deit_tiny_patch16_224 (weights: --checkpoint)")
    g.add_argument("--num-classes", type=int, default=None, help="timm: classifier width of the checkpoint")
    g.add_argument("--hf-model", type=Path, default=None, help="local Hugging Face folder (config, weights, tokenizer.json)")
    g.add_argument("--split", type=int, default=None, help="blocks on the device (default: the built-in model's own)")
    g.add_argument("--max-length", type=int, default=None, help="hf: longest input in tokens (default: the folder's)")
    g.add_argument("--keep-ratio", type=float, default=0.5, help="hf: share of real tokens the edge sends")
    g.add_argument("--exit-threshold", type=float, default=1.0,
                   help="timm/hf classifiers: exit confidence (default 1.0: never exit until calibrated)")
    g.add_argument("--heads", type=Path, default=None, help="exit head + token scorer from 'splitinfer-export finetune'")


def add_finetune_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="distil an exit head and a learned token scorer into an existing model")
    p.add_argument("--adapter", choices=("builtin", "hf"), required=True)
    p.add_argument("--checkpoint", type=Path, default=None, help="builtin: the ViT checkpoint")
    p.add_argument("--hf-model", type=Path, default=None)
    p.add_argument("--split", type=int, default=None)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--texts", type=Path, default=None,
                   help="hf: training text, one per line (default: the offline docstring corpus)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--backbone", choices=("frozen", "light"), default="frozen")
    p.add_argument("--straight-through-weight", type=float, default=0.0,
                   help="weight of the straight-through top-k distillation term (default 0: rollout target only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="file to write (exit head + scorer, .pt)")
    p.add_argument("--no-progress", action="store_true")


def build_split_model(args: argparse.Namespace):
    """The adapter the flags name, cut at --split, with --heads loaded when given."""
    import torch

    from .split import SplitModel

    if args.adapter == "builtin":
        if args.checkpoint is None:
            raise ValueError("--adapter builtin needs --checkpoint")
        from ..train import load_checkpoint
        from .vit import BuiltinViT

        vit, _ = load_checkpoint(args.checkpoint)
        backbone = BuiltinViT(vit)
        split = args.split or vit.cfg.split
    elif args.adapter == "timm":
        if not getattr(args, "timm_model", None):
            raise ValueError("--adapter timm needs --timm-model (and --checkpoint for weights)")
        from .timm_vit import load_timm_vit

        backbone = load_timm_vit(args.timm_model, args.checkpoint, num_classes=args.num_classes)
        split = args.split or backbone.depth // 2
    else:
        if args.hf_model is None:
            raise ValueError("--adapter hf needs --hf-model DIR")
        from .hf_bert import load_hf_encoder

        backbone = load_hf_encoder(args.hf_model, max_length=args.max_length)
        split = args.split or backbone.depth // 2
    model = SplitModel(backbone, split)
    heads = getattr(args, "heads", None)
    if heads is not None:
        blob = torch.load(heads, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or blob.get("format") != HEADS_FORMAT:
            raise ValueError(f"{heads} is not a file written by 'splitinfer-export finetune'")
        if blob["split"] != split:
            raise ValueError(f"{heads} was trained for split {blob['split']}, exporting split {split}")
        load_heads(model, blob)
    return model


def load_heads(model, blob: dict) -> None:
    from .split import TokenScorer

    state = blob["state"]
    if any(k.startswith("scorer.") for k in state):
        model.scorer = TokenScorer(model.backbone.dim, hidden=state["scorer.local.weight"].shape[0])
        model.importance = "learned"
    model.exit_head.load_state_dict({k[10:]: v for k, v in state.items() if k.startswith("exit_head.")})
    if model.scorer is not None:
        model.scorer.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("scorer.")})
    if blob.get("backbone_state"):
        model.backbone.load_state_dict(blob["backbone_state"])
    model.eval()


def run_adapter_export(args: argparse.Namespace) -> int:
    from .split_export import AdapterExportOptions, export_adapter_model

    model = build_split_model(args)
    budget = int(args.budget) if str(getattr(args, "budget", "auto")).isdigit() else 16
    mass = float(args.mass) if str(getattr(args, "mass", "auto")).replace(".", "", 1).isdigit() else 0.9
    name = args.name if args.name != "vit-cluttered-mnist" else (args.timm_model or Path(args.hf_model).name)
    options = AdapterExportOptions(name=name.replace(" ", "-"), opset=args.opset, keep_ratio=args.keep_ratio,
                                   exit_threshold=args.exit_threshold, budget=int(budget), mass=mass)
    manifest = export_adapter_model(model, args.out, options)
    print(json.dumps({"model_dir": str(args.out), "task": manifest["task"], "split": manifest["split"],
                      "importance": manifest["selection"]["importance"],
                      "parity_max_abs_diff": manifest["parity_max_abs_diff"]}, indent=2))
    return 0


def run_finetune(args: argparse.Namespace) -> int:
    import torch

    from ..finetune import FinetuneConfig, finetune

    model = build_split_model(argparse.Namespace(**{**vars(args), "heads": None}))
    cfg = FinetuneConfig(steps=args.steps, lr=args.lr, backbone=args.backbone, seed=args.seed,
                         straight_through_weight=args.straight_through_weight,
                         train_exit=args.adapter != "builtin",
                         cache_batches=0 if args.backbone == "light" else min(args.steps, 64))
    if args.adapter == "hf":
        from ..text_data import load_corpus
        from .hf_bert import tokenize

        texts = ([t.strip() for t in args.texts.read_text().splitlines() if t.strip()] if args.texts
                 else load_corpus("train"))
        tokenizer_file = Path(args.hf_model) / "tokenizer.json"

        def batches(seed):
            rng = random.Random(seed)
            while True:
                chunk = sorted(rng.sample(texts, min(len(texts), args.batch_size * 8)), key=len)
                for i in range(0, len(chunk), args.batch_size):
                    yield tokenize(tokenizer_file, chunk[i:i + args.batch_size], model.backbone.max_length), None
    else:
        from ..data import ClutterConfig, make_split
        from ..preprocess import normalize

        def batches(seed):
            epoch = 0
            while True:
                xs, ys = make_split("train", n=args.batch_size * 32, config=ClutterConfig(), seed=0)
                order = torch.randperm(len(xs), generator=torch.Generator().manual_seed(seed + epoch)).numpy()
                for i in range(0, len(order), args.batch_size):
                    sel = order[i:i + args.batch_size]
                    yield {"image": torch.from_numpy(normalize(xs[sel]))}, torch.from_numpy(ys[sel])
                epoch += 1
    summary = finetune(model, batches, cfg, progress=not args.no_progress)
    blob = {"format": HEADS_FORMAT, "adapter": args.adapter, "split": model.split, "state": model.trainable_state(),
            "backbone_state": model.backbone.state_dict() if args.backbone == "light" else None, "summary": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(blob, args.out)
    print(json.dumps({"heads": str(args.out), **summary}, indent=2))
    return 0
