"""splitinfer beside the alternatives on the same test inputs, end to end through real servers on loopback.

    python benchmarks/compare.py [--image-model DIR] [--text-model DIR] [--n-test 2000] [--out results/compare.json]

Systems, per model:
  whole model on the device    device half + server half on every token, here; nothing sent
  full offload (codec)         the input itself (image: PNG, WebP lossless, the lowest WebP and JPEG
                               quality within 1 point of the whole model; text: UTF-8, zstd -19, zstd -19
                               with a dictionary trained on training texts) to a server that runs the whole
                               model (this script's own gRPC server, the same ONNX files)
  split, all tokens, fp32      Neurosurgeon-style: the device half, then every token in fp32 to splitinfer-serve
  early exit, all tokens, int8 SPINN/Edgent-style: the exit head answers when confident, else every token in int8
  splitinfer pN                each operating point of the manifest (exit, pruning, codec, zstd dictionary)
plus the oracle (offload exactly the inputs the exit head gets wrong and the whole model gets right,
at the default point's bytes per offload). Per system: accuracy, mean bytes per request, device ms p50, end-to-end ms p50/p95 and an
energy estimate (laptop profile, Wi-Fi). Each baseline is compared with the cheapest splitinfer point that
is at least as accurate. ``edge_overhead_ratio``: the edge's own work per offload (selection, encoding,
request serialization) over the device half's p50, measured in the same run. Writes JSON, a markdown
table and two plots (accuracy vs bytes, accuracy vs device ms) next to it.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import re
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("compare")
WHOLE_METHOD = "/splitinfer.bench.WholeModel/Infer"


# -- the whole-model server (full offload) ---------------------------------------------------------

def serve_whole_model(model_dir: Path, port_file: Path) -> int:
    """A gRPC server on 127.0.0.1 that decodes an input (image bytes, or text: raw, zstd or zstd with
    the dictionary it was started with) and runs the whole model; the answer is the class index."""
    import grpc
    import zstandard

    from splitinfer.edge.frontends import front_end_for
    from splitinfer.edge.session import DeviceSession
    from splitinfer.protos import graphs, load_manifest

    manifest = load_manifest(model_dir)
    front, device = front_end_for(manifest), DeviceSession.from_manifest(manifest)
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    server_half = ort.InferenceSession(str(manifest.server_path), opts, providers=["CPUExecutionProvider"])
    dict_path = model_dir / "text.zstd.dict"
    zdict = zstandard.ZstdCompressionDict(dict_path.read_bytes()) if dict_path.is_file() else None

    def infer(request: bytes, context) -> bytes:
        kind, body = request[:1], request[1:]  # text: a one-byte tag (u raw, z zstd, d zstd + dictionary)
        if manifest.input.kind == "image":
            body = request
            from PIL import Image

            raw = np.asarray(Image.open(io.BytesIO(body)).convert(front.spec.color))
        else:
            if kind == b"z":
                body = zstandard.ZstdDecompressor().decompress(body)
            elif kind == b"d":
                body = zstandard.ZstdDecompressor(dict_data=zdict).decompress(body)
            raw = body.decode("utf-8")
        tokens = device.run(front(raw), second_view=False).tokens
        out = server_half.run(None, {graphs.TOKENS: tokens, graphs.MASK: np.ones(tokens.shape[:2], bool)})[0]
        return int(out[0].argmax()).to_bytes(2, "little")

    handler = grpc.method_handlers_generic_handler("splitinfer.bench.WholeModel", {
        "Infer": grpc.unary_unary_rpc_method_handler(infer)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    port_file.write_text(str(port))
    server.wait_for_termination(timeout=3600)
    return 0


def start(cmd: list[str], pattern: str, timeout_s: float = 120.0) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        match = re.search(pattern, line)
        if match:
            return proc, match.group(1)
    proc.kill()
    raise RuntimeError(f"{cmd[2:4]} did not start")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- measuring ------------------------------------------------------------------------------------

def pct(values, q) -> float:
    return float(np.percentile(np.asarray(values, float), q)) if len(values) else float("nan")


def system_row(name: str, correct, nbytes, device_ms, e2e_ms, energy_mj, **extra) -> dict:
    return {"name": name, "accuracy": float(np.mean(correct)), "mean_bytes_per_request": float(np.mean(nbytes)),
            "device_ms_p50": pct(device_ms, 50), "e2e_ms_p50": pct(e2e_ms, 50), "e2e_ms_p95": pct(e2e_ms, 95),
            "energy_mj": float(np.mean(energy_mj)), **extra}


def whole_model_local(manifest, raws, labels, energy) -> tuple[dict, np.ndarray, np.ndarray]:
    """The whole model on the device: per-input correctness, and the exit head's."""
    import onnxruntime as ort

    from splitinfer.edge.energy import DeviceEnergyMeter
    from splitinfer.edge.frontends import front_end_for
    from splitinfer.edge.session import DeviceSession
    from splitinfer.protos import graphs

    front, device = front_end_for(manifest), DeviceSession.from_manifest(manifest)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    server = ort.InferenceSession(str(manifest.server_path), opts, providers=["CPUExecutionProvider"])
    meter = DeviceEnergyMeter(energy.device)
    ms, mj, full_ok, exit_ok = [], [], [], []
    for raw, y in zip(raws, labels):
        e0, t0 = meter.read(), time.perf_counter()
        out = device.run(front(raw), second_view=False)
        logits = server.run(None, {graphs.TOKENS: out.tokens, graphs.MASK: np.ones(out.tokens.shape[:2], bool)})[0]
        ms.append((time.perf_counter() - t0) * 1e3)
        mj.append(meter.mj_between(e0, meter.read()))
        full_ok.append(int(logits[0].argmax()) == y)
        exit_ok.append(int(out.exit[0].argmax()) == y)
    name = "whole model on the device" + (f" (the deployed halves, bottleneck {manifest.bottleneck})"
                                          if manifest.bottleneck else "")
    row = system_row(name, full_ok, np.zeros(len(raws)), ms, ms, mj)
    return row, np.asarray(full_ok), np.asarray(exit_ok)


