"""Checkpoint -> model folder: calibrate, export both halves, verify them, write the manifest."""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import onnxruntime

from ..protos.manifest import sha256_file, write_manifest
from .calibrate import choose_threshold, simulate
from .data import ClutterConfig, make_split
from .model import SplitViT
from .onnx_export import IR_VERSION_FOR_OPSET, export_device_half, export_server_half, verify_parity
from .preprocess import preprocessing_spec
from .train import load_checkpoint

__all__ = ["ExportOptions", "export_model", "export_split_model"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportOptions:
    name: str = "vit-cluttered-mnist"
    opset: int = 17
    mass: float = 0.9  # share of the importance mass the edge keeps
    budget: int = 16  # most patches the edge sends (CLS comes on top)
    max_accuracy_drop: float = 0.005  # calibration target, below the full model's accuracy
    calibration_size: int | None = None
    encoding: str = "int8"
    compression: str = "zstd"

    def __post_init__(self) -> None:
        if not self.name or any(c.isspace() for c in self.name):
            raise ValueError(f"name must be non-empty without spaces, got {self.name!r}")
        if self.opset not in IR_VERSION_FOR_OPSET:
            raise ValueError(f"opset must be one of {sorted(IR_VERSION_FOR_OPSET)}, got {self.opset}")
        if not 0.0 < self.mass <= 1.0:
            raise ValueError(f"mass must be in (0, 1], got {self.mass}")
        if self.budget < 1:
            raise ValueError(f"budget must be >= 1, got {self.budget}")
        if self.calibration_size is not None and self.calibration_size < 10:
            raise ValueError(f"calibration_size must be >= 10, got {self.calibration_size}")


def export_model(checkpoint: Path, out_dir: Path, options: ExportOptions = ExportOptions()) -> dict:
    """Load a checkpoint written by ``splitinfer-export train`` and export it (see export_split_model)."""
    model, summary = load_checkpoint(checkpoint)
    clutter = ClutterConfig(**summary["clutter"]) if "clutter" in summary else ClutterConfig()
    return export_split_model(model, out_dir, options, clutter=clutter, version=sha256_file(checkpoint)[:12])


def export_split_model(model: SplitViT, out_dir: Path, options: ExportOptions = ExportOptions(),
                       clutter: ClutterConfig = ClutterConfig(), version: str = "0") -> dict:
    """Write ``out_dir/{device.onnx, server.onnx, manifest.json}`` and return the manifest dict."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    model.eval()

    cal_x, cal_y = make_split("calibration", n=options.calibration_size, config=clutter)
    result = choose_threshold(simulate(model, cal_x, cal_y, options.mass, options.budget), options.max_accuracy_drop)
    log.info("calibration on %d canvases: threshold %.4f, exit rate %.3f, split accuracy %.4f (full %.4f)",
             len(cal_x), result.threshold, result.exit_rate, result.accuracy_split, result.accuracy_full)

    device_path, server_path = out_dir / "device.onnx", out_dir / "server.onnx"
    export_device_half(model, device_path, options.opset)
    export_server_half(model, server_path, options.opset)
    parity = verify_parity(model, device_path, server_path)

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
                       "outputs": {"exit_logits": "float32 (B, K)", "tokens": "float32 (B, N, d)",
                                   "importance": "float32 (B, P)"}},
            "server": {"path": server_path.name, "sha256": sha256_file(server_path),
                       "inputs": {"tokens": "float32 (B, T, d), CLS first", "mask": "bool (B, T), True = real"},
                       "outputs": {"logits": "float32 (B, K)"}},
        },
        "preprocessing": preprocessing_spec(cfg.image_size),
        "tokens": {"dim": cfg.dim, "grid": cfg.grid, "num_patches": cfg.num_patches,
                   "num_tokens": 1 + cfg.num_patches, "cls_position": 0},
        "classes": [str(i) for i in range(cfg.num_classes)],
        "exit": {"score": "max_softmax", "threshold": result.threshold},
        "selection": {"method": "importance_mass", "mass": options.mass, "budget": options.budget, "min_tokens": 1},
        "codec": {"encoding": options.encoding, "compression": options.compression},
        "calibration": {
            "canvases": len(cal_x), "accuracy_full": result.accuracy_full, "accuracy_split": result.accuracy_split,
            "exit_rate": result.exit_rate, "mean_patches_offloaded": result.mean_patches_offloaded,
            "max_accuracy_drop": options.max_accuracy_drop, "clutter": asdict(clutter),
        },
        "operating_points": result.operating_points,
        "parity_max_abs_diff": parity,
    }
    write_manifest(out_dir, manifest)
    log.info("exported %s to %s in %.1f s", options.name, out_dir, time.perf_counter() - t0)
    return manifest
