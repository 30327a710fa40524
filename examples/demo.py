"""End-to-end demo: export the committed checkpoint, serve the server half, classify the test set.

    python examples/demo.py            # what `make demo` runs
    python examples/demo.py --n-test 500 --out results/demo-small.json

Steps: export ``checkpoints/vit-cluttered-mnist.pt`` into ``artifacts/model`` (calibrating the exit
threshold on the calibration split), run the whole model locally in ONNX Runtime as the baseline,
start ``splitinfer-serve`` on loopback in its own process, classify every cluttered-MNIST test
canvas through ``EdgeRunner`` against it, stop the server and show the edge degrading gracefully,
then print a table and write ``results/demo.json``.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "checkpoints" / "vit-cluttered-mnist.pt"

log = logging.getLogger("demo")


def png_sizes(images: np.ndarray) -> np.ndarray:
    """Bytes of each uint8 (H, W) image as a PNG (Pillow, maximum compression)."""
    from PIL import Image

    sizes = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img, mode="L").save(buf, format="PNG", optimize=True)
        sizes.append(buf.tell())
    return np.asarray(sizes)


def run_full_model_locally(manifest, images: np.ndarray, threads: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The whole model alone in ONNX Runtime (device half, then server half on all tokens), batch 1.

    Returns final-head predictions (n,), per-input latency in ms (n,), exit-head predictions (n,).
    """
    import onnxruntime as ort

    from splitinfer.edge.preprocess import preprocess
    from splitinfer.edge.session import DeviceSession, SessionOptions

    device = DeviceSession.from_manifest(manifest, SessionOptions(intra_op_threads=threads))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    server = ort.InferenceSession(str(manifest.server_path), opts, providers=["CPUExecutionProvider"])
    preds, ms, exit_preds = [], [], []
    for img in images:
        t0 = time.perf_counter()
        exit_logits, tokens, _, _ = device.run(preprocess(img, manifest.preprocessing), second_view=False)
        logits = server.run(None, {"tokens": tokens, "mask": np.ones(tokens.shape[:2], dtype=bool)})[0]
        ms.append((time.perf_counter() - t0) * 1e3)
        preds.append(int(logits[0].argmax()))
        exit_preds.append(int(exit_logits[0].argmax()))
    return np.asarray(preds), np.asarray(ms), np.asarray(exit_preds)


def fp32_all_tokens_bytes(manifest, image: np.ndarray) -> int:
    """Serialized size of a request that ships every token in fp32 without compression."""
    from splitinfer.edge.preprocess import preprocess
    from splitinfer.edge.session import DeviceSession
    from splitinfer.protos import CodecConfig, encode_tokens
    from splitinfer.protos import splitinfer_pb2 as pb

    tokens = DeviceSession.from_manifest(manifest).run(preprocess(image, manifest.preprocessing)).tokens
    packet = encode_tokens(tokens[0], np.arange(tokens.shape[1]), CodecConfig("fp32", "none"))
    request = pb.InferRequest(model=manifest.name, manifest_sha256=manifest.sha256, request_id="0" * 32, packet=packet)
    return request.ByteSize()


def start_server(model_dir: Path, threads: int) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "splitinfer.cloud.cli", "--model", str(model_dir), "--host", "127.0.0.1",
           "--port", "0", "--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        match = re.search(r"listening on (\S+)", line)
        if match:
            return proc, match.group(1)
    proc.kill()
    raise RuntimeError("splitinfer-serve did not report its address")