def full_offload(name: str, payloads: list[bytes], labels, address: str, energy, encode_ms) -> dict:
    import grpc

    call = grpc.insecure_channel(address).unary_unary(WHOLE_METHOD)
    call(payloads[0], timeout=30)  # connect
    e2e, ok, mj = [], [], []
    for body, y, enc in zip(payloads, labels, encode_ms):
        t0 = time.perf_counter()
        answer = call(body, timeout=30)
        rtt = (time.perf_counter() - t0) * 1e3
        e2e.append(enc + rtt)
        ok.append(int.from_bytes(answer, "little") == y)
        mj.append(energy.estimate(energy.device_mj(enc / 1e3), len(body), len(answer), rtt / 1e3, rtt / 1e3).total_mj)
    return system_row(name, ok, [len(p) for p in payloads], encode_ms, e2e, mj)


def run_edge(name: str, runner, raws, labels, point=None) -> dict:
    results = [runner.run(raw, point) for raw in raws]
    degraded = sum(r.decided_on == "degraded" for r in results)
    if degraded:
        raise RuntimeError(f"{name}: {degraded} requests degraded: {next(r.error for r in results if r.error)}")
    ok = [r.label == y for r, y in zip(results, labels)]
    return system_row(name, ok, [r.bytes_sent for r in results], [r.device_ms for r in results],
                      [r.latency_ms for r in results], [r.energy.total_mj for r in results],
                      offload_rate=float(np.mean([r.decided_on == "server" for r in results])))


def edge_overhead(runner, raws) -> dict:
    """The edge's own work per offload (select, encode, build and serialize the request) against the
    device half, both p50 over the same inputs, interleaved."""
    dev, own = [], []
    for raw in raws:
        inputs = runner.front_end(raw)
        t0 = time.perf_counter()
        out = runner.session.run(inputs)
        t1 = time.perf_counter()
        runner.build_request(out.tokens[0], out.importance[0], "0" * 32).SerializeToString()
        t2 = time.perf_counter()
        dev.append(t1 - t0)
        own.append(t2 - t1)
    return {"device_half_ms_p50": pct(dev, 50) * 1e3, "edge_work_ms_p50": pct(own, 50) * 1e3,
            "edge_overhead_ratio": pct(own, 50) / pct(dev, 50)}


# -- baselines per input kind ---------------------------------------------------------------------

