"""An INT8 device half beside the float one: static quantization, evaluation and a side-by-side timing.

INT8 is not faster everywhere: on ARM it can be slower than FP32 unless the format fits the CPU's
kernels (onnxruntime issues #20052, #6732). So export tries the candidate formats (QDQ and
QOperator, per-channel weights), measures each against the float half on the same inputs, keeps
the best one as ``device.int8.onnx`` and records every figure in the manifest; the edge then picks
the faster half for its CPU, or the one the user asks for.

Calibration uses the calibration split (MinMax ranges over ``calibration_canvases`` canvases);
evaluation runs the deployed path in ONNX Runtime: device half -> exit decision at the manifest's
threshold -> importance selection -> int8 token round trip -> float server half.
"""
from __future__ import annotations

import heapq
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader

from ..protos import graphs
from ..protos.manifest import cpu_signature
from .datasets import Dataset
from .halves import IR_VERSION_FOR_OPSET
from .tokens import select_tokens_mask, with_cls

__all__ = [
    "QUANT_FORMATS", "QuantizeOptions", "quantize_device_half", "evaluate_device_half",
    "measure_latency", "cpu_signature", "add_int8_device_half",
]

log = logging.getLogger(__name__)

QUANT_FORMATS = ("QDQ", "QOperator")
INT8_FILE = "device.int8.onnx"
MIN_SPEEDUP = 0.95  # INT8 changes the numerics: chosen automatically only when at least 5 % faster
# onnxruntime's quantizer logs these on the root logger for shape tensors and LayerNorm weights,
# which are meant to stay unquantized.
_HARMLESS = ("Inference failed or unsupported type to quantize", "Axis 1 is out-of-range for weight")


class _DropHarmless(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_HARMLESS)


@dataclass(frozen=True)
class QuantizeOptions:
    """formats: candidates tried, best kept. per_channel: one weight scale per output channel.
    calibration_canvases: canvases for the activation ranges. max_accuracy_drop: largest drop of
    split accuracy below the float half's for the INT8 half to be eligible for automatic choice.
    latency_runs: batch-1 runs per half for the side-by-side timing (one thread, no spinning)."""

    formats: tuple[str, ...] = QUANT_FORMATS
    per_channel: bool = True
    calibration_canvases: int = 200
    max_accuracy_drop: float = 0.01
    latency_runs: int = 200

    def __post_init__(self) -> None:
        if not self.formats or any(f not in QUANT_FORMATS for f in self.formats):
            raise ValueError(f"formats must be a non-empty subset of {QUANT_FORMATS}, got {self.formats!r}")
        if self.calibration_canvases < 1:
            raise ValueError(f"calibration_canvases must be >= 1, got {self.calibration_canvases}")
        if not 0.0 <= self.max_accuracy_drop < 1.0:
            raise ValueError(f"max_accuracy_drop must be in [0, 1), got {self.max_accuracy_drop}")
        if self.latency_runs < 10:
            raise ValueError(f"latency_runs must be >= 10, got {self.latency_runs}")


class _DatasetReader(CalibrationDataReader):
    """Feeds a Dataset's inputs (the device half's own input names) to the calibrator in batches."""

    def __init__(self, data: Dataset, batch_size: int = 50, extra: dict | None = None) -> None:
        self._batches = iter([{**data.numpy_rows(slice(i, i + batch_size)), **(extra or {})}
                              for i in range(0, len(data), batch_size)])

    def get_next(self) -> dict | None:
        return next(self._batches, None)


