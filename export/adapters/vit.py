"""The built-in ViT (``splitinfer.export.model.SplitViT``) as one adapter among the others.

The model is used as it is: its exit head (``exit_norm``, ``exit_head``) serves as the exit head
when cutting at the split it was trained for, and each block is recomputed from its own
``norm1 / attn.qkv / attn.proj / norm2 / mlp`` modules, so outputs equal ``SplitViT``'s.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..model import SplitViT
from ..preprocess import builtin_preprocessing
from .base import SplittableModel, merge_heads, require, weighted_attention

__all__ = ["BuiltinViT"]


class _NativeExit(nn.Module):
    """tokens (B, N, d) -> logits (B, K) with SplitViT's own exit head on CLS."""

    def __init__(self, model: SplitViT):
        super().__init__()
        self.norm, self.head = model.exit_norm, model.exit_head

    def forward(self, x: torch.Tensor, key_weights=None) -> torch.Tensor:
        return self.head(self.norm(x[:, 0]))


class BuiltinViT(SplittableModel):
    input_kind = "image"
    task = "classification"

    def __init__(self, model: SplitViT):
        super().__init__()
        for part in ("stem", "cls_token", "pos_embed", "blocks", "norm", "head"):
            require(model, part, "built-in ViT part")
        self.model = model
        self.cfg = model.cfg

    @property
    def dim(self) -> int:
        return self.cfg.dim

    @property
    def depth(self) -> int:
        return self.cfg.depth

    @property
    def output_dim(self) -> int:
        return self.cfg.num_classes

    def native_exit_head(self, split: int) -> nn.Module | None:
        return _NativeExit(self.model) if split == self.cfg.split else None

    def native_bottlenecks(self, split: int) -> dict:
        """The bottlenecks trained with the model, which belong to its own split."""
        if split != self.cfg.split:
            return {}
        return {int(w): b for w, b in self.model.bottlenecks.items()}

    def embed(self, inputs):
        image = inputs["image"]
        x = self.model.stem(image)  # (B, P, d)
        x = torch.cat([self.model.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.model.pos_embed
        return x, None

    def block(self, index, x, key_weights, rows=None):
        """rows=1: only CLS's query, residual and MLP (see :meth:`cls_block`)."""
        blk = self.model.blocks[index]
        B, N, d = x.shape
        h = blk.attn.heads
        q, k, v = blk.attn.qkv(blk.norm1(x)).reshape(B, N, 3, h, d // h).permute(2, 0, 3, 1, 4)
        if rows is not None:
            q, x = q[:, :, :rows], x[:, :rows]
        out, attn = weighted_attention(q, k, v, key_weights)
        x = x + blk.attn.proj(merge_heads(out))
        return x + blk.mlp(blk.norm2(x)), attn

    def cls_block(self, index, x, key_weights):
        return self.block(index, x, key_weights, rows=1)[0]

    def head(self, x, key_weights):
        return self.model.head(self.model.norm(x[:, 0]))

    def example_inputs(self, batch=2, length=None, seed=0):
        g = torch.Generator().manual_seed(seed)
        return {"image": torch.randn(batch, self.cfg.in_channels, self.cfg.image_size, self.cfg.image_size, generator=g)}

    def manifest_fields(self) -> dict:
        cfg = self.cfg
        return {
            "architecture": {"kind": "splitinfer-vit", **cfg.to_dict()},
            "preprocessing": builtin_preprocessing(cfg.image_size).to_dict(),
            "input": {"kind": "image", "channels": cfg.in_channels, "height": cfg.image_size, "width": cfg.image_size},
            "tokens": {"dim": cfg.dim, "grid": cfg.grid, "num_patches": cfg.num_patches,
                       "num_tokens": 1 + cfg.num_patches, "cls_position": 0},
        }
