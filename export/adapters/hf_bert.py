"""Hugging Face BERT-family encoders (BERT, MiniLM, DistilBERT) as :class:`SplittableModel`s.

Read from a local folder (``config.json``, weights, ``tokenizer.json``); nothing is downloaded.
Absolute position embeddings, post-norm layers, CLS first. The head is what the folder says:
``*ForSequenceClassification`` gives logits (BERT: pooler + classifier; DistilBERT:
pre_classifier + classifier); a bare encoder gives a sentence embedding, pooled as its
sentence-transformers files say (``1_Pooling/config.json``: mean or CLS; ``modules.json`` with a
Normalize module: L2-normalised), mean pooling by default. Padding is a key mask everywhere.

A bare encoder given ``class_names`` becomes a classifier: a :class:`PooledClassifier` (LayerNorm
and a linear layer over the mean of the real tokens, the pooling the encoder was trained for) as
the final head, and the same kind of head as its exit head at any split. Both start untrained;
``splitinfer.export.text_finetune`` trains them.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import SplittableModel, UnsupportedModelError, merge_heads, require, split_heads, weighted_attention, weighted_mean

__all__ = ["HFEncoder", "PooledClassifier", "load_hf_encoder", "tokenize", "SUPPORTED_MODEL_TYPES", "TOKENIZER_FILE"]

SUPPORTED_MODEL_TYPES = ("bert", "distilbert")
TOKENIZER_FILE = "tokenizer.json"


class PooledClassifier(nn.Module):
    """tokens (B, N, d), key_weights (B, N) or None -> logits (B, K): LayerNorm, the mean of the
    real tokens, a linear layer. The final head of a bare encoder made a classifier, and its exit head."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, key_weights: torch.Tensor | None) -> torch.Tensor:
        return self.proj(weighted_mean(self.norm(x), key_weights))


