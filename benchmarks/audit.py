"""The field audit on a shifted stream and on in-distribution inputs, with the built-in model.

    .venv/bin/python benchmarks/audit.py [--model artifacts/model] [--in-distribution 10000]
        [--before 2000] [--shifted 6000] [--after 2000] [--seeds 20] [--shift contrast_40]

1. Per input, once, in ONNX Runtime (benchmarks/budget_controller.py's passes): the device half's
   exit probabilities, the server half's answer on what the edge would send at the manifest's
   default point (the runner's own selection and codec, decoded as the server would), the request
   bytes, and the whole model's answer (the server half on every token).
2. Inputs: the calibration split (``make_split("calibration")``, as export measured it); >= 10,000
   test canvases with fresh clutter; a shifted stream: ``--before`` test canvases, then ``--shifted``
   shifted ones (``--shift``, default ``contrast_40``: the test canvases at 40% contrast, a dimmer
   camera) to its end: the checks run on it. The same stream followed by ``--after`` test canvases
   again shows the recovery. Every shift in SHIFTS is surveyed first on ``--survey`` canvases: exit
   head, whole model, offloading everything, the split system, and the disagreement rate among device
   answers.
3. p0, the calibrated disagreement rate: the share of the calibration inputs answered on the device
   whose server answer differs, as ``calibration.disagreement`` would carry it, turned into an upper
   bound by edge/audit.py ``calibrated_disagreement`` (the bound from the operating-point table alone,
   for a manifest without it, is reported and run too); r0, the calibrated offload rate of the
   label-free test, the same way (``calibrated_offload_rate``).
   Every stream's inputs come in random order (canvas i of a set shows digit i % 1000).
4. Replay: every stream through :func:`splitinfer.edge.audit.route` and ``settle`` -- the code
   EdgeRunner.decide runs per input -- with the audit on (``--seeds`` audit seeds; in distribution each
   seed in its own input order), with its
   disagreement test alone (no label-free test), off, and offloading everything.

Writes ``benchmarks/results/audit.json`` and ``audit.png``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
log = logging.getLogger("audit")

DETECT_WITHIN = 500
CHUNK = 1000


def test_canvases(n: int, seed: int, fragments: int = 6) -> tuple[np.ndarray, np.ndarray]:
    from splitinfer.export.data import ClutterConfig, load_mnist_digits, make_canvases, split_digits

    digits, labels = split_digits(*load_mnist_digits())["test"]
    return make_canvases(digits, labels, n, ClutterConfig(fragments=fragments), seed=seed)


def sklearn_digits_28() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits (values 0..16) as uint8 (n, 28, 28): bilinear to 20x20, centred
    on 28x28 like MNIST's digits."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    out = np.zeros((len(d.images), 28, 28), dtype=np.uint8)
    for i, img in enumerate(d.images):
        small = Image.fromarray((img * (255.0 / 16.0)).round().astype(np.uint8))
        out[i, 4:24, 4:24] = np.asarray(small.resize((20, 20), Image.BILINEAR))
    return out, d.target.astype(np.int64)


def rotated(n: int, seed: int, degrees: float = 30.0) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    from splitinfer.export.data import ClutterConfig, load_mnist_digits, make_canvases, split_digits

    digits, labels = split_digits(*load_mnist_digits())["test"]
    turned = np.stack([np.asarray(Image.fromarray(d).rotate(degrees, resample=Image.BILINEAR)) for d in digits])
    return make_canvases(turned, labels, n, ClutterConfig(), seed=seed)


def sklearn_canvases(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from splitinfer.export.data import ClutterConfig, make_canvases

    return make_canvases(*sklearn_digits_28(), n, ClutterConfig(), seed=seed)


def dimmed(n: int, seed: int, contrast: float) -> tuple[np.ndarray, np.ndarray]:
    """Test canvases at a share of their contrast (a dimmer camera)."""
    x, y = test_canvases(n, seed)
    return (x * contrast).astype(np.uint8), y


def salt_10(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """10% of the pixels white (a dusty lens, a noisy sensor)."""
    x, y = test_canvases(n, seed)
    x = x.copy()
    x[np.random.default_rng(seed).random(x.shape) < 0.1] = 255
    return x, y


def blurred(n: int, seed: int, radius: float = 0.7) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blur (an out-of-focus camera)."""
    from PIL import Image, ImageFilter

    x, y = test_canvases(n, seed)
    return np.stack([np.asarray(Image.fromarray(c).filter(ImageFilter.GaussianBlur(radius))) for c in x]), y


