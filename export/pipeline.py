"""Checkpoint -> model folder: calibrate, export both halves, verify them, write the manifest."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import onnxruntime

from ..protos.manifest import sha256_file, write_manifest
from .operating_points import (COMPRESSION, SCALE_DTYPE, SweepSpace, pareto_front, plot_pareto, points_for,
                               simulate_configs)
from .data import ClutterConfig, make_split
from .model import SplitViT
from .onnx_export import IR_VERSION_FOR_OPSET, export_device_half, export_server_half, verify_parity
from .preprocess import preprocessing_spec
from .train import load_checkpoint

__all__ = ["ExportOptions", "export_model", "export_split_model"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportOptions:
    """What to export and how to choose the default operating point.

    The default operating point is the one with the fewest mean bytes per request among the
    measured points whose calibration accuracy is within ``max_accuracy_drop`` of the most
    accurate measured point. bottleneck: the learned bottleneck width to deploy: "auto" (the width,
    or none, of that point), "none", or a trained width. encoding: the token encoding of the default point ("auto" chooses like the
    bottleneck). mass / budget: token selection of the default point ("auto" chooses too).
    """

    name: str = "vit-cluttered-mnist"
    opset: int = 17
    mass: float | str = "auto"  # share of the importance mass the edge keeps
    budget: int | str = "auto"  # most patches the edge sends (CLS comes on top)
    max_accuracy_drop: float = 0.002  # the default point is the cheapest within this of the most accurate point
    calibration_size: int | None = None
    bottleneck: int | str = "auto"
    encoding: str = "auto"
    quantize: str | None = None  # "int8": also write device.int8.onnx (export/quantize.py)
    zstd_dictionary_bytes: int = 1024  # train a zstd dictionary of this size on calibration packets (0: none)
    sweep: SweepSpace = SweepSpace()
    plot: bool = True

    def __post_init__(self) -> None:
        if not self.name or any(c.isspace() for c in self.name):
            raise ValueError(f"name must be non-empty without spaces, got {self.name!r}")
        if self.opset not in IR_VERSION_FOR_OPSET:
            raise ValueError(f"opset must be one of {sorted(IR_VERSION_FOR_OPSET)}, got {self.opset}")
        if self.mass != "auto" and not (isinstance(self.mass, (int, float)) and 0.0 < self.mass <= 1.0):
            raise ValueError(f"mass must be 'auto' or in (0, 1], got {self.mass!r}")
        if self.budget != "auto" and not (isinstance(self.budget, int) and self.budget >= 1):
            raise ValueError(f"budget must be 'auto' or an integer >= 1, got {self.budget!r}")
        if self.bottleneck not in ("auto", "none") and not (isinstance(self.bottleneck, int) and self.bottleneck >= 1):
            raise ValueError(f"bottleneck must be 'auto', 'none' or a width >= 1, got {self.bottleneck!r}")
        if self.encoding not in ("auto", "fp32", "fp16", "int8", "int4"):
            raise ValueError(f"encoding must be auto, fp32, fp16, int8 or int4, got {self.encoding!r}")
        if not 0.0 <= self.max_accuracy_drop < 1.0:
            raise ValueError(f"max_accuracy_drop must be in [0, 1), got {self.max_accuracy_drop}")
        if self.calibration_size is not None and self.calibration_size < 10:
            raise ValueError(f"calibration_size must be >= 10, got {self.calibration_size}")
        if self.quantize not in (None, "int8"):
            raise ValueError(f"quantize must be None or 'int8', got {self.quantize!r}")
        if self.zstd_dictionary_bytes and self.zstd_dictionary_bytes < 256:
            raise ValueError(f"zstd_dictionary_bytes must be 0 or >= 256, got {self.zstd_dictionary_bytes}")

    def space_for(self, model: SplitViT) -> SweepSpace:
        """The sweep restricted to what the options pin down."""
        trained = (None, *model.cfg.bottleneck_dims)
        if self.bottleneck == "auto":
            widths = trained
        elif self.bottleneck == "none":
            widths = (None,)
        else:
            model.bottleneck(self.bottleneck)  # raises with the trained widths if absent
            widths = (self.bottleneck,)
        s = self.sweep
        selections = tuple((float(self.mass) if self.mass != "auto" else m, int(self.budget) if self.budget != "auto" else b)
                           for m, b in s.selections)
        return SweepSpace(
            widths=widths,
            encodings=s.encodings if self.encoding == "auto" else (self.encoding,),
            selections=tuple(dict.fromkeys(selections)),
            thresholds=s.thresholds,
        )


def export_model(checkpoint: Path, out_dir: Path, options: ExportOptions = ExportOptions()) -> dict:
    """Load a checkpoint written by ``splitinfer-export train`` and export it (see export_split_model)."""
    model, summary = load_checkpoint(checkpoint)
    clutter = ClutterConfig(**summary["clutter"]) if "clutter" in summary else ClutterConfig()
    return export_split_model(model, out_dir, options, clutter=clutter, version=sha256_file(checkpoint)[:12])


def export_split_model(model: SplitViT, out_dir: Path, options: ExportOptions = ExportOptions(),
                       clutter: ClutterConfig = ClutterConfig(), version: str = "0") -> dict:
    """Write ``out_dir/{device.onnx, server.onnx, manifest.json, operating_points.json, pareto.png}``.

    Measures the operating-point table on the calibration split, deploys the bottleneck width of
    the cheapest calibrated point within the accuracy target, exports and verifies both halves,
    times them in ONNX Runtime, and returns the manifest dict.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    model.eval()

    cal_x, cal_y = make_split("calibration", n=options.calibration_size, config=clutter)
    space = options.space_for(model)
    header = {"model": options.name, "manifest_sha256": "0" * 64, "request_id": "0" * 32}
    sim = simulate_configs(model, cal_x, cal_y, space, header)
    points = points_for(sim, space, options.max_accuracy_drop)
    accuracy_full = float((sim.full_pred == sim.labels).mean())
    target = max(p["accuracy"] for p in points) - options.max_accuracy_drop
    chosen = min((p for p in points if p["accuracy"] >= target),
                 key=lambda p: (p["mean_bytes_per_request"], -p["accuracy"]))
    width = chosen["width"]
    log.info("calibration on %d canvases: full accuracy %.4f; default point %s", len(cal_x), accuracy_full,
             {k: chosen[k] for k in ("width", "encoding", "mass", "budget", "threshold", "accuracy", "exit_rate",
                                     "mean_bytes_per_request")})

    device_path, server_path = out_dir / "device.onnx", out_dir / "server.onnx"
    export_device_half(model, device_path, options.opset, bottleneck=width)
    export_server_half(model, server_path, options.opset, bottleneck=width)
    parity = verify_parity(model, device_path, server_path, bottleneck=width)
    timings = time_halves(device_path, server_path, cfg, chosen["mean_tokens_per_offload"] or 1 + cfg.num_patches)
    int8 = None
    if options.quantize == "int8":
        from .preprocess import normalize
        from .quantize import add_int8_device_half

        int8 = add_int8_device_half(out_dir, device_path, server_path, normalize(cal_x), cal_y, chosen["threshold"],
                                    chosen["mass"], chosen["budget"])

    deployed = [p for p in points if p["width"] == width]
    front = pareto_front(deployed)
    if chosen not in front:
        front = sorted([*front, chosen], key=lambda p: p["mean_bytes_per_request"])
    manifest_points = []
    for i, p in enumerate(front):
        manifest_points.append({"id": f"p{i}", **{k: p[k] for k in POINT_FIELDS}, **timings})
        if p is chosen:
            default_id = f"p{i}"
    (out_dir / "operating_points.json").write_text(json.dumps(
        {"accuracy_full": accuracy_full, "target": target, "deployed_width": width, "points": points}, indent=1) + "\n")
    if options.plot:
        plot_pareto(points, front, chosen, out_dir / "pareto.png",
                    f"{options.name}: {len(points)} operating points on {len(cal_x)} calibration canvases")
    print_front(manifest_points, default_id, width, cfg.dim)

    codec = {"encoding": chosen["encoding"], "compression": COMPRESSION, "group_size": 0, "scale_dtype": SCALE_DTYPE}
    if options.zstd_dictionary_bytes and chosen["encoding"] in ("int8", "int4"):
        import zstandard

        try:
            codec["zstd_dictionary"] = train_zstd_dictionary(model, cal_x, chosen, width, out_dir,
                                                             options.zstd_dictionary_bytes)
        except zstandard.ZstdError as exc:  # too few or too uniform samples to learn from
            log.warning("no zstd dictionary: %s", exc)

    wire_dim = width or cfg.dim
    manifest = {
        "name": options.name,
        "version": version,
        "architecture": {"kind": "splitinfer-vit", **cfg.to_dict()},
        "split": cfg.split,
        "onnx": {"opset": options.opset, "ir_version": IR_VERSION_FOR_OPSET[options.opset],
                 "exported_with_onnxruntime_check": onnxruntime.__version__},
        "files": {
            "device": {"path": device_path.name, "sha256": sha256_file(device_path),
                       "inputs": {"image": "float32 (B, C, H, W)"},
                       "outputs": {"exit_logits": "float32 (B, K)", "tokens": f"float32 (B, N, {wire_dim})",
                                   "importance": "float32 (B, P)"}},
            "server": {"path": server_path.name, "sha256": sha256_file(server_path),
                       "inputs": {"tokens": f"float32 (B, T, {wire_dim}), CLS first", "mask": "bool (B, T), True = real"},
                       "outputs": {"logits": "float32 (B, K)"}},
        },
        "preprocessing": preprocessing_spec(cfg.image_size),
        "tokens": {"dim": wire_dim, "model_dim": cfg.dim, "grid": cfg.grid, "num_patches": cfg.num_patches,
                   "num_tokens": 1 + cfg.num_patches, "cls_position": 0},
        "bottleneck": None if width is None else {"width": width, "ratio": width / cfg.dim},
        "classes": [str(i) for i in range(cfg.num_classes)],
        "exit": {"score": "max_softmax", "threshold": chosen["threshold"]},
        "selection": {"method": "importance_mass", "mass": chosen["mass"], "budget": chosen["budget"], "min_tokens": 1},
        "codec": codec,
        "calibration": {
            "canvases": len(cal_x), "accuracy_full": accuracy_full, "accuracy_split": chosen["accuracy"],
            "exit_rate": chosen["exit_rate"], "mean_patches_offloaded": max(chosen["mean_tokens_per_offload"] - 1, 0.0),
            "mean_bytes_per_request": chosen["mean_bytes_per_request"],
            "mean_bytes_per_offload": chosen["mean_bytes_per_offload"],
            "max_accuracy_drop": options.max_accuracy_drop, "clutter": asdict(clutter),
        },
        "operating_points": manifest_points,
        "default_operating_point": default_id,
        "timings": timings,
        "parity_max_abs_diff": parity,
    }
    if int8 is not None:
        manifest["files"]["device_int8"] = {**manifest["files"]["device"], **int8["file"],
                                            "sha256": sha256_file(out_dir / int8["file"]["path"])}
        manifest["device_variants"] = int8["device_variants"]
    write_manifest(out_dir, manifest)
    log.info("exported %s to %s in %.1f s", options.name, out_dir, time.perf_counter() - t0)
    return manifest