class HFEncoder(SplittableModel):
    """model: a transformers BertModel / DistilBertModel or their ``ForSequenceClassification``.

    pooling: "mean" or "cls" (embedding models); normalize: L2-normalise the embedding.
    max_length: the longest input the edge sends (tokens, CLS and SEP included).
    class_names: make a bare encoder a classifier over these classes (a new, untrained
    :class:`PooledClassifier` head, ``class_head``); not for a folder that already has a classifier.
    """

    input_kind = "text"

    def __init__(self, model: nn.Module, pooling: str = "mean", normalize: bool = False,
                 max_length: int = 128, folder: Path | None = None, class_names: list[str] | None = None):
        super().__init__()
        config = getattr(model, "config", None)
        if config is None:
            raise UnsupportedModelError(f"{type(model).__name__} has no 'config' (not a transformers model)")
        self.model_type = getattr(config, "model_type", None)
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {self.model_type!r} is not supported; the text adapter handles {SUPPORTED_MODEL_TYPES}")
        if getattr(config, "position_embedding_type", "absolute") != "absolute":
            raise UnsupportedModelError(
                f"position_embedding_type {config.position_embedding_type!r}: only absolute position embeddings")
        if pooling not in ("mean", "cls"):
            raise UnsupportedModelError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.model, self.config = model, config
        self.folder = None if folder is None else Path(folder)
        base_name = "bert" if self.model_type == "bert" else "distilbert"
        self.encoder_model = getattr(model, base_name, model)
        emb = require(self.encoder_model, "embeddings", "token embeddings")
        for part in ("word_embeddings", "position_embeddings", "LayerNorm"):
            require(emb, part, "embedding part")
        if self.model_type == "bert":
            self.layers = require(self.encoder_model, "encoder.layer", "encoder layers")
            for part in ("attention.self.query", "attention.self.key", "attention.self.value",
                         "attention.output.dense", "attention.output.LayerNorm", "intermediate.dense",
                         "output.dense", "output.LayerNorm"):
                require(self.layers[0], part, "BERT layer part")
        else:
            self.layers = require(self.encoder_model, "transformer.layer", "transformer layers")
            for part in ("attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin",
                         "sa_layer_norm", "ffn.lin1", "ffn.lin2", "output_layer_norm"):
                require(self.layers[0], part, "DistilBERT layer part")
        self.classifier = getattr(model, "classifier", None)
        self.class_names = None if class_names is None else [str(c) for c in class_names]
        self.class_head = None
        if self.class_names is not None:
            if self.classifier is not None:
                raise UnsupportedModelError(
                    f"{type(model).__name__} already has a classifier; class_names is for a bare encoder")
            if len(set(self.class_names)) != len(self.class_names):
                raise ValueError(f"class_names must be unique, got {self.class_names}")
            self.class_head = PooledClassifier(self.dim, len(self.class_names))
        self.task = "classification" if self.classifier is not None or self.class_head is not None else "embedding"
        if self.classifier is not None:
            if self.model_type == "bert":
                require(self.encoder_model, "pooler.dense", "BERT pooler (the classifier reads it)")
            else:
                require(model, "pre_classifier", "DistilBERT pre_classifier")
        self.pooling, self.normalize_output = pooling, normalize
        limit = int(getattr(config, "max_position_embeddings", 512))
        if not 2 <= max_length <= limit:
            raise ValueError(f"max_length must be in [2, {limit}], got {max_length}")
        self.max_length = max_length
        self.heads = int(getattr(config, "num_attention_heads", getattr(config, "n_heads", 0)))

    @property
    def dim(self) -> int:
        return int(self.encoder_model.embeddings.word_embeddings.embedding_dim)

    @property
    def depth(self) -> int:
        return len(self.layers)

    @property
    def output_dim(self) -> int:
        if self.class_head is not None:
            return len(self.class_names)
        return int(self.classifier.out_features) if self.task == "classification" else self.dim

    def classes(self) -> list[str]:
        if self.task == "embedding":
            return []
        if self.class_names is not None:
            return list(self.class_names)
        id2label = getattr(self.config, "id2label", None) or {}
        return [str(id2label.get(i, id2label.get(str(i), i))) for i in range(self.output_dim)]

    def embed(self, inputs):
        ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        emb = self.encoder_model.embeddings
        positions = torch.arange(ids.shape[1], device=ids.device)[None, :]
        x = emb.word_embeddings(ids) + emb.position_embeddings(positions)
        if self.model_type == "bert":
            x = x + emb.token_type_embeddings(torch.zeros_like(ids))
        return emb.LayerNorm(x), attention_mask.to(x.dtype)

    def block(self, index, x, key_weights):
        layer = self.layers[index]
        if self.model_type == "bert":
            sa = layer.attention.self
            q, k, v = (split_heads(lin(x), self.heads) for lin in (sa.query, sa.key, sa.value))
            out, attn = weighted_attention(q, k, v, key_weights)
            y = layer.attention.output.LayerNorm(layer.attention.output.dense(merge_heads(out)) + x)
            z = layer.output.dense(layer.intermediate.intermediate_act_fn(layer.intermediate.dense(y)))
            return layer.output.LayerNorm(z + y), attn
        sa = layer.attention
        q, k, v = (split_heads(lin(x), self.heads) for lin in (sa.q_lin, sa.k_lin, sa.v_lin))
        out, attn = weighted_attention(q, k, v, key_weights)
        y = layer.sa_layer_norm(sa.out_lin(merge_heads(out)) + x)
        z = layer.ffn.lin2(layer.ffn.activation(layer.ffn.lin1(y)))
        return layer.output_layer_norm(z + y), attn

    def native_exit_head(self, split: int) -> nn.Module | None:
        """A classifier made from a bare encoder exits with a head like its final one (mean pooled)."""
        return PooledClassifier(self.dim, len(self.class_names)) if self.class_head is not None else None

    def head(self, x, key_weights):
        if self.class_head is not None:
            return self.class_head(x, key_weights)
        if self.task == "classification":
            cls = x[:, 0]
            if self.model_type == "bert":
                pooler = self.encoder_model.pooler
                return self.classifier(pooler.activation(pooler.dense(cls)))
            return self.classifier(F.relu(self.model.pre_classifier(cls)))
        out = x[:, 0] if self.pooling == "cls" else weighted_mean(x, key_weights)
        return F.normalize(out, dim=-1) if self.normalize_output else out

    def example_inputs(self, batch=2, length=None, seed=0):
        length = self.max_length if length is None else length
        g = torch.Generator().manual_seed(seed)
        vocab = int(self.encoder_model.embeddings.word_embeddings.num_embeddings)
        ids = torch.randint(1, vocab, (batch, length), generator=g)
        mask = torch.ones(batch, length, dtype=torch.int64)
        for i in range(1, batch):  # ragged: later rows are shorter, padded
            real = max(2, length - 3 * i)
            mask[i, real:] = 0
            ids[i, real:] = int(getattr(self.config, "pad_token_id", 0) or 0)
        return {"input_ids": ids, "attention_mask": mask}

    def manifest_fields(self) -> dict:
        text = {"kind": "text", "tokenizer": TOKENIZER_FILE, "max_length": self.max_length,
                "pad_id": int(getattr(self.config, "pad_token_id", 0) or 0)}
        out = {
            "architecture": {"kind": f"hf-{self.model_type}", "model_type": self.model_type,
                             "hf_class": type(self.model).__name__, "dim": self.dim, "depth": self.depth,
                             "heads": self.heads},
            "preprocessing": dict(text),
            "input": dict(text),
            "tokens": {"dim": self.dim, "num_tokens": self.max_length, "cls_position": 0, "variable_length": True},
        }
        if self.task == "embedding":
            out["output"] = {"kind": "embedding", "dim": self.output_dim, "pooling": self.pooling,
                             "normalize": self.normalize_output}
        return out