def quantize_device_half(float_path: Path, out_path: Path, calibration: Dataset, quant_format: str = "QDQ",
                         per_channel: bool = True) -> Path:
    """float device.onnx -> INT8 ``out_path`` (uint8 activations, int8 weights), same opset and IR version.

    calibration: inputs for the activation ranges.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if quant_format not in QUANT_FORMATS:
        raise ValueError(f"quant_format must be one of {QUANT_FORMATS}, got {quant_format!r}")
    source = onnx.load(str(float_path))
    opset = next(o.version for o in source.opset_import if o.domain in ("", "ai.onnx"))
    # a view-consistency half: its If branch (the second view) stays float; the one view is quantized
    second_view = {graphs.SECOND_VIEW: np.array(True)} if any(i.name == graphs.SECOND_VIEW
                                                               for i in source.graph.input) else None
    root, quiet = logging.getLogger(), _DropHarmless()
    root.addFilter(quiet)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            prepared = Path(tmp) / "prepared.onnx"
            quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
            quantize_static(
                str(prepared), str(out_path), _DatasetReader(calibration, extra=second_view),
                quant_format=QuantFormat.QDQ if quant_format == "QDQ" else QuantFormat.QOperator,
                per_channel=per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
    finally:
        root.removeFilter(quiet)
    proto = onnx.load(str(out_path))
    proto.ir_version = min(proto.ir_version, IR_VERSION_FOR_OPSET.get(opset, proto.ir_version))
    # ORT's graph optimizer stamps every domain it knows (ai.onnx.ml 5, ...), which older runtimes
    # refuse: keep the domains the nodes use.
    _sort_topologically(proto.graph)  # the quantizer appends its nodes after an If that reads them
    used = {n.domain for n in proto.graph.node} | {""}
    kept = [o for o in proto.opset_import if o.domain in used]
    del proto.opset_import[:]
    proto.opset_import.extend(kept)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(out_path))
    return Path(out_path)


def _session(path: Path, threads: int = 1) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def evaluate_device_half(device_path: Path, server_path: Path, data: Dataset, task: str, point: dict,
                         batch_size: int = 100) -> dict:
    """The deployed path with this device half in ONNX Runtime over ``data``: exit decision at the
    point's threshold, importance selection, the point's token round trip, the float server half.

    Returns split accuracy (agreement with the float whole model for unlabelled data, mean cosine
    for embedding models), exit rate, the exit head's accuracy, and the mean tokens offloaded.
    """
    from .operating_points import _sent

    device, server = _session(device_path, threads=0), _session(server_path, threads=0)
    out_name = graphs.server_output(task)
    confidence, exit_score, split_score, kept_tokens = [], [], [], []
    for start in range(0, len(data), batch_size):
        rows = slice(start, start + batch_size)
        exit_out, tokens, importance, *conf = device.run(list(graphs.device_outputs(task)),
                                                         graphs.device_feed(device, data.numpy_rows(rows)))
        keep = select_tokens_mask(torch.from_numpy(importance), point["mass"], point["budget"])
        if data.kind == "text":
            keep = keep & torch.from_numpy(data.numpy_rows(rows)["attention_mask"][:, 1:] > 0)
        mask = with_cls(keep)
        sent = _sent(torch.from_numpy(tokens), point["encoding"]).numpy()
        full_mask = np.ones(tokens.shape[:2], bool) if data.kind == "image" else \
            data.numpy_rows(rows)["attention_mask"] > 0
        split = server.run([out_name], {graphs.TOKENS: sent, graphs.MASK: mask.numpy()})[0]
        full = server.run([out_name], {graphs.TOKENS: tokens, graphs.MASK: full_mask})[0]
        if task == "classification":
            labels = data.labels[rows] if data.labels is not None else full.argmax(-1)
            confidence.append(conf[0])  # the graph's own exit confidence (graphs.EXIT_CONFIDENCE)
            exit_score.append(exit_out.argmax(-1) == labels)
            split_score.append(split.argmax(-1) == labels)
        else:
            cos = lambda a, b: (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)  # noqa: E731
            confidence.append(np.zeros(len(split)))
            exit_score.append(np.clip(cos(exit_out, full), 0.0, 1.0))
            split_score.append(np.clip(cos(split, full), 0.0, 1.0))
        kept_tokens.append(mask.sum(-1).numpy())
    confidence, exit_score = np.concatenate(confidence), np.concatenate(exit_score).astype(float)
    split_score, kept_tokens = np.concatenate(split_score).astype(float), np.concatenate(kept_tokens)
    exits = confidence >= point["threshold"]
    return {
        "accuracy_split": float(np.where(exits, exit_score, split_score).mean()),
        "exit_rate": float(exits.mean()),
        "accuracy_exit_head": float(exit_score.mean()),
        "mean_tokens_offloaded": float(kept_tokens[~exits].mean()) if (~exits).any() else 0.0,
    }


def _sort_topologically(graph) -> None:
    """Reorder ``graph``'s nodes so each comes after the producers of what it reads, the values its
    subgraphs read from the outer scope included (stable otherwise)."""
    def reads(node) -> set[str]:
        names = set(node.input)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                made = {o for n in sub.node for o in n.output} | {i.name for i in sub.initializer}
                names |= {r for n in sub.node for r in reads(n)} - made
        return names

    producer = {o: i for i, node in enumerate(graph.node) for o in node.output}
    waiting = [{producer[r] for r in reads(node) if r in producer} - {i} for i, node in enumerate(graph.node)]
    users: dict[int, list[int]] = {}
    for i, deps in enumerate(waiting):
        for j in deps:
            users.setdefault(j, []).append(i)
    ready = [i for i, deps in enumerate(waiting) if not deps]
    heapq.heapify(ready)
    order = []
    while ready:  # Kahn's algorithm, the lowest original index first
        i = heapq.heappop(ready)
        order.append(graph.node[i])
        for k in users.get(i, ()):
            waiting[k].discard(i)
            if not waiting[k]:
                heapq.heappush(ready, k)
    if len(order) != len(graph.node):
        raise ValueError("the quantized graph has a cycle")
    nodes = [type(n)() for n in order]
    for new, old in zip(nodes, order):
        new.CopyFrom(old)
    del graph.node[:]
    graph.node.extend(nodes)


def measure_latency(paths: dict[str, Path], inputs: dict, runs: int = 200, threads: int = 1,
                    warmup: int = 10) -> dict[str, dict]:
    """Batch-1 latency of each ONNX file on ``inputs`` (one row of device-half inputs), interleaved
    run by run so drift hits all alike. Returns per name {"p50_ms", "p90_ms", "p99_ms"}.
    """
    sessions = {name: _session(path, threads) for name, path in paths.items()}
    feeds = {name: graphs.device_feed(sess, inputs) for name, sess in sessions.items()}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for i in range(warmup + runs):
        for name, sess in sessions.items():
            t0 = time.perf_counter()
            sess.run(None, feeds[name])
            if i >= warmup:
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: {f"p{q}_ms": round(float(np.percentile(t, q)), 4) for q in (50, 90, 99)} for name, t in times.items()}


def add_int8_device_half(out_dir: Path, device_path: Path, server_path: Path, calibration: Dataset, task: str,
                         point: dict, options: QuantizeOptions = QuantizeOptions()) -> dict:
    """Quantize, evaluate and time; write ``out_dir/device.int8.onnx`` and return what the manifest records.

    calibration: the calibration split; point: the default operating point (threshold, mass,
    budget, encoding). Returns {"auto_choice": "int8" | "float", "info": {...}}.
    """
    out_dir = Path(out_dir)
    one_row = calibration.numpy_rows(slice(0, 1))
    ranges = calibration.take(options.calibration_canvases)
    float_eval = evaluate_device_half(device_path, server_path, calibration, task, point)
    candidates, files = [], {"float": device_path}
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        for fmt in options.formats:
            path = Path(tmp) / f"device.{fmt.lower()}.onnx"
            t0 = time.perf_counter()
            quantize_device_half(device_path, path, ranges, fmt, options.per_channel)
            log.info("quantized the device half (%s, per_channel=%s) in %.1f s", fmt, options.per_channel,
                     time.perf_counter() - t0)
            files[fmt] = path
            metrics = evaluate_device_half(path, server_path, calibration, task, point)
            eligible = metrics["accuracy_split"] >= float_eval["accuracy_split"] - options.max_accuracy_drop
            candidates.append({"format": fmt, "per_channel": options.per_channel, "bytes": path.stat().st_size,
                               "eligible": bool(eligible), **metrics})
        latency = measure_latency(files, one_row, runs=options.latency_runs)
        for c in candidates:
            c.update(latency[c["format"]])
        eligible = [c for c in candidates if c["eligible"]]
        best = min(eligible, key=lambda c: c["p50_ms"]) if eligible else max(candidates, key=lambda c: c["accuracy_split"])
        os.replace(files[best["format"]], out_dir / INT8_FILE)
    float_row = {**float_eval, **latency["float"], "bytes": Path(device_path).stat().st_size}
    ratio = best["p50_ms"] / float_row["p50_ms"]
    faster = "int8" if ratio < 1.0 else "float"
    auto_choice = "int8" if best["eligible"] and ratio <= MIN_SPEEDUP else "float"
    for c in candidates:
        log.info("%-9s p50 %.3f ms (float %.3f ms), split accuracy %.4f (float %.4f), exit rate %.3f (float %.3f)%s",
                 c["format"], c["p50_ms"], float_row["p50_ms"], c["accuracy_split"], float_row["accuracy_split"],
                 c["exit_rate"], float_row["exit_rate"], "" if c["eligible"] else "  [accuracy drop too large]")
    return {
        "auto_choice": auto_choice,
        "info": {
            "quantization": {"format": best["format"], "per_channel": options.per_channel, "weights": "int8",
                             "activations": "uint8", "method": "static MinMax", "calibration_rows": len(ranges),
                             "onnxruntime": ort.__version__},
            "evaluated_on": {"split": "calibration", "rows": len(calibration), "threshold": point["threshold"]},
            "measured_on": {**cpu_signature(), "onnxruntime": ort.__version__, "intra_op_threads": 1,
                            "allow_spinning": False, "runs": options.latency_runs},
            "float": float_row,
            "int8": dict(best),
            "candidates": candidates,
            "latency_ratio_int8_over_float": round(ratio, 4),
            "max_accuracy_drop": options.max_accuracy_drop,
            "faster": faster,
            "min_speedup_for_auto": MIN_SPEEDUP,
            "auto_choice": auto_choice,
        },
    }
