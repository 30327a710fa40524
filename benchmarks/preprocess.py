"""The edge's image preprocessing on this machine: medians per image, side by side with timm's own.

    python benchmarks/preprocess.py                          # writes results/preprocess.json
    python benchmarks/preprocess.py --repeats 2000 --out results/preprocess.json

Cases, interleaved round by round in one process:
- built-in model, 64x64 grayscale canvas already at size (the vectorized path), polarity "any"
  and "light_on_dark" (the border rule's cost);
- built-in model, a 300x451 grayscale photo (Pillow resize);
- DeiT-tiny (timm's eval transform: shorter side 248, bicubic, center crop 224), an RGB photo,
  with the edge's code and with ``timm.data.create_transform`` (when torch and timm are installed).
Prints a table (median microseconds per image, ratio to timm) and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1000, help="timed calls per case")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "preprocess.json")
    args = parser.parse_args(argv)

    import skimage.data
    from PIL import Image

    from splitinfer.edge.preprocess import preprocess
    from splitinfer.export.data import make_split
    from splitinfer.export.preprocess import builtin_preprocessing
    from splitinfer.protos.preprocessing import ImagePreprocessing

    deit_config = {"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406),
                   "std": (0.229, 0.224, 0.225), "crop_pct": 0.9, "crop_mode": "center"}
    builtin = builtin_preprocessing(64)
    any_polarity = ImagePreprocessing(**{**builtin.__dict__, "polarity": "any"})
    deit = ImagePreprocessing.from_timm(deit_config)
    canvas = make_split("test", n=1)[0][0]  # uint8 (64, 64)
    gray_photo = np.asarray(Image.fromarray(skimage.data.chelsea()).convert("L"))
    rgb_photo = skimage.data.chelsea()  # uint8 (300, 451, 3)

    cases = {
        "builtin_64x64_canvas_polarity_any": lambda: preprocess(canvas, any_polarity),
        "builtin_64x64_canvas_light_on_dark": lambda: preprocess(canvas, builtin),
        "builtin_300x451_photo_resized": lambda: preprocess(gray_photo, builtin),
        "deit_tiny_300x451_rgb_photo_edge": lambda: preprocess(rgb_photo, deit),
    }
    try:
        import torch
        from timm.data import create_transform

        torch.set_num_threads(1)  # as the edge: one thread (torch's spinning pool would slow the others)
        transform = create_transform(**deit_config, is_training=False)
        pil_photo = Image.fromarray(rgb_photo)
        cases["deit_tiny_300x451_rgb_photo_timm"] = lambda: transform(pil_photo)[None]
    except ImportError:
        print("timm not installed: its transform is not timed", file=sys.stderr)

    for fn in cases.values():  # warm up
        for _ in range(20):
            fn()
    times = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    medians = {name: float(np.median(t) * 1e6) for name, t in times.items()}
    timm_us = medians.get("deit_tiny_300x451_rgb_photo_timm")
    any_us = medians["builtin_64x64_canvas_polarity_any"]
    print(f"{'case':42s} {'median us':>10s}  ratio")
    for name, us in medians.items():
        base = timm_us if name.startswith("deit") and timm_us else any_us
        print(f"{name:42s} {us:10.1f}  {us / base:5.2f} (to {'timm' if base is timm_us else 'polarity any'})")
    result = {"repeats": args.repeats, "median_us": medians,
              "ratio_light_on_dark_to_any": medians["builtin_64x64_canvas_light_on_dark"] / any_us}
    if timm_us:
        result["ratio_edge_to_timm_rgb"] = medians["deit_tiny_300x451_rgb_photo_edge"] / timm_us
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
