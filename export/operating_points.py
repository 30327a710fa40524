"""Operating points: what each setting of (exit threshold, importance-mass share and cap, bottleneck
width, bits) costs and buys, measured on the calibration split.

Accuracy comes from the torch model with the mirrors of the edge's functions (selection, int8/int4
round trip with float16 scales); bytes come from the real codec and the real serialized
``InferRequest`` for every offloaded input. The table's Pareto front (accuracy up, mean bytes per
request down) goes into the manifest for the edge's budget controller.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from ..protos.codec import CodecConfig, encode_tokens
from ..protos import splitinfer_pb2 as pb
from .model import SplitViT
from .preprocess import normalize
from .tokens import fake_quantize, select_tokens_mask, with_cls

__all__ = ["SweepSpace", "Simulation", "simulate_configs", "points_for", "pareto_front", "robust_threshold",
           "plot_pareto"]

log = logging.getLogger(__name__)

NEVER_EXIT = 1.0 + 1e-6
SCALE_DTYPE = "fp16"
COMPRESSION = "auto"


@dataclass(frozen=True)
class SweepSpace:
    """The settings measured. widths: bottleneck widths (None = no bottleneck, full dim)."""

    widths: tuple[int | None, ...] = (None,)
    encodings: tuple[str, ...] = ("int8", "int4")
    selections: tuple[tuple[float, int], ...] = ((0.8, 8), (0.9, 16), (0.95, 32))  # (mass, budget) pairs
    thresholds: tuple[float, ...] = (0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, NEVER_EXIT)

    def __post_init__(self) -> None:
        for name in ("widths", "encodings", "selections", "thresholds"):
            if not getattr(self, name):
                raise ValueError(f"{name} must not be empty")
        for mass, budget in self.selections:
            if not 0.0 < mass <= 1.0 or budget < 1:
                raise ValueError(f"a selection is (mass in (0, 1], budget >= 1), got {(mass, budget)}")
        for e in self.encodings:
            if e not in ("fp32", "fp16", "int8", "int4"):
                raise ValueError(f"unknown encoding {e!r}")


@dataclass
class Simulation:
    """Per-input outcomes on one split. Arrays are (n,); ``configs`` maps a config key to
    (split predictions (n,), bytes per request if offloaded (n,), tokens sent (n,))."""

    labels: np.ndarray
    confidence: np.ndarray
    exit_pred: np.ndarray
    full_pred: np.ndarray
    configs: dict


def gather_kept(tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens (B, N, w), mask (B, N) bool -> the kept tokens in order, padded: (B, K, w) and (B, K) bool,
    K = the most kept in any row. Same server output as masking the full set, at less compute."""
    k = int(mask.sum(-1).max())
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)[:, :k]  # kept first, in position order
    kept = tokens.gather(1, order[:, :, None].expand(-1, -1, tokens.shape[-1]))
    return kept, mask.gather(1, order)


def _request_bytes(codes: np.ndarray, keep: np.ndarray, encoding: str, header: dict) -> tuple[np.ndarray, np.ndarray]:
    """codes float32 (n, N, w), keep bool (n, P) -> serialized request bytes (n,), tokens (n,)."""
    config = CodecConfig(encoding, COMPRESSION, scale_dtype=SCALE_DTYPE) if encoding in ("int8", "int4") \
        else CodecConfig(encoding, COMPRESSION)
    sizes, counts = np.empty(len(codes), np.int64), np.empty(len(codes), np.int64)
    for i, (row, k) in enumerate(zip(codes, keep)):
        positions = np.r_[0, 1 + np.flatnonzero(k)]
        packet = encode_tokens(row[positions], positions, config)
        sizes[i] = pb.InferRequest(packet=packet, **header).ByteSize()
        counts[i] = len(positions)
    return sizes, counts


@torch.no_grad()
def simulate_configs(model: SplitViT, images: np.ndarray, labels: np.ndarray, space: SweepSpace,
                     header: dict, batch_size: int = 250) -> Simulation:
    """Run every (width, encoding, mass, budget) over the inputs. ``header``: the InferRequest's
    model / manifest_sha256 / request_id fields as the edge sends them (their size counts)."""
    model.eval()
    conf, exit_pred, full_pred = [], [], []
    outs: dict = {}
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(normalize(images[start:start + batch_size]))
        exit_logits, tokens, importance = model.device_forward(x)
        probs = exit_logits.softmax(-1)
        conf.append(probs.max(-1).values.numpy())
        exit_pred.append(probs.argmax(-1).numpy())
        full_pred.append(model.server_forward(tokens).argmax(-1).numpy())
        for w in space.widths:
            bottleneck = model.bottleneck(w)
            codes = tokens if bottleneck is None else bottleneck.encode(tokens)
            for mass, budget in space.selections:
                keep = select_tokens_mask(importance, mass, budget)
                kept, mask = gather_kept(codes, with_cls(keep))  # (B, K, w): only what is sent
                for enc in space.encodings:
                    if enc in ("int8", "int4"):
                        sent = fake_quantize(kept, 8 if enc == "int8" else 4, 0, SCALE_DTYPE)
                    else:
                        sent = kept.half().float() if enc == "fp16" else kept
                    received = sent if bottleneck is None else bottleneck.decode(sent)
                    pred = model.server_forward(received, mask).argmax(-1).numpy()
                    nbytes, ntok = _request_bytes(codes.numpy(), keep.numpy(), enc, header)
                    acc = outs.setdefault((w, enc, mass, budget), ([], [], []))
                    acc[0].append(pred)
                    acc[1].append(nbytes)
                    acc[2].append(ntok)
    configs = {k: tuple(np.concatenate(v) for v in vals) for k, vals in outs.items()}
    return Simulation(np.asarray(labels), np.concatenate(conf), np.concatenate(exit_pred),
                      np.concatenate(full_pred), configs)


