"""Run inside the ONNX Runtime 1.16.3 virtual environment by test_ort116.py (not a test module).

    python ort116_probe.py MODEL_DIR INPUTS.npz OUT.npz [EXTRA.onnx ...]

Loads the model folder with the edge's own code (manifest, DeviceSession with its threading
settings, EdgeRunner deciding locally), runs both device halves, the server half and any extra
device-half files on the given inputs, and saves every output with the runtime's version.
"""
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from splitinfer.edge.runner import EdgeRunner
from splitinfer.edge.session import DeviceSession, SessionOptions, available_halves
from splitinfer.protos.manifest import load_manifest


def main(model_dir: str, inputs: str, out: str, *extra: str) -> None:
    data = np.load(inputs)
    x, tokens, mask, image = data["x"], data["tokens"], data["mask"], data["image"]
    manifest = load_manifest(Path(model_dir))
    results = {"onnxruntime_version": np.array(ort.__version__)}
    for half in available_halves(manifest):
        session = DeviceSession.from_manifest(manifest, SessionOptions(intra_op_threads=1), device_half=half)
        for name, value in zip(("exit_logits", "tokens", "importance"), session.run(x)):
            results[f"{half}.{name}"] = value
    server = ort.InferenceSession(str(manifest.server_path), providers=["CPUExecutionProvider"])
    results["server.logits"] = server.run(["logits"], {"tokens": tokens, "mask": mask})[0]
    for i, path in enumerate(extra):
        results[f"extra{i}.exit"] = DeviceSession(path).run(x).exit
    runner = EdgeRunner(DeviceSession.from_manifest(manifest), None, manifest)
    results["runner.label"] = np.array(runner.classify(image).label)
    np.savez(out, **results)


if __name__ == "__main__":
    main(*sys.argv[1:])
