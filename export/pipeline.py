"""Any :class:`SplitModel` -> a model folder: calibrate, measure operating points, export both
halves, verify them, add the INT8 half and the zstd dictionary, write the manifest. One path for
every adapter (built-in ViT, timm, Hugging Face) and task.

    folder/
      manifest.json            the typed schema of splitinfer.protos.manifest
      device.onnx, server.onnx the halves (graph names in splitinfer.protos.graphs)
      device.int8.onnx         with --quantize int8
      zstd.dict                a dictionary for int8/int4 token payloads
      tokenizer.json           text models
      operating_points.json, pareto.png   the whole measured table and its plot
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from ..protos import graphs
from ..protos.calibration import binomial_p_value, clopper_pearson_upper, min_calibration_size
from ..protos.manifest import (Calibration, CodecSpec, ExitSpec, FileRef, Guarantee, InputSpec, Manifest,
                               SelectionSpec, TokenSpec, sha256_file, write_manifest)
from ..protos.points import OperatingPoint
from .adapters.split import SplitModel
from .datasets import Dataset
from .exit_score import DEFAULT_VIEW_SHIFT, EXIT_POLICIES, exit_spec_for
from .halves import IR_VERSION_FOR_OPSET, export_halves, verify_parity
from .operating_points import COMPRESSION, LTT_SEQUENCES, NEVER_EXIT, SCALE_DTYPE, Simulation, SweepSpace, certify_configs, \
    config_losses, default_point, pareto_rows, plot_pareto, points_for, simulate_configs

__all__ = ["ExportOptions", "export_split_model", "export_checkpoint", "train_zstd_dictionary"]

log = logging.getLogger(__name__)

POINT_FIELDS = ("threshold", "mass", "budget", "encoding", "group_size", "accuracy", "exit_rate",
                "mean_bytes_per_request", "mean_bytes_per_offload", "mean_tokens_per_offload", "accuracy_lower_bound")


@dataclass(frozen=True)
class ExportOptions:
    """What to export and how to choose the default operating point.

    The exit threshold of every setting is certified by Learn-then-Test: with probability >= 1 -
    ``delta`` over the calibration draw, the split system loses at most ``epsilon`` accuracy against
    the whole model on exchangeable inputs (see :class:`~splitinfer.protos.manifest.Guarantee`).
    The default operating point is the one with the fewest mean bytes per request among the
    certified points whose calibration accuracy is within ``max_accuracy_drop`` of the most
    accurate certified point (when none is certified: among the points that offload everything;
    embedding models, which never exit, choose the same way among all points). bottleneck: the
    learned bottleneck width to deploy: "auto" (the width, or none, of that point), "none", or a
    trained width. encoding: the token encoding of the
    default point ("auto" chooses like the bottleneck). mass / budget: token selection of the
    default point ("auto" chooses too). quantize "int8": also write device.int8.onnx. exit_policy:
    the device's exit confidence (:mod:`splitinfer.export.exit_score`; "auto": view consistency on
    image classifiers, max softmax on text); view_shift: the second view's roll (rows, columns).
    """

    name: str = "model"
    opset: int = 17
    mass: float | str = "auto"
    budget: int | str = "auto"
    max_accuracy_drop: float = 0.002
    epsilon: float = 0.02
    delta: float = 0.1
    calibration_size: int | None = None
    bottleneck: int | str = "auto"
    encoding: str = "auto"
    quantize: str | None = None
    zstd_dictionary_bytes: int = 1024
    sweep: SweepSpace = SweepSpace()
    exit_policy: str = "auto"
    view_shift: tuple[int, int] = DEFAULT_VIEW_SHIFT
    plot: bool = True
    atol: float = 1e-4

    def __post_init__(self) -> None:
        if not self.name or any(c.isspace() for c in self.name) or len(self.name) > 200:
            raise ValueError(f"name must be 1-200 characters without spaces, got {self.name!r}")
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
        for name in ("epsilon", "delta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {value!r}")
        if self.calibration_size is not None and self.calibration_size < 10:
            raise ValueError(f"calibration_size must be >= 10, got {self.calibration_size}")
        if self.quantize not in (None, "int8"):
            raise ValueError(f"quantize must be None or 'int8', got {self.quantize!r}")
        if self.exit_policy not in EXIT_POLICIES:
            raise ValueError(f"exit_policy must be one of {EXIT_POLICIES}, got {self.exit_policy!r}")
        if (len(self.view_shift) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in self.view_shift)
                or tuple(self.view_shift) == (0, 0)):
            raise ValueError(f"view_shift must be two integers (rows, columns), not both 0, got {self.view_shift!r}")
        if self.zstd_dictionary_bytes and self.zstd_dictionary_bytes < 256:
            raise ValueError(f"zstd_dictionary_bytes must be 0 or >= 256, got {self.zstd_dictionary_bytes}")

    def space_for(self, model: SplitModel) -> SweepSpace:
        """The sweep restricted to what the options pin down; ValueError for an option the model
        cannot take (a bottleneck width it was not trained with)."""
        trained = (None, *model.bottleneck_widths)
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
        return SweepSpace(widths=widths, encodings=s.encodings if self.encoding == "auto" else (self.encoding,),
                          selections=tuple(dict.fromkeys(selections)), thresholds=s.thresholds)


def export_split_model(model: SplitModel, out_dir: Path, options: ExportOptions, calibration: Dataset) -> Manifest:
    """Write the model folder (see the module docstring) and return its manifest.

    Measures the operating-point table on ``calibration``, certifies each setting's exit threshold,
    deploys the bottleneck width of the cheapest certified point within the accuracy target,
    exports and verifies both halves, times them in ONNX Runtime, and writes the manifest last (a folder without one is not a model).
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "manifest.json").unlink(missing_ok=True)
    model.eval()
    backbone = model.backbone
    task, kind = backbone.task, backbone.input_kind
    if calibration.kind != kind:
        raise ValueError(f"calibration data {calibration.name} is {calibration.kind} data; the model reads {kind}")
    if task == "classification" and calibration.class_names is not None and \
            len(calibration.class_names) != backbone.output_dim:
        raise ValueError(f"calibration data has {len(calibration.class_names)} classes, the model "
                         f"{backbone.output_dim}")
    exit = exit_spec_for(model, options.exit_policy, options.view_shift)
    data = calibration.take(options.calibration_size)
    space = options.space_for(model)
    header = {"model": options.name, "manifest_sha256": "0" * 64, "request_id": "0" * 32}
    can_exit = task == "classification"
    if can_exit:
        configs = len(space.widths) * len(space.encodings) * len(space.selections)
        need = min_calibration_size(options.epsilon, options.delta / (LTT_SEQUENCES * configs))
        if len(data) < need:
            raise ValueError(f"{len(data)} calibration inputs cannot certify any exit threshold at epsilon="
                             f"{options.epsilon:g}, delta={options.delta:g} over {configs} settings (each tested "
                             f"at delta/{LTT_SEQUENCES * configs}): that needs >= {need}; give more calibration data, a larger "
                             "epsilon or delta, or pin --bottleneck/--encoding/--mass/--budget")
    sim = simulate_configs(model, data, space, header, exit)
    certificates = certify_configs(sim, options.epsilon, options.delta) if can_exit else None
    points = points_for(sim, space, certificates, options.delta if can_exit else None)
    chosen, target = default_point(points, options.max_accuracy_drop)
    width = chosen["width"]
    guarantee = guarantee_for(sim, chosen, options.epsilon, options.delta, len(sim.configs), can_exit)
    log.info("calibration on %d inputs: full accuracy %.4f; default point %s", len(data), sim.accuracy_full,
             {k: chosen[k] for k in ("width", "encoding", "mass", "budget", "threshold", "accuracy", "exit_rate",
                                     "mean_bytes_per_request")})
    (log.info if guarantee.certified else log.warning)("guarantee: %s", guarantee.summary())

    device_path, server_path = export_halves(model, out_dir, options.opset, width, exit)
    parity = verify_parity(model, device_path, server_path, width, atol=options.atol, exit=exit)
    fields = backbone.manifest_fields()
    timings = time_halves(device_path, server_path, data, chosen["mean_tokens_per_offload"] or data_tokens(data))
    files = {"device": _ref(device_path), "server": _ref(server_path)}
    info: dict = {"architecture": fields.get("architecture", {}),
                  "onnx": {"opset": options.opset, "ir_version": IR_VERSION_FOR_OPSET[options.opset],
                           "checked_with_onnxruntime": onnxruntime.__version__},
                  "parity_max_abs_diff": parity, "timings": timings}
    auto_choice = "float"
    if options.quantize == "int8":
        from .quantize import INT8_FILE, add_int8_device_half

        int8 = add_int8_device_half(out_dir, device_path, server_path, data, task, chosen)
        files["device_int8"] = _ref(out_dir / INT8_FILE)
        auto_choice, info["device_variants"] = int8["auto_choice"], int8["info"]

    deployed = [p for p in points if p["width"] == width]
    front = pareto_rows(deployed)
    if chosen not in front:
        front = sorted([*front, chosen], key=lambda p: p["mean_bytes_per_request"])
    table = [OperatingPoint(id=f"p{i}", **{k: p.get(k) for k in POINT_FIELDS}, **timings) for i, p in enumerate(front)]
    default_id = table[front.index(chosen)].id
    (out_dir / "operating_points.json").write_text(json.dumps(
        {"accuracy_full": sim.accuracy_full, "target": target, "deployed_width": width,
         "guarantee": guarantee.to_json(), "points": points}, indent=1) + "\n")
    if options.plot:
        plot_pareto(points, front, chosen, out_dir / "pareto.png",
                    f"{options.name}: {len(points)} operating points on {len(data)} calibration inputs",
                    ids=[p.id for p in table])
    print_front(table, default_id, width, backbone.dim, guarantee)

    if options.zstd_dictionary_bytes and chosen["encoding"] in ("int8", "int4"):
        import zstandard

        try:
            entry = train_zstd_dictionary(model, data, chosen, width, out_dir, options.zstd_dictionary_bytes)
            files["zstd_dictionary"] = _ref(out_dir / "zstd.dict")
            info["zstd_dictionary"] = entry
        except zstandard.ZstdError as exc:  # too few or too uniform samples to learn from
            log.warning("no zstd dictionary: %s", exc)
    if kind == "text":
        src = Path(backbone.folder) / "tokenizer.json"
        shutil.copyfile(src, out_dir / "tokenizer.json")
        files["tokenizer"] = _ref(out_dir / "tokenizer.json")

    if kind == "image":
        input_spec = InputSpec(kind="image", preprocessing=fields["preprocessing"])
        num_tokens, grid = int(fields["tokens"]["num_tokens"]), fields["tokens"].get("grid")
        grid = grid[0] if isinstance(grid, (list, tuple)) and len(set(grid)) == 1 else grid
        grid = grid if isinstance(grid, int) else None
    else:
        input_spec = InputSpec(kind="text", max_length=int(backbone.max_length))
        num_tokens, grid = int(backbone.max_length), None
    manifest = Manifest(
        name=options.name, task=task, split=model.split, input=input_spec,
        tokens=TokenSpec(dim=width or backbone.dim, model_dim=backbone.dim, num_tokens=num_tokens, grid=grid),
        classes=tuple(calibration.class_names or backbone.classes()) if task == "classification" else (),
        exit=dataclasses.replace(exit, threshold=chosen["threshold"] if can_exit else NEVER_EXIT),
        selection=SelectionSpec(mass=chosen["mass"], budget=chosen["budget"], importance=model.importance),
        codec=CodecSpec(chosen["encoding"], COMPRESSION, 0, SCALE_DTYPE if chosen["encoding"] in ("int8", "int4") else "fp32"),
        files=files, operating_points=tuple(table), default_operating_point=default_id,
        calibration=Calibration(
            data=calibration.name, n=len(data), accuracy_full=sim.accuracy_full, accuracy_split=chosen["accuracy"],
            exit_rate=chosen["exit_rate"], mean_bytes_per_request=chosen["mean_bytes_per_request"],
            mean_bytes_per_offload=chosen["mean_bytes_per_offload"],
            mean_tokens_per_offload=chosen["mean_tokens_per_offload"], max_accuracy_drop=options.max_accuracy_drop,
            guarantee=guarantee,
            disagreement=sim.disagreement((width, chosen["encoding"], chosen["mass"], chosen["budget"]),
                                          chosen["threshold"])),
        bottleneck=width, device_auto_choice=auto_choice, info=info,
    )
    manifest = write_manifest(out_dir, manifest)
    log.info("exported %s (version %s) to %s in %.1f s", options.name, manifest.version, out_dir,
             time.perf_counter() - t0)
    return manifest


