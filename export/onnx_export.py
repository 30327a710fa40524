"""ONNX export of the two halves, and the check that ONNX Runtime computes what torch computes.

Opset 17 / IR version 8 by default: old enough for ONNX Runtime 1.16 (the newest wheel for older
aarch64 glibc, which rejects IR 10 / opset 20), new enough for LayerNormalization.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from .model import DeviceHalf, ServerHalf, SplitViT

__all__ = ["export_device_half", "export_server_half", "verify_parity", "ParityError", "IR_VERSION_FOR_OPSET"]

log = logging.getLogger(__name__)

# The IR version that ONNX itself pairs with each opset (onnx/helper.py VERSION_TABLE).
IR_VERSION_FOR_OPSET = {13: 7, 14: 7, 15: 8, 16: 8, 17: 8, 18: 8, 19: 9, 20: 9}


class ParityError(RuntimeError):
    """ONNX Runtime's output differs from torch's beyond tolerance."""


def _export(module: torch.nn.Module, args: tuple, path: Path, input_names, output_names, dynamic_axes, opset: int) -> None:
    if opset not in IR_VERSION_FOR_OPSET:
        raise ValueError(f"opset must be one of {sorted(IR_VERSION_FOR_OPSET)}, got {opset}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            module, args, str(path), input_names=input_names, output_names=output_names,
            dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False, do_constant_folding=True,
        )
    proto = onnx.load(str(path))
    proto.ir_version = min(proto.ir_version, IR_VERSION_FOR_OPSET[opset])
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))


def export_device_half(model: SplitViT, path: Path, opset: int = 17, bottleneck: int | None = None) -> None:
    """device.onnx: image float32 (B, C, H, W) -> exit_logits (B, K), tokens (B, N, d or d_c), importance (B, P).

    With ``bottleneck`` the tokens leave through that learned encoder (d_c = the width)."""
    cfg = model.cfg
    dummy = torch.zeros(2, cfg.in_channels, cfg.image_size, cfg.image_size)
    _export(DeviceHalf(model, bottleneck), (dummy,), path, ["image"], ["exit_logits", "tokens", "importance"],
            {"image": {0: "batch"}, "exit_logits": {0: "batch"}, "tokens": {0: "batch"}, "importance": {0: "batch"}},
            opset)


def export_server_half(model: SplitViT, path: Path, opset: int = 17, bottleneck: int | None = None) -> None:
    """server.onnx: tokens float32 (B, T, d or d_c), mask bool (B, T) (True = real token) -> logits (B, K).

    Batch and token count are dynamic; CLS must be at index 0 of every row. With ``bottleneck`` the
    graph starts with that learned decoder.
    """
    cfg = model.cfg
    tokens = torch.zeros(2, 5, bottleneck or cfg.dim)
    mask = torch.ones(2, 5, dtype=torch.bool)
    _export(ServerHalf(model, bottleneck), (tokens, mask), path, ["tokens", "mask"], ["logits"],
            {"tokens": {0: "batch", 1: "num_tokens"}, "mask": {0: "batch", 1: "num_tokens"}, "logits": {0: "batch"}},
            opset)


def verify_parity(
    model: SplitViT,
    device_path: Path,
    server_path: Path,
    token_counts: tuple[int, ...] = (2, 9, 17, 33, 65),
    batch_sizes: tuple[int, ...] = (1, 3),
    atol: float = 1e-4,
    seed: int = 0,
    bottleneck: int | None = None,
) -> dict:
    """Run both halves in ONNX Runtime and torch on the same inputs; raise ParityError on a mismatch.

    The server half is checked at every token count (kept tokens chosen at random, CLS first) and
    batch size, with a ragged batch (rows padded to the longest, masked) among them.
    Returns the largest absolute differences seen.
    """
    import onnxruntime as ort

    cfg = model.cfg
    device_half, server_half = DeviceHalf(model, bottleneck).eval(), ServerHalf(model, bottleneck).eval()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    device = ort.InferenceSession(str(device_path), opts, providers=["CPUExecutionProvider"])
    server = ort.InferenceSession(str(server_path), opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    worst = {"device": 0.0, "server": 0.0}
    max_n = 1 + cfg.num_patches
    for b in batch_sizes:
        image = rng.normal(size=(b, cfg.in_channels, cfg.image_size, cfg.image_size)).astype(np.float32)
        ort_out = device.run(None, {"image": image})
        with torch.no_grad():
            torch_out = [t.numpy() for t in device_half(torch.from_numpy(image))]
        for a, t in zip(ort_out, torch_out):
            worst["device"] = max(worst["device"], float(np.abs(a - t).max()))
        tokens_all = torch_out[1]
        for n in token_counts:
            if not 1 <= n <= max_n:
                raise ValueError(f"token count {n} out of range [1, {max_n}]")
            rows = np.stack([np.r_[0, np.sort(rng.choice(np.arange(1, max_n), n - 1, replace=False))] for _ in range(b)])
            tokens = np.take_along_axis(tokens_all, rows[:, :, None], axis=1)
            mask = np.ones((b, n), dtype=bool)
            if b > 1 and n > 2:  # ragged batch: later rows use fewer real tokens
                for i in range(1, b):
                    mask[i, n - i:] = False
            ort_logits = server.run(None, {"tokens": tokens, "mask": mask})[0]
            with torch.no_grad():
                torch_logits = server_half(torch.from_numpy(tokens), torch.from_numpy(mask)).numpy()
                # a padded row must equal the same row sent alone, unpadded
                for i in range(b):
                    k = int(mask[i].sum())
                    alone = server_half(torch.from_numpy(tokens[i:i + 1, :k]), torch.ones(1, k, dtype=torch.bool)).numpy()
                    worst["server"] = max(worst["server"], float(np.abs(alone[0] - torch_logits[i]).max()))
            worst["server"] = max(worst["server"], float(np.abs(ort_logits - torch_logits).max()))
    for half, diff in worst.items():
        if not diff <= atol:
            raise ParityError(f"{half} half: ONNX Runtime differs from torch by {diff:.3g} (> {atol})")
    log.info("parity: max |ORT - torch| device %.2e, server %.2e", worst["device"], worst["server"])
    return worst
