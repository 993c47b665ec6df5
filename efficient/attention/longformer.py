"""``longformer``: a sliding window plus global tokens (Beltagy et al. 2020).

    query i sees key j  iff  |i - j| <= window / 2  or  j < global_tokens  or  i < global_tokens

``window`` is Longformer's (and Hugging Face's ``attention_window``): the whole span, so each
side holds window / 2 keys and a query sees window + 1 keys. The first ``global_tokens``
positions (a classifier's [CLS]) see every key and are seen by every query. Exact under that
mask, block by block (``sparse.SparseAttention``) in O(n (window + global_tokens)) memory; the
global rows are computed densely.

Against the paper and Hugging Face's ``LongformerSelfAttention``: both give the global tokens
their own query, key and value projections; here every position uses the layer's one set, so
that the backend is softmax attention under a mask and plugs into any model. Hugging Face marks
global tokens with a per-input ``global_attention_mask``; here they are the leading positions.
Dilation (the paper's character-level LM) is not implemented.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from efficient.attention.base import as_value, register
from efficient.attention.sliding_window import window_blocks, window_offsets
from efficient.attention.sparse import SparseAttention, SparseKernel
from efficient.bounds import Bound


@register
class LongformerAttention(SparseAttention):
    name = "longformer"
    option_bounds = {"window": Bound(2), "global_tokens": Bound(0), "block": Bound(1)}

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        dropout: float = 0.0,
        n_kv_heads: Optional[int] = None,
        *,
        window: int = 512,
        global_tokens: int = 1,
        block: int = 64,
        kernel: SparseKernel = SparseKernel.auto,
    ):
        super().__init__(d_model, n_heads, dropout, n_kv_heads)
        self.kernel = as_value(kernel)
        if window % 2:
            raise ValueError(
                f"longformer's window is the whole span of a query, split evenly on both sides: "
                f"it must be even, got {window}"
            )
        self.window, self.global_tokens, self.block = window, global_tokens, block

    def key_blocks(self, n_blocks: int, device) -> torch.Tensor:
        """The window's blocks, then the global tokens' blocks where the window does not hold them."""
        window = window_blocks(n_blocks, math.ceil(self.window // 2 / self.block), device)  # [c, K]
        n_global = min(math.ceil(self.global_tokens / self.block), n_blocks)
        globals_ = torch.arange(n_global, device=device).expand(n_blocks, -1)  # [c, G]
        held = (window[:, :, None] == globals_[:, None, :]).any(dim=1)
        return torch.cat([window, globals_.masked_fill(held, -1)], dim=1)

    def band_offsets(self, n_blocks: int) -> list[int]:
        return window_offsets(n_blocks, math.ceil(self.window // 2 / self.block))

    def visible(self, query_positions, key_positions, length):
        near = (query_positions - key_positions).abs() <= self.window // 2
        return near | (key_positions < self.global_tokens) | (query_positions < self.global_tokens)

    def global_queries(self, length: int) -> list[int]:
        return list(range(min(self.global_tokens, length)))

    @classmethod
    def pattern(cls, length: int, window: int = 512, global_tokens: int = 1, block: int = 64, **options):
        n_blocks = math.ceil(length / block)
        reach = min(math.ceil(window // 2 / block), n_blocks - 1)
        return block, 2 * reach + 1, min(math.ceil(global_tokens / block), n_blocks), min(global_tokens, length)
