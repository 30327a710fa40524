"""ONNX export of any :class:`SplitModel`'s two halves, and the one check that ONNX Runtime
computes what torch computes.

Graph names and shapes are those of :mod:`splitinfer.protos.graphs`. With a learned bottleneck of
width w deployed, device.onnx ends with its encoder (tokens (B, N, w)) and server.onnx starts with
its decoder. Opset 17 / IR version 8 by default: old enough for ONNX Runtime 1.16 (the newest wheel
for older aarch64 glibc, which rejects IR 10 / opset 20), new enough for LayerNormalization.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
import torch.nn as nn

from ..protos import graphs
from ..protos.manifest import ExitSpec
from .adapters.split import SplitModel
from .exit_score import device_pass, exit_spec_for

__all__ = ["export_halves", "verify_parity", "ParityError", "IR_VERSION_FOR_OPSET"]

log = logging.getLogger(__name__)

# The IR version that ONNX itself pairs with each opset (onnx/helper.py VERSION_TABLE).
IR_VERSION_FOR_OPSET = {13: 7, 14: 7, 15: 8, 16: 8, 17: 8, 18: 8, 19: 9, 20: 9}


class ParityError(RuntimeError):
    """ONNX Runtime's output differs from torch's beyond tolerance."""


class DeviceHalf(nn.Module):
    """inputs (graphs.device_inputs) -> exit output, tokens (B, N, d or w), importance (B, N - 1), and
    for classifiers the exit confidence (B,) of ``exit`` (default: the model's ``auto`` policy)."""

    def __init__(self, model: SplitModel, width: int | None = None, exit: ExitSpec | None = None):
        super().__init__()
        self.model, self.names = model, graphs.device_inputs(model.backbone.input_kind)
        self.bottleneck = model.bottleneck(width)
        self.exit = exit_spec_for(model) if exit is None else exit

    def forward(self, *args):
        exit_out, tokens, importance, _, confidence = device_pass(self.model, dict(zip(self.names, args)), self.exit)
        if self.bottleneck is not None:
            tokens = self.bottleneck.encode(tokens)
        return (exit_out, tokens, importance) if confidence is None else (exit_out, tokens, importance, confidence)


class ServerHalf(nn.Module):
    """tokens (B, T, d or w), mask (B, T) bool (True = real) -> logits (B, K) or embedding (B, D)."""

    def __init__(self, model: SplitModel, width: int | None = None):
        super().__init__()
        self.model = model
        self.bottleneck = model.bottleneck(width)

    def forward(self, tokens, mask):
        if self.bottleneck is not None:
            tokens = self.bottleneck.decode(tokens)
        return self.model.server_forward(tokens, mask)


def _export(module: nn.Module, args: tuple, path: Path, input_names, output_names, dynamic_axes, opset: int) -> None:
    if opset not in IR_VERSION_FOR_OPSET:
        raise ValueError(f"opset must be one of {sorted(IR_VERSION_FOR_OPSET)}, got {opset}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            module, args, str(path), input_names=list(input_names), output_names=list(output_names),
            dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False, do_constant_folding=True,
        )
    proto = onnx.load(str(path))
    proto.ir_version = min(proto.ir_version, IR_VERSION_FOR_OPSET[opset])
    proto.producer_version = ""  # the file depends on the graph, not on which torch wrote it
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))


def _skip_identities(g) -> None:
    """Read initializers directly instead of through Identity nodes (the exporter writes one per
    parameter equal to another): ONNX Runtime removes them itself, and warns when a subgraph reads
    one, where it cannot rename it."""
    initializers = {i.name for i in g.initializer}
    outputs = {o.name for o in g.output}
    rename = {n.output[0]: n.input[0] for n in g.node
              if n.op_type == "Identity" and n.input[0] in initializers and n.output[0] not in outputs}
    if not rename:
        return
    kept = [n for n in g.node if not (n.op_type == "Identity" and n.output and n.output[0] in rename)]
    for node in kept:
        node.input[:] = [rename.get(i, i) for i in node.input]
    del g.node[:]
    g.node.extend(kept)