SHIFTS = {  # name -> (n, seed) -> uint8 canvases (n, 64, 64), labels (n,)
    "contrast_40": lambda n, seed: dimmed(n, seed, 0.4),
    "contrast": lambda n, seed: dimmed(n, seed, 0.5),
    "blur_0.7": blurred,
    "salt_10": salt_10,
    "sklearn_digits": sklearn_canvases,
    "rotation_30": rotated,
    "dense_clutter_20": lambda n, seed: test_canvases(n, seed, fragments=20),
}


def survey(o: dict, labels: np.ndarray, threshold: float) -> dict:
    answered = o["confidence"] >= threshold
    split = np.where(answered, o["device"], o["server"])
    q = float((o["device"][answered] != o["server"][answered]).mean()) if answered.any() else 0.0
    return {"exit_rate": float(answered.mean()), "exit_head": accuracy(o["device"], labels),
            "whole_model": accuracy(o["whole"], labels), "offload_everything": accuracy(o["server"], labels),
            "split": accuracy(split, labels), "disagreement_among_device_answers": q,
            "disagreement_share_of_inputs": q * float(answered.mean())}


def outcomes(manifest, device, server, runner, images: np.ndarray) -> dict:
    """Per input (n,): confidence, device / server / whole-model answers, request bytes if offloaded."""
    from budget_controller import device_pass, offload_outcomes

    parts = []
    for start in range(0, len(images), CHUNK):
        confidence, exit_pred, tokens, importance, _ = device_pass(manifest, device, images[start:start + CHUNK],
                                                                   timed=0)
        server_pred, nbytes, _ = offload_outcomes(runner, server, tokens, importance, None)
        whole = []
        for s in range(0, len(tokens), 250):
            batch = tokens[s:s + 250]
            whole.append(server.run(None, {"tokens": batch, "mask": np.ones(batch.shape[:2], dtype=bool)})[0].argmax(1))
        parts.append({"confidence": confidence, "device": exit_pred, "server": server_pred,
                      "whole": np.concatenate(whole), "bytes": nbytes})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def replay(o: dict, threshold: float, audit) -> dict:
    """The stream through the runner's per-input decision. Per input: the answer, offloaded?, an
    audit?, the alarm on after it."""
    from splitinfer.edge.audit import route, settle

    n = len(o["confidence"])
    answer = np.empty(n, dtype=np.int64)
    offloaded, audited, alarm = (np.zeros(n, dtype=bool) for _ in range(3))
    first_tests = None
    for i in range(n):
        decision = route(float(o["confidence"][i]), threshold, audit)
        answer[i] = settle(decision, audit, o["device"][i], o["server"][i]) if decision.offload else o["device"][i]
        offloaded[i], audited[i] = decision.offload, decision.audit
        alarm[i] = audit is not None and audit.alarm
        if alarm[i] and first_tests is None:
            first_tests = list(audit.drift_tests)
    return {"answer": answer, "offloaded": offloaded, "audited": audited, "alarm": alarm, "first_tests": first_tests}


def measured_p0(manifest, cal: dict, labels: np.ndarray, alpha: float) -> tuple[float, float, float, dict]:
    """(p0 from the measured disagreement, p0 from the table alone, r0 (the label-free test's
    calibrated offload rate), the calibration figures)."""
    from splitinfer.edge.audit import calibrated_disagreement, calibrated_offload_rate

    answered = cal["confidence"] >= manifest.exit_threshold
    rate = float((cal["device"][answered] != cal["server"][answered]).mean())
    calibration = dataclasses.replace(manifest.calibration, n=len(labels), exit_rate=float(answered.mean()),
                                      disagreement=rate)
    with_field = calibrated_disagreement(dataclasses.replace(manifest, calibration=calibration), delta=alpha)
    figures = {"n": len(labels), "exit_rate": float(answered.mean()), "disagreement": rate,
               "disagreements": int((cal["device"][answered] != cal["server"][answered]).sum()),
               "answered": int(answered.sum()),
               "exit_head_accuracy": float((cal["device"] == labels).mean()),
               "whole_model_accuracy": float((cal["whole"] == labels).mean())}
    figures["offload_rate_bound"] = calibrated_offload_rate(dataclasses.replace(manifest, calibration=calibration),
                                                            delta=alpha)
    return with_field, calibrated_disagreement(manifest, delta=alpha), figures["offload_rate_bound"], figures


