"""The learned split bottleneck: the encoder ends the device half, the decoder starts the server half.

Applied per token, so pruning commutes with it: tokens (B, N, d) -> codes (B, N, w) on the device,
codes (B, T, w) -> tokens (B, T, d) on the server. Trained with the model (the built-in ViT's
``train``) or on a frozen backbone (the text recipe), through int8/int4 round trips of the codes.
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["Bottleneck"]


class Bottleneck(nn.Module):
    def __init__(self, dim: int, width: int):
        super().__init__()
        if not 1 <= width:
            raise ValueError(f"bottleneck width must be >= 1, got {width}")
        self.dim, self.width = dim, width
        self.encoder = nn.Linear(dim, width)
        self.decoder = nn.Sequential(nn.Linear(width, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., w)."""
        return self.encoder(tokens)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(..., w) -> (..., d)."""
        return self.decoder(codes)