def _gate_second_view(path: Path, opset: int) -> None:
    """Put device.onnx's second-view branch (the nodes only ``exit_confidence`` needs) under an If on
    the boolean input ``second_view``: the edge feeds true and runs the policy it was calibrated
    with; a whole-model baseline feeds false and runs one view (the else branch is max softmax of
    the exit logits, which the manifest's threshold does not apply to). ONNX Runtime runs every node
    of a graph whatever outputs are asked for, so the branch needs the If to be skipped."""
    from onnx import TensorProto, helper

    proto = onnx.load(str(path))
    g = proto.graph
    _skip_identities(g)
    producer = {out: node for node in g.node for out in node.output}

    def ancestors(names) -> set[int]:
        seen, stack = set(), list(names)
        while stack:
            node = producer.get(stack.pop())
            if node is not None and id(node) not in seen:
                seen.add(id(node))
                stack.extend(node.input)
        return seen

    main = ancestors([o.name for o in g.output if o.name != graphs.EXIT_CONFIDENCE])
    branch = [n for n in g.node if id(n) in ancestors([graphs.EXIT_CONFIDENCE]) - main]
    inner = graphs.EXIT_CONFIDENCE + "_views"
    for node in branch:
        node.output[:] = [inner if o == graphs.EXIT_CONFIDENCE else o for o in node.output]
    out_type = next(o for o in g.output if o.name == graphs.EXIT_CONFIDENCE).type
    then_graph = helper.make_graph(branch, "second_view", [], [helper.make_value_info(inner, out_type)])
    probs, one_view = graphs.EXIT_CONFIDENCE + "_probs", graphs.EXIT_CONFIDENCE + "_one_view"
    if opset >= 18:
        axes = helper.make_node("Constant", [], ["reduce_axes"], value=helper.make_tensor("a", TensorProto.INT64, [1], [-1]))
        reduce = [axes, helper.make_node("ReduceMax", [probs, "reduce_axes"], [one_view], keepdims=0)]
    else:
        reduce = [helper.make_node("ReduceMax", [probs], [one_view], axes=[-1], keepdims=0)]
    else_graph = helper.make_graph([helper.make_node("Softmax", [graphs.EXIT_LOGITS], [probs], axis=-1), *reduce],
                                   "one_view", [], [helper.make_value_info(one_view, out_type)])
    gate = helper.make_node("If", [graphs.SECOND_VIEW], [graphs.EXIT_CONFIDENCE], then_branch=then_graph,
                            else_branch=else_graph)
    nodes = [n for n in g.node if id(n) not in {id(b) for b in branch}] + [gate]
    del g.node[:]
    g.node.extend(nodes)
    g.input.append(helper.make_tensor_value_info(graphs.SECOND_VIEW, TensorProto.BOOL, []))
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))


def export_halves(model: SplitModel, out_dir: Path, opset: int = 17, width: int | None = None,
                  exit: ExitSpec | None = None) -> tuple[Path, Path]:
    """Write out_dir/device.onnx and out_dir/server.onnx (checked by the ONNX checker); device.onnx
    computes the confidence of ``exit`` (default: the model's ``auto`` exit policy)."""
    model.eval()
    out_dir = Path(out_dir)
    backbone = model.backbone
    task = backbone.task
    names = graphs.device_inputs(backbone.input_kind)
    exit_name = graphs.exit_output(task)
    example = backbone.example_inputs(2, length=min(8, getattr(backbone, "max_length", 8)))
    text = backbone.input_kind == "text"
    seq = {0: "batch", 1: "length"} if text else {0: "batch"}
    dyn = {n: dict(seq) for n in names}
    dyn.update({exit_name: {0: "batch"}, graphs.TOKENS: dict(seq), graphs.IMPORTANCE: dict(seq),
                graphs.EXIT_CONFIDENCE: {0: "batch"}})
    device_path, server_path = out_dir / "device.onnx", out_dir / "server.onnx"
    device_half = DeviceHalf(model, width, exit)
    _export(device_half, tuple(example[n] for n in names), device_path, names, graphs.device_outputs(task), dyn, opset)
    if device_half.exit.score == "view_consistency":
        _gate_second_view(device_path, opset)
    wire = width or backbone.dim
    tokens, mask = torch.zeros(2, 5, wire), torch.ones(2, 5, dtype=torch.bool)
    out_name = graphs.server_output(task)
    _export(ServerHalf(model, width), (tokens, mask), server_path, graphs.server_inputs(), [out_name],
            {graphs.TOKENS: {0: "batch", 1: "num_tokens"}, graphs.MASK: {0: "batch", 1: "num_tokens"},
             out_name: {0: "batch"}}, opset)
    return device_path, server_path