def accuracy(answer: np.ndarray, labels: np.ndarray) -> float:
    return float((answer == labels).mean()) if len(labels) else float("nan")


def run_stream(o: dict, labels: np.ndarray, threshold: float, p0: float, r0: float | None, args, shift: int | None,
               end: int | None) -> dict:
    """Audit on (one run per seed; r0 None: the disagreement test alone), off, and offload-everything
    over one stream."""
    from splitinfer.edge.audit import Audit

    rest = slice(shift or 0, None)
    off = replay(o, threshold, None)
    everything = replay(o, 2.0, None)  # a threshold no input reaches
    runs, example = [], None
    for seed in range(args.seeds):
        audit = Audit(args.audit_rate, p0, args.alpha, rng=seed, calibrated_offload_rate=r0,
                      exit_threshold=None if r0 is None else threshold)
        # without a shift every seed also replays the inputs in its own order (the label-free test draws nothing)
        order = np.arange(len(labels)) if shift is not None else np.random.default_rng(seed).permutation(len(labels))
        r = replay({k: v[order] for k, v in o.items()}, threshold, audit)
        alarms = np.flatnonzero(np.diff(np.r_[False, r["alarm"]].astype(int)) == 1)
        first = int(alarms[0]) if len(alarms) else None
        after_shift = [int(a) for a in alarms if shift is not None and a >= shift]
        ends = np.flatnonzero(np.diff(np.r_[False, r["alarm"]].astype(int)) == -1)
        runs.append({
            "seed": seed, **{k: v for k, v in audit.state().items() if k in ("audits", "disagreements", "alarms",
                                                                              "recoveries")},
            "first_alarm": first, "first_alarm_tests": r["first_tests"],
            "false_alarms_before_shift": int(sum(a < (shift or len(labels)) for a in alarms)),
            "delay": (after_shift[0] - shift) if after_shift else None,
            "recovered_after_shift_end": (int(ends[ends >= end][0]) - end) if end is not None and (ends >= end).any()
            else None,
            "alarm_at_the_end": bool(r["alarm"][-1]),
            "accuracy_rest": accuracy(r["answer"][rest], labels[order][rest]),
            "offload_rate": float(r["offloaded"].mean()),
            "extra_offload_rate": float(r["offloaded"].mean() - off["offloaded"].mean()),
            "mean_bytes_per_request": float(np.where(r["offloaded"], o["bytes"][order], 0).mean()),
        })
        example = example or r
    acc_all = accuracy(everything["answer"][rest], labels[rest])
    acc_on = np.array([r["accuracy_rest"] for r in runs])
    delays = [r["delay"] for r in runs]
    out = {
        "inputs": len(labels), "shift_at": shift, "shift_ends_at": end,
        "accuracy_rest": {"audit_on_median": float(np.median(acc_on)), "audit_on_min": float(acc_on.min()),
                          "audit_off": accuracy(off["answer"][rest], labels[rest]), "offload_everything": acc_all,
                          "exit_head": accuracy(o["device"][rest], labels[rest]),
                          "whole_model": accuracy(o["whole"][rest], labels[rest])},
        "offload_rate": {"audit_off": float(off["offloaded"].mean()),
                         "audit_on_mean": float(np.mean([r["offload_rate"] for r in runs]))},
        "extra_offload_rate": {"mean": float(np.mean([r["extra_offload_rate"] for r in runs])),
                               "max": float(np.max([r["extra_offload_rate"] for r in runs]))},
        "runs_with_an_alarm": int(sum(r["alarms"] > 0 for r in runs)), "runs": runs,
    }
    if shift is not None:
        flagged = [d for d in delays if d is not None and d <= DETECT_WITHIN]
        out["detection"] = {"within": DETECT_WITHIN, "flagged_share": len(flagged) / len(runs),
                            "delay_median": float(np.median([d for d in delays if d is not None])) if any(
                                d is not None for d in delays) else None,
                            "delay_max": max((d for d in delays if d is not None), default=None),
                            "false_alarms_before_shift": int(sum(r["false_alarms_before_shift"] for r in runs)),
                            "first_alarm_by": {name: sum(name in (r["first_alarm_tests"] or ()) for r in runs)
                                               for name in ("disagreement", "offload_rate")}}
        out["accuracy_rest"]["audit_on_gap_to_offload_everything"] = float(acc_all - acc_on.min())
        out["accuracy_rest"]["audit_off_gap_to_offload_everything"] = float(acc_all - out["accuracy_rest"]["audit_off"])
    if end is not None and end < len(labels):
        back = [r["recovered_after_shift_end"] for r in runs]
        out["recovery"] = {"recovered_share": sum(b is not None for b in back) / len(runs),
                           "delay_median": float(np.median([b for b in back if b is not None])) if any(
                               b is not None for b in back) else None,
                           "in_alarm_at_the_end": int(sum(r["alarm_at_the_end"] for r in runs))}
    out["_example"], out["_off"], out["_everything"] = example, off, everything
    return out


