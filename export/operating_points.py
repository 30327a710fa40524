"""Operating points: what each setting of (exit threshold, importance-mass share and cap, bottleneck
width, bits) costs and buys, measured on the calibration split.

Accuracy comes from the torch model with the mirrors of the edge's functions (selection, int8/int4
round trip with float16 scales); bytes come from the real codec and the real serialized
``InferRequest`` for every offloaded input. The table's Pareto front (accuracy up, mean bytes per
request down) goes into the manifest for the edge's budget controller. Each config's exit threshold
is certified by Learn-then-Test (:func:`certify_configs`, :mod:`splitinfer.protos.calibration`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from ..protos import splitinfer_pb2 as pb
from ..protos.calibration import clopper_pearson_upper, learn_then_test, split_losses
from ..protos.codec import CodecConfig, encode_tokens
from ..protos.manifest import ExitSpec
from ..protos.points import pareto_front
from .adapters.split import SplitModel
from .datasets import Dataset
from .exit_score import device_pass, exit_spec_for
from .tokens import fake_quantize, select_tokens_mask, with_cls

__all__ = ["SweepSpace", "Simulation", "simulate_configs", "points_for", "pareto_rows", "config_losses",
           "certify_configs", "default_point", "plot_pareto", "NEVER_EXIT", "LTT_THRESHOLDS", "LTT_SEQUENCES"]

log = logging.getLogger(__name__)

NEVER_EXIT = 1.0 + 1e-6
# Learn-then-Test's candidate exit thresholds, fixed before any data is seen and ordered from the most
# conservative (never exit) to the least: 1 - threshold on a geometric grid from 1e-7 to 0.9.
LTT_THRESHOLDS = np.r_[NEVER_EXIT, 1.0, 1.0 - np.geomspace(1e-7, 0.9, 300)]
LTT_SEQUENCES = 2  # certify_configs tests each config down and up its threshold sequence
SCALE_DTYPE = "fp16"
COMPRESSION = "auto"


@dataclass(frozen=True)
class SweepSpace:
    """The settings measured. widths: bottleneck widths (None = no bottleneck, full dim)."""

    widths: tuple[int | None, ...] = (None,)
    encodings: tuple[str, ...] = ("int8", "int4")
    selections: tuple[tuple[float, int], ...] = ((0.8, 8), (0.9, 16), (0.95, 32))  # (mass, budget) pairs
    # 0.0 exits every input: the 0-byte floor a byte, latency or battery budget can fall back to
    thresholds: tuple[float, ...] = (0.0, 0.2, 0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, NEVER_EXIT)

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
    """Per-input outcomes on one split, arrays (n,). ``confidence``: the exit policy's confidence (0
    for embedding models, which never exit). ``exit_correct`` / ``full_correct``: 1/0 label
    correctness of the exit head and of the whole model (classification; unlabelled data is scored
    against the whole model's own answer) or the cosine to the whole model's embedding.
    ``configs`` maps (width, encoding, mass, budget) to (correctness of the server's answer on what
    the edge would send (n,), bytes per request if offloaded (n,), tokens sent (n,)). ``exit_pred``
    and ``full_pred``: predicted classes (classification only, else None)."""

    labels: np.ndarray | None
    confidence: np.ndarray
    exit_correct: np.ndarray
    full_correct: np.ndarray
    configs: dict
    exit_pred: np.ndarray | None = None
    full_pred: np.ndarray | None = None
    server_pred: dict | None = None  # config -> the server's predicted class per input (classification)

    def disagreement(self, key, threshold: float) -> float | None:
        """Share of the inputs config ``key`` answers on the device at ``threshold`` where the server
        would have answered otherwise (the field audit's calibrated rate); None if it cannot tell."""
        if self.server_pred is None or self.exit_pred is None:
            return None
        exits = self.confidence >= threshold
        if not exits.any():
            return None
        return float((self.exit_pred[exits] != self.server_pred[key][exits]).mean())

    @property
    def accuracy_full(self) -> float:
        return float(self.full_correct.mean())


def gather_kept(tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens (B, N, w), mask (B, N) bool -> the kept tokens in order, padded: (B, K, w) and (B, K) bool,
    K = the most kept in any row. Same server output as masking the full set, at less compute."""
    k = int(mask.sum(-1).max())
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)[:, :k]  # kept first, in position order
    kept = tokens.gather(1, order[:, :, None].expand(-1, -1, tokens.shape[-1]))
    return kept, mask.gather(1, order)


def _request_bytes(codes: np.ndarray, keep: np.ndarray, encoding: str, header: dict) -> tuple[np.ndarray, np.ndarray]:
    """codes float32 (n, N, w), keep bool (n, N - 1) -> serialized request bytes (n,), tokens (n,)."""
    config = CodecConfig(encoding, COMPRESSION, scale_dtype=SCALE_DTYPE) if encoding in ("int8", "int4") \
        else CodecConfig(encoding, COMPRESSION)
    sizes, counts = np.empty(len(codes), np.int64), np.empty(len(codes), np.int64)
    for i, (row, k) in enumerate(zip(codes, keep)):
        positions = np.r_[0, 1 + np.flatnonzero(k)]
        packet = encode_tokens(row[positions], positions, config)
        sizes[i] = pb.InferRequest(packet=packet, **header).ByteSize()
        counts[i] = len(positions)
    return sizes, counts


def _score(task: str, out: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """Per-row correctness: (argmax == label) for classifiers, cosine to the whole model's embedding."""
    if task == "classification":
        return (out.argmax(-1) == labels).double().numpy()
    cos = torch.nn.functional.cosine_similarity(out, reference, dim=-1).double()
    return cos.clamp(0.0, 1.0).numpy()  # a score in [0, 1], like label correctness


def _sent(kept: torch.Tensor, encoding: str) -> torch.Tensor:
    """What the server decodes from ``kept`` tokens after the codec's round trip."""
    if encoding in ("int8", "int4"):
        return fake_quantize(kept, 8 if encoding == "int8" else 4, 0, SCALE_DTYPE)
    return kept.half().float() if encoding == "fp16" else kept


@torch.no_grad()
def simulate_configs(model: SplitModel, data: Dataset, space: SweepSpace, header: dict,
                     exit: ExitSpec | None = None, batch_size: int = 250) -> Simulation:
    """Run every (width, encoding, mass, budget) over ``data``. ``header``: the InferRequest's
    model / manifest_sha256 / request_id fields as the edge sends them (their size counts). exit:
    the exit policy whose confidence decides (default: the model's ``auto`` policy)."""
    model.eval()
    exit = exit_spec_for(model) if exit is None else exit
    task = model.backbone.task
    conf, exit_c, full_c, exit_p, full_p, labels_all = [], [], [], [], [], []
    outs: dict = {}
    server_p: dict = {}
    for inputs, rows in data.batches(batch_size):
        exit_out, tokens, importance, w, confidence = device_pass(model, inputs, exit)
        full = model.server_forward(tokens, w)
        if task == "classification":
            labels = torch.from_numpy(data.labels[rows]) if data.labels is not None else full.argmax(-1)
            conf.append(confidence.double().numpy())
            exit_p.append(exit_out.argmax(-1).numpy())
            full_p.append(full.argmax(-1).numpy())
            labels_all.append(labels.numpy())
        else:
            labels = None
            conf.append(np.zeros(len(full)))
        exit_c.append(_score(task, exit_out, full, labels))
        full_c.append(_score(task, full, full, labels))
        real = None if w is None else (w[:, 1:] > 0)
        for width in space.widths:
            bottleneck = model.bottleneck(width)
            codes = tokens if bottleneck is None else bottleneck.encode(tokens)
            codes_np = codes.numpy()
            for mass, budget in space.selections:
                keep = select_tokens_mask(importance, mass, budget)
                if real is not None:
                    keep = keep & real
                kept, mask = gather_kept(codes, with_cls(keep))  # (B, K, w): only what is sent
                for enc in space.encodings:
                    sent = _sent(kept, enc)
                    received = sent if bottleneck is None else bottleneck.decode(sent)
                    out = model.server_forward(received, mask)
                    nbytes, ntok = _request_bytes(codes_np, keep.numpy(), enc, header)
                    acc = outs.setdefault((width, enc, mass, budget), ([], [], []))
                    acc[0].append(_score(task, out, full, labels))
                    acc[1].append(nbytes)
                    acc[2].append(ntok)
                    if task == "classification":
                        server_p.setdefault((width, enc, mass, budget), []).append(out.argmax(-1).numpy())
    configs = {k: tuple(np.concatenate(v) for v in vals) for k, vals in outs.items()}
    cat = lambda xs: np.concatenate(xs) if xs else None  # noqa: E731
    return Simulation(cat(labels_all), np.concatenate(conf), np.concatenate(exit_c), np.concatenate(full_c), configs,
                      cat(exit_p), cat(full_p), {k: np.concatenate(v) for k, v in server_p.items()} or None)


def _outcome(sim: Simulation, key, threshold: float, delta: float | None = None) -> dict:
    """What config ``key`` buys and costs at ``threshold``; with ``delta`` (0/1 correctness only)
    also the one-sided (1 - delta) Clopper-Pearson lower bound on its accuracy."""
    split_correct, nbytes, ntok = sim.configs[key]
    exits = sim.confidence >= threshold
    correct = np.where(exits, sim.exit_correct, split_correct)
    off = ~exits
    out = {
        "accuracy": float(correct.mean()),
        "exit_rate": float(exits.mean()),
        "mean_bytes_per_request": float(np.where(off, nbytes, 0).mean()),
        "mean_bytes_per_offload": float(nbytes[off].mean()) if off.any() else 0.0,
        "mean_tokens_per_offload": float(ntok[off].mean()) if off.any() else 0.0,
    }
    if delta is not None:
        wrong = int(round(len(correct) - correct.sum()))
        out["accuracy_lower_bound"] = min(out["accuracy"], 1.0 - clopper_pearson_upper(wrong, len(correct), delta))
    return out


def config_losses(sim: Simulation, key, thresholds) -> np.ndarray:
    """(m, n) 0/1 loss of config ``key`` against the whole model at each of m thresholds: 1 where the
    whole model is right and the split system wrong (:func:`~splitinfer.protos.calibration.split_losses`)."""
    return split_losses(sim.confidence, thresholds, sim.exit_correct, sim.configs[key][0], sim.full_correct)


def certify_configs(sim: Simulation, epsilon: float, delta: float) -> dict:
    """Learn-then-Test for every config (width, encoding, mass, budget) of ``sim``, two fixed
    sequences each: down :data:`LTT_THRESHOLDS` from "never exit" (the usual case: the exit head is
    the weaker answer) and up from the lowest threshold (a model whose offloads lose more than its
    exit head, such as a narrow bottleneck), each at level delta / (2 K) for K configs (Bonferroni
    over 2 K families), so with probability >= 1 - delta every certified (config, threshold) keeps
    its loss <= epsilon at once and export may deploy any of them. Per config the certificate is the
    lowest certified threshold (the fewest offloads) of the downward sequence, or, when that
    certifies nothing, the upward sequence's first candidate (the lowest threshold of all, so the
    rest of that sequence would never be deployed). Classification outcomes (0/1) only. ->
    {config: Certificate}."""
    level = delta / (LTT_SEQUENCES * len(sim.configs))
    out = {}
    for key in sim.configs:
        losses = config_losses(sim, key, LTT_THRESHOLDS)
        cert = learn_then_test(losses, LTT_THRESHOLDS, epsilon, level)
        out[key] = cert if cert.certified else learn_then_test(losses[-1:], LTT_THRESHOLDS[-1:], epsilon, level)
    return out


def points_for(sim: Simulation, space: SweepSpace, certificates: dict | None = None,
               delta: float | None = None) -> list[dict]:
    """Every measured point: the fixed threshold grid of each config plus its certified threshold
    (``certified`` True) from ``certificates`` (:func:`certify_configs`; None for models that cannot
    exit: only "never exit"). With ``delta``, each point carries its ``accuracy_lower_bound``."""
    points = []
    for key in sim.configs:
        w, enc, mass, budget = key
        cert = certificates[key] if certificates is not None else None
        certified = cert.threshold if cert is not None and cert.certified else None
        grid = set(space.thresholds) if certificates is not None else {NEVER_EXIT}
        for t in sorted(grid | ({certified} if certified is not None else set())):
            points.append({
                "width": w, "encoding": enc, "mass": mass, "budget": budget, "group_size": 0,
                "threshold": float(t), "certified": t == certified, **_outcome(sim, key, t, delta),
            })
    return points


def default_point(points: list[dict], max_accuracy_drop: float) -> tuple[dict, float]:
    """The default operating point among rows of :func:`points_for` and the accuracy target it met:
    the fewest mean bytes per request among the certified rows within ``max_accuracy_drop`` of the
    most accurate certified row; with none certified, the most accurate row of all (fewest bytes
    among equals): offloading everything when the server half is the better answer, exiting when
    the exit head is (a narrow bottleneck can make offloads lose accuracy)."""
    certified = [p for p in points if p["certified"]]
    candidates = certified or points
    target = max(p["accuracy"] for p in candidates) - (max_accuracy_drop if certified else 0.0)
    chosen = min((p for p in candidates if p["accuracy"] >= target),
                 key=lambda p: (p["mean_bytes_per_request"], -p["accuracy"], p["threshold"]))
    return chosen, target


def pareto_rows(points: list[dict]) -> list[dict]:
    """The Pareto front (accuracy up, mean bytes per request down) of measured rows, cheapest first."""
    return pareto_front(points, accuracy=lambda p: p["accuracy"], cost=lambda p: p["mean_bytes_per_request"])


def plot_pareto(points: list[dict], front: list[dict], chosen: dict, path, title: str,
                ids: list[str] | None = None) -> None:
    """Accuracy against mean bytes per request (PNG): one colour per bottleneck width, a marker per
    encoding (o int8, ^ int4, s fp16, D fp32), the deployed Pareto front with its point ids (``ids``,
    in ``front`` order), the default point starred. Points that send nothing (every input exits)
    sit at the left edge, labelled "0 B"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    positive = [p["mean_bytes_per_request"] for p in points if p["mean_bytes_per_request"] > 0]
    floor = (min(positive) / 2) if positive else 1.0  # where a 0-byte point is drawn on the log axis
    xof = lambda p: p["mean_bytes_per_request"] if p["mean_bytes_per_request"] > 0 else floor  # noqa: E731
    markers = {"int8": "o", "int4": "^", "fp16": "s", "fp32": "D"}
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    widths = sorted({p["width"] or 0 for p in points})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, w in enumerate(widths):
        for enc, marker in markers.items():
            sel = [p for p in points if (p["width"] or 0) == w and p["encoding"] == enc]
            if sel:
                ax.scatter([xof(p) for p in sel], [p["accuracy"] for p in sel], s=14, alpha=0.45, marker=marker,
                           color=colors[i % len(colors)],
                           label=f"{'width ' + str(w) if w else 'no bottleneck'}, {enc}")
    ax.plot([xof(p) for p in front], [p["accuracy"] for p in front], "k-", lw=1.2, label="Pareto front (deployed width)")
    for k, p in enumerate(front):
        label = (ids[k] if ids else f"p{k}") + (" (0 B)" if p["mean_bytes_per_request"] == 0 else "")
        ax.annotate(label, (xof(p), p["accuracy"]), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.scatter([xof(chosen)], [chosen["accuracy"]], marker="*", s=180, c="red", zorder=5, label="default point")
    ax.set_xscale("log")
    ax.set_xlabel("mean bytes per request (log; 0-byte points at the left edge)")
    ax.set_ylabel("accuracy (calibration split)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, loc="lower right", ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
