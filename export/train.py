"""Train the built-in ViT on cluttered MNIST, keeping both halves useful.

Loss per batch: cross-entropy of the exit head + of the final head on all tokens + of the final
head on a pruned token set (each sample keeps a random number of its most important patches, and
the kept tokens go through an int8 round trip with a straight-through gradient), so the server
half stays accurate on what the edge actually sends. With learned bottlenecks, the mean over
bottleneck widths of the final head's loss on the same pruned tokens sent through encoder ->
int8 or int4 round trip (float16 scales) -> decoder. Fresh clutter every epoch.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import ClutterConfig, load_mnist_digits, make_canvases, split_digits
from .model import SplitViT, ViTConfig
from .preprocess import normalize
from .tokens import fake_quantize, fake_quantize_int8, keep_top_k_mask, with_cls

__all__ = ["TrainConfig", "train", "evaluate", "save_checkpoint", "load_checkpoint"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 40
    canvases_per_epoch: int = 10_500
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 2
    label_smoothing: float = 0.1
    min_keep: int = 2  # fewest patches a pruned training sample keeps
    seed: int = 0
    init_from: str | None = None  # checkpoint whose weights start training (bottlenecks may be new)

    def __post_init__(self) -> None:
        for name in ("epochs", "canvases_per_epoch", "batch_size", "min_keep"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


def _batches(images: np.ndarray, labels: np.ndarray, batch_size: int, device: torch.device, rng=None):
    idx = np.arange(len(images)) if rng is None else rng.permutation(len(images))
    for start in range(0, len(idx), batch_size):
        sel = idx[start:start + batch_size]
        x = torch.from_numpy(normalize(images[sel])).to(device, non_blocking=True)
        y = torch.from_numpy(labels[sel]).to(device, non_blocking=True)
        yield x, y


def train(
    vit: ViTConfig = ViTConfig(),
    cfg: TrainConfig = TrainConfig(),
    clutter: ClutterConfig = ClutterConfig(),
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[SplitViT, dict]:
    """Train from scratch; returns the model (eval mode, on CPU) and a summary dict."""
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    images, labels = load_mnist_digits()
    splits = split_digits(images, labels)
    train_digits, train_labels = splits["train"]
    test_x, test_y = make_canvases(*splits["test"], n=2 * len(splits["test"][0]), config=clutter, seed=3)

    model = SplitViT(vit)
    if cfg.init_from:
        start, _ = load_checkpoint(Path(cfg.init_from))
        missing, unexpected = model.load_state_dict(start.state_dict(), strict=False)
        if unexpected or any(not k.startswith("bottlenecks.") for k in missing):
            raise ValueError(f"{cfg.init_from} does not fit this configuration: missing {missing}, unexpected {unexpected}")
    model = model.to(device)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n and "token" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n and "token" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    steps_per_epoch = math.ceil(cfg.canvases_per_epoch / cfg.batch_size)
    total, warmup = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch

    def lr_at(step: int) -> float:
        if step < warmup:
            return cfg.lr * (step + 1) / warmup
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="train", unit="step")
    step, t0 = 0, time.perf_counter()
    P = vit.num_patches
    for epoch in range(cfg.epochs):
        model.train()
        xs, ys = make_canvases(train_digits, train_labels, cfg.canvases_per_epoch, clutter, seed=10_000 + epoch)
        for x, y in _batches(xs, ys, cfg.batch_size, device, rng):
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            exit_logits, tokens, importance = model.device_forward(x)
            full_logits = model.server_forward(tokens)
            keep = torch.randint(cfg.min_keep, P + 1, (x.shape[0],), device=device)
            mask = with_cls(keep_top_k_mask(importance.detach(), keep))
            quantized = tokens + (fake_quantize_int8(tokens) - tokens).detach()
            pruned_logits = model.server_forward(quantized, mask)
            ce = lambda logits: F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)  # noqa: E731
            loss = ce(exit_logits) + ce(full_logits) + ce(pruned_logits)
            if vit.bottleneck_dims:
                bits = 8 if torch.rand(()).item() < 0.5 else 4
                coded = 0.0
                for bottleneck in model.bottlenecks.values():
                    codes = bottleneck.encode(tokens)
                    codes = codes + (fake_quantize(codes, bits, 0, "fp16") - codes).detach()
                    coded = coded + ce(model.server_forward(bottleneck.decode(codes), mask))
                loss = loss + coded / len(model.bottlenecks)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
        if (epoch + 1) % 10 == 0 or epoch + 1 == cfg.epochs:
            metrics = evaluate(model, test_x, test_y, device)
            log.info("epoch %d (%.0f s): %s", epoch + 1, time.perf_counter() - t0, {k: round(v, 4) for k, v in metrics.items()})
            if bar is not None:
                bar.write(f"epoch {epoch + 1}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    if bar is not None:
        bar.close()
    model = model.cpu().eval()
    summary = {
        "train_config": asdict(cfg),
        "clutter": asdict(clutter),
        "train_seconds": round(time.perf_counter() - t0, 1),
        "device": str(device),
        "test_metrics_during_training": evaluate(model, test_x, test_y, "cpu"),
    }
    return model, summary


@torch.no_grad()
def evaluate(model: SplitViT, images: np.ndarray, labels: np.ndarray, device="cpu", keep_fractions=(0.25, 0.125)) -> dict:
    """Accuracy of the exit head, the full model, and the final head on the top-k patches by importance."""
    model.eval()
    device = torch.device(device)
    P = model.cfg.num_patches
    hits = {"exit": 0, "full": 0, **{f"keep_{f:g}": 0 for f in keep_fractions},
            **{f"bottleneck_{w}_keep_0.25_{b}bit": 0 for w in model.cfg.bottleneck_dims for b in (8, 4)}}
    for x, y in _batches(images, labels, 512, device):
        exit_logits, tokens, importance = model.device_forward(x)
        hits["exit"] += (exit_logits.argmax(-1) == y).sum().item()
        hits["full"] += (model.server_forward(tokens).argmax(-1) == y).sum().item()
        for f in keep_fractions:
            k = torch.full((x.shape[0],), max(1, round(f * P)), device=device)
            logits = model.server_forward(tokens, with_cls(keep_top_k_mask(importance, k)))
            hits[f"keep_{f:g}"] += (logits.argmax(-1) == y).sum().item()
        mask = with_cls(keep_top_k_mask(importance, torch.full((x.shape[0],), P // 4, device=device)))
        for w, bottleneck in model.bottlenecks.items():
            for b in (8, 4):
                codes = fake_quantize(bottleneck.encode(tokens), b, 0, "fp16")
                logits = model.server_forward(bottleneck.decode(codes), mask)
                hits[f"bottleneck_{w}_keep_0.25_{b}bit"] += (logits.argmax(-1) == y).sum().item()
    model.train()
    return {k: v / len(images) for k, v in hits.items()}


def save_checkpoint(model: SplitViT, path: Path, summary: dict | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"format": "splitinfer-vit/1", "config": model.cfg.to_dict(), "state_dict": state, "summary": summary or {}}, path)


def load_checkpoint(path: Path) -> tuple[SplitViT, dict]:
    """Load a checkpoint written by :func:`save_checkpoint` (tensors and plain data only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != "splitinfer-vit/1":
        raise ValueError(f"{path} is not a splitinfer ViT checkpoint (missing format 'splitinfer-vit/1')")
    model = SplitViT(ViTConfig(**blob["config"]))
    model.load_state_dict(blob["state_dict"])
    return model.eval(), blob.get("summary", {})
