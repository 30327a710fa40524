"""Exit policies side by side: offload rate against accuracy, with the oracle, on fresh test clutter.

    .venv/bin/python benchmarks/exit_policy.py [--checkpoint checkpoints/vit-cluttered-mnist.pt]
        [--test 20000] [--train 70000] [--valid 10000] [--calibration 5000] [--bootstrap 1000]

1. Canvases (export/data.py), each set from its own digits and its own clutter seed: the deferral
   head's training and validation sets from the *training* digits (3,000 and 500 digits, fresh
   clutter, never the calibration or test digits), the calibration split's 500 digits, and the 1,000
   test digits with fresh clutter (``--test`` canvases, each digit ``--test / 1000`` times).
2. Per canvas (export/exit_policy.py ``collect``): exit logits, the split block's pooled hidden
   states, the whole model's answer and the server half's answer on what the edge would send at the
   default operating point (mass 0.8, budget 8, int4 tokens with float16 scales).
3. Policies (a deferral score each, higher = offload first): max softmax, margin, entropy,
   temperature-scaled max softmax (T fitted on the calibration split), and deferral heads
   (export/exit_policy.py DeferralHead): on the exit logits only, on hidden states + exit logits
   (``deferral_head``), and the same trained on perturbed training digits (random affine maps, a
   stand-in for digit shapes the model has not memorised: ``deferral_head_perturbed``), and view
   consistency (``view_consistency``: device.onnx's second view, the canvas rolled by 2 px up and
   left, export/exit_score.py; offload first the answers that do not survive it). The oracle
   offloads exactly the inputs the server fixes. The deployed policy (``learned`` in the JSON) is
   the one ``splitinfer-export export`` deploys by default (view consistency on images, max softmax
   on text); a rule run on the *calibration* split alone (fewest offloads at the two targets among
   the policies never above max softmax) is reported beside it as a check.
4. On the test canvases, each policy's curve: offloading its top-k inputs for every k. At accuracy
   ``accuracy_full_model - 0.005`` and ``- 0.002`` (whole model on the same canvases): the smallest
   offload rate whose accuracy reaches the target, its ratio to the oracle's, 95% intervals from a
   bootstrap that resamples test *digits* (canvases of one digit are not independent).
5. Deployed as export would: each policy's threshold chosen on the calibration split by
   Learn-then-Test (protos/calibration.py, epsilon 0.005 and 0.01, delta 0.1), then measured on the test set.

Writes ``benchmarks/results/exit_policy.json`` and ``exit_policy.png``; caches the collected
outcomes in ``artifacts/exit_policy/`` (keyed by the checkpoint's hash and the set sizes).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
log = logging.getLogger("exit_policy")

TARGET_DROPS = (0.005, 0.002)
SEEDS = {"train": 70_001, "valid": 70_002, "calibration": 70_003, "test": 70_004, "train_perturbed": 70_005,
         "valid_perturbed": 70_006}


def perturb_digits(digits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 (n, 28, 28) -> each digit under its own random affine map (rotation +-20 degrees, scale
    0.85-1.15, shear +-0.25, shift +-2 px; bilinear), a stand-in for digit shapes the model has not
    memorised: the trained model is far more accurate on its own training digits than on new ones,
    so a head trained on them alone sees too few of the errors that matter."""
    n, size = len(digits), digits.shape[1]
    angle = rng.uniform(-20, 20, n) * np.pi / 180
    scale = rng.uniform(0.85, 1.15, n)
    shear = rng.uniform(-0.25, 0.25, n)
    shift = rng.uniform(-2, 2, (n, 2))
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    inv = np.stack([np.stack([cos, -sin + shear * cos], -1), np.stack([sin, cos + shear * sin], -1)], 1)  # (n, 2, 2)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    grid = np.stack([yy.ravel(), xx.ravel()]) - (size - 1) / 2  # (2, size*size), centred
    src = inv @ grid + (size - 1) / 2 - shift[:, :, None]  # (n, 2, size*size): where each output pixel samples
    y0, x0 = np.floor(src[:, 0]).astype(int), np.floor(src[:, 1]).astype(int)
    fy, fx = src[:, 0] - y0, src[:, 1] - x0
    img = digits.astype(np.float64)
    rows = np.arange(n)[:, None]

    def at(y, x):
        ok = (y >= 0) & (y < size) & (x >= 0) & (x < size)
        return np.where(ok, img[rows, y.clip(0, size - 1), x.clip(0, size - 1)], 0.0)

    out = (at(y0, x0) * (1 - fy) * (1 - fx) + at(y0, x0 + 1) * (1 - fy) * fx
           + at(y0 + 1, x0) * fy * (1 - fx) + at(y0 + 1, x0 + 1) * fy * fx)
    return out.reshape(n, size, size).round().clip(0, 255).astype(np.uint8)


