"""Reading model folders written by splitinfer 0.1 (``splitinfer-model/1``) as the current schema.

0.1 had two writers (the built-in pipeline and the adapters'); both are mapped here, once, to the
JSON of ``splitinfer-model/2``. What 0.1 did not record gets the value 0.1 behaved with: a
classifier, CLS-attention importance, one operating point made of the manifest's own settings
when it had no table. The deployment hash of such a folder stays the manifest file's sha256, as
0.1 computed it, so 0.1 edges and servers keep matching.
"""
from __future__ import annotations

from pathlib import Path

from .errors import ManifestError

__all__ = ["upgrade_v1"]

_POINT_KEYS = ("id", "threshold", "mass", "budget", "encoding", "accuracy", "exit_rate", "mean_bytes_per_request",
               "mean_bytes_per_offload", "group_size", "mean_tokens_per_offload", "device_ms", "server_ms")


def _need(data: dict, key: str, where: Path):
    if key not in data:
        raise ManifestError(f"{where}: missing field {key!r} (a splitinfer-model/1 manifest)")
    return data[key]


def upgrade_v1(data: dict, where: Path) -> dict:
    """A 0.1 manifest dict -> the dict of the current schema (ManifestError when it lacks a field)."""
    tokens = dict(_need(data, "tokens", where))
    files_in = _need(data, "files", where)
    files = {role: {"path": files_in[old]["path"], "sha256": files_in[old]["sha256"]}
             for old, role in (("device", "device"), ("server", "server"), ("device_int8", "device_int8"),
                               ("tokenizer", "tokenizer")) if old in files_in}
    codec_in = dict(_need(data, "codec", where))
    zdict = codec_in.pop("zstd_dictionary", None)
    if zdict:
        files["zstd_dictionary"] = {"path": zdict["path"], "sha256": zdict["sha256"]}
    codec = {k: codec_in[k] for k in ("encoding", "compression", "group_size", "scale_dtype") if k in codec_in}
    input_in = data.get("input", {"kind": "image"})
    kind = input_in.get("kind", "image")
    if kind == "text":
        input_spec = {"kind": "text", "max_length": int(input_in.get("max_length", tokens["num_tokens"]))}
    else:
        from .preprocessing import ImagePreprocessing

        try:
            pre = ImagePreprocessing.load(_need(data, "preprocessing", where)).to_dict()
        except ValueError as exc:
            raise ManifestError(f"{where}: {exc}") from exc
        input_spec = {"kind": "image", "preprocessing": pre}
    sel_in = _need(data, "selection", where)
    num_tokens = int(tokens["num_tokens"])
    if sel_in.get("method") == "top_fraction":  # 0.1's text path kept a share of the real tokens
        budget = max(1, round(float(sel_in.get("keep_ratio", 0.5)) * (num_tokens - 1)))
        mass = 1.0
    else:
        budget, mass = int(sel_in["budget"]), float(sel_in.get("mass", 1.0))
    selection = {"mass": mass, "budget": budget, "min_tokens": int(sel_in.get("min_tokens", 1)),
                 "importance": sel_in.get("importance", "cls_attention")}
    exit_in = _need(data, "exit", where)
    task = data.get("task", "classification")
    exit_spec = {"score": exit_in.get("score", "max_softmax") if task == "classification" else "none",
                 "threshold": float(exit_in["threshold"])}
    cal = data.get("calibration", {})
    calibration = {
        "data": "cluttered-mnist" if "clutter" in cal else "unknown",
        "n": int(cal.get("canvases", 1)), "accuracy_full": float(cal.get("accuracy_full", 0.0)),
        "accuracy_split": float(cal.get("accuracy_split", 0.0)), "exit_rate": float(cal.get("exit_rate", 0.0)),
        "mean_bytes_per_request": float(cal.get("mean_bytes_per_request", 0.0)),
        "mean_bytes_per_offload": float(cal.get("mean_bytes_per_offload", 0.0)),
        "mean_tokens_per_offload": float(cal.get("mean_patches_offloaded", 0.0)) + 1.0,
        "max_accuracy_drop": float(cal.get("max_accuracy_drop", 0.0)),
    }
    points = [{k: p[k] for k in _POINT_KEYS if k in p} for p in data.get("operating_points") or []]
    default = data.get("default_operating_point")
    if not points:
        points = [{"id": "p0", "threshold": exit_spec["threshold"], "mass": mass, "budget": budget,
                   "encoding": codec.get("encoding", "int8"), "accuracy": calibration["accuracy_split"],
                   "exit_rate": calibration["exit_rate"], "mean_bytes_per_request": 0.0,
                   "mean_bytes_per_offload": 0.0}]
        default = "p0"
    width = (data.get("bottleneck") or {}).get("width")
    variants = data.get("device_variants") or {}
    return {
        "format": "splitinfer-model/2", "name": _need(data, "name", where), "task": task,
        "split": int(_need(data, "split", where)), "input": input_spec,
        "tokens": {"dim": int(tokens["dim"]), "model_dim": int(tokens.get("model_dim", tokens["dim"])),
                   "num_tokens": num_tokens, "cls_position": 0, "grid": tokens.get("grid")},
        "classes": list(_need(data, "classes", where)), "exit": exit_spec, "selection": selection,
        "codec": codec, "files": files, "operating_points": points, "default_operating_point": default or points[0]["id"],
        "calibration": calibration, "bottleneck": width,
        "device_auto_choice": "int8" if variants.get("auto_choice") == "int8" and "device_int8" in files else "float",
        "info": {"version": str(data.get("version", "")), "upgraded_from": "splitinfer-model/1"},
    }