POINT_FIELDS = ("threshold", "mass", "budget", "encoding", "group_size", "accuracy", "exit_rate",
                "mean_bytes_per_request", "mean_bytes_per_offload", "mean_tokens_per_offload")


def train_zstd_dictionary(model: SplitViT, images, point: dict, width: int | None, out_dir: Path, size: int) -> dict:
    """Train a zstd dictionary on the payloads the default point would send for the calibration
    canvases (first half), measure it on the second half, write ``zstd.dict``; return the manifest entry."""
    import numpy as np
    import torch
    import zstandard

    from ..protos.codec import CodecConfig, encode_tokens
    from .preprocess import normalize
    from .tokens import select_tokens_mask

    config = CodecConfig(point["encoding"], "none", scale_dtype=SCALE_DTYPE)
    payloads = []
    with torch.no_grad():
        for start in range(0, len(images), 250):
            _, tokens, importance = model.device_forward(torch.from_numpy(normalize(images[start:start + 250])))
            bottleneck = model.bottleneck(width)
            codes = (tokens if bottleneck is None else bottleneck.encode(tokens)).numpy()
            keep = select_tokens_mask(importance, point["mass"], point["budget"]).numpy()
            for row, k in zip(codes, keep):
                positions = np.r_[0, 1 + np.flatnonzero(k)]
                payloads.append(encode_tokens(row[positions], positions, config).payload)
    half = len(payloads) // 2
    dictionary = zstandard.train_dictionary(size, payloads[:half])
    path = out_dir / "zstd.dict"
    path.write_bytes(dictionary.as_bytes())
    plain = zstandard.ZstdCompressor(level=3)
    with_dict = zstandard.ZstdCompressor(level=3, dict_data=dictionary)
    held = payloads[half:]
    mean = lambda c: float(np.mean([min(len(p), len(c.compress(p))) for p in held]))  # noqa: E731
    entry = {"path": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size,
             "held_out_mean_payload": {"raw": float(np.mean([len(p) for p in held])), "zstd": mean(plain),
                                       "zstd_dictionary": mean(with_dict)}}
    log.info("zstd dictionary (%d bytes): held-out payload %s", entry["bytes"], entry["held_out_mean_payload"])
    return entry


