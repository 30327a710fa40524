"""The learned split bottleneck: the encoder ends the device half, the decoder starts the server half.

Applied per token, so pruning commutes with it: tokens (B, N, d) -> codes (B, N, w) on the device,
codes (B, T, w) -> tokens (B, T, d) on the server. Trained with the model (the built-in ViT's
``train``) or on a frozen backbone (the text recipe), through int8/int4 round trips of the codes.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

__all__ = ["Bottleneck"]


class Bottleneck(nn.Module):
    def __init__(self, dim: int, width: int):
        super().__init__()
        if not 1 <= width:
            raise ValueError(f"bottleneck width must be >= 1, got {width}")
        self.dim, self.width = dim, width
        self.encoder = nn.Linear(dim, width)
        self.decoder = nn.Sequential(nn.Linear(width, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., w)."""
        return self.encoder(tokens)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(..., w) -> (..., d)."""
        return self.decoder(codes)


def train_bottlenecks(model, data, widths: tuple[int, ...], steps: int = 300, batch_size: int = 64,
                      lr: float = 2e-3, seed: int = 0, cache_rows: int = 2048) -> dict:
    """Train a learned bottleneck of each width on a frozen split model, in place.

    model: a :class:`~splitinfer.export.adapters.split.SplitModel`; data: a
    :class:`~splitinfer.export.datasets.Dataset` (its labels are not needed). The split-layer
    tokens of up to ``cache_rows`` inputs are computed once; each step keeps CLS and the tokens
    covering a random share of the importance (as the edge selects), sends them through the
    encoder, an int8 or int4 round trip (as the codec does) and the decoder, and fits the server
    half's output on them to its output on all tokens (KL for classifiers, 1 - cosine for
    embeddings) plus the reconstruction of the kept tokens. Returns a summary.
    """
    import time

    import torch.nn.functional as F

    from .tokens import fake_quantize, select_tokens_mask, with_cls

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    task = model.backbone.task
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    xs, ws, imps, targets = [], [], [], []
    with torch.no_grad():
        for inputs, _ in data.take(cache_rows).batches(128):
            _, x, importance, w = model.device_forward(inputs)
            full = model.backbone.max_length if data.kind == "text" else x.shape[1]  # text: pad to one length
            xs.append(F.pad(x, (0, 0, 0, full - x.shape[1])))
            ws.append(F.pad(torch.ones(x.shape[:2]) if w is None else w, (0, full - x.shape[1])))
            imps.append(F.pad(importance, (0, full - x.shape[1])))
            targets.append(model.server_forward(x, w))
    x_all, w_all, imp_all, target_all = torch.cat(xs), torch.cat(ws), torch.cat(imps), torch.cat(targets)
    summary: dict = {"steps": steps, "rows": len(x_all), "widths": {}}
    for width in widths:
        bottleneck = model.bottlenecks[str(width)] if str(width) in model.bottlenecks else model.add_bottleneck(width)
        for p in bottleneck.parameters():
            p.requires_grad_(True)
        opt = torch.optim.AdamW(bottleneck.parameters(), lr=lr, weight_decay=0.01)
        t0, losses = time.perf_counter(), []
        bottleneck.train()
        for step in range(steps):
            for g in opt.param_groups:
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            rows = torch.randint(len(x_all), (min(batch_size, len(x_all)),), generator=gen)
            x, w, imp, target = x_all[rows], w_all[rows], imp_all[rows], target_all[rows]
            longest = int((w > 0).sum(1).max())
            x, w, imp = x[:, :longest], w[:, :longest], imp[:, :longest - 1]
            mass = float(0.6 + 0.4 * torch.rand((), generator=gen))
            keep = with_cls(select_tokens_mask(imp, mass, longest) & (w[:, 1:] > 0)) & (w > 0)
            codes = bottleneck.encode(x)
            bits = 4 if step % 2 else 8
            quantized = codes + (fake_quantize(codes.detach(), bits, 0, "fp16") - codes.detach())  # straight through
            decoded = bottleneck.decode(quantized)
            out = model.server_forward(decoded, keep)
            if task == "classification":
                fit = F.kl_div(F.log_softmax(out, -1), F.log_softmax(target, -1), log_target=True, reduction="batchmean")
            else:
                fit = (1 - F.cosine_similarity(out, target, dim=-1)).mean()
            m = keep[..., None].to(x.dtype)
            recon = (((decoded - x) ** 2) * m).sum() / (m.sum() * x.shape[-1]).clamp_min(1.0)
            loss = fit + 0.1 * recon / x.pow(2).mean().clamp_min(1e-6)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(fit.detach()))
        bottleneck.eval()
        for p in bottleneck.parameters():
            p.requires_grad_(False)
        tail = losses[-max(1, steps // 10):]
        summary["widths"][int(width)] = {"final_fit_loss": round(sum(tail) / len(tail), 5),
                                         "seconds": round(time.perf_counter() - t0, 1)}
    return summary
