"""timm ``VisionTransformer`` (ViT / DeiT configs) as a :class:`SplittableModel`, in the spirit of
ToMe's ``patch/timm.py``: the upstream module is used as it is, no fork.

Supported: a CLS token with absolute position embeddings that include it (``no_embed_class``
False), pre-norm ``Block``s (``norm1 -> attn.qkv -> attn.proj -> ls1``, ``norm2 -> mlp -> ls2``),
token pooling, ``norm`` then ``fc_norm`` then ``head``. Anything else (register or distillation
tokens, average or attention pooling, q/k norms, dynamic image size) is refused with a message
naming it. ``timm`` is imported only by :func:`load_timm_vit`.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from .base import SplittableModel, UnsupportedModelError, merge_heads, missing_parts, weighted_attention

__all__ = ["TimmViT", "load_timm_vit"]


def _is_identity(m) -> bool:
    return m is None or isinstance(m, nn.Identity)


class TimmViT(SplittableModel):
    input_kind = "image"
    task = "classification"

    def __init__(self, model: nn.Module):
        super().__init__()
        missing = missing_parts(model, [
            ("patch_embed", "patch embedding"), ("cls_token", "CLS token"), ("pos_embed", "absolute position embedding"),
            ("blocks", "transformer blocks"), ("norm", "final norm"), ("head", "classifier head")])
        if not missing:
            missing = missing_parts(model, [(f"blocks.0.{part}", what) for part, what in (
                ("attn.qkv", "fused qkv projection"), ("attn.proj", "attention output projection"),
                ("norm1", "pre-attention norm"), ("norm2", "pre-MLP norm"), ("mlp", "MLP"))])
        if missing:
            raise UnsupportedModelError(f"{type(model).__name__} is not a timm VisionTransformer the split "
                                        "supports; missing: " + ", ".join(missing))
        self.model = model
        self.check()

    def check(self) -> None:
        super().check()
        m = self.model
        refuse = []
        if getattr(m, "reg_token", None) is not None:
            refuse.append("register tokens (reg_token)")
        if getattr(m, "dist_token", None) is not None:
            refuse.append("a distillation token (dist_token; use a DeiT config without distillation)")
        if getattr(m, "no_embed_class", False):
            refuse.append("no_embed_class=True")
        if getattr(m, "dynamic_img_size", False):
            refuse.append("dynamic_img_size=True")
        if getattr(m, "global_pool", "token") != "token":
            refuse.append(f"global_pool={m.global_pool!r} (only 'token' pooling: the server half reads CLS)")
        if getattr(m, "attn_pool", None) is not None:
            refuse.append("attention pooling (attn_pool)")
        for name in ("norm_pre", "patch_drop"):
            if not _is_identity(getattr(m, name, None)):
                refuse.append(f"a non-identity {name}")
        for i, blk in enumerate(m.blocks):
            for part in ("q_norm", "k_norm", "norm"):
                if not _is_identity(getattr(blk.attn, part, None)):
                    refuse.append(f"blocks[{i}].attn.{part} (not an Identity)")
            if getattr(blk.attn, "gate", None) is not None:
                refuse.append(f"blocks[{i}].attn.gate")
            for part in ("norm1", "attn", "norm2", "mlp", "ls1", "ls2"):
                if not hasattr(blk, part):
                    refuse.append(f"blocks[{i}].{part} (a pre-norm timm Block)")
        if refuse:
            raise UnsupportedModelError(f"{type(m).__name__}: unsupported for splitting: " + "; ".join(sorted(set(refuse))))

    @property
    def dim(self) -> int:
        return int(self.model.cls_token.shape[-1])

    @property
    def depth(self) -> int:
        return len(self.model.blocks)

    @property
    def output_dim(self) -> int:
        head = self.model.head
        return int(head.out_features) if isinstance(head, nn.Linear) else self.dim

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(int(s) for s in self.model.patch_embed.img_size)

    @property
    def in_channels(self) -> int:
        return int(self.model.patch_embed.proj.in_channels)

    def embed(self, inputs):
        m = self.model
        x = m.patch_embed(inputs["image"])  # (B, P, d)
        x = torch.cat([m.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + m.pos_embed
        return x, None

    def block(self, index, x, key_weights, rows=None):
        """rows=1: only CLS's query, residual and MLP (see :meth:`cls_block`)."""
        blk = self.model.blocks[index]
        B, N, d = x.shape
        a = blk.attn
        q, k, v = a.qkv(blk.norm1(x)).reshape(B, N, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4)
        if rows is not None:
            q, x = q[:, :, :rows], x[:, :rows]
        out, attn = weighted_attention(q, k, v, key_weights, scale=a.scale)
        x = x + blk.ls1(a.proj(merge_heads(out)))
        return x + blk.ls2(blk.mlp(blk.norm2(x))), attn

    def cls_block(self, index, x, key_weights):
        return self.block(index, x, key_weights, rows=1)[0]

    def head(self, x, key_weights):
        m = self.model
        return m.head(m.fc_norm(m.norm(x[:, :1])[:, 0]))

    def example_inputs(self, batch=2, length=None, seed=0):
        g = torch.Generator().manual_seed(seed)
        return {"image": torch.randn(batch, self.in_channels, *self.image_size, generator=g)}

    def preprocessing(self):
        """timm's own eval transform for this model (resolve_data_config), as the edge applies it."""
        from timm.data import resolve_data_config

        from ...protos.preprocessing import ImagePreprocessing

        return ImagePreprocessing.from_timm(resolve_data_config({"input_size": (self.in_channels, *self.image_size)},
                                                                model=self.model))

    def manifest_fields(self) -> dict:
        m = self.model
        cfg = getattr(m, "pretrained_cfg", {}) or {}
        grid = tuple(int(g) for g in m.patch_embed.grid_size)
        h, w = self.image_size
        return {
            "architecture": {"kind": "timm-vit", "timm_name": cfg.get("architecture", type(m).__name__),
                             "dim": self.dim, "depth": self.depth, "heads": int(m.blocks[0].attn.num_heads),
                             "patch_size": [int(p) for p in m.patch_embed.patch_size]},
            "preprocessing": self.preprocessing().to_dict(),
            "input": {"kind": "image", "channels": self.in_channels, "height": h, "width": w},
            "tokens": {"dim": self.dim, "grid": list(grid), "num_patches": grid[0] * grid[1],
                       "num_tokens": 1 + grid[0] * grid[1], "cls_position": 0},
        }


def load_timm_vit(name: str, checkpoint: Path | None = None, num_classes: int | None = None, **kwargs) -> TimmViT:
    """``timm.create_model(name)`` (no download) with weights from a local checkpoint file, adapted.

    checkpoint: a state dict file (.pth / .pt / .safetensors) as timm's ``load_checkpoint`` reads;
    None keeps timm's random initialisation.
    """
    try:
        import timm
    except ImportError as exc:
        raise UnsupportedModelError(f"the timm adapter needs the timm package ({exc})") from exc
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise FileNotFoundError(f"timm checkpoint not found: {checkpoint}")
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    model = timm.create_model(name, pretrained=False, **kwargs)
    if checkpoint is not None:
        from timm.models import load_checkpoint

        load_checkpoint(model, str(checkpoint), strict=True)
    return TimmViT(model.eval())