def guarantee_for(sim: Simulation, point: dict, epsilon: float, delta: float, configurations: int,
                  can_exit: bool) -> Guarantee:
    """The :class:`Guarantee` of the deployed ``point`` (a row of :func:`points_for`): its loss on the
    calibration split, p-value and Clopper-Pearson bound at delta / (2 configurations), as it was tested."""
    n = len(sim.confidence)
    if not can_exit:
        return Guarantee(epsilon, delta, n, "binomial", configurations, False, None, None, None,
                         "an embedding model never answers on the device and its answers are scored by cosine "
                         "to the whole model, not right/wrong: there is no exit threshold to certify")
    key = (point["width"], point["encoding"], point["mass"], point["budget"])
    losses = int(config_losses(sim, key, [point["threshold"]]).sum())
    level = delta / (LTT_SEQUENCES * configurations)
    reason = "" if point["certified"] else (
        f"no exit threshold of any setting passed Learn-then-Test; the default point is the most accurate "
        f"measured one (threshold {point['threshold']:.4g}, exit rate {point['exit_rate']:.3f}) and its own loss "
        f"against the whole model is {losses / n:.4f} (bound {clopper_pearson_upper(losses, n, level):.4f})")
    return Guarantee(epsilon, delta, n, "binomial", configurations, bool(point["certified"]),
                     clopper_pearson_upper(losses, n, level), losses / n, binomial_p_value(losses, n, epsilon), reason)