def _session(path: Path) -> onnxruntime.InferenceSession:
    opts = onnxruntime.SessionOptions()
    opts.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@torch.no_grad()
def verify_parity(model: SplitModel, device_path: Path, server_path: Path, width: int | None = None,
                  batch_sizes: tuple[int, ...] = (1, 3), text_lengths: tuple[int, ...] = (4, 17, 40),
                  atol: float = 1e-4, seed: int = 0, exit: ExitSpec | None = None) -> dict:
    """ORT vs torch on both halves; raise ParityError beyond ``atol``. Returns the worst |diff| per part.

    Device: every batch size (text: every length, ragged padding). Server: random token subsets
    (CLS first) at several token counts, a ragged padded batch among them, and each padded row
    against the same row alone, unpadded.
    """
    model.eval()
    device, server = _session(device_path), _session(server_path)
    device_half, server_half = DeviceHalf(model, width, exit), ServerHalf(model, width)
    names = graphs.device_inputs(model.backbone.input_kind)
    rng = np.random.default_rng(seed)
    worst = {"device": 0.0, "server": 0.0, "padding": 0.0}
    lengths = text_lengths if model.backbone.input_kind == "text" else (None,)
    for b in batch_sizes:
        for length in lengths:
            if length is not None:
                length = min(length, model.backbone.max_length)
            inputs = model.backbone.example_inputs(b, length=length, seed=int(rng.integers(1 << 30)))
            ort_out = device.run(None, graphs.device_feed(device, {n: inputs[n].numpy() for n in names}))
            if len(ort_out) != len(graphs.device_outputs(model.backbone.task)):
                raise ParityError(f"device.onnx has {len(ort_out)} outputs, expected {graphs.device_outputs(model.backbone.task)}")
            torch_out = [t.numpy() for t in device_half(*(inputs[n] for n in names))]
            for a, t in zip(ort_out, torch_out):
                worst["device"] = max(worst["device"], float(np.abs(a - t).max()))
            tokens_all = torch_out[1]
            n_all = tokens_all.shape[1]
            for n in sorted({1, 2, max(2, n_all // 4), max(2, n_all // 2), n_all}):
                if not 1 <= n <= n_all:
                    continue
                rows = np.stack([np.r_[0, np.sort(rng.choice(np.arange(1, n_all), n - 1, replace=False))]
                                 for _ in range(b)])
                tokens = np.ascontiguousarray(np.take_along_axis(tokens_all, rows[:, :, None], axis=1))
                mask = np.ones((b, n), dtype=bool)
                if b > 1 and n > 2:
                    for i in range(1, b):
                        mask[i, max(1, n - i):] = False
                ort_y = server.run(None, {graphs.TOKENS: tokens, graphs.MASK: mask})[0]
                torch_y = server_half(torch.from_numpy(tokens), torch.from_numpy(mask)).numpy()
                worst["server"] = max(worst["server"], float(np.abs(ort_y - torch_y).max()))
                for i in range(b):
                    k = int(mask[i].sum())
                    alone = server_half(torch.from_numpy(tokens[i:i + 1, :k]),
                                        torch.ones(1, k, dtype=torch.bool)).numpy()
                    worst["padding"] = max(worst["padding"], float(np.abs(alone[0] - torch_y[i]).max()))
    for part, diff in worst.items():
        if not diff <= atol:
            raise ParityError(f"{part}: ONNX Runtime / padded rows differ from torch by {diff:.3g} (> {atol})")
    log.info("parity: max |ORT - torch| device %.2e, server %.2e, padding %.2e",
             worst["device"], worst["server"], worst["padding"])
    return worst
