"""Real weights, real data, text: all-MiniLM-L6-v2 as a BBC News classifier, split, served and measured.

    python benchmarks/text_classification.py            # uses checkpoints/minilm-bbcnews-heads.pt
    python benchmarks/text_classification.py --train    # retrains the heads first (GPU: ~1 min)

1. The heads (exit head at the split, final head, learned bottlenecks) come from
   checkpoints/minilm-bbcnews-heads.pt, or are trained on the training articles when the file is
   absent or ``--train`` is given (``python -m splitinfer.export.text_finetune``).
2. The split classifier is exported through the one pipeline (operating points on the
   calibration articles, INT8 device half, zstd dictionary, the learned bottleneck).
3. ``splitinfer-serve`` serves the folder on 127.0.0.1 (port 0, a subprocess stopped by pid) and
   ``splitinfer-edge text`` classifies every test article through it.
4. Side by side on the same test articles: the whole model in ONNX Runtime on this machine (all
   tokens, no bottleneck: ``accuracy_full_model``, ``full_model_local_ms_p50``), the device half
   alone (``device_ms_p50``), and the text a client could send instead: the UTF-8 text the model
   reads (the article up to its 128th token), raw, zstd level 19, and zstd 19 with a 16 KB
   dictionary trained on the training articles' text.

Writes results/text_classification.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HEADS = ROOT / "checkpoints" / "minilm-bbcnews-heads.pt"
RESULTS = ROOT / "results" / "text_classification.json"
BIN = Path(sys.executable).parent
BARS = {"accuracy_full_model": 0.95, "accuracy_split_drop": 0.01, "exit_rate": 0.5}

log = logging.getLogger("text_classification")


# ---- the text a client could send instead ------------------------------------------------------

def text_the_model_reads(tokenizer, texts: list[str]) -> list[bytes]:
    """Each text cut where the tokenizer's truncation cuts it (CLS/SEP excluded), as UTF-8."""
    out = []
    for text, enc in zip(texts, tokenizer.encode_batch(list(texts))):
        end = max((e for s, e in enc.offsets if e > s), default=0)
        out.append(text[:end].encode("utf-8"))
    return out


def text_baselines(train_texts: list[bytes], test_texts: list[bytes], dict_bytes: int = 16384) -> dict:
    """Mean bytes per article of the text: raw, zstd -19, zstd -19 with a dictionary from the training texts."""
    import zstandard

    plain = zstandard.ZstdCompressor(level=19)
    dictionary = zstandard.train_dictionary(dict_bytes, train_texts)
    with_dict = zstandard.ZstdCompressor(level=19, dict_data=dictionary)
    return {"mean_bytes_text_utf8": float(np.mean([len(t) for t in test_texts])),
            "mean_bytes_text_zstd19": float(np.mean([len(plain.compress(t)) for t in test_texts])),
            "mean_bytes_text_zstd": float(np.mean([len(with_dict.compress(t)) for t in test_texts])),
            "zstd_dictionary_bytes": len(dictionary.as_bytes())}


# ---- heads, export ------------------------------------------------------------------------------

def ensure_heads(path: Path, retrain: bool, device: str) -> None:
    if path.is_file() and not retrain:
        return
    from splitinfer.export.text_finetune import main as finetune_main

    log.info("training the heads into %s (device %s)", path, device)
    if finetune_main(["--out", str(path), "--device", device, "--no-progress",
                      "--report", str(path.with_suffix(".json"))]) != 0:
        raise SystemExit("training the heads failed")


def export_folder(model, out_dir: Path, width: int | str, encoding: str, name: str, max_accuracy_drop: float):
    """The one export pipeline: operating points on the calibration articles, INT8 device half,
    zstd dictionary, the learned bottleneck. -> the manifest it wrote."""
    from splitinfer.export.datasets import load_dataset
    from splitinfer.export.pipeline import ExportOptions, export_split_model

    calibration = load_dataset("bbcnews", "calibration", model.backbone)
    options = ExportOptions(name=name, quantize="int8", bottleneck=width, encoding=encoding,
                            max_accuracy_drop=max_accuracy_drop, plot=True)
    return export_split_model(model, out_dir, options, calibration)


def export_whole_model(model, path: Path) -> None:
    """The whole model (all tokens, no bottleneck) as one ONNX graph: input_ids, attention_mask -> logits."""
    import torch

    class Whole(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m({"input_ids": input_ids, "attention_mask": attention_mask})

    example = model.backbone.example_inputs(2, length=16)
    with torch.no_grad():
        torch.onnx.export(Whole(model).eval(), (example["input_ids"], example["attention_mask"]), str(path),
                          input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "length"},
                                        "attention_mask": {0: "batch", 1: "length"}, "logits": {0: "batch"}},
                          opset_version=17, dynamo=False)


