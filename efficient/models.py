"""Models over any attention backend: an encoder classifier and a causal language model.

Both take ``make_attention(layer_index) -> Attention`` so that backends whose parameters are
shared across layers (Linformer's layerwise projection) can hand every layer the same module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from efficient.attention import Attention
from efficient.blocks import TransformerBlock
from efficient.kv_cache import cached_length
from efficient.positional import PositionalEncoding


@dataclass
class ModelSize:
    d_model: int = 512
    n_heads: int = 8
    n_layers: int = 2
    d_ff: int = 2048
    dropout: float = 0.1
    norm: str = "pre"  # pre | post
    positional: str = "sinusoidal"  # sinusoidal | learned | none
    n_kv_heads: Optional[int] = None  # key/value heads (grouped-query attention); None: n_heads


class Encoder(nn.Module):
    """tokens [b, n] -> hidden states [b, n, d]: embedding + positions + blocks (+ final LN)."""

    def __init__(self, vocab_size: int, max_len: int, size: ModelSize, make_attention: Callable[[int], Attention]):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, size.d_model)
        nn.init.normal_(self.embed.weight, std=size.d_model**-0.5)
        self.embed_scale = size.d_model**0.5  # Vaswani et al.: embeddings times sqrt(d_model)
        self.drop = nn.Dropout(size.dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(make_attention(i), size.d_ff, size.dropout, size.norm) for i in range(size.n_layers)
        )
        # A backend with relative positions (Transformer-XL) gets no absolute encoding on top.
        relative = any(b.attention.capabilities.relative_positions for b in self.blocks)
        self.positions = PositionalEncoding("none" if relative else size.positional, size.d_model, max_len)
        self.ln_final = nn.LayerNorm(size.d_model) if size.norm == "pre" else nn.Identity()

    def forward(self, tokens, key_padding_mask=None, causal=False, states=None):
        """states: one per layer (or None): Transformer-XL memories, or KV caches (decoding: the
        tokens' positions go on after the cached ones); returns (hidden [b, n, d], new states)."""
        start = cached_length(states)
        h = self.drop(self.positions(self.embed(tokens) * self.embed_scale, start))
        states = states or [None] * len(self.blocks)
        new_states = []
        for block, state in zip(self.blocks, states):
            h, state = block(h, key_padding_mask, causal, state)
            new_states.append(state)
        return self.ln_final(h), new_states


class EncoderClassifier(nn.Module):
    """tokens [b, n] -> class logits [b, n_classes], mean-pooled over real tokens."""

    causal = False

    def __init__(self, vocab_size: int, n_classes: int, max_len: int, size: ModelSize, make_attention):
        super().__init__()
        self.encoder = Encoder(vocab_size, max_len, size, make_attention)
        self.head = nn.Linear(size.d_model, n_classes)

    def forward(self, tokens, key_padding_mask=None):
        h, _ = self.encoder(tokens, key_padding_mask, causal=False)  # [b, n, d]
        if key_padding_mask is None:
            pooled = h.mean(dim=1)
        else:
            real = key_padding_mask.unsqueeze(-1).to(h.dtype)  # [b, n, 1]
            pooled = (h * real).sum(dim=1) / real.sum(dim=1).clamp_min(1.0)
        return self.head(pooled)


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """Half-precision logits are upcast for the loss; float64 stays float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class CausalLM(nn.Module):
    """tokens [b, n] -> next-token logits [b, n, vocab]; output weights tied to the embedding."""

    causal = True

    def __init__(self, vocab_size: int, max_len: int, size: ModelSize, make_attention):
        super().__init__()
        self.encoder = Encoder(vocab_size, max_len, size, make_attention)
        self.lm_head = nn.Linear(size.d_model, vocab_size, bias=False)
        self.lm_head.weight = self.encoder.embed.weight

    def forward(self, tokens, key_padding_mask=None, states=None):
        h, states = self.encoder(tokens, key_padding_mask, causal=True, states=states)
        return self.lm_head(h), states

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits, _ = self(tokens)
        return nn.functional.cross_entropy(at_least_float32(logits).flatten(0, 1), targets.flatten())