def image_codecs(images: np.ndarray, target_acc: float, whole_ok_of) -> list[tuple[str, list[bytes], list[float]]]:
    """PNG, WebP lossless, and the lowest WebP / JPEG quality whose accuracy (whole model on the
    decoded images) stays within 1 point of ``target_acc``; each as (name, payloads, encode ms)."""
    from PIL import Image

    def encode(fmt: str, **kw):
        out, ms = [], []
        for img in images:
            t0 = time.perf_counter()
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format=fmt, **kw)
            ms.append((time.perf_counter() - t0) * 1e3)
            out.append(buf.getvalue())
        return out, ms

    chosen = [("PNG", *encode("PNG", optimize=True)), ("WebP lossless", *encode("WEBP", lossless=True))]
    for fmt, qualities in (("WEBP", (10, 20, 30, 40, 50, 70, 90)), ("JPEG", (10, 20, 30, 50, 70, 90))):
        for q in qualities:  # cheapest first: the first quality that keeps the accuracy
            payloads, ms = encode(fmt, quality=q)
            decoded = [np.asarray(Image.open(io.BytesIO(p)).convert("L" if img.ndim == 2 else "RGB"))
                       for p, img in zip(payloads, images)]
            if whole_ok_of(decoded).mean() >= target_acc - 0.01:
                chosen.append((f"{'WebP' if fmt == 'WEBP' else 'JPEG'} q{q}", payloads, ms))
                break
    return chosen


def text_codecs(texts: list[str], train_texts: list[str], tokenizer, model_dir: Path):
    """UTF-8, zstd -19, zstd -19 with a dictionary trained on training texts: of the part the model reads."""
    import zstandard

    read = [tokenizer.truncated_text(t).encode("utf-8") for t in texts]
    dictionary = zstandard.train_dictionary(16384, [tokenizer.truncated_text(t).encode("utf-8") for t in train_texts])
    (model_dir / "text.zstd.dict").write_bytes(dictionary.as_bytes())
    plain, with_dict = zstandard.ZstdCompressor(level=19), zstandard.ZstdCompressor(level=19, dict_data=dictionary)
    out = []
    for name, tag, fn in (("UTF-8", b"u", lambda b: b), ("zstd -19", b"z", plain.compress),
                          ("zstd -19 + dictionary", b"d", with_dict.compress)):
        payloads, ms = [], []
        for b in read:
            t0 = time.perf_counter()
            payloads.append(tag + fn(b))
            ms.append((time.perf_counter() - t0) * 1e3)
        out.append((name, payloads, ms))
    return out


# -- one model ------------------------------------------------------------------------------------