def time_halves(device_path: Path, server_path: Path, cfg, tokens: float, runs: int = 200) -> dict:
    """Median ONNX Runtime latency (one thread, batch 1) of the device half and of the server half
    on ``tokens`` tokens, in ms."""
    import numpy as np

    opts = onnxruntime.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    device = onnxruntime.InferenceSession(str(device_path), opts, providers=["CPUExecutionProvider"])
    server = onnxruntime.InferenceSession(str(server_path), opts, providers=["CPUExecutionProvider"])
    image = np.zeros((1, cfg.in_channels, cfg.image_size, cfg.image_size), np.float32)
    codes = device.run(None, {"image": image})[1][:, : max(1, int(round(tokens)))]
    mask = np.ones(codes.shape[:2], bool)

    def median_ms(fn) -> float:
        for _ in range(10):
            fn()
        samples = []
        for _ in range(runs):
            t = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t) * 1e3)
        return round(float(np.median(samples)), 4)

    return {"device_ms": median_ms(lambda: device.run(None, {"image": image})),
            "server_ms": median_ms(lambda: server.run(None, {"tokens": codes, "mask": mask}))}


def print_front(points: list[dict], default_id: str, width, dim: int) -> None:
    """The Pareto front as a table on stdout (the export CLI's intended output)."""
    print(f"\nPareto front, bottleneck {width or dim}/{dim} (calibration split; * = default point)")
    print(f"  {'id':>4} {'thr':>6} {'mass':>5} {'cap':>4} {'enc':>5} {'acc':>7} {'exit':>6} {'B/req':>8} {'B/offl':>8}")
    for p in points:
        mark = "*" if p["id"] == default_id else " "
        print(f"{mark} {p['id']:>4} {min(p['threshold'], 9.99):>6.3f} {p['mass']:>5.2f} {p['budget']:>4d} "
              f"{p['encoding']:>5} {p['accuracy']:>7.4f} {p['exit_rate']:>6.3f} {p['mean_bytes_per_request']:>8.1f} "
              f"{p['mean_bytes_per_offload']:>8.1f}")