def stop_server(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def p50(values) -> float:
    return float(np.median(np.asarray(values, dtype=np.float64))) if len(values) else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    parser.add_argument("--model-dir", type=Path, default=ROOT / "artifacts" / "model")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "demo.json")
    parser.add_argument("--n-test", type=int, default=None, help="test canvases (default: all 2,000)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads, edge and server")
    parser.add_argument("--timeout-ms", type=float, default=2000.0)
    parser.add_argument("--device-profile", default="laptop", help="energy profile of the device (pi4, pi5, laptop)")
    parser.add_argument("--link", default="wifi", help="energy profile of the link (wifi, lte, ethernet)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from splitinfer.edge.energy import EnergyModel, energy_label, reference_energy
    from splitinfer.edge.audit import audit_for
    from splitinfer.edge.runner import EdgeRunner
    from splitinfer.edge.session import DeviceSession, SessionOptions
    from splitinfer.edge.transport import GrpcTransport
    from splitinfer.export.data import make_split
    from splitinfer.export.pipeline import export_checkpoint
    from splitinfer.protos import load_manifest

    t_start = time.perf_counter()
    log.info("exporting %s -> %s", args.checkpoint.relative_to(ROOT) if args.checkpoint.is_relative_to(ROOT) else args.checkpoint, args.model_dir)
    export_checkpoint(args.checkpoint, args.model_dir)
    manifest = load_manifest(args.model_dir)
    images, labels = make_split("test", n=args.n_test)
    n = len(images)
    log.info("test set: %d cluttered-MNIST canvases (%dx%d)", n, *images.shape[1:])

    full_pred, full_ms, exit_only_pred = run_full_model_locally(manifest, images, args.threads)
    png = png_sizes(images)
    fp32_bytes = fp32_all_tokens_bytes(manifest, images[0])

    proc, address = start_server(args.model_dir, args.threads)
    log.info("server on %s (pid %d)", address, proc.pid)
    try:
        session = DeviceSession.from_manifest(manifest, SessionOptions(intra_op_threads=args.threads))
        with GrpcTransport(address, timeout_s=args.timeout_ms / 1e3) as transport:
            energy = EnergyModel.named(args.device_profile, args.link)
            audit, audit_off = audit_for(manifest, rng=0)  # the field audit at its default rate
            runner = EdgeRunner(session, transport, manifest, energy=energy, audit=audit)
            runner.classify(images[0])  # warm-up: channel connect, first ORT runs
            results = [runner.classify(img) for img in images]
            audit_state = audit.state() if audit is not None else None
            exit_code = stop_server(proc)
            log.info("server stopped (exit code %s); classifying with no server", exit_code)
            after_stop = [runner.classify(img) for img in images[:20]]
    finally:
        if proc.poll() is None:
            stop_server(proc)

    reference, how = reference_energy(manifest, session.run, runner.front_end(images[0]), runner.meter,
                                      half=session.choice.half)
    full_mj = reference.whole_model_mj
    energy_mean = {k: float(np.mean([getattr(r.energy, k) for r in results]))
                   for k in ("device_mj", "radio_mj", "server_mj", "total_mj")}
    energy_ratio = reference.ratio(len(results), sum(r.energy.radio_mj for r in results),
                                   sum(r.energy.server_mj for r in results), len(results))
    decided = np.array([r.decided_on for r in results])
    pred = np.array([r.label for r in results])
    offloaded = decided == "server"
    bytes_sent = np.array([r.bytes_sent for r in results])
    guarantee = manifest.calibration.guarantee
    report = {
        "n_test": n,
        "accuracy_full_model": float((full_pred == labels).mean()),
        "accuracy_split": float((pred == labels).mean()),
        "accuracy_exit_head_only": float((exit_only_pred == labels).mean()),
        "exit_rate": float((decided == "device").mean()),
        "offload_rate": float(offloaded.mean()),
        "degraded_rate": float((decided == "degraded").mean()),
        "mean_bytes_per_request": float(bytes_sent.mean()),
        "mean_bytes_per_offload": float(bytes_sent[offloaded].mean()) if offloaded.any() else 0.0,
        "mean_tokens_per_offload": float(np.mean([r.tokens_sent for r, o in zip(results, offloaded) if o])) if offloaded.any() else 0.0,
        "bytes_fp32_all_tokens": fp32_bytes,
        "bytes_png_input": float(png.mean()),
        "device_ms_p50": p50([r.device_ms for r in results]),
        "full_model_local_ms_p50": p50(full_ms),
        "end_to_end_ms_p50": p50([r.latency_ms for r in results]),
        "end_to_end_offload_ms_p50": p50([r.latency_ms for r, o in zip(results, offloaded) if o]),
        "server_round_trip_ms_p50": p50([r.server_ms for r, o in zip(results, offloaded) if o and r.server_ms is not None]),
        "after_server_stop": {"n": len(after_stop),
                              "degraded_or_device": sum(r.decided_on in ("degraded", "device") for r in after_stop),
                              "answered": sum(r.label is not None for r in after_stop)},
        "energy_mj_per_request": energy_mean["total_mj"],
        "energy_mj_per_request_split": {k[:-3]: energy_mean[k] for k in ("device_mj", "radio_mj", "server_mj")},
        "energy_full_model_on_device_mj": full_mj,
        "energy_device_half_on_device_mj": reference.device_half_mj,
        "energy_ratio_to_full_model": energy_ratio,
        "energy_label": energy_label(energy_ratio),
        "energy_method": {"device": results[0].energy.method,
                          "reference": f"median of {reference.repeats}, device half and whole model alike ({how})"},
        "energy_profile": {"device": energy.device.name, "link": energy.link.name, "server": energy.server.name},
        "exit_threshold": manifest.exit_threshold,
        "guarantee": guarantee.to_json() if guarantee is not None else None,
        "audit": audit_state if audit_state is not None else {"off": audit_off},
        "audited_rate": float(np.mean([r.audited for r in results])),
        "selection": {"mass": manifest.selection.mass, "budget": manifest.selection.budget},
        "codec": {"encoding": manifest.codec.encoding, "compression": manifest.codec.compression,
                  "zstd_dictionary": "zstd_dictionary" in manifest.files},
        "threads": args.threads,
        "model": {"name": manifest.name, "version": manifest.version, "manifest_sha256": manifest.sha256},
        "wall_seconds": None,
    }
    report["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    report["guarantee_line"] = guarantee.summary() if guarantee is not None else "none recorded (an older model folder)"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"\nwrote {args.out}")
    return 0


def print_table(r: dict) -> None:
    rows = [
        ("test inputs", f"{r['n_test']}"),
        ("accuracy, full model (ORT, local)", f"{r['accuracy_full_model']:.4f}"),
        ("accuracy, split system (edge + server)", f"{r['accuracy_split']:.4f}"),
        ("decided on device (early exit)", f"{r['exit_rate']:.1%}"),
        ("offloaded to server", f"{r['offload_rate']:.1%}"),
        ("degraded (server failed)", f"{r['degraded_rate']:.1%}"),
        ("mean bytes per request", f"{r['mean_bytes_per_request']:.0f}"),
        ("mean bytes per offload", f"{r['mean_bytes_per_offload']:.0f} ({r['mean_tokens_per_offload']:.1f} tokens)"),
        ("bytes, all tokens fp32", f"{r['bytes_fp32_all_tokens']} ({r['bytes_fp32_all_tokens'] / max(r['mean_bytes_per_offload'], 1):.1f}x an offload)"),
        ("bytes, PNG input", f"{r['bytes_png_input']:.0f}"),
        ("device half p50 ms", f"{r['device_ms_p50']:.2f}"),
        ("full model local p50 ms", f"{r['full_model_local_ms_p50']:.2f}"),
        ("end to end p50 ms (all / offloaded)", f"{r['end_to_end_ms_p50']:.2f} / {r['end_to_end_offload_ms_p50']:.2f}"),
        ("after server stop: answered", f"{r['after_server_stop']['answered']}/{r['after_server_stop']['n']} (degraded or device)"),
        ("energy per request, mJ (device/radio/server)",
         f"{r['energy_mj_per_request']:.3f} ({' / '.join(f'{v:.3f}' for v in r['energy_mj_per_request_split'].values())})"),
        ("energy label (vs whole model on device)",
         f"{r['energy_label']} ({r['energy_ratio_to_full_model']:.2f} x {r['energy_full_model_on_device_mj']:.3f} mJ; "
         f"{r['energy_profile']['device'].split(' (')[0]}, {r['energy_profile']['link'].split(' (')[0]})"),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    print(f"  guarantee (Learn-then-Test on the calibration split): {r['guarantee_line']}")
    a = r["audit"]
    if "off" in a:
        print(f"  field audit: off ({a['off']})")
    else:
        from splitinfer.edge.audit import offload_rate_summary

        label_free = offload_rate_summary(a)
        print(f"  field audit: {a['audits']} audits ({100 * r['audited_rate']:.1f}% of inputs, counted in the bytes), "
              f"{a['disagreements']} disagreement(s) with the server (calibrated rate <= {a['calibrated_disagreement']:.4f}); "
              + (f"{label_free}; " if label_free else "")
              + f"{a['alarms']} drift alarm(s), false alarms <= {a['alpha']:g}")


if __name__ == "__main__":
    sys.exit(main())