def digit_sets():
    from splitinfer.export.data import load_mnist_digits, split_digits

    splits = split_digits(*load_mnist_digits())
    train_x, train_y = splits["train"]
    held = np.arange(len(train_x)) % 7 == 0  # 500 training digits validate the head, 3,000 train it
    return {"train": (train_x[~held], train_y[~held]), "valid": (train_x[held], train_y[held]),
            "train_perturbed": (train_x[~held], train_y[~held]), "valid_perturbed": (train_x[held], train_y[held]),
            "calibration": splits["calibration"], "test": splits["test"]}


def collect_sets(checkpoint: Path, sizes: dict, cache: Path) -> dict:
    """{set name: (Outcomes, digit index per canvas)}, from the cache when it matches."""
    import torch

    from splitinfer.export.data import ClutterConfig, make_canvases
    from splitinfer.export.exit_policy import Outcomes, collect
    from splitinfer.export.train import load_checkpoint

    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:12]
    cache.mkdir(parents=True, exist_ok=True)
    model, summary = None, None
    sets, out = digit_sets(), {}
    for name, n in sizes.items():
        path = cache / f"{name}-{n}-{SEEDS[name]}-{digest}.npz"
        digits, labels = sets[name]
        digit = np.arange(n) % len(digits)  # make_canvases shows digit i % len(digits) on canvas i
        if path.is_file():
            with np.load(path) as blob:
                out[name] = (Outcomes(**{k: blob[k] for k in blob.files}), digit)
            continue
        if model is None:
            torch.set_num_threads(max(1, torch.get_num_threads()))
            model, summary = load_checkpoint(checkpoint)
        clutter = ClutterConfig(**summary["clutter"]) if "clutter" in summary else ClutterConfig()
        t0 = time.perf_counter()
        if name.endswith("_perturbed"):  # a fresh perturbation of every digit for each pass over the set
            rng = np.random.default_rng(SEEDS[name])
            parts = [make_canvases(perturb_digits(digits, rng), labels, len(digits), clutter, seed=SEEDS[name] + r)
                     for r in range(-(-n // len(digits)))]
            x, y = np.concatenate([p[0] for p in parts])[:n], np.concatenate([p[1] for p in parts])[:n]
        else:
            x, y = make_canvases(digits, labels, n, clutter, seed=SEEDS[name])
        outcomes = collect(model, x, y)
        np.savez(path, **outcomes.to_npz())
        log.info("%s: %d canvases collected in %.0f s", name, n, time.perf_counter() - t0)
        out[name] = (outcomes, digit)
    return out


def collect_text(model_dir: Path, split: str):
    """Outcomes of a text model folder on one BBC News split, with the exported ONNX halves: exit
    logits, the server half's answer on what the edge sends (its runner's default operating point:
    selection, codec, dictionary; budget_controller.offload_outcomes) and the whole model's (server
    half on every token, fp32)."""
    from budget_controller import load_sessions, offload_outcomes

    from splitinfer.edge.runner import EdgeRunner
    from splitinfer.export.exit_policy import Outcomes
    from splitinfer.export.text_data import load_bbcnews
    from splitinfer.protos import graphs, load_manifest

    manifest = load_manifest(model_dir)
    if manifest.task != "classification":
        raise SystemExit(f"error: {model_dir} is a {manifest.task} model; exit policies need a classifier")
    session, server = load_sessions(manifest)
    runner = EdgeRunner(session, None, manifest)
    texts, labels, _ = load_bbcnews(split)
    exit_logits, tokens, importance, full_pred = [], [], [], []
    for text in texts:  # one article at a time: each has its own token count
        out = session.run(runner.front_end(text))
        exit_logits.append(out.exit[0])
        tokens.append(out.tokens[0])
        importance.append(out.importance[0])
        logits = server.run(None, {graphs.TOKENS: out.tokens, graphs.MASK: np.ones(out.tokens.shape[:2], bool)})[0]
        full_pred.append(int(logits[0].argmax()))
    server_pred, _nbytes, _ntokens = offload_outcomes(runner, server, tokens, importance, None)
    return Outcomes(np.asarray(labels, np.int64), np.asarray(exit_logits, np.float32), server_pred,
                    np.asarray(full_pred, np.int64), np.zeros((len(texts), 0), np.float32))


def text_report(model_dir: Path, resamples: int) -> dict:
    """The exit-policy table for a BBC News text model: post-hoc policies (max softmax, margin,
    entropy, temperature fitted on the calibration split), the deployed one chosen on the calibration
    split, and the oracle, on the test articles (bootstrap over articles)."""
    from splitinfer.export.exit_policy import fit_temperature, post_hoc_scores

    t0 = time.perf_counter()
    cal, test = collect_text(model_dir, "calibration"), collect_text(model_dir, "test")
    temperature = fit_temperature(cal.exit_logits, cal.labels)
    scores: dict = {}
    for set_name, outcomes in (("calibration", cal), ("test", test)):
        for name, value in post_hoc_scores(outcomes.exit_logits, temperature).items():
            scores.setdefault(name, {})[set_name] = value
    chosen, selection = select_on_calibration(cal, scores)
    deployed = EXPORT_DEFAULT["text"]
    report = compare((test, np.arange(len(test))), scores, resamples, deployed, model="text")
    report["selection_on_calibration"] = {"policies": selection, "chosen": chosen,
                                          "agrees_with_export_default": chosen == deployed}
    report["setup"] = {"model_dir": str(model_dir), "n_calibration": len(cal), "temperature": temperature,
                       "bootstrap": {"resamples": resamples, "unit": "test article"},
                       "seconds": round(time.perf_counter() - t0, 1)}
    return report


def policy_scores(data: dict, args) -> tuple[dict, dict]:
    """{policy: {set name: deferral scores (n,)}} for the calibration and test sets, and head logs."""
    import torch

    from splitinfer.export.exit_policy import (HeadConfig, fit_temperature, head_scores, post_hoc_scores,
                                               train_deferral_head)

    torch.manual_seed(0)
    torch.set_num_threads(1)  # a small MLP: more threads only contend
    cal, test = data["calibration"][0], data["test"][0]
    temperature = fit_temperature(cal.exit_logits, cal.labels)
    scores = {name: {} for name in ("max_softmax", "margin", "entropy", "temperature")}
    for set_name, outcomes in (("calibration", cal), ("test", test)):
        for name, value in post_hoc_scores(outcomes.exit_logits, temperature).items():
            scores[name][set_name] = value
    heads = {"temperature": temperature}
    dim = (cal.features.shape[1] - 2 * cal.exit_logits.shape[1] - 1) // 3
    runs = [("learned_logits_only", "train", HeadConfig(tokens=False)), ("deferral_head", "train", HeadConfig(tokens=True))]
    if "train_perturbed" in data:
        runs.append(("deferral_head_perturbed", "train_perturbed", HeadConfig(tokens=True)))
    for name, source, cfg in runs:
        t0 = time.perf_counter()
        valid = "valid" if source == "train" else "valid_perturbed"
        head, info = train_deferral_head(data[source][0], data[valid][0], dim, cal.exit_logits.shape[1], cfg)
        scores[name] = {set_name: head_scores(head, o.features) for set_name, o in (("calibration", cal), ("test", test))}
        heads[name] = {"config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}, "trained_on": source,
                       "best_valid_gain": info["best_valid_gain"], "train_seconds": round(time.perf_counter() - t0, 1),
                       "parameters": sum(p.numel() for p in head.parameters())}
        if name.startswith("deferral_head"):
            args.cache.mkdir(parents=True, exist_ok=True)
            torch.save({"state_dict": head.state_dict(), "dim": dim, "num_classes": cal.exit_logits.shape[1],
                        "config": heads[name]["config"]}, args.cache / f"{name}.pt")
    return scores, heads


VIEW_SHIFTS = {"up": (-2, 0), "down": (2, 0), "left": (0, -2), "right": (0, 2), "up_left": (-2, -2),
               "down_right": (2, 2), "up_right": (-2, 2), "down_left": (2, -2), "up_3": (-3, 0), "down_3": (3, 0),
               "left_3": (0, -3), "right_3": (0, 3)}  # (rows, columns) the second view's canvas is rolled by


# What ``splitinfer-export export --exit-policy auto`` deploys (export/exit_score.py exit_spec_for):
# the policy the JSON reports as ``learned``.
EXPORT_DEFAULT = {"image": "view_consistency", "text": "max_softmax"}


def mean_offload_at_targets(score: np.ndarray, outcomes) -> float:
    """The offload rate a deferral score needs to reach each target accuracy on ``outcomes``, averaged
    over the targets (an unreachable target counts as offloading everything): the calibration rule."""
    from splitinfer.export.exit_policy import offload_at_accuracy, offload_curve

    rate, acc = offload_curve(score, outcomes.exit_pred == outcomes.labels, outcomes.server_pred == outcomes.labels)
    acc_full = float((outcomes.full_pred == outcomes.labels).mean())
    at = [offload_at_accuracy(rate, acc, acc_full - d) for d in TARGET_DROPS]
    return float(np.mean([1.0 if np.isnan(a) else a for a in at]))


def view_scores(checkpoint: Path, data: dict, sizes: dict, cache: Path) -> tuple[dict, dict]:
    """The view-consistency policy as device.onnx computes it (export/exit_score.py ``device_pass``:
    the exit head also sees the canvas rolled by a few pixels; confidence sqrt(p(c) p'(c))), deferral
    score -log(confidence), with export's default shift. Beside it, the calibration split's own
    choice among VIEW_SHIFTS (the rule of :func:`mean_offload_at_targets`), which should be that
    default; returns ({set: scores}, details)."""
    import torch

    from splitinfer.export.adapters import SplitModel
    from splitinfer.export.adapters.vit import BuiltinViT
    from splitinfer.export.data import ClutterConfig, make_canvases
    from splitinfer.export.exit_policy import normalize
    from splitinfer.export.exit_score import DEFAULT_VIEW_SHIFT, device_pass, exit_spec_for
    from splitinfer.export.train import load_checkpoint

    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:12]
    vit, summary = load_checkpoint(checkpoint)
    model = SplitModel(BuiltinViT(vit.eval()), vit.cfg.split).eval()
    clutter = ClutterConfig(**summary["clutter"]) if "clutter" in summary else ClutterConfig()
    sets, canvases = digit_sets(), {}

    def score(set_name: str, shift: tuple[int, int]) -> np.ndarray:
        path = cache / f"view-confidence-{set_name}-{sizes[set_name]}-{SEEDS[set_name]}-{shift[0]}_{shift[1]}-{digest}.npy"
        if path.is_file():
            return -np.log(np.load(path))
        if set_name not in canvases:  # drawn once per set, whatever the number of shifts
            canvases[set_name] = normalize(make_canvases(*sets[set_name], sizes[set_name], clutter,
                                                         seed=SEEDS[set_name])[0])
        spec, x = exit_spec_for(model, "view_consistency", shift), canvases[set_name]
        with torch.no_grad():
            conf = np.concatenate([device_pass(model, {"image": torch.from_numpy(x[s:s + 1000])}, spec)[4].double().numpy()
                                   for s in range(0, len(x), 1000)])
        cache.mkdir(parents=True, exist_ok=True)
        np.save(path, conf)
        return -np.log(conf)

    table = {name: mean_offload_at_targets(score("calibration", shift), data["calibration"][0])
             for name, shift in VIEW_SHIFTS.items()}
    chosen = min(table, key=table.get)
    default = next(name for name, shift in VIEW_SHIFTS.items() if shift == DEFAULT_VIEW_SHIFT)
    return ({"calibration": score("calibration", DEFAULT_VIEW_SHIFT), "test": score("test", DEFAULT_VIEW_SHIFT)},
            {"shift": default, "rolled_by": DEFAULT_VIEW_SHIFT, "calibration_choice": chosen,
             "calibration_mean_offload_rate_at_targets": table, "device_passes": 2,
             "device_onnx": "export --exit-policy auto (the default for image classifiers)"})


def select_on_calibration(cal, scores: dict) -> tuple[str, dict]:
    """The calibration split's own choice of policy (a check on export's default): among max softmax
    and the policies that offload no more than it at any accuracy there (one input of slack), the fewest
    offloads averaged over the two target accuracies (an unreachable target counts as offloading
    everything). The test set plays no part."""
    exit_ok, server_ok = cal.exit_pred == cal.labels, cal.server_pred == cal.labels
    by_set = {name: s["calibration"] for name, s in scores.items()}
    table = {}
    for name, score in by_set.items():
        excess = 0.0 if name == "max_softmax" else dominance(by_set, name, exit_ok, server_ok)["max_excess_offload_rate"]
        table[name] = {"mean_offload_rate_at_targets": mean_offload_at_targets(score, cal),
                       "max_excess_over_max_softmax": excess, "eligible": excess <= 1.0 / len(exit_ok) + 1e-12}
    eligible = [name for name, row in table.items() if row["eligible"]]
    return min(eligible, key=lambda name: table[name]["mean_offload_rate_at_targets"]), table


def compare(test_set, scores: dict, resamples: int, deployed: str = "deferral_head", model: str = "image") -> dict:
    """Curves, offload rates at the target accuracies and bootstrap intervals on the test set; the
    bootstrap resamples the units of ``test_set[1]`` (the digit of each canvas; for text, each article)."""
    from splitinfer.export.exit_policy import offload_at_accuracy, offload_curve, oracle_scores

    test, digit = test_set
    exit_ok, server_ok, full_ok = test.exit_pred == test.labels, test.server_pred == test.labels, \
        test.full_pred == test.labels
    policies = {"oracle": oracle_scores(exit_ok, server_ok), **{k: v["test"] for k, v in scores.items()}}
    grid = np.linspace(0.0, 0.3, 301)  # offload rates for the curves in the plot

    def evaluate(weights):
        w = np.ones(len(digit)) if weights is None else weights
        acc_full = float((w * full_ok).sum() / w.sum())
        out = {"accuracy_full_model": acc_full, "policies": {}}
        for name, score in policies.items():
            rate, acc = offload_curve(score, exit_ok, server_ok, w)
            at = {f"{d:g}": offload_at_accuracy(rate, acc, acc_full - d) for d in TARGET_DROPS}
            out["policies"][name] = {"at": at, "curve": np.interp(grid, rate, acc) - acc_full}  # against the whole model
        return out

    point = evaluate(None)
    rng = np.random.default_rng(0)
    n_digits = int(digit.max()) + 1
    boots = [evaluate(np.bincount(rng.integers(0, n_digits, n_digits), minlength=n_digits)[digit].astype(np.float64))
             for _ in range(resamples)]

    def interval(values):
        """2.5 and 97.5 percentiles over the resamples; a resample where the target is out of reach
        counts as offloading everything (rate 1, ratio 1 / oracle's rate), so an interval is never narrowed by dropping them."""
        values = np.asarray(values, np.float64)
        return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]

    def reach(b, name, key):
        r = b["policies"][name]["at"][key]
        return 1.0 if np.isnan(r) else r

    report = {"model": model, "n_test": len(digit), "accuracy_full_model": point["accuracy_full_model"],
              "accuracy_exit": float(exit_ok.mean()), "accuracy_offload_all": float(server_ok.mean()),
              "fixable_rate": float((~exit_ok & server_ok).mean()), "breakable_rate": float((exit_ok & ~server_ok).mean()),
              model: {}, "curves": {"offload_rate": grid.tolist()}}
    for d in TARGET_DROPS:
        key = f"{d:g}"
        entry = {"target_accuracy": point["accuracy_full_model"] - d,
                 "exit_head_alone_reaches_target": bool(exit_ok.mean() >= point["accuracy_full_model"] - d)}
        oracle = point["policies"]["oracle"]["at"][key]
        for name in policies:
            rate = point["policies"][name]["at"][key]
            boot_rate = [reach(b, name, key) for b in boots]
            boot_ratio = [reach(b, name, key) / max(reach(b, "oracle", key), 1e-9) for b in boots]
            entry[name] = {"offload_rate": rate, "offload_rate_ci95": interval(boot_rate),
                           "target_reached_share": float(np.mean([not np.isnan(b["policies"][name]["at"][key]) for b in boots]))}
            if name != "oracle":
                entry[name]["ratio_to_oracle"] = rate / oracle if oracle > 0 else (1.0 if rate == 0 else None)
                entry[name]["ratio_to_oracle_ci95"] = interval(boot_ratio)
                ms_rate = point["policies"]["max_softmax"]["at"][key]
                entry[name]["ratio_to_max_softmax"] = rate / ms_rate if ms_rate > 0 else (1.0 if rate == 0 else None)
        entry["learned"] = {**entry[deployed], "policy": deployed}
        report[model][f"accuracy_full_model-{key}"] = entry
    for name in policies:
        curves = np.array([b["policies"][name]["curve"] for b in boots])
        report["curves"][name] = {"accuracy_minus_full_model": point["policies"][name]["curve"].tolist(),
                                  "ci95": [np.percentile(curves, 2.5, 0).tolist(), np.percentile(curves, 97.5, 0).tolist()]}
    report["deployed_policy"] = deployed
    report["learned_vs_max_softmax"] = {name: dominance(policies, name, exit_ok, server_ok) for name in policies
                                        if name not in ("oracle", "max_softmax")}
    return report


def dominance(policies: dict, name: str, exit_ok, server_ok) -> dict:
    """Over every accuracy from the exit head's up to the best both reach: the most policy ``name``
    offloads beyond max softmax (in offload rate), and the share of accuracies where it offloads no more."""
    from splitinfer.export.exit_policy import offload_at_accuracy, offload_curve

    ms_rate, ms_acc = offload_curve(policies["max_softmax"], exit_ok, server_ok)
    le_rate, le_acc = offload_curve(policies[name], exit_ok, server_ok)
    n = len(exit_ok)
    targets = np.arange(exit_ok.mean() + 1 / n, min(ms_acc.max(), le_acc.max()) + 1e-12, 1 / n)
    diff = np.array([offload_at_accuracy(le_rate, le_acc, t) - offload_at_accuracy(ms_rate, ms_acc, t) for t in targets])
    return {"accuracies": len(targets), "share_learned_not_more": float((diff <= 1e-12).mean()),
            "max_excess_offload_rate": float(diff.max()), "at_accuracy": float(targets[int(diff.argmax())])}


def deploy(cal, test, scores: dict, epsilon: float = 0.005, delta: float = 0.1, candidates: int = 400) -> dict:
    """Each policy's threshold by Learn-then-Test on the calibration split, measured on the test set."""
    from splitinfer.protos.calibration import learn_then_test, split_losses

    out = {"epsilon": epsilon, "delta": delta, "n_calibration": len(cal), "loss": "split wrong where the whole model is right"}
    flags = {}
    for name, o in (("calibration", cal), ("test", test)):
        flags[name] = (o.exit_pred == o.labels, o.server_pred == o.labels, o.full_pred == o.labels)
    for name, by_set in scores.items():
        exit_score = -by_set["calibration"]  # the device answers when -deferral score >= threshold
        qs = np.quantile(exit_score, np.linspace(1.0, 0.0, candidates))
        thresholds = np.r_[np.inf, qs]  # most conservative (offload everything) first
        cert = learn_then_test(split_losses(exit_score, thresholds, *flags["calibration"]), thresholds, epsilon, delta)
        t = cert.threshold if cert.certified else np.inf
        e, v, f = flags["test"]
        exits = -by_set["test"] >= t
        system = np.where(exits, e, v)
        out[name] = {"certificate": cert.to_dict(), "test_offload_rate": float((~exits).mean()),
                     "test_accuracy": float(system.mean()), "test_accuracy_full_model": float(f.mean()),
                     "test_loss": float((f & ~system).mean())}
    return out


def print_table(report: dict, model: str = "image") -> None:
    unit = "test canvases" if model == "image" else "test articles"
    print(f"\n{model}: {report['n_test']} {unit}: whole model {report['accuracy_full_model']:.4f}, exit head "
          f"{report['accuracy_exit']:.4f}, offload-all {report['accuracy_offload_all']:.4f}, fixable "
          f"{report['fixable_rate']:.4f}")
    names = [k for k in report["curves"] if k != "offload_rate"] + ["learned"]
    for key, entry in report[model].items():
        print(f"\nat {key} = {entry['target_accuracy']:.4f}:")
        print(f"  {'policy':22s} {'offload':>8s} {'95% CI':>17s} {'x oracle':>9s} {'95% CI':>15s} {'x max softmax':>14s}")
        for name in names:
            p = entry[name]
            ci = p["offload_rate_ci95"]
            rci = p.get("ratio_to_oracle_ci95", [None, None])
            fmt = lambda v, f: "   -  " if v is None else format(v, f)  # noqa: E731
            print(f"  {name:22s} {p['offload_rate']:8.4f} [{fmt(ci[0], '.4f')}, {fmt(ci[1], '.4f')}] "
                  f"{fmt(p.get('ratio_to_oracle'), '9.2f')} [{fmt(rci[0], '.2f')}, {fmt(rci[1], '.2f')}] "
                  f"{fmt(p.get('ratio_to_max_softmax'), '14.2f')}")
    print(f"\ndeployed policy (chosen on the calibration split): {report['deployed_policy']}")
    for name, dom in report["learned_vs_max_softmax"].items():
        print(f"{name} vs max softmax over {dom['accuracies']} test accuracies: offloads no more at "
              f"{dom['share_learned_not_more']:.3f} of them; worst excess {dom['max_excess_offload_rate']:.4f} at "
              f"{dom['at_accuracy']:.4f}")
    for dep in report.get("deployed", []):
        print(f"\ndeployed by Learn-then-Test (epsilon {dep['epsilon']}, delta {dep['delta']}, n {dep['n_calibration']}):")
        for name in names:
            if name in dep and name != "learned":
                d = dep[name]
                c = d["certificate"]
                print(f"  {name:22s} certified {str(c['threshold'] is not None):5s} bound {c['bound']:.4f}  test: offload "
                      f"{d['test_offload_rate']:.4f}, accuracy {d['test_accuracy']:.4f} (whole model "
                      f"{d['test_accuracy_full_model']:.4f}), loss {d['test_loss']:.4f}")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = report["curves"]
    x = np.asarray(curves["offload_rate"])
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    styles = {"oracle": ("k", "-"), "max_softmax": ("tab:red", "-"), report["deployed_policy"]: ("tab:blue", "-")}
    others = iter(["tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray"])
    for name, c in curves.items():
        if name == "offload_rate":
            continue
        color, ls = styles[name] if name in styles else (next(others, None), "--")
        lw = 2.0 if name in styles else 1.0
        label = f"{name} (deployed)" if name == report["deployed_policy"] else name
        line, = ax.plot(100 * x, 100 * np.asarray(c["accuracy_minus_full_model"]), color=color, ls=ls, lw=lw, label=label)
        if name in styles:
            ax.fill_between(100 * x, 100 * np.asarray(c["ci95"][0]), 100 * np.asarray(c["ci95"][1]),
                            color=line.get_color(), alpha=0.15, lw=0)
    full = report["accuracy_full_model"]
    ax.axhline(0.0, color="grey", lw=0.8, ls=":", label=f"whole model ({full:.4f})")
    for d in TARGET_DROPS:
        ax.axhline(-100 * d, color="grey", lw=0.6, ls="--")
        ax.annotate(f"whole model - {d:g}", (29.5, -100 * d), fontsize=7, va="bottom", ha="right")
    ax.set_xlim(0, 30)
    ax.set_ylim(100 * (report["accuracy_exit"] - full) - 0.2, 0.6)
    ax.set_xlabel("offload rate (%)")
    ax.set_ylabel("accuracy - whole model's (points, test canvases)")
    ax.set_title(f"exit policies on {report['n_test']} test canvases (bands: 95% digit bootstrap)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "vit-cluttered-mnist.pt")
    parser.add_argument("--test", type=int, default=20_000)
    parser.add_argument("--train", type=int, default=70_000)
    parser.add_argument("--valid", type=int, default=10_000)
    parser.add_argument("--calibration", type=int, default=5_000)
    parser.add_argument("--perturbed", type=int, default=30_000,
                        help="canvases of perturbed training digits for a second deferral head (0: none)")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--cache", type=Path, default=ROOT / "artifacts" / "exit_policy")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--collect-only", action="store_true", help="stop after collecting the outcomes")
    parser.add_argument("--text-model", type=Path, default=None,
                        help="a BBC News text model folder (splitinfer-export --model minilm --data bbcnews): "
                             "its table too, under 'text'")
    parser.add_argument("--text-only", action="store_true",
                        help="with --text-model: only the text table, written into the existing JSON (its image part kept)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sizes = {"train": args.train, "valid": args.valid, "calibration": args.calibration, "test": args.test}
    if args.perturbed:
        sizes.update(train_perturbed=args.perturbed, valid_perturbed=max(100, args.perturbed // 6))
    for name, n in sizes.items():
        if n < 100:
            print(f"error: --{name} must be >= 100, got {n}", file=sys.stderr)
            return 2
    if args.text_only:
        if args.text_model is None:
            print("error: --text-only needs --text-model", file=sys.stderr)
            return 2
        path = args.out / "exit_policy.json"
        report = json.loads(path.read_text()) if path.is_file() else {}
    else:
        data = collect_sets(args.checkpoint, sizes, args.cache)
        if args.collect_only:
            return 0
        t0 = time.perf_counter()
        scores, heads = policy_scores(data, args)
        scores["view_consistency"], heads["view_consistency"] = view_scores(args.checkpoint, data, sizes, args.cache)
        chosen, selection = select_on_calibration(data["calibration"][0], scores)
        deployed = EXPORT_DEFAULT["image"]
        report = compare(data["test"], scores, args.bootstrap, deployed)
        report["selection_on_calibration"] = {"policies": selection, "chosen": chosen,
                                              "agrees_with_export_default": chosen == deployed}
        report["deployed"] = [deploy(data["calibration"][0], data["test"][0], scores, epsilon) for epsilon in (0.005, 0.01)]
        report["setup"] = {
            "checkpoint": str(args.checkpoint.relative_to(ROOT) if args.checkpoint.is_relative_to(ROOT) else args.checkpoint),
            "sets": {name: {"canvases": n, "digits": int(len(np.unique(data[name][1]))), "clutter_seed": SEEDS[name]}
                     for name, n in sizes.items()},
            "offload": {"mass": 0.8, "budget": 8, "encoding": "int4", "scale_dtype": "fp16", "bottleneck": None},
            "bootstrap": {"resamples": args.bootstrap, "unit": "test digit"},
            "heads": heads, "seconds": round(time.perf_counter() - t0, 1),
            "command": "python benchmarks/exit_policy.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        }
    if args.text_model is not None:
        text = text_report(args.text_model, args.bootstrap)
        text["setup"]["command"] = "python benchmarks/exit_policy.py " + " ".join(argv if argv is not None else sys.argv[1:])
        report["text"] = text.pop("text")
        report["text_details"] = text
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "exit_policy.json").write_text(json.dumps(report, indent=1) + "\n")
    if not args.text_only:
        plot(report, args.out / "exit_policy.png")
        print_table(report)
    if args.text_model is not None:
        print_table({**report["text_details"], "text": report["text"]}, "text")
    return 0


if __name__ == "__main__":
    sys.exit(main())
