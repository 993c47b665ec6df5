"""The key/value cache of autoregressive inference: a prefill of N tokens, then one token at a time.

Each attention layer of a ``ProjectedAttention`` backend takes a ``KVCache`` as its ``state``:
the new tokens' keys and values are written into it in place, then the new queries attend over
every cached key with the suite's bottom-right causal alignment (the last query sees every key).
Buffers are allocated once for ``capacity`` tokens, so a decode step reads the cache and writes
one row, never copies it. A Transformer-XL layer needs no such cache: its memory is one (the
paper's evaluation mode, where the memory holds the previous hidden states).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class KVCache:
    """keys, values [b, n_kv_heads, capacity, head_dim], filled up to ``length``."""

    keys: torch.Tensor
    values: torch.Tensor
    length: int = 0
    extras: dict[str, Any] = field(default_factory=dict)  # a backend's own decoding state (flex's block mask)

    @classmethod
    def empty(cls, batch: int, n_kv_heads: int, head_dim: int, capacity: int, device=None, dtype=None) -> "KVCache":
        """No token cached yet. The buffers are zeros, not uninitialised memory: a kernel that reads
        the whole buffer with the unfilled slots masked (flex) multiplies their values by zero
        probabilities, and garbage there (NaN, inf) would survive as NaN."""
        shape = (batch, n_kv_heads, capacity, head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    @property
    def capacity(self) -> int:
        return self.keys.shape[-2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [b, n_kv_heads, t, d] of the t newest tokens -> every cached key and value,
        [b, n_kv_heads, length + t, d] (views of the buffers)."""
        t = k.shape[-2]
        if self.length + t > self.capacity:
            raise ValueError(f"the KV cache holds {self.capacity} tokens: {self.length} cached + {t} new do not fit")
        self.keys[:, :, self.length : self.length + t] = k
        self.values[:, :, self.length : self.length + t] = v
        self.length += t
        return self.filled()

    def filled(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[:, :, : self.length], self.values[:, :, : self.length]

    def nbytes(self, length: int | None = None) -> int:
        """Bytes of keys and values for ``length`` tokens (default: those cached)."""
        b, heads, _, d = self.keys.shape
        return 2 * b * heads * (self.length if length is None else length) * d * self.keys.element_size()


def empty_caches(model: nn.Module, batch: int, capacity: int) -> list[KVCache | None]:
    """One empty cache per block of ``model`` (an ``Encoder`` or a model holding one as
    ``encoder``), in its parameters' device and dtype; None for a stateful layer (Transformer-XL
    keeps its own memory)."""
    encoder = getattr(model, "encoder", model)
    parameter = next(model.parameters())
    caches: list[KVCache | None] = []
    for block in encoder.blocks:
        attention = block.attention
        caches.append(None if attention.capabilities.stateful else KVCache.empty(
            batch, attention.n_kv_heads, attention.head_dim, capacity, parameter.device, parameter.dtype))
    return caches


def cached_length(states) -> int:
    """How many tokens the layers' caches already hold: where new tokens' positions start."""
    return next((s.length for s in states or () if isinstance(s, KVCache)), 0)
