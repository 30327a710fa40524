"""ONNX export of any :class:`SplitModel`'s two halves, the ORT-vs-torch check, and the manifest.

device.onnx
  image models: image float32 (B, C, H, W)
  text models:  input_ids int64 (B, T), attention_mask int64 (B, T) (1 = real token); T dynamic
  -> exit_logits (B, K) or exit_embedding (B, D), tokens float32 (B, N, d) (CLS first),
     importance float32 (B, N - 1) (zero on padding, rows sum to 1)
server.onnx
  tokens float32 (B, T, d), mask bool (B, T) (True = real) -> logits (B, K) or embedding (B, D)
Opset 17 / IR 8, as for the built-in pipeline (ONNX Runtime 1.16 loads them).
"""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime
import torch
import torch.nn as nn

from ...protos.manifest import sha256_file, write_manifest
from ..onnx_export import IR_VERSION_FOR_OPSET, ParityError, _export
from .split import SplitModel

__all__ = ["AdapterExportOptions", "export_adapter_model", "export_halves", "verify_split_parity", "output_names"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterExportOptions:
    """name: model name in requests. mass / budget: the edge's selection (image models).
    keep_ratio: share of real non-CLS tokens the edge keeps (text models; the learned scorer is
    conditioned on it). exit_threshold: the exit head answers alone at this max-softmax confidence
    (1.0: never, until calibrated; embedding models never exit by confidence)."""

    name: str = "model"
    opset: int = 17
    mass: float = 0.9
    budget: int = 16
    keep_ratio: float = 0.5
    exit_threshold: float = 1.0
    encoding: str = "int8"
    compression: str = "zstd"
    atol: float = 1e-4
    text_lengths: tuple[int, ...] = (4, 17, 40)

    def __post_init__(self) -> None:
        if not self.name or any(c.isspace() for c in self.name):
            raise ValueError(f"name must be non-empty without spaces, got {self.name!r}")
        if self.opset not in IR_VERSION_FOR_OPSET:
            raise ValueError(f"opset must be one of {sorted(IR_VERSION_FOR_OPSET)}, got {self.opset}")
        if not 0.0 < self.mass <= 1.0:
            raise ValueError(f"mass must be in (0, 1], got {self.mass}")
        if self.budget < 1:
            raise ValueError(f"budget must be >= 1, got {self.budget}")
        if not 0.0 < self.keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if not 0.0 <= self.exit_threshold <= 1.0:
            raise ValueError(f"exit_threshold must be in [0, 1], got {self.exit_threshold}")
        if not self.text_lengths or min(self.text_lengths) < 2:
            raise ValueError(f"text_lengths must be >= 2, got {self.text_lengths}")


def output_names(model: SplitModel) -> tuple[str, str]:
    """(exit output, server output) names for the model's task."""
    return ("exit_logits", "logits") if model.backbone.task == "classification" else ("exit_embedding", "embedding")


def input_names(model: SplitModel) -> tuple[str, ...]:
    return ("image",) if model.backbone.input_kind == "image" else ("input_ids", "attention_mask")


class _Device(nn.Module):
    def __init__(self, model: SplitModel):
        super().__init__()
        self.model, self.names = model, input_names(model)

    def forward(self, *args):
        exit_out, tokens, importance, _ = self.model.device_forward(dict(zip(self.names, args)))
        return exit_out, tokens, importance


class _Server(nn.Module):
    def __init__(self, model: SplitModel):
        super().__init__()
        self.model = model

    def forward(self, tokens, mask):
        return self.model.server_forward(tokens, mask)


def export_halves(model: SplitModel, out_dir: Path, opset: int = 17) -> tuple[Path, Path]:
    """Write out_dir/device.onnx and out_dir/server.onnx (checked by the ONNX checker)."""
    model.eval()
    out_dir = Path(out_dir)
    exit_name, server_name = output_names(model)
    names = input_names(model)
    example = model.backbone.example_inputs(2, length=min(8, getattr(model.backbone, "max_length", 8)))
    dyn = {n: {0: "batch"} for n in names}
    if model.backbone.input_kind == "text":
        dyn = {n: {0: "batch", 1: "length"} for n in names}
    tok_axes = {0: "batch", 1: "length"} if model.backbone.input_kind == "text" else {0: "batch"}
    dyn.update({exit_name: {0: "batch"}, "tokens": tok_axes, "importance": dict(tok_axes)})
    device_path, server_path = out_dir / "device.onnx", out_dir / "server.onnx"
    _export(_Device(model), tuple(example[n] for n in names), device_path, list(names),
            [exit_name, "tokens", "importance"], dyn, opset)
    tokens, mask = torch.zeros(2, 5, model.backbone.dim), torch.ones(2, 5, dtype=torch.bool)
    _export(_Server(model), (tokens, mask), server_path, ["tokens", "mask"], [server_name],
            {"tokens": {0: "batch", 1: "num_tokens"}, "mask": {0: "batch", 1: "num_tokens"}, server_name: {0: "batch"}},
            opset)
    return device_path, server_path


def _session(path: Path):
    opts = onnxruntime.SessionOptions()
    opts.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@torch.no_grad()
def verify_split_parity(model: SplitModel, device_path: Path, server_path: Path,
                        token_counts: tuple[int, ...] | None = None, batch_sizes: tuple[int, ...] = (1, 3),
                        text_lengths: tuple[int, ...] = (4, 17, 40), atol: float = 1e-4, seed: int = 0) -> dict:
    """ORT vs torch on both halves; raise ParityError beyond ``atol``. Returns the worst |diff|.

    Device: every batch size (text: every length, ragged padding). Server: random token subsets
    (CLS first) at every token count, a ragged padded batch among them, and each padded row
    against the same row alone, unpadded.
    """
    model.eval()
    device, server = _session(device_path), _session(server_path)
    names = input_names(model)
    rng = np.random.default_rng(seed)
    worst = {"device": 0.0, "server": 0.0, "padding": 0.0}
    lengths = text_lengths if model.backbone.input_kind == "text" else (None,)
    for b in batch_sizes:
        for length in lengths:
            if length is not None:
                length = min(length, model.backbone.max_length)
            inputs = model.backbone.example_inputs(b, length=length, seed=int(rng.integers(1 << 30)))
            ort_out = device.run(None, {n: inputs[n].numpy() for n in names})
            torch_out = [t.numpy() for t in model.device_forward(inputs)[:3]]
            for a, t in zip(ort_out, torch_out):
                worst["device"] = max(worst["device"], float(np.abs(a - t).max()))
            tokens_all = torch_out[1]
            n_all = tokens_all.shape[1]
            counts = token_counts or sorted({1, 2, max(2, n_all // 4), max(2, n_all // 2), n_all})
            for n in counts:
                if not 1 <= n <= n_all:
                    continue
                rows = np.stack([np.r_[0, np.sort(rng.choice(np.arange(1, n_all), n - 1, replace=False))]
                                 for _ in range(b)])
                tokens = np.ascontiguousarray(np.take_along_axis(tokens_all, rows[:, :, None], axis=1))
                mask = np.ones((b, n), dtype=bool)
                if b > 1 and n > 2:
                    for i in range(1, b):
                        mask[i, max(1, n - i):] = False
                ort_y = server.run(None, {"tokens": tokens, "mask": mask})[0]
                torch_y = model.server_forward(torch.from_numpy(tokens), torch.from_numpy(mask)).numpy()
                worst["server"] = max(worst["server"], float(np.abs(ort_y - torch_y).max()))
                for i in range(b):
                    k = int(mask[i].sum())
                    alone = model.server_forward(torch.from_numpy(tokens[i:i + 1, :k])).numpy()
                    worst["padding"] = max(worst["padding"], float(np.abs(alone[0] - torch_y[i]).max()))
    for part, diff in worst.items():
        if not diff <= atol:
            raise ParityError(f"{part}: ONNX Runtime / padded rows differ from torch by {diff:.3g} (> {atol})")
    log.info("parity: max |ORT - torch| device %.2e, server %.2e, padding %.2e",
             worst["device"], worst["server"], worst["padding"])
    return worst


def export_adapter_model(model: SplitModel, out_dir: Path, options: AdapterExportOptions = AdapterExportOptions(),
                         version: str = "0", extra: dict | None = None) -> dict:
    """Write ``out_dir/{device.onnx, server.onnx, manifest.json}`` (and ``tokenizer.json`` for
    text models), verify them, and return the manifest dict."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    backbone = model.backbone
    model.keep_ratio = options.keep_ratio if backbone.input_kind == "text" else model.keep_ratio
    if backbone.input_kind == "image" and model.importance == "learned":
        model.keep_ratio = min(1.0, options.budget / (backbone.manifest_fields()["tokens"]["num_tokens"] - 1))
    device_path, server_path = export_halves(model, out_dir, options.opset)
    parity = verify_split_parity(model, device_path, server_path, atol=options.atol, text_lengths=options.text_lengths)
    exit_name, server_name = output_names(model)
    fields = backbone.manifest_fields()
    files = {
        "device": {"path": device_path.name, "sha256": sha256_file(device_path),
                   "inputs": ({"image": "float32 (B, C, H, W)"} if backbone.input_kind == "image" else
                              {"input_ids": "int64 (B, T)", "attention_mask": "int64 (B, T), 1 = real"}),
                   "outputs": {exit_name: "float32 (B, K|D)", "tokens": "float32 (B, N, d)",
                               "importance": "float32 (B, N - 1)"}},
        "server": {"path": server_path.name, "sha256": sha256_file(server_path),
                   "inputs": {"tokens": "float32 (B, T, d), CLS first", "mask": "bool (B, T), True = real"},
                   "outputs": {server_name: "float32 (B, K|D)"}},
    }
    if backbone.input_kind == "text":
        src = Path(backbone.folder) / fields["input"]["tokenizer"]
        dst = out_dir / src.name
        shutil.copyfile(src, dst)
        files["tokenizer"] = {"path": dst.name, "sha256": sha256_file(dst)}
    learned = model.importance == "learned"
    if backbone.input_kind == "text":
        selection = {"method": "top_fraction", "keep_ratio": options.keep_ratio, "mass": 1.0,
                     "budget": max(1, fields["tokens"]["num_tokens"] - 1), "min_tokens": 1}
    else:
        selection = {"method": "top_k" if learned else "importance_mass", "mass": 1.0 if learned else options.mass,
                     "budget": options.budget, "min_tokens": 1}
    selection["importance"] = model.importance
    task = backbone.task
    manifest = {
        "name": options.name,
        "version": version,
        "task": task,
        **fields,
        "split": model.split,
        "onnx": {"opset": options.opset, "ir_version": IR_VERSION_FOR_OPSET[options.opset],
                 "exported_with_onnxruntime_check": onnxruntime.__version__},
        "files": files,
        "classes": backbone.classes(),
        "exit": ({"score": "max_softmax", "threshold": options.exit_threshold} if task == "classification"
                 else {"score": "none", "threshold": 1.0}),
        "selection": selection,
        "codec": {"encoding": options.encoding, "compression": options.compression},
        "parity_max_abs_diff": parity,
        **(extra or {}),
    }
    write_manifest(out_dir, manifest)
    log.info("exported %s to %s in %.1f s", options.name, out_dir, time.perf_counter() - t0)
    return manifest