# ---- serving and the edge -----------------------------------------------------------------------

def start_server(folder: Path, timeout_s: float = 120.0) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([str(BIN / "splitinfer-serve"), "--model", str(folder), "--host", "127.0.0.1",
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                raise RuntimeError(f"splitinfer-serve exited with {proc.returncode} before listening")
            continue
        if "listening on" in line:
            return proc, line.strip().rsplit(" ", 1)[-1]
    stop_server(proc)
    raise RuntimeError(f"splitinfer-serve did not listen within {timeout_s:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def classify_with_edge(folder: Path, address: str, articles_file: Path, timeout_s: float = 900.0) -> list[dict]:
    """``splitinfer-edge text`` over the articles (one per line) -> one answer per article."""
    done = subprocess.run([str(BIN / "splitinfer-edge"), "text", "--model", str(folder), "--server", address,
                           "--json", "--require-server", "--no-energy-label", str(articles_file)],
                          capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"splitinfer-edge text exited with {done.returncode}: {done.stderr[-2000:]}")
    answers = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    failed = [a for a in answers if "decided_on" not in a]
    if failed:
        raise RuntimeError(f"splitinfer-edge text failed on {len(failed)} articles, first: {failed[0]}")
    return answers


# ---- local timings and the whole model ----------------------------------------------------------

def ort_session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = 1, 1, 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def one_by_one(session, encoded: list[tuple[np.ndarray, np.ndarray]]) -> tuple[list[np.ndarray], list[float]]:
    """Run each article alone (batch 1) -> first outputs, milliseconds per article."""
    outs, ms = [], []
    session.run(None, {"input_ids": encoded[0][0], "attention_mask": encoded[0][1]})  # warm-up
    for ids, mask in encoded:
        t0 = time.perf_counter()
        out = session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        ms.append((time.perf_counter() - t0) * 1e3)
        outs.append(out[0])
    return outs, ms


def device_variant(folder: Path, manifest) -> Path:
    """The device half the edge runs: the INT8 one when the export chose it."""
    choice = getattr(manifest, "device_auto_choice", "float")
    int8 = folder / "device.int8.onnx"
    return int8 if choice == "int8" and int8.is_file() else folder / "device.onnx"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--heads", type=Path, default=HEADS)
    p.add_argument("--train", action="store_true", help="retrain the heads even when the file exists")
    p.add_argument("--device", default="auto", help="training device: auto, cpu or cuda")
    p.add_argument("--width", default="8", help="bottleneck width to deploy: auto, none or a trained width "
                                                "(default 8, the narrowest trained)")
    p.add_argument("--encoding", default="int4", help="token encoding: auto, int8 or int4 (default int4)")
    p.add_argument("--max-accuracy-drop", type=float, default=0.002,
                   help="the default operating point may lose this much calibration accuracy for fewer bytes")
    p.add_argument("--limit", type=int, default=None, help="classify only the first N test articles")
    p.add_argument("--work-dir", type=Path, default=None, help="keep the model folder here (default: a temp dir)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t_start = time.perf_counter()

    import torch
    from tokenizers import Tokenizer

    from splitinfer.export.text_data import load_bbcnews
    from splitinfer.export.text_finetune import build_text_classifier, load_text_heads
    from splitinfer.protos.manifest import load_manifest

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    ensure_heads(args.heads, args.train, ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto"
                 else args.device)
    heads = load_text_heads(args.heads)
    model, _ = build_text_classifier(heads=heads)
    width = args.width if args.width in ("auto", "none") else int(args.width)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="text-classification-"))
    folder = work / "minilm-bbcnews"
    if folder.exists():
        shutil.rmtree(folder)
    t0 = time.perf_counter()
    export_folder(model, folder, width, args.encoding, "minilm-bbcnews", args.max_accuracy_drop)
    export_s = time.perf_counter() - t0
    manifest = load_manifest(folder)
    export_whole_model(model, work / "whole.onnx")

    train_texts, _, _ = load_bbcnews("train")
    test_texts, test_labels, classes = load_bbcnews("test")
    if args.limit:
        test_texts, test_labels = test_texts[:args.limit], test_labels[:args.limit]
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(model.backbone.max_length)
    baselines = text_baselines(text_the_model_reads(tok, train_texts), text_the_model_reads(tok, test_texts))

    # the system: the real server, the real edge CLI, every test article
    articles = work / "test_articles.txt"
    articles.write_text("".join(" ".join(t.split()) + "\n" for t in test_texts), encoding="utf-8")
    server, address = start_server(folder)
    try:
        t0 = time.perf_counter()
        answers = classify_with_edge(folder, address, articles)
        edge_s = time.perf_counter() - t0
    finally:
        stop_server(server)
    if len(answers) != len(test_texts):
        raise RuntimeError(f"the edge answered {len(answers)} of {len(test_texts)} articles")
    predicted = np.array([a["label"] for a in answers])
    decided = np.array([a["decided_on"] for a in answers])
    bytes_sent = np.array([a.get("bytes_sent", 0) for a in answers], dtype=np.float64)

    # side by side on this machine: the device half the edge runs, and the whole model
    encoded = []
    for e in tok.encode_batch(test_texts):
        ids = np.asarray([e.ids], dtype=np.int64)
        encoded.append((ids, np.ones_like(ids)))
    _, device_ms = one_by_one(ort_session(device_variant(folder, manifest)), encoded)
    whole_logits, whole_ms = one_by_one(ort_session(work / "whole.onnx"), encoded)
    accuracy_full = float(np.mean(np.argmax(np.stack(whole_logits), -1) == test_labels))

    offloaded = decided != "device"
    result = {
        "model": heads["model"], "corpus": "bbcnews", "classes": classes, "split": model.split,
        "max_length": model.backbone.max_length, "n_test": len(test_texts),
        "accuracy_full_model": accuracy_full,
        "accuracy_split": float(np.mean(predicted == test_labels)),
        "exit_rate": float(np.mean(decided == "device")),
        "degraded": int(np.sum(decided == "degraded")),
        "mean_bytes_per_request": float(bytes_sent.mean()),
        "mean_bytes_per_offload": float(bytes_sent[offloaded].mean()) if offloaded.any() else 0.0,
        "mean_tokens_per_offload": float(np.mean([a.get("tokens_sent", 0) for a, o in zip(answers, offloaded) if o]))
        if offloaded.any() else 0.0,
        **baselines,
        "device_ms_p50": float(np.median(device_ms)),
        "full_model_local_ms_p50": float(np.median(whole_ms)),
        "device_half_file": device_variant(folder, manifest).name,
        "deployed": {"bottleneck": manifest.bottleneck, "encoding": manifest.codec.encoding,
                     "exit_threshold": manifest.exit.threshold, "mass": manifest.selection.mass,
                     "budget": manifest.selection.budget, "version": manifest.version},
        "heads": {"file": str(args.heads.relative_to(ROOT) if args.heads.is_relative_to(ROOT) else args.heads),
                  "trained_on": heads["summary"].get("device"), "train_seconds": heads["summary"].get("train_seconds")},
        "seconds": {"export": round(export_s, 1), "edge_cli": round(edge_s, 1),
                    "total": round(time.perf_counter() - t_start, 1)},
    }
    result["ratios"] = {"bytes_per_request_vs_text_zstd": result["mean_bytes_per_request"] / result["mean_bytes_text_zstd"],
                        "device_ms_vs_full_model_ms": result["device_ms_p50"] / result["full_model_local_ms_p50"]}
    result["bars"] = {
        "accuracy_full_model >= 0.95": result["accuracy_full_model"] >= BARS["accuracy_full_model"],
        "accuracy_split >= accuracy_full_model - 0.01":
            result["accuracy_split"] >= result["accuracy_full_model"] - BARS["accuracy_split_drop"],
        "exit_rate >= 0.5": result["exit_rate"] >= BARS["exit_rate"],
        "mean_bytes_per_request <= mean_bytes_text_zstd": result["mean_bytes_per_request"] <= result["mean_bytes_text_zstd"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    rows = [("test articles", f"{result['n_test']}"), ("accuracy, whole model (ORT, all tokens)", f"{accuracy_full:.4f}"),
            ("accuracy, split (edge CLI + server)", f"{result['accuracy_split']:.4f}"),
            ("decided on the device", f"{result['exit_rate']:.1%}"), ("degraded", f"{result['degraded']}"),
            ("mean bytes per request (tokens)", f"{result['mean_bytes_per_request']:.0f}"),
            ("mean bytes per offload", f"{result['mean_bytes_per_offload']:.0f}"),
            ("text UTF-8 / zstd-19 / zstd-19 + dict", f"{baselines['mean_bytes_text_utf8']:.0f} / "
             f"{baselines['mean_bytes_text_zstd19']:.0f} / {baselines['mean_bytes_text_zstd']:.0f}"),
            ("bytes ratio tokens / text zstd+dict", f"{result['ratios']['bytes_per_request_vs_text_zstd']:.2f}"),
            ("device half p50 ms / whole model p50 ms", f"{result['device_ms_p50']:.2f} / {result['full_model_local_ms_p50']:.2f}")]
    for k, v in rows:
        print(f"{k:<44} {v}")
    for bar, ok in result["bars"].items():
        print(f"{'PASS' if ok else 'MISS'}  {bar}")
    print(f"wrote {args.out}")
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
