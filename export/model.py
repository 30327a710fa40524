"""The built-in splittable ViT: one class per concept, cut at ``config.split`` blocks.

Shapes: B batch, P patches (grid**2), N = 1 + P tokens (CLS first), d = dim, h = heads.
The device half is ``embed -> blocks[:split] -> (exit head, CLS attention)``; the server half is
``blocks[split:] -> norm -> head`` over any subset of tokens, with a padding mask so requests with
different token counts batch together.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .bottleneck import Bottleneck

__all__ = ["ViTConfig", "SplitViT"]

MASKED_SCORE = -1e9  # added to attention scores of padded keys; exp() underflows to exactly 0


@dataclass(frozen=True)
class ViTConfig:
    image_size: int = 64
    in_channels: int = 1
    patch_size: int = 8
    dim: int = 128
    depth: int = 6
    heads: int = 4
    mlp_ratio: float = 4.0
    split: int = 2
    num_classes: int = 10
    stem: str = "conv"  # "conv": three stride-2 3x3 convs; "patch": one linear patch projection
    bottleneck_dims: tuple[int, ...] = ()  # learned split bottlenecks trained with the model (d -> d_c -> d)

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if not 1 <= self.split < self.depth:
            raise ValueError(f"split must be in [1, depth={self.depth}), got {self.split}")
        if self.stem not in ("conv", "patch"):
            raise ValueError(f"stem must be 'conv' or 'patch', got {self.stem!r}")
        if self.stem == "conv" and self.patch_size != 8:
            raise ValueError(f"the conv stem downsamples by 8; patch_size must be 8, got {self.patch_size}")
        object.__setattr__(self, "bottleneck_dims", tuple(int(w) for w in self.bottleneck_dims))
        for w in self.bottleneck_dims:
            if not 1 <= w < self.dim:
                raise ValueError(f"bottleneck dims must be in [1, dim={self.dim}), got {w}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    def to_dict(self) -> dict:
        return asdict(self)


class ConvStem(nn.Module):
    """(B, C, H, W) -> (B, P, d): three stride-2 convs, so each output cell covers one 8x8 patch."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        widths = [cfg.in_channels, cfg.dim // 4, cfg.dim // 2]
        layers: list[nn.Module] = []
        for cin, cout in zip(widths, widths[1:]):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.GELU()]
        layers.append(nn.Conv2d(widths[-1], cfg.dim, 3, stride=2, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten(2).transpose(1, 2)  # (B, d, g, g) -> (B, P, d)


class PatchStem(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_channels, cfg.dim, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, N, d), mask (B, N) bool, True = real token. Returns (B, N, d) and attention (B, h, N, N)."""
        B, N, d = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # (B, h, N, hs)
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(d // self.heads))  # (B, h, N, N)
        if mask is not None:
            scores = scores + (~mask)[:, None, None, :].to(scores.dtype) * MASKED_SCORE
        attn = scores.softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(B, N, d)
        return self.proj(out), attn


class MLP(nn.Module):
    def __init__(self, dim: int, ratio: float):
        super().__init__()
        hidden = int(dim * ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        y, attn = self.attn(self.norm1(x), mask)
        x = x + y
        x = x + self.mlp(self.norm2(x))
        return x, attn


class SplitViT(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.stem = ConvStem(cfg) if cfg.stem == "conv" else PatchStem(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.num_patches, cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.exit_norm = nn.LayerNorm(cfg.dim)
        self.exit_head = nn.Linear(cfg.dim, cfg.num_classes)
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)
        self.bottlenecks = nn.ModuleDict({str(w): Bottleneck(cfg.dim, w) for w in cfg.bottleneck_dims})
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def device_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """images (B, C, H, W) float, normalized -> exit logits (B, K), tokens (B, N, d), importance (B, P).

        importance is the CLS token's attention to each patch in the last device block, averaged
        over heads and renormalized over patches (each row sums to 1).
        """
        x = self.stem(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        attn = None
        for block in self.blocks[: self.cfg.split]:
            x, attn = block(x)
        cls_attn = attn[:, :, 0, 1:].mean(dim=1)  # (B, P)
        importance = cls_attn / cls_attn.sum(dim=-1, keepdim=True)
        exit_logits = self.exit_head(self.exit_norm(x[:, 0]))
        return exit_logits, x, importance

    def server_forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, N', d) with CLS at index 0, mask (B, N') bool (True = real) -> logits (B, K)."""
        x = tokens
        for block in self.blocks[self.cfg.split:]:
            x, _ = block(x, mask)
        return self.head(self.norm(x[:, 0]))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _, tokens, _ = self.device_forward(images)
        return self.server_forward(tokens)


    def bottleneck(self, width: int | None) -> Bottleneck | None:
        if width is None:
            return None
        if str(width) not in self.bottlenecks:
            raise ValueError(f"this model has no bottleneck of width {width}; trained: {list(self.cfg.bottleneck_dims)}")
        return self.bottlenecks[str(width)]


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
