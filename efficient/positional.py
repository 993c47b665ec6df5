"""Absolute positional encodings added to token embeddings: sinusoidal, learned, or none."""

from __future__ import annotations

import math

import torch
from torch import nn

POSITIONAL = ("sinusoidal", "learned", "none")


def sinusoid_table(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """[n] positions (float) -> [n, dim]: PE[p, 2i] = sin(p / 10000^(2i/dim)), PE[p, 2i+1] = cos.

    Computed in float32 whatever the model dtype, so positions stay exact far beyond 2048.
    """
    inv_freq = torch.exp(torch.arange(0, dim, 2, device=positions.device) * (-math.log(10000.0) / dim))
    angles = positions.float()[:, None] * inv_freq[None, :]  # [n, dim/2]
    table = torch.stack([angles.sin(), angles.cos()], dim=-1)  # [n, dim/2, 2]: interleaved
    return table.flatten(-2)  # [n, dim]


class PositionalEncoding(nn.Module):
    """x [b, n, d] -> x + PE[start : start + n] (sinusoidal as in Vaswani et al. 2017, learned,
    or none); ``start`` > 0 when decoding after cached tokens."""

    def __init__(self, kind: str, d_model: int, max_len: int):
        super().__init__()
        if kind not in POSITIONAL:
            raise ValueError(f"unknown positional encoding {kind!r}; valid: {', '.join(POSITIONAL)}")
        self.kind, self.max_len = kind, max_len
        if kind == "learned":
            self.table = nn.Embedding(max_len, d_model)
            nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        stop = start + x.shape[1]
        if self.kind == "none":
            return x
        if self.kind == "learned":
            if stop > self.max_len:
                raise ValueError(f"position {stop - 1} is beyond the learned table ({self.max_len} positions)")
            return x + self.table.weight[start:stop]
        return x + sinusoid_table(torch.arange(start, stop, device=x.device), x.shape[-1]).to(x.dtype)
