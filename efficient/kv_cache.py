"""The key/value cache of autoregressive inference: a prefill of N tokens, then one token at a time.

Each attention layer of a ``ProjectedAttention`` backend takes a ``KVCache`` as its ``state``
(attention through a feature map keeps ``RunningSums`` instead, whose size does not grow):
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


class DecodingState:
    """What a layer keeps between decode steps: ``length`` tokens read so far (where the next
    tokens' positions start) and the bytes a step reads (``nbytes``)."""

    length: int

    def nbytes(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass
class RunningSums(DecodingState):
    """The constant-size decoding state of attention through a feature map (``linear``,
    ``performer``): sums over every token read so far, whatever their number.

    sums [b, n_kv_heads, D, d + 1]: sum_j phi(k_j) [v_j ; 1]^T (the last column is the normaliser
    sum_j phi(k_j)); ``extras`` holds a backend's own running quantities (Performer's key max).
    """

    sums: torch.Tensor
    length: int = 0
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def empty(cls, batch: int, n_kv_heads: int, features: int, head_dim: int, device=None, dtype=None) -> "RunningSums":
        return cls(torch.zeros(batch, n_kv_heads, features, head_dim + 1, device=device, dtype=dtype))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.sums, *self.extras.values()))

    def add(self, k_features: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> None:
        """Fold in t new tokens: k_features [b, hk, t, D], v [b, hk, t, d], key_padding_mask [b, t]."""
        if key_padding_mask is not None:
            k_features = k_features * key_padding_mask[:, None, :, None].to(k_features.dtype)
        values = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # [v ; 1]
        self.sums = self.sums + torch.einsum("bhtf,bhte->bhfe", k_features, values)
        self.length += k_features.shape[-2]


@dataclass
class KVCache(DecodingState):
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


def empty_caches(model: nn.Module, batch: int, capacity: int) -> list[DecodingState | None]:
    """One empty decoding state per block of ``model`` (an ``Encoder`` or a model holding one as
    ``encoder``), in its parameters' device and dtype: a KV cache for ``capacity`` tokens, or the
    backend's own (``empty_decoding_state``: running sums); None for a stateful layer
    (Transformer-XL keeps its own memory)."""
    encoder = getattr(model, "encoder", model)
    parameter = next(model.parameters())
    return [
        None
        if block.attention.capabilities.stateful
        else block.attention.empty_decoding_state(batch, capacity, parameter.device, parameter.dtype)
        for block in encoder.blocks
    ]


def cached_length(states) -> int:
    """How many tokens the layers' states already hold: where new tokens' positions start."""
    return next((s.length for s in states or () if isinstance(s, DecodingState)), 0)