def compare_model(kind: str, model_dir: Path, raws, labels, energy, train_texts=None) -> dict:
    from splitinfer.edge.runner import EdgeRunner
    from splitinfer.edge.session import DeviceSession
    from splitinfer.edge.transport import GrpcTransport
    from splitinfer.protos import CodecConfig, load_manifest

    manifest = load_manifest(model_dir)
    labels = np.asarray(labels)
    whole, full_ok, exit_ok = whole_model_local(manifest, raws, labels, energy)
    systems = [whole]
    serve, address = start([sys.executable, "-m", "splitinfer.cloud.cli", "--model", str(model_dir), "--host",
                            "127.0.0.1", "--port", "0", "--threads", "1"], r"listening on (\S+)")
    try:
        session = DeviceSession.from_manifest(manifest)
        with GrpcTransport(address, timeout_s=10.0) as transport:
            def runner(**kw):
                r = EdgeRunner(session, transport, manifest, energy=energy, **kw)
                r.run(raws[0])  # connect and warm up
                return r

            budget = max(1, manifest.num_tokens - 1)  # every token
            systems.append(run_edge("split, all tokens, fp32 (Neurosurgeon-style)",
                                    runner(codec=CodecConfig("fp32", "none"), exit_threshold=2.0, mass=1.0,
                                           budget=budget), raws, labels))
            systems.append(run_edge("early exit, all tokens, int8 (SPINN/Edgent-style)",
                                    runner(codec=CodecConfig("int8", "auto"), mass=1.0, budget=budget), raws, labels))
            base = runner()
            for point in manifest.operating_points:
                row = run_edge(f"splitinfer {point.id}" + (" (default)" if point.id == manifest.default_operating_point
                                                           else ""), base, raws, labels, point)
                systems.append({**row, "operating_point": point.to_dict()})
            overhead = edge_overhead(base, raws[:500])
            default = next(s for s in systems if s["name"].endswith("(default)"))
    finally:
        stop(serve)
    port_file = model_dir / ".whole.port"
    port_file.unlink(missing_ok=True)
    codecs = (image_codecs(np.asarray(raws), whole["accuracy"], lambda imgs: whole_model_local(
        manifest, imgs, labels, energy)[1]) if kind == "image" else None)
    if kind == "text":
        from splitinfer.edge.frontends import front_end_for

        codecs = text_codecs(raws, train_texts, front_end_for(manifest).tokenizer, model_dir)
    whole_server = subprocess.Popen([sys.executable, __file__, "--serve-whole-model", str(model_dir),
                                     "--port-file", str(port_file)], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not port_file.is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        address = f"127.0.0.1:{port_file.read_text().strip()}"
        for name, payloads, ms in codecs:
            systems.insert(1 + len([s for s in systems if s["name"].startswith("full offload")]),
                           full_offload(f"full offload, {name}", payloads, labels, address, energy, ms))
    finally:
        stop(whole_server)
        port_file.unlink(missing_ok=True)
    splitinfer = [s for s in systems if s["name"].startswith("splitinfer")]
    for s in systems:
        if s["name"].startswith("splitinfer") or s["mean_bytes_per_request"] == 0:
            continue
        match = [p for p in splitinfer if p["accuracy"] >= s["accuracy"] - 1e-9]
        if match:
            best = min(match, key=lambda p: p["mean_bytes_per_request"])
            s["vs_splitinfer"] = {"point": best["name"], "splitinfer_bytes": best["mean_bytes_per_request"],
                                  "bytes_ratio": (s["mean_bytes_per_request"] / best["mean_bytes_per_request"]
                                                  if best["mean_bytes_per_request"] > 0 else None),
                                  "device_ms_ratio": s["device_ms_p50"] / best["device_ms_p50"]}
    # the oracle: offload exactly where the exit head is wrong and the whole model is right
    fixable = (~exit_ok) & full_ok
    oracle = {"accuracy": float(np.mean(exit_ok | fixable)), "offload_rate": float(fixable.mean()),
              "mean_bytes_per_request": float(fixable.mean() * default["mean_bytes_per_request"] /
                                              max(default["offload_rate"], 1e-9))}
    target = whole["accuracy"] - 0.01
    keeping = [s for s in systems if s["name"].startswith("full offload") and s["accuracy"] >= target]
    ok_points = [s for s in splitinfer if s["accuracy"] >= target]
    headline = {}
    if keeping and ok_points:
        best_codec = min(keeping, key=lambda s: s["mean_bytes_per_request"])
        best_point = min(ok_points, key=lambda s: s["mean_bytes_per_request"])
        headline = {"target_accuracy": target, "best_input_codec": best_codec["name"],
                    "best_input_codec_bytes": best_codec["mean_bytes_per_request"],
                    "splitinfer_point": best_point["name"], "splitinfer_bytes": best_point["mean_bytes_per_request"],
                    "bytes_ratio_splitinfer_over_codec": best_point["mean_bytes_per_request"] /
                    best_codec["mean_bytes_per_request"],
                    "device_ms_ratio_splitinfer_over_whole": best_point["device_ms_p50"] / whole["device_ms_p50"]}
    return {"model": manifest.name, "version": manifest.version, "n_test": len(raws), "systems": systems,
            "oracle": oracle, "edge_overhead_ratio": overhead["edge_overhead_ratio"], "edge_overhead": overhead,
            "at_whole_model_minus_1_point": headline}


# -- report ---------------------------------------------------------------------------------------

def markdown(report: dict) -> str:
    lines = []
    for key, r in report["models"].items():
        lines += [f"### {key}: {r['model']} ({r['n_test']} test inputs)", "",
                  "| system | accuracy | bytes/request | device ms p50 | e2e ms p50 | e2e ms p95 | energy mJ | bytes vs splitinfer |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for s in r["systems"]:
            vs = s.get("vs_splitinfer")
            if vs is None:
                ratio = "no splitinfer point as accurate" if not s["name"].startswith(("splitinfer", "whole")) else ""
            elif vs["bytes_ratio"] is None:
                ratio = f"{vs['point']} sends 0 B at this accuracy"
            else:
                ratio = f"{vs['bytes_ratio']:.1f}x ({vs['point']})"
            lines.append(f"| {s['name']} | {s['accuracy']:.4f} | {s['mean_bytes_per_request']:.1f} | "
                         f"{s['device_ms_p50']:.3f} | {s['e2e_ms_p50']:.3f} | {s['e2e_ms_p95']:.3f} | "
                         f"{s['energy_mj']:.3f} | {ratio} |")
        o = r["oracle"]
        lines += [f"| oracle (offload what the server fixes) | {o['accuracy']:.4f} | {o['mean_bytes_per_request']:.1f} | | | | | |",
                  "", f"edge overhead per offload: {r['edge_overhead_ratio']:.3f} x the device half "
                  f"({r['edge_overhead']['edge_work_ms_p50']:.3f} ms vs {r['edge_overhead']['device_half_ms_p50']:.3f} ms)", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(report["models"].items())
    fig, axes = plt.subplots(len(models), 2, figsize=(15, 4.5 * len(models)), dpi=110, squeeze=False)
    for row, (key, r) in enumerate(models):
        # baselines get a letter at their point and a line in the key beside the plots; splitinfer
        # points their operating point id (several baselines share one accuracy: names would overprint)
        codes = {s["name"]: chr(ord("A") + i) for i, s in enumerate(x for x in r["systems"]
                                                                   if not x["name"].startswith("splitinfer"))}
        for col, (field, label) in enumerate((("mean_bytes_per_request", "mean bytes per request (log)"),
                                              ("device_ms_p50", "device ms p50 (log)"))):
            ax = axes[row][col]
            for s in r["systems"]:
                x = max(s[field], 0.5 if field.startswith("mean") else 1e-3)
                ours = s["name"].startswith("splitinfer")
                ax.scatter([x], [s["accuracy"]], marker="o" if ours else "s", color="tab:blue" if ours else "tab:red",
                           s=30)
                text = s["name"].replace("splitinfer ", "").replace(" (default)", "*") if ours else codes[s["name"]]
                ax.annotate(text, (x, s["accuracy"]), fontsize=7, textcoords="offset points",
                            xytext=(3, 3) if ours else (-3, -9), color="tab:blue" if ours else "tab:red")
            ax.set_xscale("log")
            ax.set_xlabel(label + ("; 0 B at the left edge" if col == 0 else ""))
            ax.set_ylabel("accuracy (test)")
            ax.set_title(f"{key}: accuracy vs {'bytes' if col == 0 else 'device time'}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
        legend = "\n".join([f"{c}  {name}" for name, c in codes.items()] +
                           ["", "blue: splitinfer operating points", "* the default point"])
        axes[row][1].text(1.04, 1.0, legend, transform=axes[row][1].transAxes, va="top", fontsize=7)
    fig.tight_layout(rect=(0, 0, 0.78, 1))
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-model", type=Path, default=ROOT / "artifacts" / "model",
                   help="the built-in model folder (exported from the shipped checkpoint when absent)")
    p.add_argument("--text-model", type=Path, default=None, help="a BBC News text model folder (optional)")
    p.add_argument("--n-test", type=int, default=2000)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "compare.json")
    p.add_argument("--serve-whole-model", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--port-file", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_whole_model:
        return serve_whole_model(args.serve_whole_model, args.port_file)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from splitinfer.edge.energy import EnergyModel
    from splitinfer.export.data import make_split

    energy = EnergyModel.named("laptop", "wifi")
    if not (args.image_model / "manifest.json").is_file():
        from splitinfer.export.pipeline import export_checkpoint

        export_checkpoint(ROOT / "checkpoints" / "vit-cluttered-mnist.pt", args.image_model)
    t0 = time.perf_counter()
    images, labels = make_split("test", n=args.n_test)
    report = {"command": "python benchmarks/compare.py " + " ".join(argv or sys.argv[1:]), "energy_profile": "laptop, wifi",
              "models": {"image": compare_model("image", args.image_model, list(images), labels, energy)}}
    if args.text_model is not None:
        from splitinfer.export.text_data import load_bbcnews

        texts, text_labels, _ = load_bbcnews("test")
        train, _, _ = load_bbcnews("train")
        report["models"]["text"] = compare_model("text", args.text_model, list(texts), text_labels, energy, train)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    table = markdown(report)
    args.out.with_suffix(".md").write_text(table + "\n")
    plot(report, args.out.with_suffix(".png"))
    print(table)
    print(f"wrote {args.out}, {args.out.with_suffix('.md')}, {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