def _sentence_transformers_pooling(folder: Path) -> tuple[str, bool, int | None]:
    """(pooling, normalize, max_seq_length) from a sentence-transformers folder, else defaults."""
    pooling, normalize, max_len = "mean", False, None
    modules = folder / "modules.json"
    if modules.is_file():
        entries = json.loads(modules.read_text())
        normalize = any(str(e.get("type", "")).endswith("Normalize") for e in entries)
        for e in entries:
            if str(e.get("type", "")).endswith("Pooling"):
                cfg_path = folder / e.get("path", "") / "config.json"
                if cfg_path.is_file():
                    cfg = json.loads(cfg_path.read_text())
                    if cfg.get("pooling_mode_cls_token"):
                        pooling = "cls"
                    elif not cfg.get("pooling_mode_mean_tokens", True):
                        raise UnsupportedModelError(f"{cfg_path}: only mean or CLS pooling is supported")
    st_cfg = folder / "sentence_bert_config.json"
    if st_cfg.is_file():
        max_len = json.loads(st_cfg.read_text()).get("max_seq_length")
    return pooling, normalize, max_len


def load_hf_encoder(folder: Path, max_length: int | None = None, class_names: list[str] | None = None) -> HFEncoder:
    """A local Hugging Face folder -> HFEncoder (eval mode). Needs ``config.json``, the weights and
    ``tokenizer.json`` (the edge tokenizes with it). Never touches the network. class_names: make
    a bare encoder a classifier (see :class:`HFEncoder`)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a Hugging Face model folder: config.json not found")
    if not (folder / TOKENIZER_FILE).is_file():
        raise UnsupportedModelError(
            f"{folder} has no {TOKENIZER_FILE}: the edge needs a fast-tokenizer file (save one with "
            "AutoTokenizer.from_pretrained(...).save_pretrained(folder))")
    try:
        import transformers
    except ImportError as exc:
        raise UnsupportedModelError(f"the Hugging Face adapter needs the transformers package ({exc})") from exc
    config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{folder}: model_type {config.model_type!r} is not supported; the text adapter handles {SUPPORTED_MODEL_TYPES}")
    arch = (getattr(config, "architectures", None) or [""])[0]
    auto = transformers.AutoModelForSequenceClassification if arch.endswith("ForSequenceClassification") \
        else transformers.AutoModel
    model = auto.from_pretrained(str(folder), local_files_only=True).eval()
    pooling, normalize, st_max = _sentence_transformers_pooling(folder)
    limit = int(getattr(config, "max_position_embeddings", 512))
    max_length = max_length or min(st_max or limit, limit)
    if class_names is not None and auto is not transformers.AutoModel:
        raise UnsupportedModelError(f"{folder} is already a classifier ({arch}); class_names is for a bare encoder")
    return HFEncoder(model, pooling=pooling, normalize=normalize, max_length=max_length, folder=folder,
                     class_names=class_names).eval()


def tokenize(tokenizer_file: Path, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """texts -> {"input_ids", "attention_mask"} int64 (B, T), padded to the longest (T <= max_length),
    with the folder's own ``tokenizer.json`` (the same file the edge uses)."""
    from splitinfer.edge.frontends import TextTokenizer

    ids, mask = TextTokenizer(tokenizer_file, max_length).encode(list(texts))
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