def _outcome(sim: Simulation, key, threshold: float) -> dict:
    split_pred, nbytes, ntok = sim.configs[key]
    exits = sim.confidence >= threshold
    pred = np.where(exits, sim.exit_pred, split_pred)
    off = ~exits
    return {
        "accuracy": float((pred == sim.labels).mean()),
        "exit_rate": float(exits.mean()),
        "mean_bytes_per_request": float(np.where(off, nbytes, 0).mean()),
        "mean_bytes_per_offload": float(nbytes[off].mean()) if off.any() else 0.0,
        "mean_tokens_per_offload": float(ntok[off].mean()) if off.any() else 0.0,
    }


def robust_threshold(sim: Simulation, key, max_accuracy_drop: float) -> float:
    """Lowest threshold t such that every threshold >= t keeps the accuracy within
    ``max_accuracy_drop`` of the full model's (scan down from "never exit", stop at the first failure),
    so one lucky low threshold is not chosen."""
    target = float((sim.full_pred == sim.labels).mean()) - max_accuracy_drop
    candidates = np.unique(np.r_[sim.confidence, NEVER_EXIT])
    chosen = candidates[-1]
    split_pred = sim.configs[key][0]
    order = np.argsort(sim.confidence, kind="stable")
    # accuracy as a function of threshold, vectorised: inputs below t use split_pred
    correct_exit = (sim.exit_pred == sim.labels)[order]
    correct_split = (split_pred == sim.labels)[order]
    conf_sorted = sim.confidence[order]
    n = len(order)
    cum_split = np.r_[0, np.cumsum(correct_split)]
    cum_exit_rev = np.r_[np.cumsum(correct_exit[::-1])[::-1], 0]
    for t in candidates[::-1]:
        below = int(np.searchsorted(conf_sorted, t, side="left"))  # offloaded count
        acc = (cum_split[below] + cum_exit_rev[below]) / n
        if acc < target:
            break
        chosen = t
    return float(chosen)


def points_for(sim: Simulation, space: SweepSpace, max_accuracy_drop: float) -> list[dict]:
    """Every measured point: the calibrated (robust) threshold of each config plus the fixed grid."""
    points = []
    for key in sim.configs:
        w, enc, mass, budget = key
        calibrated = robust_threshold(sim, key, max_accuracy_drop)
        for t in sorted(set(space.thresholds) | {calibrated}):
            points.append({
                "width": w, "encoding": enc, "mass": mass, "budget": budget, "group_size": 0,
                "threshold": round(float(t), 6), "calibrated": bool(t == calibrated), **_outcome(sim, key, t),
            })
    return points


def pareto_front(points: list[dict]) -> list[dict]:
    """Points no other point beats on both accuracy (higher) and mean bytes per request (lower),
    cheapest first."""
    ordered = sorted(points, key=lambda p: (p["mean_bytes_per_request"], -p["accuracy"]))
    front, best = [], -1.0
    for p in ordered:
        if p["accuracy"] > best:
            front.append(p)
            best = p["accuracy"]
    return front


def plot_pareto(points: list[dict], front: list[dict], chosen: dict, path, title: str) -> None:
    """Accuracy against mean bytes per request, one colour per bottleneck width (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    widths = sorted({p["width"] or 0 for p in points})
    for w in widths:
        sel = [p for p in points if (p["width"] or 0) == w]
        ax.scatter([max(p["mean_bytes_per_request"], 0.5) for p in sel], [p["accuracy"] for p in sel], s=8,
                   alpha=0.5, label=f"width {w}" if w else "no bottleneck")
    ax.plot([max(p["mean_bytes_per_request"], 0.5) for p in front], [p["accuracy"] for p in front], "k-", lw=1.2,
            label="Pareto front (deployed width)")
    ax.scatter([max(chosen["mean_bytes_per_request"], 0.5)], [chosen["accuracy"]], marker="*", s=160, c="red",
               zorder=5, label="default point")
    ax.set_xscale("log")
    ax.set_xlabel("mean bytes per request (log)")
    ax.set_ylabel("accuracy (calibration split)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