def _ref(path: Path) -> FileRef:
    return FileRef(path=Path(path).name, sha256=sha256_file(path))


def data_tokens(data: Dataset) -> int:
    """All tokens of a typical input (image: the full grid; text: the longest calibration input)."""
    return 0 if data.kind == "image" else int(data.inputs["attention_mask"].sum(1).max())


def train_zstd_dictionary(model: SplitModel, data: Dataset, point: dict, width: int | None, out_dir: Path,
                          size: int) -> dict:
    """Train a zstd dictionary on the payloads the default point would send for the calibration
    inputs (first half), measure it on the second half, write ``zstd.dict``; return its figures."""
    import zstandard

    from ..protos.codec import CodecConfig, encode_tokens
    from .tokens import select_tokens_mask

    config = CodecConfig(point["encoding"], "none", scale_dtype=SCALE_DTYPE)
    bottleneck = model.bottleneck(width)
    payloads = []
    with torch.no_grad():
        for inputs, _ in data.batches(250):
            _, tokens, importance, w = model.device_forward(inputs)
            codes = (tokens if bottleneck is None else bottleneck.encode(tokens)).numpy()
            keep = select_tokens_mask(importance, point["mass"], point["budget"])
            if w is not None:
                keep = keep & (w[:, 1:] > 0)
            for row, k in zip(codes, keep.numpy()):
                positions = np.r_[0, 1 + np.flatnonzero(k)]
                payloads.append(encode_tokens(row[positions], positions, config).payload)
    # a small calibration set (an imagefolder of a few dozen pictures): train on every payload and
    # say so; otherwise train on the first half and measure on the second
    half = len(payloads) // 2 if len(payloads) >= 64 else len(payloads)
    dictionary = zstandard.train_dictionary(size, payloads[:half] * (1 if half >= 64 else -(-64 // half)), threads=1)
    path = out_dir / "zstd.dict"
    path.write_bytes(dictionary.as_bytes())
    plain = zstandard.ZstdCompressor(level=3)
    with_dict = zstandard.ZstdCompressor(level=3, dict_data=dictionary)
    held = payloads[half:] or payloads
    mean = lambda c: float(np.mean([min(len(p), len(c.compress(p))) for p in held]))  # noqa: E731
    entry = {"bytes": path.stat().st_size, "trained_on": half, "measured_on": "held-out" if half < len(payloads) else "training payloads",
             "held_out_mean_payload": {"raw": float(np.mean([len(p) for p in held])), "zstd": mean(plain),
                                       "zstd_dictionary": mean(with_dict)}}
    log.info("zstd dictionary (%d bytes): held-out payload %s", entry["bytes"], entry["held_out_mean_payload"])
    return entry


def time_halves(device_path: Path, server_path: Path, data: Dataset, tokens: float, runs: int = 200) -> dict:
    """Median ONNX Runtime latency (one thread, batch 1) of the device half on a calibration input
    and of the server half on ``tokens`` of its tokens, in ms."""
    opts = onnxruntime.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    device = onnxruntime.InferenceSession(str(device_path), opts, providers=["CPUExecutionProvider"])
    server = onnxruntime.InferenceSession(str(server_path), opts, providers=["CPUExecutionProvider"])
    row = graphs.device_feed(device, data.numpy_rows(slice(0, 1)))
    codes = device.run(None, row)[1]
    codes = codes[:, : max(1, min(codes.shape[1], int(round(tokens or codes.shape[1]))))]
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

    return {"device_ms": median_ms(lambda: device.run(None, row)),
            "server_ms": median_ms(lambda: server.run(None, {graphs.TOKENS: codes, graphs.MASK: mask}))}


def print_front(points: list[OperatingPoint], default_id: str, width, dim: int, guarantee: Guarantee) -> None:
    """The Pareto front as a table on stdout (the export CLI's intended output); acc>= is each point's
    (1 - delta) lower confidence bound on its accuracy."""
    print(f"\nPareto front, bottleneck {width or dim}/{dim} (calibration split, n={guarantee.n}; * = default point; "
          f"acc>=: {1 - guarantee.delta:g} lower bound)")
    print(f"  {'id':>4} {'thr':>8} {'mass':>5} {'cap':>4} {'enc':>5} {'acc':>7} {'acc>=':>7} {'exit':>6} "
          f"{'B/req':>8} {'B/offl':>8}")
    for p in points:
        mark = "*" if p.id == default_id else " "
        threshold = "never" if p.threshold >= NEVER_EXIT else f"{p.threshold:.6f}"
        floor = "-" if p.accuracy_lower_bound is None else f"{p.accuracy_lower_bound:.4f}"
        print(f"{mark} {p.id:>4} {threshold:>8} {p.mass:>5.2f} {p.budget:>4d} {p.encoding:>5} {p.accuracy:>7.4f} "
              f"{floor:>7} {p.exit_rate:>6.3f} {p.mean_bytes_per_request:>8.1f} {p.mean_bytes_per_offload:>8.1f}")
    print(f"guarantee of the default point: {guarantee.summary()}")


def export_checkpoint(checkpoint: Path, out_dir: Path, options: ExportOptions | None = None) -> Manifest:
    """A checkpoint of ``splitinfer-export train`` (the built-in ViT) through :func:`export_split_model`,
    calibrated on cluttered MNIST with the clutter it was trained with."""
    from .adapters.vit import BuiltinViT
    from .data import ClutterConfig
    from .datasets import load_dataset
    from .train import load_checkpoint

    vit, summary = load_checkpoint(checkpoint)
    clutter = ClutterConfig(**summary["clutter"]) if "clutter" in summary else ClutterConfig()
    options = options or ExportOptions(name="vit-cluttered-mnist")
    backbone = BuiltinViT(vit)
    data = load_dataset("cluttered-mnist", "calibration", backbone, n=options.calibration_size, clutter=clutter)
    return export_split_model(SplitModel(backbone, vit.cfg.split), out_dir, options, data)