def plot(path: Path, name: str, shifted: dict, labels: np.ndarray, in_dist: dict, window: int = 200) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(12, 10))
    kernel = np.ones(window) / window
    t = np.arange(window, len(labels) + 1)
    curves = {"audit on (seed 0)": shifted["_example"], "audit off": shifted["_off"],
              "offload everything": shifted["_everything"]}
    for (label, r), style in zip(curves.items(), ("-", "--", ":")):
        axes[0].plot(t, np.convolve(r["answer"] == labels, kernel, mode="valid"), linestyle=style, label=label)
        axes[1].plot(t, np.convolve(r["offloaded"], kernel, mode="valid"), linestyle=style, label=label)
    ex = shifted["_example"]["alarm"]
    for ax in axes[:2]:
        ax.axvspan(shifted["shift_at"], shifted["shift_ends_at"], color="orange", alpha=0.12, label="shifted inputs")
        on = np.flatnonzero(np.diff(np.r_[False, ex].astype(int)) == 1)
        for k, a in enumerate(on):
            ax.axvline(a, color="red", linewidth=1, label="drift flagged (seed 0)" if k == 0 else None)
        off = np.flatnonzero(np.diff(np.r_[False, ex].astype(int)) == -1)
        for k, a in enumerate(off):
            ax.axvline(a, color="green", linewidth=1, label="back to the calibrated threshold (seed 0)" if k == 0 else None)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes[0].set_ylabel(f"accuracy ({window}-input window)")
    axes[1].set_ylabel(f"offload rate ({window}-input window)")
    axes[1].set_xlabel("input")
    d = shifted["detection"]
    delay = "never" if d["delay_median"] is None else f"median delay {d['delay_median']:.0f}"
    back = shifted.get("recovery", {})
    axes[0].set_title(f"shifted stream ({name}) from input {shifted['shift_at']} to {shifted['shift_ends_at']}: drift "
                      f"flagged within {DETECT_WITHIN} inputs in {d['flagged_share']:.0%} of {len(shifted['runs'])} seeds "
                      f"({delay});\nback to the calibrated threshold in {back.get('recovered_share', 0):.0%} (median "
                      f"{back.get('delay_median')} inputs after the shift ends)", fontsize=9)
    extra = np.array([r["extra_offload_rate"] for r in in_dist["runs"]]) * 100
    axes[2].hist(extra, bins=15, color="gray")
    axes[2].axvline(2.5, color="red", linestyle="--", label="2.5% bar")
    axes[2].set_xlabel(f"extra offloads on {in_dist['inputs']:,} in-distribution inputs (% of inputs), one per seed; "
                       f"runs with a false alarm: {in_dist['runs_with_an_alarm']} of {len(in_dist['runs'])}")
    axes[2].set_ylabel("seeds")
    axes[2].legend(fontsize=7)
    axes[2].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def public(stream: dict) -> dict:
    return {k: v for k, v in stream.items() if not k.startswith("_")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "artifacts" / "model")
    parser.add_argument("--in-distribution", type=int, default=10_000)
    parser.add_argument("--before", type=int, default=2_000, help="in-distribution inputs before the shift")
    parser.add_argument("--shifted", type=int, default=6_000)
    parser.add_argument("--after", type=int, default=2_000, help="in-distribution inputs after the shift")
    parser.add_argument("--seeds", type=int, default=20, help="audit seeds per stream")
    parser.add_argument("--shift", choices=tuple(SHIFTS), default="contrast_40")
    parser.add_argument("--survey", type=int, default=1_000, help="canvases per shift in the survey")
    parser.add_argument("--audit-rate", type=float, default=0.02)
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "audit.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("splitinfer.edge.audit").setLevel(logging.ERROR)  # thousands of replayed alarms

    from budget_controller import load_sessions

    from splitinfer.edge.runner import EdgeRunner
    from splitinfer.export.data import make_split
    from splitinfer.protos import load_manifest

    t0 = time.perf_counter()
    manifest = load_manifest(args.model)
    device, server = load_sessions(manifest)
    runner = EdgeRunner(device, None, manifest)
    threshold = manifest.exit_threshold

    cal_x, cal_y = make_split("calibration")
    n_test = args.in_distribution + args.before + args.after
    test_x, test_y = test_canvases(n_test, seed=90_001)
    shift_x, shift_y = SHIFTS[args.shift](args.shifted, 90_002)
    log.info("ONNX Runtime passes over %d calibration, %d test and %d shifted canvases", len(cal_x), n_test,
             len(shift_x))
    cal = outcomes(manifest, device, server, runner, cal_x)
    test = outcomes(manifest, device, server, runner, test_x)
    shifted_o = outcomes(manifest, device, server, runner, shift_x)
    # canvas i shows digit i % 1000 (export/data.py make_canvases): streams of independent inputs come in random order
    order = np.random.default_rng(90_004)
    test_p, shift_p = order.permutation(n_test), order.permutation(len(shift_y))
    test, test_y = {k: v[test_p] for k, v in test.items()}, test_y[test_p]
    shifted_o, shift_y = {k: v[shift_p] for k, v in shifted_o.items()}, shift_y[shift_p]

    surveyed = {}
    for name, make in SHIFTS.items():
        x, y = make(args.survey, 90_003)
        surveyed[name] = survey(outcomes(manifest, device, server, runner, x), y, threshold)
    t_pass = time.perf_counter() - t0
    p0, p0_table, r0, figures = measured_p0(manifest, cal, cal_y, args.alpha)
    log.info("calibration: %s; p0 %.4f (table-only bound %.4f), r0 %s", figures, p0, p0_table, r0)

    n_in = args.in_distribution
    in_o = {k: v[:n_in] for k, v in test.items()}
    b, a = slice(n_in, n_in + args.before), slice(n_in + args.before, None)
    back = {k: np.concatenate([test[k][b], shifted_o[k], test[k][a]]) for k in test}  # the shift ends
    back_y = np.concatenate([test_y[b], shift_y, test_y[a]])
    shift_at, shift_end = args.before, args.before + args.shifted
    stream = {k: v[:shift_end] for k, v in back.items()}  # the shift persists to the end
    stream_y = back_y[:shift_end]

    report = {"model": {"name": manifest.name, "version": manifest.version}, "exit_threshold": threshold,
              "audit_rate": args.audit_rate, "alpha": args.alpha, "seeds": args.seeds,
              "shift": args.shift, "survey": {"canvases": args.survey, "shifts": surveyed},
              "calibration": figures, "p0": p0, "p0_from_table_only": p0_table, "r0": r0}
    shifted_only = slice(shift_at, shift_end)
    report["shifted_inputs"] = {"exit_head": accuracy(stream["device"][shifted_only], stream_y[shifted_only]),
                                "whole_model": accuracy(stream["whole"][shifted_only], stream_y[shifted_only]),
                                "offload_everything": accuracy(stream["server"][shifted_only], stream_y[shifted_only])}
    report["test_inputs"] = {"exit_head": accuracy(in_o["device"], test_y[:n_in]),
                             "whole_model": accuracy(in_o["whole"], test_y[:n_in]),
                             "offload_everything": accuracy(in_o["server"], test_y[:n_in])}
    results = {}
    for name, (d0, off0) in (("audit", (p0, r0)), ("disagreement_test_only", (p0, None)),
                             ("p0_from_table_only", (p0_table, r0))):
        results[name] = {"in_distribution": run_stream(in_o, test_y[:n_in], threshold, d0, off0, args, None, None),
                         "shifted_stream": run_stream(stream, stream_y, threshold, d0, off0, args, shift_at, None)}
    results["audit"]["shift_ends"] = run_stream(back, back_y, threshold, p0, r0, args, shift_at, shift_end)
    main_in, main_shift = results["audit"]["in_distribution"], results["audit"]["shifted_stream"]
    sh, acc = report["shifted_inputs"], main_shift["accuracy_rest"]
    report["checks"] = {
        "exit_head_loses_5_points_more_on_shift": (sh["whole_model"] - sh["exit_head"])
        - (report["test_inputs"]["whole_model"] - report["test_inputs"]["exit_head"]) >= 0.05,
        "flagged_within_500_every_seed": main_shift["detection"]["flagged_share"] == 1.0,
        "audit_on_within_2_points_of_offload_everything": acc["audit_on_gap_to_offload_everything"] <= 0.02,
        "audit_off_not_within_2_points": acc["audit_off_gap_to_offload_everything"] > 0.02,
        "no_alarm_in_distribution": main_in["runs_with_an_alarm"] == 0,
        "extra_offloads_at_most_2_5_percent": main_in["extra_offload_rate"]["max"] <= 0.025,
        "recovers_when_the_shift_ends": results["audit"]["shift_ends"]["recovery"]["recovered_share"] == 1.0,
    }
    report["results"] = {k: {s: public(v) for s, v in r.items()} for k, r in results.items()}
    report["pass_seconds"], report["wall_seconds"] = round(t_pass, 1), round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    png = args.out.with_suffix(".png")
    plot(png, args.shift, results["audit"]["shift_ends"], back_y, main_in)

    print(f"\ncalibration: exit rate {figures['exit_rate']:.3f}, disagreement {figures['disagreement']:.4f} "
          f"({figures['disagreements']} of {figures['answered']}); p0 {p0:.4f} (table-only bound {p0_table:.4f}); "
          f"r0 {r0:.4f}")
    print(f"survey ({args.survey} canvases per shift, threshold {threshold}):")
    for name, v in surveyed.items():
        print(f"  {name:<18} exit rate {v['exit_rate']:.3f}  exit head {v['exit_head']:.4f}  whole model "
              f"{v['whole_model']:.4f}  offload everything {v['offload_everything']:.4f}  split {v['split']:.4f}  "
              f"disagreement among device answers {v['disagreement_among_device_answers']:.4f}")
    print(f"shifted inputs ({args.shift}): exit head {sh['exit_head']:.4f}, whole model {sh['whole_model']:.4f}, offload "
          f"everything {sh['offload_everything']:.4f}")
    for name, r in results.items():
        i, s = r["in_distribution"], r["shifted_stream"]
        d = s["detection"]
        print(f"[{name}] in distribution ({i['inputs']:,}): alarms in {i['runs_with_an_alarm']} of {args.seeds} seeds, "
              f"extra offloads mean {i['extra_offload_rate']['mean']:.4f} max {i['extra_offload_rate']['max']:.4f}")
        print(f"[{name}] shift at {shift_at}: flagged within {DETECT_WITHIN} in {d['flagged_share']:.0%} of seeds "
              f"(median delay {d['delay_median']}, max {d['delay_max']}; first alarm by {d['first_alarm_by']}); "
              f"accuracy from the shift on: audit on {s['accuracy_rest']['audit_on_median']:.4f} (min "
              f"{s['accuracy_rest']['audit_on_min']:.4f}), off {s['accuracy_rest']['audit_off']:.4f}, offload "
              f"everything {s['accuracy_rest']['offload_everything']:.4f}")
    rec = results["audit"]["shift_ends"]["recovery"]
    print(f"[audit] shift ends at {shift_end}: recovered in {rec['recovered_share']:.0%} of seeds (median "
          f"{rec['delay_median']} inputs after the end), in alarm at the end of the stream: {rec['in_alarm_at_the_end']}")
    print("checks: " + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in report["checks"].items()))
    print(f"wrote {args.out} and {png}")
    return 0 if all(report["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
